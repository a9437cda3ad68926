"""The errors of input that cannot work, raised before anything compiles.

Each layer below the run harness raises these with its own words: the argument it was given
(``subject``, e.g. ``"microbatches"`` or ``"d_ff"``) and the value, never a config key. The run
layer (:mod:`shardml.run.errors`) knows which key each subject came from and rewords the message
(``microbatches=0`` -> ``train.microbatches=0``) and raises it as ``shardml.ConfigError``; a
Python caller of the library sees the argument it passed. Catch :class:`ShardmlError` for any
input that cannot work, one of its subclasses for one kind of problem.

    raise LayoutError("d_ff=65 is not divisible by tensor=2 (parameter layers/w_up, dimension 1)",
                      subject="d_ff", value=65)
"""

from __future__ import annotations

from typing import Any


class ShardmlError(ValueError):
    """A value that cannot work; the message names the value and the fix.

    Attributes:
      subject: the argument or setting the value was given as (``"microbatches"``, ``"tensor"``),
        or None when the message names no single one.
      value: that value.

    The command line turns it into exit status 2 without a traceback.
    """

    def __init__(self, message: str, *, subject: str | None = None, value: Any = None):
        super().__init__(message)
        self.subject, self.value = subject, value


class LayoutError(ShardmlError):
    """A parameter, batch or sequence that a mesh layout cannot divide (names the parameter, its
    dimension and the mesh axes), or a layout that does not fit the devices."""


class SettingError(ShardmlError):
    """A setting outside its valid range or choices."""


class ModelError(ShardmlError):
    """A model that cannot be built or trained as asked (logical names, pipelining, shapes)."""


class DataError(ShardmlError):
    """Data that cannot feed the run (missing file, too few rows, wrong shapes or dtypes)."""


# The old name of the common base, kept only until no module imports it from here: the run
# layer's ``shardml.ConfigError`` (:mod:`shardml.run.errors`) is a subclass, raised with config keys.
ConfigError = ShardmlError
