"""The device mesh: seven named axes in one canonical order, and their sizes.

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    layout_name(mesh.shape)   # 'data=2 x fsdp=2 x tensor=2'
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from shardml.core.errors import LayoutError, SettingError

# The canonical axes, outermost first. Every mesh has all seven (size 1 where unused), so shardings
# and rules never depend on which axes a layout happens to use. ``expert`` splits the experts of a
# mixture-of-experts layer (and the batch everywhere else); ``context`` splits the sequence of every
# activation (attention gathers the keys and values, or passes them round a ring); ``tensor`` stays
# innermost, the axis with the most traffic per step.
MESH_AXES = ("members", "pipeline", "data", "fsdp", "expert", "context", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device-mesh axis sizes, in the canonical order; ``-1`` fills the remaining devices."""

    members: int = 1
    pipeline: int = 1
    data: int = -1
    fsdp: int = 1
    expert: int = 1
    context: int = 1
    tensor: int = 1


def layout_name(sizes: Mapping[str, int], sep: str = " x ") -> str:
    """``'data=2 x tensor=4'``: the axes larger than 1, in canonical order (``'one device'`` if none)."""
    used = [f"{name}={sizes[name]}" for name in MESH_AXES if sizes.get(name, 1) > 1]
    return sep.join(used) or "one device"


def resolve_mesh_sizes(mesh: MeshConfig | Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Axis sizes with ``-1`` filled in; raises LayoutError if they cannot cover ``n_devices``.

    Example:
      >>> resolve_mesh_sizes({"data": -1, "tensor": 2}, 8)["data"]
      4
    """
    if isinstance(mesh, MeshConfig):
        sizes = dataclasses.asdict(mesh)
    else:
        unknown = sorted(set(mesh) - set(MESH_AXES))
        if unknown:
            raise SettingError(f"unknown mesh axes {unknown}; the axes are {', '.join(MESH_AXES)}", subject="sizes",
                               value=unknown)
        sizes = {name: int(mesh.get(name, 1)) for name in MESH_AXES}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise SettingError(f"{name}={size} must be a positive size, or -1 to fill the remaining devices",
                               subject=name, value=size)
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise SettingError(f"only one mesh axis may be -1, got {', '.join(n + '=-1' for n in fill)}",
                           subject=fill[0], value=-1)
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if n_devices % fixed:
            raise LayoutError(
                f"{fill[0]}=-1 cannot fill {n_devices} devices: the other axes multiply to {fixed}, "
                f"which does not divide {n_devices}; choose sizes whose product divides {n_devices}",
                subject=fill[0], value=-1)
        sizes[fill[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise LayoutError(
            f"mesh sizes ({layout_name(sizes) if fixed > 1 else 'all 1'}) multiply to {fixed} but {n_devices} "
            f"devices are available; make the product {n_devices}, or set one axis to -1 (e.g. data=-1)")
    return sizes


def make_mesh(sizes: MeshConfig | Mapping[str, int] | None = None, devices: Sequence | None = None):
    """Builds a ``jax.sharding.Mesh`` with all seven canonical axes (size 1 where unused).

    Args:
      sizes: axis sizes by name, a ``MeshConfig``, or None (all devices on ``data``); ``-1`` fills.
      devices: the devices to use (default: all of ``jax.devices()``).

    Example:
      >>> mesh = make_mesh({"data": -1})
      >>> mesh.axis_names
      ('members', 'pipeline', 'data', 'fsdp', 'expert', 'context', 'tensor')
    """
    import jax

    devices = list(devices if devices is not None else jax.devices())
    resolved = resolve_mesh_sizes(sizes if sizes is not None else {"data": -1}, len(devices))
    shape = tuple(resolved[name] for name in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == len(jax.devices()) and len(devices) > 1:
        # Lets JAX order devices for the physical topology (ICI rings on TPU).
        try:
            return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=auto)
        except Exception:
            pass
    grid = np.array(devices[: math.prod(shape)], dtype=object).reshape(shape)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)


def as_mesh(mesh_or_sizes, devices: Sequence | None = None):
    """A ``Mesh`` as given, or one built by :func:`make_mesh` from sizes (None: all devices on data)."""
    import jax

    if isinstance(mesh_or_sizes, jax.sharding.Mesh):
        return mesh_or_sizes
    return make_mesh(mesh_or_sizes, devices)


def describe(mesh) -> str:
    """One line: ``8 cpu device(s): data=2 x fsdp=2 x tensor=2``."""
    return f"{mesh.devices.size} {mesh.devices.flat[0].platform} device(s): {layout_name(mesh.shape)}"
