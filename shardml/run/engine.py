"""The training loop: dispatch, evaluation, metrics, checkpoints, preemption and the non-finite guard
for any trainer and data source (``fit`` and ``shardml train`` both end here).

    summary = run_loop(trainer, data, LoopSettings(steps=300, out_dir="runs/x"), eval_batches)

The run directory (:class:`shardml.run.run_dir.RunDir`) is asked for the starting state and handed
the states to save: every ``checkpoint_every`` steps, at the end, and when SIGTERM / SIGINT asks the
run to stop; running the same call again resumes, exactly when the source is indexable (the batch of
step s is a function of s). The loop never waits on the device before queueing the next step: the
metrics of step s are read after step s + 1 has been dispatched.

Batches reach the step through :class:`shardml.core.input.Feeder`: with ``workers`` > 0 grain
worker processes preprocess them ahead and the iterator's state is checkpointed; on several
processes (:mod:`shardml.run.distributed`) each reads only its own rows, process 0 alone prints
and writes metrics and run files, and a stop asked of any process stops all at the same step.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from shardml.core.data import as_source
from shardml.core.input import Feeder
from shardml.core.losses import mean_name
from shardml.core.step import Trainer, TrainState
from shardml.run import distributed
from shardml.run.library_log import LibraryLog
from shardml.run.metrics import MetricsWriter, Recorder, progress
from shardml.run.run_dir import Frozen, RunDir, Start, identity
from shardml.run.store import read_iterator_state
from shardml.run.throughput import Throughput


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


@dataclasses.dataclass(frozen=True)
class Mode:
    """The parts of a config-driven run that differ between plain, population and federated runs;
    :func:`shardml.run.driver.drive` plugs them into the one "describe, print, run, report" driver.

    Attributes:
      lines: printed before training (by process 0).
      report: called with the summary of a run that was not stopped early; returns the lines printed
        after it (and may write files: process 0 only).
      policy: what acts between steps (a population's); None for none.
    """

    lines: Sequence[str]
    report: Callable[[TrainSummary], list[str]]
    policy: Policy | None = None


@dataclasses.dataclass
class _Saved:
    step: int = 0
    path: str | None = None


def _open_run(run_dir: RunDir, trainer: Trainer, source, feeder: Feeder, config: dict | None) -> Start:
    """Claims the run directory, finds where the run starts (step 0 without one) and puts the data there."""
    run_dir.claim(identity(trainer, getattr(source, "fingerprint", None), config), config,
                  getattr(source, "tokenizer", None))
    begin = run_dir.start(trainer)
    if run_dir.path is None:
        feeder.start(0)
        return begin
    if hasattr(source, "restore"):
        source.restore(begin.data_state or {"position": begin.step, "iterator": None})
    grain_saved = (begin.data_state or {}).get("grain") if isinstance(begin.data_state, dict) else None
    iterator_state = read_iterator_state(begin.source) if begin.source and grain_saved else None
    note = feeder.start(begin.step, begin.data_state if grain_saved else None, iterator_state)
    if note:
        notice(note)
    return begin


class _Run:
    """One run of the loop: the state, where it started, its writers, what was saved."""

    def __init__(self, trainer: Trainer, data: Any, settings: LoopSettings, eval_data, config, policy: Policy,
                 init: Callable[[int], TrainState] | None = None, frozen: Frozen | None = None):
        self.trainer, self.settings, self.policy = trainer, settings, policy
        self.init = init or trainer.init
        self.source = as_source(data)
        self.feeder = Feeder(self.source, trainer.batch_sharding, settings.workers)
        self.eval_batches = list(eval_data) if eval_data is not None else None
        self.start = time.perf_counter()
        self.run_dir = RunDir(settings.out_dir, settings.resume, settings.fresh, settings.checkpoint_keep,
                              settings.async_checkpoint, notice, frozen)
        self.begin = _open_run(self.run_dir, trainer, self.source, self.feeder, config)
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
        self.state = self.begin.state if self.begin.state is not None else self.init(settings.seed)
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
            self.recorder = Recorder(self.settings.steps, self.settings.log_every, self.writer, Throughput(self.trainer, batch), self.bar)
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
        # The previous step's record first, timed when its metrics are ready: after the wait below its
        # interval would hold this step too, and this step's own record almost nothing.
        self.flush()
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
        self.saved.path = self.run_dir.save(step + 1, self.state, data_state, self.feeder.iterator_state(),
                                            dict(self.trainer.mesh.shape))
        self.saved.step = step + 1

    def save_due(self, step: int, stopping: bool) -> bool:
        every = self.settings.checkpoint_every
        last = step + 1 == self.settings.steps
        return self.run_dir.saves and (last or (every and (step + 1) % every == 0) or stopping)

    def close(self) -> None:
        self.feeder.close()
        self.run_dir.close()  # waits until the last save is written and finalized
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
            if self.eval_batches:  # a finished run asked again still reports its evaluation
                self.val = evaluate(self.trainer, self.state.params, self.eval_batches)
        return TrainSummary(
            state=self.state, records=list(self.writer.records), val=None if stop_signal else self.val,
            out_dir=s.out_dir, mesh=dict(self.trainer.mesh.shape),
            resumed_from=self.begin.step if self.begin.source else None, preempted=stop_signal,
            bad_steps=int(np.sum(np.asarray(self.state.bad_steps))), checkpoint=self.saved.path,
            seconds=time.perf_counter() - self.start, compile_seconds=self.compile_s, trainer=self.trainer)


def run_loop(trainer: Trainer, data: Any, settings: LoopSettings, eval_data: Iterable[dict] | None = None,
             config: dict | None = None, policy: Policy | None = None,
             init: Callable[[int], TrainState] | None = None, frozen: Frozen | None = None) -> TrainSummary:
    """Trains ``trainer`` on ``data`` (any source :func:`shardml.core.data.as_source` takes) for
    ``settings.steps`` steps; see :func:`fit`. ``config`` is recorded in the run and checkpoints;
    ``policy`` acts between steps (populations); ``init`` (seed -> state) starts a new run instead
    of ``trainer.init`` (e.g. from imported weights); ``frozen`` parameters (a LoRA run's base) are
    left out of checkpoints and read again on resume (:class:`shardml.run.run_dir.Frozen`)."""
    if policy is None:
        policy = Policy()
        policy.max_bad_steps = settings.max_bad_steps
    name = "library.log" if distributed.primary() else f"library-{distributed.process_index()}.log"
    with LibraryLog(settings.out_dir, name):  # what the libraries say about failures shardml handles
        return _run(_Run(trainer, data, settings, eval_data, config, policy, init, frozen), settings)


def _run(run: _Run, settings: LoopSettings) -> TrainSummary:
    """The steps of an opened run, each checkpoint due, a stop asked for; the summary."""
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
