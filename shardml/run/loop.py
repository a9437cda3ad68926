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

Batches reach the step through :class:`shardml.core.input.Feeder`: with ``workers`` > 0 grain
worker processes preprocess them ahead and the iterator's state is checkpointed; on several
processes (:mod:`shardml.run.distributed`) each reads only its own rows, process 0 alone prints
and writes metrics and run files, and a stop asked of any process stops all at the same step.
"""

from __future__ import annotations

import dataclasses
import math
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
from shardml.core.data import as_source
from shardml.core.input import Feeder
from shardml.core.losses import Loss, mean_name, token_cross_entropy
from shardml.core.mesh import as_mesh
from shardml.core.step import Trainer, TrainState, build_trainer
from shardml.run import distributed
from shardml.run.checkpoint import Checkpointer, read_iterator_state
from shardml.run.metrics import MetricsWriter, progress
from shardml.run.resume import Start, checkpoint_meta, claim_out_dir, identity, resume_point, write_run


class NonFiniteError(RuntimeError):
    """``max_bad_steps`` steps in a row had a non-finite loss or gradients."""


def notice(message: str) -> None:
    """Run events (resume, preemption, damaged checkpoints): stderr, also when not verbose; on
    several processes, from process 0 only."""
    if distributed.primary():
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
      workers: grain worker processes preprocessing batches ahead (0: batches are read in this
        process when due); the iterator's position is saved in checkpoints.
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
    workers: int = 0


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
    trainer: Trainer | None = None  # what trained it: its predict / evaluate take ``state.params``

    @property
    def val_loss(self) -> float | None:
        return None if self.val is None else self.val["loss"]


def evaluate(trainer: Trainer, params: Any, batches: Iterable[dict]) -> dict:
    """Means over ``batches`` (``loss``, ``accuracy``, ...): sums first, one division at the end.

    Padded rows (``mask`` 0) count nothing, so a padded last batch gives the exact full-set mean.
    """
    totals: dict[str, Any] = {}
    for batch in batches:
        for key, value in jax.device_get(trainer.evaluate(params, trainer.put_eval(batch))).items():
            totals[key] = totals.get(key, 0.0) + np.asarray(value, np.float64)
    count = np.maximum(totals.pop("count", 0.0), 1.0)
    # A population's sums have one entry per member: its means are lists.
    return {mean_name(k): (v / count).tolist() if np.ndim(v) else float(v / count) for k, v in totals.items()}


# ----------------------------------------------------------------------------- the loop's parts


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


class Recorder:
    """Decides which steps are logged and writes their records (JSONL, TensorBoard, progress bar);
    a population writes one record per member per logged step, with a ``member`` field."""

    SHOWN = ("loss", "grad_norm", "accuracy", "bad_steps")

    def __init__(self, settings: LoopSettings, writer: MetricsWriter, throughput: Throughput, bar):
        self.settings, self.writer, self.throughput, self.bar = settings, writer, throughput, bar

    def due(self, step: int) -> bool:
        return step in (0, self.settings.steps - 1) or (step + 1) % self.settings.log_every == 0

    def record(self, step: int, metrics: dict, val: dict | None) -> None:
        """Writes the record(s) of ``step`` (0-based) if it is a logging or evaluation step."""
        if not (self.due(step) or val is not None):
            return
        values = {k: np.asarray(metrics[k], np.float64) for k in self.SHOWN if k in metrics}
        values.update({f"val_{k}": np.asarray(v, np.float64) for k, v in (val or {}).items()
                       if np.ndim(v) <= 1 and not isinstance(v, dict)})
        shared = self.throughput.rates(step + 1)
        members = values["loss"].shape[0] if values["loss"].ndim else 0
        if not members:
            record = self.writer.write(step + 1, {**values, **shared})
        else:
            for member in range(members):
                one = {k: v[member] if v.ndim else v for k, v in values.items()}
                record = self.writer.write(step + 1, {"member": member, **one, **shared})
            record = {**record, "loss": float(np.mean(values["loss"]))}
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.3g}",
                                 mfu=f"{100 * record['mfu']:.1f}%")


def check_finite(metrics: dict, step: int, max_bad_steps: int, saved: tuple[int, str | None]) -> None:
    """Stops the run after ``max_bad_steps`` non-finite steps in a row (counted in the state).

    Raises:
      NonFiniteError: naming the steps, the last checkpoint (left as it was) and what to change.
    """
    streak = int(np.max(np.asarray(metrics["bad_streak"])))
    if streak < max_bad_steps:
        return
    step_saved, path = saved
    last = (f"The last checkpoint, {path} (step {step_saved}), is left as it was" if path
            else "No checkpoint had been saved")
    raise NonFiniteError(
        f"steps {step + 2 - streak}-{step + 1}: {streak} steps in a row (max_bad_steps={max_bad_steps}) had a "
        f"non-finite loss or gradients and were skipped; stopping. {last}; lower the learning rate or check the "
        "data, then run again to resume from it")


class Policy:
    """What a population does between steps (PBT, early stopping, freezing diverged members); the
    single-model loop has none. See :mod:`shardml.run.population`."""

    def due(self, step: int) -> bool:
        """Whether the loop evaluates and calls :meth:`at` after ``step``."""
        return False

    def at(self, step: int, state: TrainState, val: dict | None) -> TrainState:
        return state

    def on_metrics(self, step: int, metrics: dict, state: TrainState, saved: tuple[int, str | None]) -> TrainState:
        """Called with each step's metrics (one step late); may return a changed state."""
        check_finite(metrics, step, self.max_bad_steps, saved)
        return state

    max_bad_steps = 10


@dataclasses.dataclass
class _Saved:
    step: int = 0
    path: str | None = None


def _open_run(trainer: Trainer, source, feeder: Feeder, settings: LoopSettings,
              config: dict | None) -> tuple[Start, dict]:
    """Claims ``out_dir`` (process 0 writes), finds where the run starts (step 0 without one) and
    puts the data there."""
    ident = identity(trainer, getattr(source, "fingerprint", None), config)
    if settings.out_dir is None:
        feeder.start(0)
        return Start(state=None, step=0, source=None, data_state=None), ident
    primary = distributed.primary()
    claim_out_dir(settings.out_dir, ident, settings.resume, settings.fresh, notice=notice, primary=primary)
    distributed.barrier("shardml-checked-out-dir")  # every process has read out_dir before process 0 writes
    if primary:
        os.makedirs(settings.out_dir, exist_ok=True)
        write_run(settings.out_dir, ident)
        if config is not None:
            with open(os.path.join(settings.out_dir, "config.yaml"), "w") as f:
                yaml.safe_dump(config, f, sort_keys=False)
        tokenizer = getattr(source, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save(os.path.join(settings.out_dir, "tokenizer.json"))
    distributed.barrier("shardml-wrote-out-dir")  # ... and has written (or moved aside) before anyone reads
    begin = resume_point(settings.out_dir, settings.resume, trainer, ident, notice=notice, primary=primary)
    if hasattr(source, "restore"):
        source.restore(begin.data_state or {"position": begin.step, "iterator": None})
    grain_saved = (begin.data_state or {}).get("grain") if isinstance(begin.data_state, dict) else None
    iterator_state = read_iterator_state(begin.source) if begin.source and grain_saved else None
    note = feeder.start(begin.step, begin.data_state if grain_saved else None, iterator_state)
    if note:
        notice(note)
    return begin, ident


class _Run:
    """One run of the loop: the state, where it started, its writers, what was saved."""

    def __init__(self, trainer: Trainer, data: Any, settings: LoopSettings, eval_data, config, policy: Policy):
        self.trainer, self.settings, self.policy = trainer, settings, policy
        self.source = as_source(data)
        self.feeder = Feeder(self.source, trainer.batch_sharding, settings.workers)
        self.eval_batches = list(eval_data) if eval_data is not None else None
        self.start = time.perf_counter()
        self.begin, self.ident = _open_run(trainer, self.source, self.feeder, settings, config)
        try:
            self._open(settings)
        except BaseException:
            self.feeder.close()  # its worker processes
            raise

    def _open(self, settings: LoopSettings) -> None:
        trainer, primary = self.trainer, distributed.primary()
        self.writer = MetricsWriter(settings.out_dir if primary else None,
                                    start_step=self.begin.step if settings.out_dir else None)
        if self.writer.dropped:
            notice(f"metrics.jsonl: dropped {self.writer.dropped} record(s) after step {self.begin.step}; "
                   "they are written again")
        self.checkpointer = (Checkpointer(os.path.join(settings.out_dir, "checkpoints"), keep=settings.checkpoint_keep,
                                          async_save=settings.async_checkpoint) if settings.out_dir else None)
        self.state = self.begin.state if self.begin.state is not None else trainer.init(settings.seed)
        self.bar = progress(settings.steps, enabled=settings.verbose and primary)
        if self.bar is not None and self.begin.step:
            self.bar.update(min(self.begin.step, settings.steps))
        self.saved = _Saved(self.begin.step, self.begin.source)
        self.recorder: Recorder | None = None
        self.pending = None  # (step, metrics, val) of the last step, read one step late
        self.val, self.compile_s = None, 0.0

    def train(self, step: int) -> None:
        """Dispatches ``step``, evaluates when due, then reads the previous step's metrics."""
        batch = self.feeder.get(step)  # global arrays, this process's rows read and placed
        if self.recorder is None:
            self.recorder = Recorder(self.settings, self.writer, Throughput(self.trainer, batch), self.bar)
        self.state, metrics = self.trainer.step(self.state, batch)
        if step == self.begin.step:
            jax.block_until_ready(metrics)
            self.compile_s = time.perf_counter() - self.start
            self.recorder.throughput.start(step + 1)
        self.val = self._evaluate(step)
        self.flush()
        self.pending = (step, metrics, self.val)
        if self.policy.due(step):
            self.flush()
            self.state = self.policy.at(step, self.state, self.val)
        if self.bar is not None:
            self.bar.update(1)

    def _evaluate(self, step: int) -> dict | None:
        s = self.settings
        due = step + 1 == s.steps or (s.eval_every and (step + 1) % s.eval_every == 0) or self.policy.due(step)
        if not self.eval_batches or not due:
            return None
        jax.block_until_ready(self.state)  # training time ends here; evaluation time is not counted
        eval_start = time.perf_counter()
        val = evaluate(self.trainer, self.state.params, self.eval_batches)
        self.recorder.throughput.exclude(time.perf_counter() - eval_start)
        return val

    def flush(self) -> None:
        """Records the pending step and lets the policy see its metrics."""
        if self.pending is not None:
            step, metrics, val = self.pending
            self.pending = None
            self.recorder.record(step, metrics, val)
            self.state = self.policy.on_metrics(step, metrics, self.state, (self.saved.step, self.saved.path))

    def save(self, step: int) -> None:
        self.flush()  # the records saved must include this step
        # Returns once the state is on the host: the next step may take (donate) it.
        data_state = self.feeder.state() or getattr(self.source, "state", lambda: None)()
        meta = checkpoint_meta(self.ident, step + 1, data_state, self.trainer.mesh.shape)
        self.saved.path = self.checkpointer.save(step + 1, self.state, meta, self.feeder.iterator_state())
        self.saved.step = step + 1

    def save_due(self, step: int, stopping: bool) -> bool:
        every = self.settings.checkpoint_every
        last = step + 1 == self.settings.steps
        return self.checkpointer is not None and (last or (every and (step + 1) % every == 0) or stopping)

    def close(self) -> None:
        self.feeder.close()
        if self.checkpointer is not None:
            self.checkpointer.close()  # waits until the last save is written and finalized
        if self.bar is not None:
            self.bar.close()
        self.writer.close()

    def summary(self, stop_signal: str | None, last_step: int) -> TrainSummary:
        s = self.settings
        if stop_signal:
            where = (f"saved checkpoint {self.saved.path}; run the same command again to resume" if self.saved.path
                     else "nothing was saved (no out_dir)")
            notice(f"stopped by {stop_signal} after step {self.saved.step if self.saved.path else last_step} of "
                   f"{s.steps}; {where}")
        elif self.begin.step >= s.steps:
            notice(f"nothing to train: the run in {s.out_dir} is at step {self.begin.step} and steps={s.steps}")
        return TrainSummary(
            state=self.state, records=list(self.writer.records), val=None if stop_signal else self.val,
            out_dir=s.out_dir, mesh=dict(self.trainer.mesh.shape),
            resumed_from=self.begin.step if self.begin.source else None, preempted=stop_signal,
            bad_steps=int(np.sum(np.asarray(self.state.bad_steps))), checkpoint=self.saved.path,
            seconds=time.perf_counter() - self.start, compile_seconds=self.compile_s, trainer=self.trainer)


def run_loop(trainer: Trainer, data: Any, settings: LoopSettings, eval_data: Iterable[dict] | None = None,
             config: dict | None = None, policy: Policy | None = None) -> TrainSummary:
    """Trains ``trainer`` on ``data`` (any source :func:`shardml.core.data.as_source` takes) for
    ``settings.steps`` steps; see :func:`fit`. ``config`` is recorded in the run and checkpoints;
    ``policy`` acts between steps (populations)."""
    if policy is None:
        policy = Policy()
        policy.max_bad_steps = settings.max_bad_steps
    run = _Run(trainer, data, settings, eval_data, config, policy)
    stop_signal, step = None, run.begin.step
    with distributed.stop_request() as stop:  # also covers the final wait for the last save
        try:
            for step in range(run.begin.step, settings.steps):
                run.train(step)
                stopping = stop.requested(step)  # on several processes: the same step on all
                if run.save_due(step, stopping):
                    run.save(step)
                if stopping and step + 1 < settings.steps:
                    stop_signal = stop.signal
                    break
            run.flush()
        finally:
            run.close()
    return run.summary(stop_signal, step + 1)


def fit(model, data: Any, optimizer, *, loss: Loss = token_cross_entropy, mesh=None, microbatches: int = 1,
        eval_data: Iterable[dict] | None = None, rules=None, schedule=None, members: int = 1,
        hyperparams: dict | None = None, member_data: bool = False, steps: int = 100,
        **settings: Any) -> TrainSummary:
    """Trains any :class:`shardml.Model` with any loss, optax optimizer and data source: the whole
    loop, with checkpoints, resume, preemption, metrics and evaluation. With ``members`` > 1, a
    population of that many copies in one compiled step (an ensemble; a sweep with
    ``hyperparams``), stacked over the ``members`` mesh axis.

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
      members, hyperparams, member_data: a population (:func:`shardml.build_population`): member i
        initialises from seed + i; ``hyperparams`` maps injected optimizer hyperparameters to one
        value per member; ``member_data`` means batches carry a leading member axis. A member whose
        loss stays non-finite is frozen instead of stopping the run.
      steps, **settings: the fields of :class:`LoopSettings` (``out_dir``, ``seed``, ``log_every``,
        ``eval_every``, ``checkpoint_every``, ``resume``, ``fresh``, ``max_bad_steps``, ``verbose``,
        ``workers``...).

    Raises:
      ConfigError: before anything compiles, for a layout or an out_dir that cannot work.
      CheckpointError: ``out_dir`` has checkpoints and none is usable.
      NonFiniteError: ``max_bad_steps`` non-finite steps in a row (the last checkpoint is kept).
    """
    distributed.start()  # a cluster JAX detects, when nothing has started JAX's backend yet
    loop_settings = LoopSettings(steps=steps, **settings)
    if members == 1 and not hyperparams:
        trainer = build_trainer(model, as_mesh(mesh), optimizer, loss=loss, microbatches=microbatches, rules=rules,
                                schedule=schedule)
        return run_loop(trainer, data, loop_settings, eval_data)
    from shardml.parallel.members import build_population
    from shardml.run.population import PopulationPolicy

    trainer = build_population(model, as_mesh(mesh), optimizer, members, loss=loss, microbatches=microbatches,
                               rules=rules, hyperparams=hyperparams, per_member_data=member_data)
    policy = PopulationPolicy(trainer, "ensemble", (), loop_settings.seed, steps, loop_settings.max_bad_steps)
    return run_loop(trainer, data, loop_settings, eval_data, policy=policy)
