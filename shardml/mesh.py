"""The device mesh: named axes in canonical order, and CPU device emulation.

    emulate_cpu_devices(8)            # before JAX starts its backend
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from shardml.config import MESH_AXES, ConfigError, MeshConfig, resolve_mesh_sizes


def _backend_started() -> bool:
    # JAX offers no public query; the private registry is read defensively.
    try:
        from jax._src import xla_bridge

        return bool(getattr(xla_bridge, "_backends", {}))
    except Exception:  # pragma: no cover - layout of a future JAX
        return False


# XLA:CPU runs each emulated device's collectives on one shared thread pool, by default about one
# thread per device, and a device waiting in a collective's rendezvous holds a thread. When devices
# have several independent collectives ready they can start them in different orders; if every
# thread ends up blocked, the devices still to arrive find no thread and XLA aborts the process after
# 40 s. Two measures, both observed on jax 0.10.2 with 8 devices on 2 cores:
# - CPU_COLLECTIVE_FLAG turns off the concurrency-optimised scheduler, which let a device run an FSDP
#   all-gather beside a pipeline collective-permute (a circular pipeline x fsdp test aborted in 2 of
#   3 runs; with the flag, 0 of 7).
# - The flag alone is not enough: the executor still runs independent ready collectives at once. A
#   process compiling and running four variants of an fsdp=8 step aborted in 3 of 3 runs with the
#   flag and a pool of 8 threads (6 devices waiting in one all-gather, the rest in another); with
#   2 threads per device (NPROC, read when the backend starts) it finished in 2 of 2. bench_mfu's
#   100m config on data=2 x fsdp=2 x tensor=2 likewise aborted in 3 of 4 runs with 8 threads, 0 of 2
#   with 16. Step time at fsdp=8 measured the same with 16 threads as with 8 (32: ~6 % slower).
CPU_COLLECTIVE_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
THREADS_PER_DEVICE = 2


def avoid_cpu_collective_deadlock(devices: int | None = None) -> None:
    """Adds ``CPU_COLLECTIVE_FLAG`` to ``XLA_FLAGS`` and, for ``devices`` emulated devices (default:
    ``JAX_NUM_CPU_DEVICES``), sizes XLA:CPU's thread pool to ``THREADS_PER_DEVICE`` threads per
    device (``NPROC``), leaving any setting the user made alone.

    XLA reads both when JAX starts its backend, so call this before that.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {CPU_COLLECTIVE_FLAG}".strip()
    if devices is None and os.environ.get("JAX_NUM_CPU_DEVICES", "").isdigit():
        devices = int(os.environ["JAX_NUM_CPU_DEVICES"])
    if devices and devices > 1 and "NPROC" not in os.environ:
        os.environ["NPROC"] = str(max(THREADS_PER_DEVICE * devices, os.cpu_count() or 1))


def emulate_cpu_devices(n: int) -> None:
    """Makes JAX's CPU backend expose ``n`` devices, so every mesh axis can be exercised on one host.

    Must run before JAX initialises its backend (the first ``jax.devices()`` or array operation).
    ``JAX_NUM_CPU_DEVICES=n`` in the environment does the same without code.

    It also sets ``CPU_COLLECTIVE_FLAG`` and a larger thread pool (see
    ``avoid_cpu_collective_deadlock``): without them, XLA:CPU can deadlock when several emulated
    devices run collectives at once.

    Raises:
      RuntimeError: if the backend has already started with another device count.
    """
    import jax

    if n <= 0:
        raise ConfigError(f"cpu devices={n} must be positive")
    if _backend_started():
        have = len(jax.devices("cpu"))
        if have == n:
            return
        raise RuntimeError(
            f"cannot emulate {n} CPU devices: JAX's backend already started with {have}. Call "
            f"shardml.emulate_cpu_devices({n}) before any JAX operation (first thing in the notebook "
            f"or script), or set JAX_NUM_CPU_DEVICES={n} in the environment before Python starts"
        )
    avoid_cpu_collective_deadlock(n)
    jax.config.update("jax_num_cpu_devices", n)


def accelerator_plugin_installed() -> bool:
    """True when a GPU or TPU plugin for JAX is importable (checked without starting the backend)."""
    names = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")
    return any(importlib.util.find_spec(name) is not None for name in names)


def default_cpu_devices() -> int | None:
    """How many CPU devices the command line emulates when not told: 8 on a CPU-only machine.

    None when the user already chose (``JAX_NUM_CPU_DEVICES``) or an accelerator is present.
    """
    if os.environ.get("JAX_NUM_CPU_DEVICES") or accelerator_plugin_installed():
        return None
    if os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0] not in ("", "cpu"):
        return None
    return 8


def make_mesh(
    sizes: MeshConfig | Mapping[str, int] | None = None,
    devices: Sequence | None = None,
):
    """Builds a ``jax.sharding.Mesh`` with all five canonical axes (size 1 where unused).

    Args:
      sizes: axis sizes by name, a ``MeshConfig``, or None (all devices on ``data``); ``-1`` fills.
      devices: the devices to use (default: all of ``jax.devices()``).

    Example:
      >>> mesh = make_mesh({"data": -1})
      >>> mesh.axis_names
      ('members', 'pipeline', 'data', 'fsdp', 'tensor')
    """
    import jax

    devices = list(devices if devices is not None else jax.devices())
    if sizes is None:
        sizes = {"data": -1}
    if isinstance(sizes, MeshConfig):
        config = sizes
    else:
        unknown = set(sizes) - set(MESH_AXES)
        if unknown:
            raise ConfigError(f"unknown mesh axes {sorted(unknown)}; axes are {', '.join(MESH_AXES)}")
        config = MeshConfig(**{name: sizes.get(name, 1) for name in MESH_AXES})
    resolved = resolve_mesh_sizes(config, len(devices))
    shape = tuple(resolved[name] for name in MESH_AXES)
    if len(devices) == len(jax.devices()) and len(devices) > 1:
        # Lets JAX order devices for the physical topology (ICI rings on TPU).
        try:
            return jax.make_mesh(shape, MESH_AXES, devices=devices,
                                 axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
        except Exception:
            pass
    grid = np.array(devices[: math.prod(shape)], dtype=object).reshape(shape)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def describe(mesh) -> str:
    """One line: ``8 cpu devices: data=2 x fsdp=2 x tensor=2``."""
    used = [f"{name}={size}" for name, size in mesh.shape.items() if size > 1] or ["one device"]
    kind = mesh.devices.flat[0].platform
    return f"{mesh.devices.size} {kind} device(s): {' x '.join(used)}"


def initialize_distributed(**kwargs) -> None:
    """Multi-host start: a thin call of ``jax.distributed.initialize`` (arguments passed through)."""
    import jax

    jax.distributed.initialize(**kwargs)
