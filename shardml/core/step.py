"""The one trainer builder: a pure :class:`Program` (init, step, evaluate, predict and their
shardings) built once for a model, transformations that wrap it, and the one place it is jitted.

    program = step_program(model, mesh, optax.adamw(1e-3), microbatches=4)   # checked, not compiled
    trainer = compile_trainer(program)           # or build_trainer(model, mesh, ...) for both
    state = trainer.init(seed=0)                 # created already sharded
    state, metrics = trainer.step(state, batch)  # (state, batch) -> (state, metrics)

A population (:func:`shardml.parallel.members.over_population`) and a federated round
(:func:`shardml.parallel.federated.federated_rounds`) are functions ``Program -> Program``, the
way optax wraps a gradient transformation: they map or scan the pure step and say how their state
and batches are laid out; :func:`compile_trainer` jits whatever they return with explicit
shardings and a donated state. The update itself lives in :mod:`shardml.core.update`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from shardml.core.accumulate import accumulator
from shardml.core.checks import check_divisible
from shardml.core.data import put_batch
from shardml.core.errors import LayoutError, SettingError
from shardml.core.losses import Loss, token_cross_entropy
from shardml.core.model import Model, check_logical
from shardml.core.pipeline import PIPE, Pipeline, Schedule
from shardml.core.sharding import Rules, batch_sharding, replicated, tree_shardings
from shardml.core.strategy import GradientStrategy
# The pure update, re-exported: callers import the state and the step from here.
from shardml.core.update import TrainState, eval_step, init_state, predict_step, row_keys, train_step  # noqa: F401


def gradient_strategy(model: Model, loss: Loss, mesh, microbatches: int = 1,
                      schedule: Schedule | None = None) -> GradientStrategy:
    """The accumulator, or a pipeline when ``mesh`` has a ``pipeline`` axis (``schedule`` default:
    1F1B with one microbatch per stage)."""
    stages = mesh.shape.get(PIPE, 1)
    if stages == 1:
        return accumulator(model, loss, mesh, microbatches)
    return Pipeline(model, mesh, schedule or default_schedule(stages), passes=microbatches, loss_fn=loss).strategy()


def default_schedule(stages: int) -> Schedule:
    """1F1B with one microbatch per stage."""
    return Schedule("1f1b", stages, stages)


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_params: Any, params: Any, mesh) -> Any:
    """The optimizer state's shardings: parameter-shaped parts like ``params``, the rest replicated.

    ``optax.tree_map_params`` calls ``optimizer.init`` on a placeholder, which creates (and so
    compiles) small arrays such as step counts; it runs inside an abstract trace here, so building
    a trainer compiles nothing before the layout has been checked.
    """
    found = []

    def trace():
        abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
        # A masked part (optax.masked, multi_transform: a frozen LoRA base) holds no state: kept as it is.
        found.append(optax.tree_map_params(optimizer, lambda x, sharding: x if _masked(x) else sharding, abstract_opt,
                                           params, transform_non_params=lambda _: replicated(mesh), is_leaf=_masked))
        return jnp.zeros(())

    jax.eval_shape(trace)
    return found[0]


def _masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def state_shardings(strategy: GradientStrategy, optimizer, model: Model, rules: Rules, mesh) -> TrainState:
    """Shardings of the state: parameters by the rules, optimizer state following the parameters."""
    params = tree_shardings(strategy.param_logical, rules, mesh)
    abstract = jax.eval_shape(strategy.layout, model.abstract_params)
    one = replicated(mesh)
    return TrainState(step=one, params=params, opt_state=opt_state_shardings(optimizer, abstract, params, mesh),
                      rng=one, bad_steps=one, bad_streak=one)


# ----------------------------------------------------------------------------- the program


@dataclasses.dataclass(frozen=True)
class BatchAxes:
    """The leading axes of a training batch leaf that index the examples one step trains on.

    Attributes:
      names: ``("rows",)`` for a plain step; a transformation puts its own axes in front
        (``("members", "rows")``, ``("slots", "local_steps", "rows")``).
      sharing: how many models train on each example (a population sharing one batch: every member).
    """

    names: tuple[str, ...] = ("rows",)
    sharing: int = 1

    def examples(self, shape: tuple[int, ...]) -> int:
        """Examples one step trains on, from a batch leaf's shape."""
        return math.prod(shape[:len(self.names)]) * self.sharing

    def under(self, *outer: str) -> BatchAxes:
        """These axes with ``outer`` axes in front (each model of the wrapper has its own batch)."""
        return BatchAxes((*outer, *self.names), self.sharing)

    def shared_by(self, models: int) -> BatchAxes:
        """These axes, every example trained on by ``models`` models."""
        return BatchAxes(self.names, self.sharing * models)


class Shardings(NamedTuple):
    """Where a program's arrays live: ``state`` (a TrainState of NamedShardings), every ``batch``
    leaf, evaluation (and prediction) batches ``eval``, and ``metrics`` (of steps and evaluations)."""

    state: TrainState
    batch: NamedSharding
    eval: NamedSharding
    metrics: NamedSharding


class Parts(NamedTuple):
    """What one model's step is made of (transformations keep them as they are)."""

    model: Model
    loss: Loss
    mesh: Any
    rules: Rules
    optimizer: optax.GradientTransformation
    microbatches: int
    strategy: GradientStrategy
    schedule: Schedule | None


@dataclasses.dataclass(frozen=True)
class Program:
    """The pure functions of training, before jit, and what compiling them needs.

    Attributes:
      init: ``seed (uint32) -> state``.
      step: ``(state, batch) -> (state, metrics)``.
      evaluate: ``(params, batch) -> loss sums``; predict: ``(params, inputs) -> outputs``.
      shardings: where the state, batches and metrics live.
      examples: the leading example axes of a training batch.
      members: models stacked on the state's leading axis (1: the state is one model's).
      parts: the model, loss, mesh, rules, optimizer, ... the step was built from.
    """

    init: Callable
    step: Callable
    evaluate: Callable
    predict: Callable
    shardings: Shardings
    parts: Parts
    examples: BatchAxes = BatchAxes()
    members: int = 1


def check_step(model: Model, mesh, rules: Rules, microbatches: int) -> None:
    """What a step of ``model`` on ``mesh`` needs before anything is traced.

    Raises:
      SettingError: ``microbatches`` < 1.
      ModelError: a parameter without logical axes.
      LayoutError: a ``pipeline`` mesh axis the rules do not map ``layers`` to.
    """
    if microbatches < 1:
        raise SettingError(f"microbatches={microbatches} must be >= 1", subject="microbatches", value=microbatches)
    check_logical(model)
    stages = mesh.shape.get(PIPE, 1)
    if stages > 1 and rules.mesh_axes("layers") != (PIPE,):
        raise LayoutError(f"pipeline={stages} needs the rules to map 'layers' to 'pipeline' "
                          f"(they map it to {rules.mesh_axes('layers') or None})", subject="pipeline", value=stages)


def step_program(model: Model, mesh, optimizer: optax.GradientTransformation, *, loss: Loss = token_cross_entropy,
                 microbatches: int = 1, schedule: Schedule | None = None, rules: Rules | None = None,
                 strategy: GradientStrategy | None = None, uses_rng: bool | None = None) -> Program:
    """The checked :class:`Program` of one model (arguments as :func:`build_trainer`); nothing is
    compiled. ``strategy`` replaces the accumulator or pipeline (e.g. DP-SGD's accumulator);
    ``uses_rng`` (default ``model.uses_rng``) gives the strategy one key per row."""
    rules = rules or Rules.default()
    stages = mesh.shape.get(PIPE, 1)
    schedule = (schedule or default_schedule(stages)) if stages > 1 else None
    check_step(model, mesh, rules, microbatches)
    strategy = strategy or gradient_strategy(model, loss, mesh, microbatches, schedule)
    check_divisible(strategy.param_logical, jax.eval_shape(strategy.layout, model.abstract_params), rules, mesh.shape)
    data = batch_sharding(mesh, rules)
    shardings = Shardings(state=state_shardings(strategy, optimizer, model, rules, mesh), batch=data, eval=data,
                          metrics=replicated(mesh))
    uses_rng = model.uses_rng if uses_rng is None else uses_rng
    return Program(
        init=functools.partial(init_state, model=model, optimizer=optimizer, strategy=strategy, rules=rules),
        step=functools.partial(train_step, strategy=strategy, optimizer=optimizer, rules=rules, uses_rng=uses_rng),
        evaluate=functools.partial(eval_step, strategy=strategy, rules=rules),
        predict=functools.partial(predict_step, model=model, strategy=strategy, rules=rules),
        shardings=shardings, parts=Parts(model, loss, mesh, rules, optimizer, microbatches, strategy, schedule))


# ----------------------------------------------------------------------------- the compiled trainer


def _part(name: str) -> property:
    """A trainer attribute read from the parts its program's step was built from."""
    return property(lambda self: getattr(self.program.parts, name), doc=f"The step's {name} (``program.parts``).")


@dataclasses.dataclass(frozen=True)
class Trainer:
    """A :class:`Program` jitted with its shardings (the state donated to the step).

    Attributes (from the program): model, loss, mesh, rules, optimizer, microbatches, strategy,
    schedule; state_shardings, batch_sharding (of every training batch leaf), eval_sharding;
    members (> 1: every state leaf stacked on axis 0); batch_axes (the number of leading example
    axes of a training batch, ``program.examples``).
    """

    program: Program
    _init: Any
    _step: Any
    _eval: Any
    _predict: Any

    model = _part("model")
    loss = _part("loss")
    mesh = _part("mesh")
    rules = _part("rules")
    optimizer = _part("optimizer")
    microbatches = _part("microbatches")
    strategy = _part("strategy")
    schedule = _part("schedule")

    @property
    def state_shardings(self) -> TrainState:
        return self.program.shardings.state

    @property
    def batch_sharding(self) -> NamedSharding:
        return self.program.shardings.batch

    @property
    def eval_sharding(self) -> NamedSharding:
        return self.program.shardings.eval

    @property
    def members(self) -> int:
        return self.program.members

    @property
    def batch_axes(self) -> int:
        return len(self.program.examples.names)

    def examples_per_step(self, batch_shape: tuple[int, ...]) -> int:
        """How many examples one step trains on, from a training batch leaf's shape (a population
        sharing one batch trains every member on all of it)."""
        return self.program.examples.examples(batch_shape)

    def init(self, seed: int = 0) -> TrainState:
        """A fresh state, every array created directly in its shards."""
        with jax.set_mesh(self.mesh):
            return self._init(jnp.asarray(seed, jnp.uint32))

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One optimizer step on a global batch; ``state`` is donated.

        ``metrics["skipped"]`` is 1 when the loss or the gradients were not finite: the step then
        left ``params`` and ``opt_state`` unchanged (``step`` still counts the batch).
        """
        with jax.set_mesh(self.mesh):
            return self._step(state, batch)

    def evaluate(self, params: Any, batch: dict) -> dict:
        """Loss sums of a batch (divide sums over batches once, at the end)."""
        with jax.set_mesh(self.mesh):
            return self._eval(params, batch)

    def predict(self, params: Any, inputs: Any) -> Any:
        """The model's outputs (logits) for a global batch of inputs, deterministic (no dropout);
        a population gives every member's, stacked on axis 0."""
        with jax.set_mesh(self.mesh):
            return self._predict(params, inputs)

    def natural(self, params: Any) -> Any:
        """The model's own parameter layout (a circular pipeline stores layers regrouped)."""
        return self.strategy.natural(params)

    def trace_step(self, state: Any, batch: Any):
        """``jax.stages.Traced`` of the step (``.jaxpr``), for audits (accepts ShapeDtypeStructs)."""
        with jax.set_mesh(self.mesh):
            return self._step.trace(state, batch)

    def lower_step(self, state: Any, batch: Any):
        """``jax.stages.Lowered`` of the step, for audits (accepts ShapeDtypeStructs)."""
        with jax.set_mesh(self.mesh):
            return self._step.lower(state, batch)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs (with shardings) of the state, without allocating it."""
        with jax.set_mesh(self.mesh):
            shapes = jax.eval_shape(self._init, jnp.asarray(0, jnp.uint32))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_shardings)

    def put(self, batch: dict) -> dict:
        """A host training batch as global arrays sharded over the batch axes (see :func:`put_batch`)."""
        return put_batch(batch, self.batch_sharding)

    def put_eval(self, batch: dict) -> dict:
        """A host evaluation (or prediction) batch as global arrays; a population whose members train
        on their own data still evaluates them all on the same batch."""
        return put_batch(batch, self.eval_sharding)


def compile_trainer(program: Program, kind: type[Trainer] = Trainer, **fields: Any) -> Trainer:
    """``program`` jitted (compiling on first use) with its shardings and a donated state: the one
    place shardml calls ``jax.jit`` on a training program. ``kind`` and ``fields``: a Trainer
    subclass and its extra fields (e.g. :class:`shardml.parallel.federated.FederatedTrainer`)."""
    sh = program.shardings
    return kind(
        program=program,
        _init=jax.jit(program.init, out_shardings=sh.state),
        _step=jax.jit(program.step, in_shardings=(sh.state, sh.batch), out_shardings=(sh.state, sh.metrics),
                      donate_argnums=0),
        _eval=jax.jit(program.evaluate, in_shardings=(sh.state.params, sh.eval), out_shardings=sh.metrics),
        _predict=jax.jit(program.predict, in_shardings=(sh.state.params, sh.eval)),
        **fields)


def build_trainer(model: Model, mesh, optimizer: optax.GradientTransformation, *, loss: Loss = token_cross_entropy,
                  microbatches: int = 1, schedule: Schedule | None = None, rules: Rules | None = None) -> Trainer:
    """Checks the layout, then jits (compiling on first use) the init, train and eval steps.

    Args:
      model: a :class:`shardml.Model` (e.g. from :func:`shardml.from_nnx`).
      mesh: from :func:`shardml.make_mesh`.
      optimizer: any optax transformation.
      loss: ``loss(outputs, batch) -> sums`` (:mod:`shardml.core.losses`); default token
        cross-entropy.
      microbatches: k, the accumulator's split of each device's rows.
      schedule: the pipeline schedule when ``mesh`` has a ``pipeline`` axis > 1.
      rules: logical -> mesh axes; default :meth:`Rules.default`.

    Raises:
      ShardmlError: before anything compiles (:func:`check_step`, :func:`check_divisible`), when a
        parameter does not divide over its mesh axes, a logical name has no rule, or the model
        cannot be pipelined.
    """
    return compile_trainer(step_program(model, mesh, optimizer, loss=loss, microbatches=microbatches,
                                        schedule=schedule, rules=rules))
