"""Typed settings with their valid ranges declared beside the field, checked in one place.

    @dataclasses.dataclass(frozen=True)
    class OptimConfig:
        lr: float = setting(3e-3, above=0.0)

    check_settings(OptimConfig(lr=-1.0))   # SettingError: lr=-1.0 must be > 0.0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from shardml.core.errors import SettingError


def setting(default: Any, *, minimum: float | None = None, above: float | None = None,
            maximum: float | None = None, below: float | None = None, choices: Iterable[str] | None = None,
            hint: str = "") -> Any:
    """A dataclass field whose value must lie in a range (``minimum <= x``, ``above < x``,
    ``x <= maximum``, ``x < below``) or among ``choices``; ``hint`` is added to the error."""
    bounds = {"minimum": minimum, "above": above, "maximum": maximum, "below": below,
              "choices": tuple(choices) if choices is not None else None, "hint": hint}
    return dataclasses.field(default=default, metadata={"shardml": bounds})


def _violation(value: Any, bounds: dict) -> str | None:
    if bounds["choices"] is not None:
        return None if value in bounds["choices"] else f"is not one of {', '.join(map(str, bounds['choices']))}"
    for key, test, words in (("minimum", lambda v, b: v >= b, ">="), ("above", lambda v, b: v > b, ">"),
                             ("maximum", lambda v, b: v <= b, "<="), ("below", lambda v, b: v < b, "<")):
        if bounds[key] is not None and not test(value, bounds[key]):
            return f"must be {words} {bounds[key]}"
    return None


def check_settings(obj: Any, prefix: str = "") -> None:
    """Checks every field of a settings dataclass (and nested ones) against its declared range.

    Fields of nested dataclasses are named by their path (``prefix.field``), so a caller that
    passes a whole tree of settings reads which one was bad.

    Raises:
      SettingError: naming the first bad field, its value, the range and the hint (``subject``
        is that field's path).
    """
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        key = f"{prefix}.{field.name}" if prefix else field.name
        if dataclasses.is_dataclass(value):
            check_settings(value, key)
            continue
        bounds = field.metadata.get("shardml")
        if bounds is None:
            continue
        problem = _violation(value, bounds)
        if problem:
            hint = f"; {bounds['hint']}" if bounds["hint"] else ""
            raise SettingError(f"{key}={value!r} {problem}{hint}", subject=key, value=value)
