"""Run metrics: JSONL and TensorBoard writers, throughput and model FLOPs utilisation.

    writer = MetricsWriter("runs/x")
    writer.write(10, {"loss": 2.3, "tokens_per_s": 1.2e5})
"""

from __future__ import annotations

import functools
import json
import math
import os
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


def peak_flops(compute_dtype: str = "bfloat16") -> tuple[float, str]:
    """Peak FLOP/s of the whole machine running the step, and where the figure comes from.

    Accelerators: datasheet peak per chip x chips. CPU: emulated devices share the host's cores, so
    the peak is the host's measured matmul throughput (one jitted dot) in the compute dtype.
    """
    import jax

    devices = jax.devices()
    kind = devices[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops * len(devices), f"datasheet {name} x {len(devices)}"
    dtype = "float32" if compute_dtype == "float32" else compute_dtype
    return measured_matmul_flops(dtype), f"measured {dtype} matmul on this host"


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl``; mirrors scalars to TensorBoard
    when ``tensorboardX`` is installed.

    ``start_step``: the step the run starts from (None: append to what is there). Records after it
    (written by an attempt that died before its next checkpoint, or a half-written last line) are
    dropped, since the run writes them again; TensorBoard is told to purge them too. ``records``
    holds the kept records and ``dropped`` counts the others.
    """

    def __init__(self, out_dir: str, start_step: int | None = None):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.records, self.dropped = [], 0
        if start_step is not None:
            self.records, self.dropped = _keep_records(self.path, start_step)
        self._file = open(self.path, "a")  # noqa: SIM115 - open for the writer's lifetime
        self._tb = None
        try:
            from tensorboardX import SummaryWriter

            purge = start_step + 1 if start_step or self.dropped else None
            self._tb = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=purge)
        except ImportError:
            pass

    def write(self, step: int, values: dict) -> None:
        record = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, float(value), int(step))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _keep_records(path: str, last_step: int) -> tuple[list[dict], int]:
    """Rewrites ``path`` keeping the records up to ``last_step``; returns them and the dropped count."""
    if not os.path.exists(path):
        return [], 0
    kept, lines, dropped = [], [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = record["step"] <= last_step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(record)
                lines.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        with open(path + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(path + ".tmp", path)
    return kept, dropped


def progress(total: int, enabled: bool = True):
    """A tqdm progress bar (silent when disabled or when tqdm is missing)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, disable=not enabled, dynamic_ncols=True, leave=True)
