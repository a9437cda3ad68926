"""``fit``: any model, loss, optimizer and data source through the whole training loop, from Python.

    summary = fit(model, data, optax.adamw(1e-3), loss=classification, mesh={"data": 2, "fsdp": 2, "tensor": 2},
                  steps=300, eval_data=eval_batches, out_dir="runs/digits")
    summary.val["accuracy"], summary.records[-1]

The loop itself is :mod:`shardml.run.engine`, the run directory (claim, checkpoints, resume)
:mod:`shardml.run.run_dir`; their public names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from shardml.core.checks import check_batch
from shardml.core.losses import Loss, token_cross_entropy
from shardml.core.mesh import as_mesh
from shardml.core.step import build_trainer
from shardml.parallel.members import build_population
from shardml.run import distributed
from shardml.run.engine import (LoopSettings, NonFiniteError, Policy, TrainSummary, check_finite, evaluate, notice,
                                run_loop)
from shardml.run.population import PopulationPolicy
from shardml.run.throughput import Throughput

__all__ = ["LoopSettings", "NonFiniteError", "Policy", "Throughput", "TrainSummary", "check_finite", "check_source",
           "evaluate", "fit", "notice", "run_loop"]


def check_source(trainer, data: Any) -> None:
    """The check ``shardml train`` makes of ``train.batch_size`` (:func:`shardml.core.checks.check_batch`,
    one source for both), made of a source that declares its ``batch_size`` (``ArrayBatches``,
    ``TextBatches``), before anything compiles.

    Raises:
      LayoutError: ``batch_size=30 is not divisible by data=2 x fsdp=2 x microbatches=1 = 4; ...``.
    """
    rows = getattr(data, "batch_size", None)
    if isinstance(rows, int) and not isinstance(rows, bool):
        schedule = trainer.schedule
        check_batch(rows, dict(trainer.mesh.shape), trainer.microbatches, schedule.microbatches if schedule else 1,
                    trainer.rules)


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
      ShardmlError: before anything compiles, for input that cannot work: a ``LayoutError`` for a
        layout the model or the batch cannot take (a ``batch_size`` that ``data`` x ``fsdp`` x
        ``microbatches`` does not divide, worded as ``shardml train`` words it, with the argument
        names for the config keys), a ``ConfigError`` for an out_dir that cannot be used.
      CheckpointError: ``out_dir`` has checkpoints and none is usable.
      NonFiniteError: ``max_bad_steps`` non-finite steps in a row (the last checkpoint is kept).
    """
    distributed.start()  # a cluster JAX detects, when nothing has started JAX's backend yet
    loop_settings = LoopSettings(steps=steps, **settings)
    if members == 1 and not hyperparams:
        trainer = build_trainer(model, as_mesh(mesh), optimizer, loss=loss, microbatches=microbatches, rules=rules,
                                schedule=schedule)
        check_source(trainer, data)
        return run_loop(trainer, data, loop_settings, eval_data)
    trainer = build_population(model, as_mesh(mesh), optimizer, members, loss=loss, microbatches=microbatches,
                               rules=rules, hyperparams=hyperparams, per_member_data=member_data)
    check_source(trainer, data)
    policy = PopulationPolicy(trainer, "ensemble", (), loop_settings.seed, steps, loop_settings.max_bad_steps)
    return run_loop(trainer, data, loop_settings, eval_data, policy=policy)
