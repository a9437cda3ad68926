"""Layouts as a test writes them (``"data=2 x tensor=2"``, ``"fsdp=4,tensor=2"``, ``{"fsdp": 4}``),
and meshes of them on the first devices they need.

    parse_layout("data=2 x fsdp=2 x tensor=2")   # {'data': 2, 'fsdp': 2, 'tensor': 2}
    mesh = mesh_of("fsdp=4", jax.devices())       # the first 4 devices
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from shardml.core.errors import ConfigError
from shardml.core.mesh import MESH_AXES, layout_name, make_mesh

Layout = str | Mapping[str, int]


def parse_layout(layout: Layout | None) -> dict[str, int]:
    """Axis sizes of a layout: a dict, a ``jax.sharding.Mesh``, or text such as ``"data=2 x tensor=4"``
    (separators ``x``, ``×``, ``,`` or spaces; ``"one device"`` is ``{}``). None: ``{"data": -1}``.

    Raises:
      ConfigError: an unknown axis or a size that is not a number.
    """
    if layout is None:
        return {"data": -1}
    if hasattr(layout, "shape") and hasattr(layout, "axis_names"):  # a Mesh
        return {name: int(size) for name, size in layout.shape.items() if size > 1}
    if isinstance(layout, Mapping):
        sizes = {str(k): int(v) for k, v in layout.items()}
    else:
        text = str(layout).strip()
        if text in ("", "one device"):
            return {}
        sizes = {}
        for part in re.split(r"[\s,]+", re.sub(r"\s*=\s*", "=", text.replace("×", " x "))):
            if part in ("", "x"):
                continue
            match = re.fullmatch(r"(\w+)=(-?\d+)", part)
            if not match:
                raise ConfigError(f"cannot read layout {layout!r}: write it as 'data=2 x tensor=2' or a dict of sizes")
            sizes[match.group(1)] = int(match.group(2))
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"layout {layout!r} names unknown mesh axes {unknown}; the axes are {', '.join(MESH_AXES)}")
    return sizes


def mesh_of(layout: Layout | None, devices: Sequence[Any] | None = None):
    """A mesh of ``layout`` on the first devices it needs (all of ``devices`` when an axis is -1).

    Raises:
      ConfigError: the layout needs more devices than there are.
    """
    import jax

    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_layout(layout)
    if any(v == -1 for v in sizes.values()):
        return make_mesh(sizes, devices)
    needed = math.prod(sizes.values()) if sizes else 1
    if needed > len(devices):
        raise ConfigError(f"layout {layout_name(sizes)} needs {needed} devices but {len(devices)} are available; "
                          f"ask the shardml pytest plugin for more (shardml_cpu_devices = {needed})")
    return make_mesh(sizes or {"data": 1}, devices[:needed])
