"""The machine's peak FLOP/s, for MFU: datasheet figures on accelerators, a measured matmul on CPU.

    flops, source = peak_flops("bfloat16")     # (1.58e15, "datasheet NVIDIA H100 x 2")
"""

from __future__ import annotations

import functools
import math
import time

# Dense peak FLOP/s per chip from vendor datasheets (bf16, without sparsity).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(dtype: str = "float32", size: int = 1024, repeats: int = 5) -> float:
    """This machine's matmul throughput on one device (jitted ``jnp.dot``), FLOP/s, best of repeats."""
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    dot = jax.jit(lambda x, y: jnp.dot(x, y))
    dot(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def datasheet_flops() -> tuple[float, str] | None:
    """The datasheet peak FLOP/s of all devices and its source, or None for a chip the table does not
    know (CPU included).

        datasheet_flops()       # (1.978e15, "datasheet NVIDIA H100 x 2"), or None on CPU
    """
    import jax

    devices = jax.devices()
    kind = devices[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops * len(devices), f"datasheet {name} x {len(devices)}"
    return None


def peak_flops(compute_dtype: str = "bfloat16") -> tuple[float, str]:
    """Peak FLOP/s of the whole machine running the step, and where the figure comes from.

    Accelerators: datasheet peak per chip x chips. CPU: emulated devices share the host's cores, so
    the peak is the host's measured matmul throughput (one jitted dot) in the compute dtype.
    """
    datasheet = datasheet_flops()
    if datasheet is not None:
        return datasheet
    return measured_matmul_flops(compute_dtype), f"measured {compute_dtype} matmul on this host"
