"""Emulated CPU devices: how many the user asked for, setting them up before JAX starts, and an
XLA:CPU workaround for collectives of emulated devices.

A user can ask for fake CPU devices four ways; all are honoured, and two that disagree are an error
naming both:

- ``--cpu-devices N`` on the command line, or :func:`emulate_cpu_devices` from Python;
- ``JAX_NUM_CPU_DEVICES=N`` in the environment, or ``jax.config.update("jax_num_cpu_devices", N)``;
- ``XLA_FLAGS=--xla_force_host_platform_device_count=N``.

    emulate_cpu_devices(8)          # first thing in a notebook or script, before any JAX operation
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import sys

from shardml.core.errors import SettingError
from shardml.core.host_memory import host_memory_bytes, keep_freed_host_memory

XLA_DEVICE_FLAG = "xla_force_host_platform_device_count"

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
# jaxlib 0.12 no longer needs either (2026-11-29, 8 devices on 2 cores): the four-variant process
# that aborted 2 of 2 times on 0.10.2 with the flag and 8 threads finished 2 of 2 times on 0.12 so,
# and 2 of 2 with JAX's defaults alone (NPROC unset, scheduler on), as did the circular pipeline x
# fsdp run; the whole default and slow test suites passed on 0.12 without the workaround. There it
# would only cost time (the race decoder at fsdp=8: 1,405 ms/step with it, 1,381 ms without), so it
# applies below WORKAROUND_BEFORE_JAXLIB only.
CPU_COLLECTIVE_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
THREADS_PER_DEVICE = 2
WORKAROUND_BEFORE_JAXLIB = (0, 12)
DEFAULT_CPU_DEVICES = 8


def backend_started() -> bool:
    """Whether JAX has created its backends (after which the device count is fixed)."""
    if "jax" not in sys.modules:
        return False
    # JAX offers no public query; the private registry is read defensively.
    try:
        from jax._src import xla_bridge

        return bool(getattr(xla_bridge, "_backends", {}))
    except Exception:  # pragma: no cover - layout of a future JAX
        return False


def _xla_flag_devices() -> int | None:
    match = re.search(rf"--{XLA_DEVICE_FLAG}=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(match.group(1)) if match else None


def _jax_config_devices() -> tuple[int | None, str]:
    """``jax_num_cpu_devices`` as JAX will read it: the config value once JAX is imported (it reads
    ``JAX_NUM_CPU_DEVICES`` at import), the environment variable before."""
    if "jax" in sys.modules:
        import jax

        value = jax.config.jax_num_cpu_devices
        if value is not None and value >= 0:
            source = ("JAX_NUM_CPU_DEVICES" if os.environ.get("JAX_NUM_CPU_DEVICES", "") == str(value)
                      else 'jax.config.update("jax_num_cpu_devices", ...)')
            return value, source
        return None, ""
    raw = os.environ.get("JAX_NUM_CPU_DEVICES", "")
    if raw:
        if not raw.isdigit() or int(raw) <= 0:
            raise SettingError(f"JAX_NUM_CPU_DEVICES={raw!r} must be a positive number of devices",
                               subject="JAX_NUM_CPU_DEVICES", value=raw)
        return int(raw), "JAX_NUM_CPU_DEVICES"
    return None, ""


def _overridden_environment(config_value: int | None) -> tuple[int | None, str]:
    """``JAX_NUM_CPU_DEVICES`` when ``jax.config.update`` has since replaced it with another count
    (JAX reads the variable once, at import, and then uses the update without a word)."""
    raw = os.environ.get("JAX_NUM_CPU_DEVICES", "")
    if "jax" in sys.modules and config_value is not None and raw.isdigit() and int(raw) != config_value:
        return int(raw), "JAX_NUM_CPU_DEVICES"
    return None, ""


def requested_cpu_devices(cli: int | None = None, cli_source: str = "--cpu-devices") -> tuple[int | None, str]:
    """How many CPU devices the user asked for, and where (None, "" when nobody asked).

    ``cli`` is an explicit count (the command line's ``--cpu-devices``, or another setting named by
    ``cli_source``, such as the pytest plugin's option).

    Raises:
      SettingError: two settings ask for different counts (JAX would silently use one of them).
    """
    asked = []
    if cli is not None:
        asked.append((cli, cli_source))
    config_value, config_source = _jax_config_devices()
    if config_value is not None:
        asked.append((config_value, config_source))
    env_value, env_source = _overridden_environment(config_value)
    if env_value is not None:
        asked.append((env_value, env_source))
    flag = _xla_flag_devices()
    if flag is not None:
        asked.append((flag, f"XLA_FLAGS --{XLA_DEVICE_FLAG}"))
    for count, source in asked[1:]:
        if count != asked[0][0]:
            raise SettingError(f"{asked[0][1]} asks for {asked[0][0]} CPU devices but {source} asks for {count}; "
                               "keep one of the two settings (or make them agree)", subject=source, value=count)
    return asked[0] if asked else (None, "")


def accelerator_plugin_installed() -> bool:
    """True when a GPU or TPU plugin for JAX is importable (checked without starting the backend)."""
    names = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")
    return any(importlib.util.find_spec(name) is not None for name in names)


def cpu_only() -> bool:
    """No accelerator plugin, and ``JAX_PLATFORMS`` (if set) starts with cpu."""
    platforms = os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0]
    return not accelerator_plugin_installed() and platforms in ("", "cpu")


def collective_workaround_needed(jaxlib_version: str | None = None) -> bool:
    """Whether this jaxlib's XLA:CPU needs :func:`avoid_cpu_collective_deadlock` (older than
    ``WORKAROUND_BEFORE_JAXLIB``; also when jaxlib's version cannot be read). Reads the installed
    version without importing JAX.

        collective_workaround_needed("0.10.2")   # True
    """
    if jaxlib_version is None:
        try:
            jaxlib_version = importlib.metadata.version("jaxlib")
        except importlib.metadata.PackageNotFoundError:
            return True
    numbers = tuple(int(n) for n in re.findall(r"\d+", jaxlib_version)[:2])
    return numbers < WORKAROUND_BEFORE_JAXLIB


def device_memory_bytes(devices) -> int:
    """Memory one of ``devices`` can use: the runtime's limit on an accelerator; on CPU, where
    emulated devices share the host, the host's memory / this process's devices.

        device_memory_bytes(jax.devices())
    """
    stats = None
    try:
        stats = devices[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory statistics raise or return None
        pass
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    local = sum(1 for d in devices if d.process_index == devices[0].process_index)
    return host_memory_bytes() // max(local, 1)


def avoid_cpu_collective_deadlock(devices: int | None = None) -> None:
    """Adds ``CPU_COLLECTIVE_FLAG`` to ``XLA_FLAGS`` and, for ``devices`` emulated devices, sizes
    XLA:CPU's thread pool to ``THREADS_PER_DEVICE`` threads per device (``NPROC``), leaving any
    setting the user made alone; only where :func:`collective_workaround_needed`. XLA reads both
    when JAX starts its backend, so call this before.
    """
    if not collective_workaround_needed():
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {CPU_COLLECTIVE_FLAG}".strip()
    if devices and devices > 1 and "NPROC" not in os.environ:
        os.environ["NPROC"] = str(max(THREADS_PER_DEVICE * devices, os.cpu_count() or 1))


def emulate_cpu_devices(n: int, keep_host_memory: bool = True) -> None:
    """Makes JAX's CPU backend expose ``n`` devices, so every mesh axis can be exercised on one host.

    Must run before JAX initialises its backend (the first ``jax.devices()`` or array operation).
    It also applies :func:`avoid_cpu_collective_deadlock` and, with ``keep_host_memory`` (for
    training; a test suite that mostly compiles is faster without it), keeps freed host memory for
    the next step (:func:`shardml.core.host_memory.keep_freed_host_memory`).

    Raises:
      SettingError: ``n`` is not positive, another setting asks for a different count, or JAX's
        backend already started with another count.
    """
    if n <= 0:
        raise SettingError(f"cpu devices={n} must be positive", subject="n", value=n)
    import jax

    if backend_started():
        have = len(jax.devices("cpu"))
        if have == n:
            return
        raise SettingError(
            f"cannot emulate {n} CPU devices: JAX's backend already started with {have}. Call "
            f"shardml.emulate_cpu_devices({n}) before any JAX operation (first thing in the notebook "
            f"or script), or set JAX_NUM_CPU_DEVICES={n} in the environment before Python starts", subject="n", value=n)
    config_value, config_source = _jax_config_devices()
    flag = _xla_flag_devices()
    for count, source in ((config_value, config_source), (flag, f"XLA_FLAGS --{XLA_DEVICE_FLAG}")):
        if count is not None and count != n:
            raise SettingError(f"cannot emulate {n} CPU devices: {source} asks for {count}; "
                               "keep one of the two settings (or make them agree)", subject="n", value=n)
    avoid_cpu_collective_deadlock(n)
    if keep_host_memory and cpu_only():
        keep_freed_host_memory()
    jax.config.update("jax_num_cpu_devices", n)


def setup_cpu_devices(cli: int | None = None) -> tuple[int | None, str]:
    """What the command line does before JAX starts: honours the user's device count from any of the
    four settings, emulates ``DEFAULT_CPU_DEVICES`` on a CPU-only machine when none is given (or
    keeps the devices of a backend that already started: in-process calls after JAX work), and
    applies the deadlock workaround. Returns (count, where it came from); (None, "") on accelerators.
    """
    count, source = requested_cpu_devices(cli)
    if count is None:
        if not cpu_only():
            return None, ""
        if backend_started():  # nobody asked, and JAX already has its devices: use them
            import jax

            return len(jax.devices("cpu")), "JAX's backend (already started)"
        count, source = DEFAULT_CPU_DEVICES, "default on a CPU-only machine"
    if source.startswith("XLA_FLAGS"):
        avoid_cpu_collective_deadlock(count)  # XLA reads the flag itself
        if cpu_only():
            keep_freed_host_memory()
    else:
        emulate_cpu_devices(count)
    return count, source
