"""Training throughput: examples, tokens and model FLOPs per second of training time (the first
step, with compilation, and evaluations excluded), and MFU against the device's peak.

    throughput = Throughput(trainer, batch)
    throughput.start(1)
    ...
    throughput.rates(step)          # {"tokens_per_s": ..., "mfu": ...}
"""

from __future__ import annotations

import math
import time

import jax

from shardml.analysis.flops import training_flops_per_example
from shardml.analysis.peak import peak_flops


class Throughput:
    """Examples per second of training time: the first step (compile) and evaluations excluded."""

    def __init__(self, trainer: Trainer, batch: dict):
        model, inputs = trainer.model, batch["inputs"]
        self.rows = trainer.examples_per_step(inputs.shape)
        self.tokens_per_example = model.tokens_per_example
        self.flops_per_example = model.flops_per_example
        if self.flops_per_example is None:
            # One model's forward on the examples, whatever population or round axes lead the batch.
            rows = math.prod(inputs.shape[:trainer.batch_axes])
            one = jax.ShapeDtypeStruct((rows, *inputs.shape[trainer.batch_axes:]), inputs.dtype)
            self.flops_per_example = training_flops_per_example(model, one)
        self.peak, self.peak_source = peak_flops(model.compute_dtype)
        self._time, self._step = None, 0

    def start(self, step: int) -> None:
        self._time, self._step = time.perf_counter(), step

    def exclude(self, seconds: float) -> None:
        if self._time is not None:
            self._time += seconds

    def rates(self, step: int) -> dict:
        """``tokens_per_s`` and ``mfu`` since the last call (0 before the clock starts)."""
        now, done = time.perf_counter(), step - self._step
        if self._time is None or done <= 0:
            return {"tokens_per_s": 0.0, "mfu": 0.0}
        examples_per_s = done * self.rows / (now - self._time)
        self._time, self._step = now, step
        return {"tokens_per_s": examples_per_s * self.tokens_per_example,
                "mfu": examples_per_s * self.flops_per_example / self.peak}
