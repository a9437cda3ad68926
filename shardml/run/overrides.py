"""From nested dicts and ``key=value`` strings to a :class:`~shardml.run.schema.Config`: every key
known, every value of its field's type, so a typo fails before anything is built.

    cfg = apply_overrides(Config(), ["mesh.data=2", "optim.lr=1e-3"])
    cfg = from_dict({"train": {"steps": 5}}, base=cfg)
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

import yaml

from shardml.run.errors import ConfigError
from shardml.run.schema import Config, all_keys, field_key
from shardml.run.search import move_search


def _unknown_key(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, all_keys(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else f"; valid keys: {', '.join(all_keys())}"
    return ConfigError(f"unknown config key '{key}'{hint}", subject=key)


def _coerce(key: str, value: Any, typ: type) -> Any:
    """Checks ``value`` against the field type; ints are accepted where floats are expected."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:  # YAML 1.1 reads '3e-3' as a string
            return float(value)
        except ValueError:
            pass
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a directory named 2024, a corpus path given as a number
    if typ is dict and isinstance(value, dict):
        return dict(value)
    if isinstance(value, bool) and typ is not bool or not isinstance(value, typ):
        raise ConfigError(f"config key '{key}' expects {typ.__name__}, got {type(value).__name__} {value!r}",
                          subject=key, value=value)
    return value


def from_dict(data: dict, cls=Config, prefix: str = "", base: Any = None) -> Any:
    """Builds ``cls`` from a nested dict, starting from ``base`` (defaults if None).

    Raises:
      ConfigError: an unknown key, a value of the wrong type, a section that is not a mapping.
    """
    base = base if base is not None else cls()
    if cls is Config and isinstance(data, dict):
        data = move_search(data, base)
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}",
                          subject=prefix.rstrip(".") or None, value=data)
    types = {field_key(name): (name, typ) for name, typ in typing.get_type_hints(cls).items()}
    changes = {}
    for key_name, value in data.items():
        key = prefix + key_name
        if key_name not in types:
            raise _unknown_key(key)
        name, typ = types[key_name]
        if dataclasses.is_dataclass(typ):
            changes[name] = from_dict(value, typ, key + ".", getattr(base, name))
        else:
            changes[name] = _coerce(key, value, typ)
    return dataclasses.replace(base, **changes)


def parse_override(item: str) -> dict:
    """``"mesh.data=2"`` as a nested dict ``{"mesh": {"data": 2}}``; the value read as a YAML scalar."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value (e.g. mesh.data=2)", subject=item)
    key, raw = item.split("=", 1)
    key = key.strip()
    if key not in all_keys():
        raise _unknown_key(key)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # a string YAML cannot read as a scalar (a path with ': ' in it, say)
    nested: dict = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Applies ``key=value`` strings; values are parsed as YAML scalars (``2``, ``1e-3``, ``bf16``)."""
    for item in overrides:
        cfg = from_dict(parse_override(item), base=cfg)
    return cfg
