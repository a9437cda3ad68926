"""The one error type for input that cannot work, raised before anything compiles."""


class ConfigError(ValueError):
    """A value that cannot work; the message names the value and the fix.

    The command line turns it into exit status 2 without a traceback.
    """
