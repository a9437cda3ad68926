"""The training loop for any model, loss, optimizer and data source: checkpoints, resume,
preemption, metrics, progress, evaluation and the non-finite guard.

    summary = fit(model, data, optax.adamw(1e-3), loss=classification, mesh={"data": 2, "fsdp": 2, "tensor": 2},
                  steps=300, eval_data=eval_batches, out_dir="runs/digits")
    summary.val["accuracy"], summary.records[-1]

Checkpoints (:mod:`shardml.run.checkpoint`) are saved every ``checkpoint_every`` steps, at the
end, and when SIGTERM / SIGINT asks the run to stop; running the same call again resumes from the
latest valid one (:mod:`shardml.run.resume`), exactly when the source is indexable (the batch of
step s is a function of s). The loop never waits on the device before queueing the next step: the
metrics of step s are read after step s + 1 has been dispatched.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
import yaml

from shardml.analysis.flops import training_flops_per_example
from shardml.analysis.peak import peak_flops
from shardml.core.data import as_source, rows_of
from shardml.core.losses import Loss, mean_name, token_cross_entropy
from shardml.core.mesh import as_mesh
from shardml.core.step import Trainer, TrainState, build_trainer
from shardml.run.checkpoint import Checkpointer
from shardml.run.metrics import MetricsWriter, progress
from shardml.run.preemption import StopRequest
from shardml.run.resume import Start, checkpoint_meta, claim_out_dir, identity, resume_point, write_run


class NonFiniteError(RuntimeError):
    """``max_bad_steps`` steps in a row had a non-finite loss or gradients."""


def notice(message: str) -> None:
    """Run events (resume, preemption, damaged checkpoints): stderr, also when not verbose."""
    print(f"shardml: {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """How long to train, what to log and evaluate, where to save.

    Attributes:
      out_dir: where metrics, the run record and checkpoints go; None keeps records in memory only
        (no checkpoints, no resume).
      resume: ``auto`` (the latest valid checkpoint of ``out_dir``), ``never``, or a checkpoint path.
      fresh: move a run found in ``out_dir`` to ``out_dir/previous/`` and start over.
      eval_every: evaluate every N steps (0: once, at the end).
      checkpoint_every: save every N steps (0: only at the end and when stopped by a signal).
    """

    steps: int
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    out_dir: str | None = None
    checkpoint_every: int = 100
    checkpoint_keep: int = 3
    async_checkpoint: bool = True
    resume: str = "auto"
    fresh: bool = False
    max_bad_steps: int = 10
    verbose: bool = True


@dataclasses.dataclass(frozen=True)
class TrainSummary:
    """What a run did.

    Attributes:
      state: the final train state (on the mesh).
      records: every metrics record of the run, also those written before a resume.
      val: the final evaluation (``loss``, ``accuracy`` for classifiers, ...); None if stopped early
        or without evaluation data.
      resumed_from: the step restored from, or None.
      preempted: the name of the signal that stopped the run, or None.
      checkpoint: the last checkpoint saved or restored.
    """

    state: TrainState
    records: list[dict]
    val: dict | None
    out_dir: str | None
    mesh: dict[str, int]
    resumed_from: int | None
    preempted: str | None
    bad_steps: int
    checkpoint: str | None
    seconds: float
    compile_seconds: float

    @property
    def val_loss(self) -> float | None:
        return None if self.val is None else self.val["loss"]


def evaluate(trainer: Trainer, params: Any, batches: Iterable[dict]) -> dict:
    """Means over ``batches`` (``loss``, ``accuracy``, ...): sums first, one division at the end.

    Padded rows (``mask`` 0) count nothing, so a padded last batch gives the exact full-set mean.
    """
    totals: dict[str, float] = {}
    for batch in batches:
        for key, value in jax.device_get(trainer.evaluate(params, trainer.put(batch))).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    count = max(totals.pop("count", 0.0), 1.0)
    return {mean_name(k): v / count for k, v in totals.items()}


# ----------------------------------------------------------------------------- the loop's parts


class Throughput:
    """Examples per second of training time: the first step (compile) and evaluations excluded."""

    def __init__(self, trainer: Trainer, batch: dict):
        model = trainer.model
        self.rows = rows_of(batch)
        self.tokens_per_example = model.tokens_per_example
        self.flops_per_example = model.flops_per_example
        if self.flops_per_example is None:
            self.flops_per_example = training_flops_per_example(model, jax.numpy.asarray(batch["inputs"]))
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


class Recorder:
    """Decides which steps are logged and writes their records (JSONL, TensorBoard, progress bar)."""

    SHOWN = ("loss", "grad_norm", "accuracy", "bad_steps")

    def __init__(self, settings: LoopSettings, writer: MetricsWriter, throughput: Throughput, bar):
        self.settings, self.writer, self.throughput, self.bar = settings, writer, throughput, bar

    def record(self, step: int, metrics: dict, val: dict | None) -> None:
        """Writes the record of ``step`` (0-based) if it is a logging step."""
        every, last = self.settings.log_every, step == self.settings.steps - 1
        if not (last or step == 0 or (step + 1) % every == 0 or val is not None):
            return
        values = {k: float(np.asarray(metrics[k])) for k in self.SHOWN if k in metrics}
        values.update(self.throughput.rates(step + 1))
        values.update({f"val_{k}": v for k, v in (val or {}).items()})
        record = self.writer.write(step + 1, values)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.3g}",
                                 mfu=f"{100 * record['mfu']:.1f}%")


def check_finite(metrics: dict, step: int, max_bad_steps: int, saved: tuple[int, str | None]) -> None:
    """Stops the run after ``max_bad_steps`` non-finite steps in a row (counted in the state).

    Raises:
      NonFiniteError: naming the steps, the last checkpoint (left as it was) and what to change.
    """
    streak = int(np.asarray(metrics["bad_streak"]))
    if streak < max_bad_steps:
        return
    step_saved, path = saved
    last = (f"The last checkpoint, {path} (step {step_saved}), is left as it was" if path
            else "No checkpoint had been saved")
    raise NonFiniteError(
        f"steps {step + 2 - streak}-{step + 1}: {streak} steps in a row (max_bad_steps={max_bad_steps}) had a "
        f"non-finite loss or gradients and were skipped; stopping. {last}; lower the learning rate or check the "
        "data, then run again to resume from it")


@dataclasses.dataclass
class _Saved:
    step: int = 0
    path: str | None = None


def _open_run(trainer: Trainer, source, settings: LoopSettings, config: dict | None) -> tuple[Start, dict]:
    """Claims ``out_dir`` and finds where the run starts (step 0 without one)."""
    ident = identity(trainer, getattr(source, "fingerprint", None), config)
    if settings.out_dir is None:
        return Start(state=None, step=0, source=None, data_state=None), ident
    claim_out_dir(settings.out_dir, ident, settings.resume, settings.fresh, notice=notice)
    os.makedirs(settings.out_dir, exist_ok=True)
    write_run(settings.out_dir, ident)
    if config is not None:
        with open(os.path.join(settings.out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
    begin = resume_point(settings.out_dir, settings.resume, trainer, ident, notice=notice)
    if hasattr(source, "restore"):
        source.restore(begin.data_state or {"position": begin.step, "iterator": None})
    return begin, ident


def run_loop(trainer: Trainer, data: Any, settings: LoopSettings, eval_data: Iterable[dict] | None = None,
             config: dict | None = None) -> TrainSummary:
    """Trains ``trainer`` on ``data`` (any source :func:`shardml.core.data.as_source` takes) for
    ``settings.steps`` steps; see :func:`fit`. ``config`` is recorded in the run and checkpoints."""
    source = as_source(data)
    eval_batches = list(eval_data) if eval_data is not None else None
    start = time.perf_counter()
    begin, ident = _open_run(trainer, source, settings, config)
    writer = MetricsWriter(settings.out_dir, start_step=begin.step if settings.out_dir else None)
    if writer.dropped:
        notice(f"metrics.jsonl: dropped {writer.dropped} record(s) after step {begin.step}; they are written again")
    checkpointer = (Checkpointer(os.path.join(settings.out_dir, "checkpoints"), keep=settings.checkpoint_keep,
                                 async_save=settings.async_checkpoint) if settings.out_dir else None)
    state = begin.state if begin.state is not None else trainer.init(settings.seed)
    bar = progress(settings.steps, enabled=settings.verbose)
    if bar is not None and begin.step:
        bar.update(min(begin.step, settings.steps))
    saved = _Saved(begin.step, begin.source)
    throughput = recorder = None
    compile_s = 0.0

    def finish(step, metrics, val):
        recorder.record(step, metrics, val)
        check_finite(metrics, step, settings.max_bad_steps, (saved.step, saved.path))

    pending, stop_signal, val = None, None, None
    with StopRequest() as stop:  # also covers the final wait for the last save
        try:
            for step in range(begin.step, settings.steps):
                batch = source.batch(step)
                if throughput is None:
                    throughput = Throughput(trainer, batch)
                    recorder = Recorder(settings, writer, throughput, bar)
                state, metrics = trainer.step(state, trainer.put(batch))
                if step == begin.step:
                    jax.block_until_ready(metrics)
                    compile_s = time.perf_counter() - start
                    throughput.start(step + 1)
                val = None
                last = step + 1 == settings.steps
                if eval_batches and (last or (settings.eval_every and (step + 1) % settings.eval_every == 0)):
                    jax.block_until_ready(state)  # training time ends here; evaluation time is not counted
                    eval_start = time.perf_counter()
                    val = evaluate(trainer, state.params, eval_batches)
                    throughput.exclude(time.perf_counter() - eval_start)
                if pending is not None:
                    finish(*pending)
                pending = (step, metrics, val)
                if bar is not None:
                    bar.update(1)
                every = settings.checkpoint_every
                if checkpointer and (last or (every and (step + 1) % every == 0) or stop.signal):
                    finish(*pending)  # the records saved must include this step
                    pending = None
                    # Returns once the state is on the host: the next step may take (donate) it.
                    meta = checkpoint_meta(ident, step + 1, getattr(source, "state", lambda: None)(),
                                           trainer.mesh.shape)
                    saved.path, saved.step = checkpointer.save(step + 1, state, meta), step + 1
                if stop.signal and not last:
                    stop_signal = stop.signal
                    break
            if pending is not None:
                finish(*pending)
        finally:
            if checkpointer is not None:
                checkpointer.close()  # waits until the last save is written and finalized
            if bar is not None:
                bar.close()
            writer.close()
    if stop_signal:
        where = f"saved checkpoint {saved.path}; run the same command again to resume" if saved.path else \
            "nothing was saved (no out_dir)"
        notice(f"stopped by {stop_signal} after step {saved.step if saved.path else step + 1} of {settings.steps}; "
               f"{where}")
    elif begin.step >= settings.steps:
        notice(f"nothing to train: the run in {settings.out_dir} is at step {begin.step} and steps={settings.steps}")
    return TrainSummary(
        state=state, records=list(writer.records), val=None if stop_signal else val, out_dir=settings.out_dir,
        mesh=dict(trainer.mesh.shape), resumed_from=begin.step if begin.source else None, preempted=stop_signal,
        bad_steps=int(np.asarray(state.bad_steps)), checkpoint=saved.path,
        seconds=time.perf_counter() - start, compile_seconds=compile_s)


def fit(model, data: Any, optimizer, *, loss: Loss = token_cross_entropy, mesh=None, microbatches: int = 1,
        eval_data: Iterable[dict] | None = None, rules=None, schedule=None,
        steps: int = 100, **settings: Any) -> TrainSummary:
    """Trains any :class:`shardml.Model` with any loss, optax optimizer and data source: the whole
    loop, with checkpoints, resume, preemption, metrics and evaluation.

    Args:
      model: a :class:`shardml.Model` (:func:`shardml.from_nnx`, :func:`shardml.from_linen`, ...).
      data: the training batches: a source (``batch(step)``), a ``step -> batch`` function, a
        sequence of batches, or an iterator (host NumPy dicts with ``inputs`` and the loss's keys).
      optimizer: any ``optax.GradientTransformation``.
      loss: ``loss(outputs, batch) -> sums`` (:mod:`shardml.core.losses`).
      mesh: a ``Mesh``, or axis sizes for :func:`shardml.make_mesh` (default: all devices on data).
      microbatches: k accumulation microbatches per step.
      eval_data: batches evaluated every ``eval_every`` steps and at the end (pad the last one and
        mask its padding, as :meth:`shardml.ArrayBatches.eval_batches` does).
      rules, schedule: see :func:`shardml.build_trainer`.
      steps, **settings: the fields of :class:`LoopSettings` (``out_dir``, ``seed``, ``log_every``,
        ``eval_every``, ``checkpoint_every``, ``resume``, ``fresh``, ``max_bad_steps``, ``verbose``...).

    Raises:
      ConfigError: before anything compiles, for a layout or an out_dir that cannot work.
      CheckpointError: ``out_dir`` has checkpoints and none is usable.
      NonFiniteError: ``max_bad_steps`` non-finite steps in a row (the last checkpoint is kept).
    """
    trainer = build_trainer(model, as_mesh(mesh), optimizer, loss=loss, microbatches=microbatches, rules=rules,
                            schedule=schedule)
    return run_loop(trainer, data, LoopSettings(steps=steps, **settings), eval_data)
