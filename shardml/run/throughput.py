"""Training throughput: examples per second for classifiers, tokens per second for language
models, over training time (the first step, with compilation, and evaluations excluded), and the
model FLOPs against the machine's peak.

    throughput = Throughput(trainer, batch)
    throughput.start(1)
    ...
    throughput.rates(step)          # {"tokens_per_s": ..., "mfu": ...} for a language model

The rate's key says what it counts: ``tokens_per_s`` when an example has several tokens
(``Model.tokens_per_example`` > 1: a language model), ``examples_per_s`` otherwise. The FLOP ratio's
key says what it is against: ``mfu`` against a datasheet peak (an accelerator the table knows),
``mfu_vs_matmul`` against this host's measured matmul throughput (CPU, or an unknown chip) - not a
hardware peak, so a value near or above 1 is possible and says little.
"""

from __future__ import annotations

import math
import time

import jax

from shardml.analysis.flops import training_flops_per_example
from shardml.analysis.peak import datasheet_flops, measured_matmul_flops


class Throughput:
    """Examples (or tokens) per second of training time: the first step (compile) and evaluations
    excluded. ``rate_key`` and ``mfu_key`` name the two figures :meth:`rates` returns."""

    def __init__(self, trainer: Trainer, batch: dict):
        # Packed SFT rows: a dict of [B, S] arrays (tokens, segments, positions), counted by their tokens.
        model, inputs = trainer.model, jax.tree.leaves(batch["inputs"])[0]
        self.rows = trainer.examples_per_step(inputs.shape)
        self.tokens_per_example = model.tokens_per_example
        self.rate_key = "tokens_per_s" if self.tokens_per_example > 1 else "examples_per_s"
        self.flops_per_example = model.flops_per_example
        if self.flops_per_example is None:
            # One model's forward on the examples, whatever population or round axes lead the batch.
            rows = math.prod(inputs.shape[:trainer.batch_axes])
            one = jax.ShapeDtypeStruct((rows, *inputs.shape[trainer.batch_axes:]), inputs.dtype)
            self.flops_per_example = training_flops_per_example(model, one)
        datasheet = datasheet_flops()
        if datasheet is not None:
            (self.peak, self.peak_source), self.mfu_key = datasheet, "mfu"
        else:
            self.peak = measured_matmul_flops(model.compute_dtype)
            self.peak_source = f"measured {model.compute_dtype} matmul on this host"
            self.mfu_key = "mfu_vs_matmul"
        self._time, self._step = None, 0

    def start(self, step: int) -> None:
        self._time, self._step = time.perf_counter(), step

    def exclude(self, seconds: float) -> None:
        if self._time is not None:
            self._time += seconds

    def rates(self, step: int) -> dict:
        """``{rate_key: ..., mfu_key: ...}`` since the last call (0 before the clock starts)."""
        now, done = time.perf_counter(), step - self._step
        if self._time is None or done <= 0:
            return {self.rate_key: 0.0, self.mfu_key: 0.0}
        examples_per_s = done * self.rows / (now - self._time)
        self._time, self._step = now, step
        # tokens_per_example is 1 where the rate counts examples.
        return {self.rate_key: examples_per_s * self.tokens_per_example,
                self.mfu_key: examples_per_s * self.flops_per_example / self.peak}
