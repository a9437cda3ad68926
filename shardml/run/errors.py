"""The run layer's error: the library's typed errors reworded in the config keys they came from.

Below ``shardml/run/`` an error names the argument it was given (``d_ff=65 is not divisible by
tensor=2``, ``subject="d_ff"``); only the run layer knows the schema, so only it can say which
key that was. :func:`keyed` wraps the config-driven calls and re-raises what escapes them as a
:class:`ConfigError` naming the keys::

    with keyed(cfg):                     # d_ff=65 ... tensor=2  ->  model.d_ff=65 ... mesh.tensor=2
        parts = build(cfg)

What to catch:

* ``shardml.ShardmlError``: any input that cannot work, raised before anything compiles, from the
  library (typed arguments) or the run layer (a config). The command line catches this one.
* ``shardml.ConfigError``: what the config-driven functions raise (``load_config``, ``validate``,
  the run harness under :func:`keyed`); the message names config keys. A reworded library error
  keeps its kind too: it is both a ``ConfigError`` and, say, a ``LayoutError``.
* ``LayoutError``, ``SettingError``, ``ModelError``, ``DataError`` (:mod:`shardml.core.errors`):
  one kind of problem, from either path.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from shardml.core.errors import DataError, LayoutError, ModelError, SettingError, ShardmlError
from shardml.run.schema import all_keys

# Library argument names that are not the name of the config field they come from.
ALIASES: dict[str, tuple[str, ...]] = {
    "stages": ("mesh.pipeline",),
    "min_size": ("federated.min_partition",),
    "passes": ("train.microbatches",),
    "pipeline_microbatches": ("pipeline.microbatches",),
    "members": ("population.size",),  # the library's count of members; mesh.members is the axis
}
# Field names held by two sections: the first is meant unless the config's values say otherwise.
PREFERRED = ("mesh.", "model.", "train.")
_NAME = re.compile(r"(?<![\w.\-'\"])([a-z][a-z0-9_]*)=")
_LITERAL = re.compile(r"[^\s;,)]*")
_SAME = re.compile(r"(=(\d+)) = \2\b(?! x)")  # "mesh.tensor=4 = 4" says 4 once
_PRODUCT = re.compile(r"(?<![\w.])([a-z][a-z0-9_]*(?: x [a-z][a-z0-9_]*)+) = ")  # "data x microbatches = 8 x 1"


class ConfigError(ShardmlError):
    """A config that cannot work; the message names the config keys (``model.d_ff=65``)."""


@functools.cache
def subject_keys() -> dict[str, tuple[str, ...]]:
    """Library argument name -> the config keys it can come from (fields by their own name, then
    :data:`ALIASES`); ambiguous names list the preferred key first."""
    table: dict[str, list[str]] = {}
    for key in all_keys():
        table.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    for name, keys in ALIASES.items():
        table.setdefault(name, []).extend(k for k in keys if k not in table[name])
    return {name: tuple(sorted(keys, key=_rank)) for name, keys in table.items()}


def _rank(key: str) -> int:
    return next((i for i, prefix in enumerate(PREFERRED) if key.startswith(prefix)), len(PREFERRED))


def _value_of(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part, None)
    return cfg


def _same(held: Any, value: Any) -> bool:
    """``value`` (or its text in a message) is what the config holds."""
    return held == value or isinstance(value, str) and value in (str(held), repr(held))


def key_of(name: str, value: Any = None, cfg: Any = None, keys: Mapping[str, str] | None = None) -> str | None:
    """The config key an argument ``name`` came from: ``keys`` first, then the schema; of two keys
    the one whose value in ``cfg`` is ``value``, else the preferred one. None for no key."""
    if keys and name in keys:
        return keys[name]
    found = subject_keys().get(name, ())
    if cfg is not None and value is not None and len(found) > 1:
        match = [k for k in found if _same(_value_of(cfg, k), value)]
        if len(match) == 1:
            return match[0]
    return found[0] if found else None


def reword(message: str, cfg: Any = None, keys: Mapping[str, str] | None = None,
           subject: str | None = None, value: Any = None) -> str:
    """``message`` with each ``name=`` that names a config field written as its key, and the names of
    a product (``data x microbatches = 8 x 1``) too; keyword arguments of code in the message
    (``replace(heads='tensor')``) stay as they are."""

    def one(match: re.Match) -> str:
        start, name, text = match.start(), match.group(1), match.string
        if start > 1 and text[start - 1] == "(" and text[start - 2].isalnum():
            return match.group(0)
        written = _LITERAL.match(text, match.end()).group(0)  # the value as the message writes it
        key = key_of(name, value if name == subject else written, cfg, keys)
        return f"{key}=" if key else match.group(0)

    def product(match: re.Match) -> str:
        names = match.group(1).split(" x ")
        return " x ".join(key_of(name, None, cfg, keys) or name for name in names) + " = "

    return _SAME.sub(r"\1", _NAME.sub(one, _PRODUCT.sub(product, message)))


class ConfigLayoutError(ConfigError, LayoutError):
    """A :class:`LayoutError` reworded in config keys."""


class ConfigSettingError(ConfigError, SettingError):
    """A :class:`SettingError` reworded in config keys."""


class ConfigModelError(ConfigError, ModelError):
    """A :class:`ModelError` reworded in config keys."""


class ConfigDataError(ConfigError, DataError):
    """A :class:`DataError` reworded in config keys."""


KEYED = {LayoutError: ConfigLayoutError, SettingError: ConfigSettingError, ModelError: ConfigModelError,
         DataError: ConfigDataError}


def _keyed_class(kind: type) -> type:
    """The :class:`ConfigError` that is also ``kind``'s kind (a ``LayoutError`` stays catchable as one)."""
    return next((KEYED[k] for k in kind.__mro__ if k in KEYED), ConfigError)


def keyed_error(err: ShardmlError, cfg: Any = None, keys: Mapping[str, str] | None = None) -> ConfigError:
    """``err`` as a :class:`ConfigError` whose message and ``subject`` name config keys."""
    if isinstance(err, ConfigError):
        return err
    key = key_of(err.subject, err.value, cfg, keys) if err.subject else None
    message = reword(str(err), cfg, keys, err.subject, err.value)
    return _keyed_class(type(err))(message, subject=key or err.subject, value=err.value)


@contextlib.contextmanager
def keyed(cfg: Any = None, keys: Mapping[str, str] | None = None) -> Iterator[None]:
    """Re-raises a :class:`ShardmlError` from inside as a :class:`ConfigError` naming the keys.

    Args:
      cfg: the run config the calls were given (tells apart keys of the same field name, e.g.
        ``train.microbatches`` and ``pipeline.microbatches``, by their values).
      keys: argument name -> key, for a call whose arguments the schema does not name.
    """
    try:
        yield
    except ShardmlError as err:
        if isinstance(err, ConfigError):
            raise
        raise keyed_error(err, cfg, keys).with_traceback(err.__traceback__) from None


def config_errors(fn: Callable) -> Callable:
    """Decorates a config-driven function (its first argument the run config): a
    :class:`ShardmlError` leaves it as a :class:`ConfigError` naming the keys (see :func:`keyed`)."""

    @functools.wraps(fn)
    def wrapper(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        with keyed(cfg):
            return fn(cfg, *args, **kwargs)

    return wrapper
