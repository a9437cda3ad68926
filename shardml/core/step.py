"""The train state and the compiled steps: a module-level train step, explicit shardings, donated
state, abstract init.

    trainer = build_trainer(model, mesh, optax.adamw(1e-3), microbatches=4)
    state = trainer.init(seed=0)                 # created already sharded
    state, metrics = trainer.step(state, batch)  # (state, batch) -> (state, metrics)

:func:`train_step` is the whole update and can be called (or jitted) on its own; the
:class:`Trainer` only holds it compiled with the shardings of one (model, mesh, optimizer).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from shardml.core.accumulate import accumulator
from shardml.core.checks import check_divisible
from shardml.core.data import put_batch
from shardml.core.errors import ConfigError
from shardml.core.losses import Loss, means, token_cross_entropy
from shardml.core.pipeline import PIPE, Pipeline, Schedule
from shardml.core.sharding import Rules, batch_sharding, constrain, is_axes, replicated, tree_shardings, use_rules
from shardml.core.strategy import GradientStrategy
from shardml.core.model import Model, check_logical


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything that changes during training; a PyTree (jit, checkpoints and vmap take it as is).

    ``rng`` holds raw key data (uint32) so the state saves and restores without key adapters; the
    step folds in the step number and each example's row for the model's random numbers.
    ``bad_steps`` counts the steps skipped for a non-finite loss or gradient, ``bad_streak`` those
    in a row; they live here (as ``optax.apply_if_finite`` keeps its counters) so they checkpoint
    with the state.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    bad_steps: jax.Array
    bad_streak: jax.Array


def init_state(seed: jax.Array, *, model: Model, optimizer: optax.GradientTransformation,
               strategy: GradientStrategy, rules: Rules | None = None) -> TrainState:
    """A fresh state: parameters from ``model.init`` (under ``rules``) in the strategy's layout, the
    optimizer's state."""
    key = jax.random.key(seed)
    with use_rules(rules):
        params = strategy.layout(model.init(jax.random.fold_in(key, 0)))
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.fold_in(key, 1)), bad_steps=zero, bad_streak=zero)


def row_keys(rng: jax.Array, step: jax.Array, rows: int) -> jax.Array:
    """Key data [rows, ...]: one key per row of the global batch, a function of (rng, step, row), so
    every layout and microbatch count gives each example the same random numbers."""
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(rows, dtype=jnp.uint32))
    data = jax.random.key_data(keys)
    return constrain(data, ("batch",) + (None,) * (data.ndim - 1))


def train_step(state: TrainState, batch: dict, *, strategy: GradientStrategy, optimizer: optax.GradientTransformation,
               rules: Rules, uses_rng: bool) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch; call it under ``jax.set_mesh`` (the trainer does).

    A non-finite loss or gradient leaves the parameters and optimizer state as they were; the step
    counter (the data position) still advances: the batch is consumed, not retried.
    """
    with use_rules(rules):
        rng_rows = row_keys(state.rng, state.step, jax.tree.leaves(batch)[0].shape[0]) if uses_rng else None
        grad_sums, sums = strategy.gradient_sums(state.params, batch, rng_rows)
        count = jnp.maximum(sums["count"], 1.0)
        grads = jax.tree.map(lambda axes, g: constrain(g / count, axes), strategy.param_logical, grad_sums,
                             is_leaf=is_axes)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = means(sums)
    metrics["grad_norm"] = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                     (params, opt_state), (state.params, state.opt_state))
    bad = 1 - finite.astype(jnp.int32)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng,
                     bad_steps=state.bad_steps + bad, bad_streak=(state.bad_streak + 1) * bad)
    metrics.update(skipped=bad, bad_steps=new.bad_steps, bad_streak=new.bad_streak)
    return new, metrics


def eval_step(params: Any, batch: dict, *, strategy: GradientStrategy, rules: Rules) -> dict:
    """Loss sums of a batch (``loss``, ``count``, ...): add them over batches, divide once at the end."""
    with use_rules(rules):
        return strategy.loss_sums(params, batch)


def predict_step(params: Any, inputs: Any, *, model: Model, strategy: GradientStrategy, rules: Rules) -> Any:
    """The model's deterministic outputs for ``inputs`` (parameters in the strategy's layout)."""
    with use_rules(rules):
        return model(strategy.natural(params), inputs)


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
        found.append(optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract_opt, params,
                                           transform_non_params=lambda _: replicated(mesh)))
        return jnp.zeros(())

    jax.eval_shape(trace)
    return found[0]


def state_shardings(strategy: GradientStrategy, optimizer, model: Model, rules: Rules, mesh) -> TrainState:
    """Shardings of the state: parameters by the rules, optimizer state following the parameters."""
    params = tree_shardings(strategy.param_logical, rules, mesh)
    abstract = jax.eval_shape(strategy.layout, model.abstract_params)
    one = replicated(mesh)
    return TrainState(step=one, params=params, opt_state=opt_state_shardings(optimizer, abstract, params, mesh),
                      rng=one, bad_steps=one, bad_streak=one)


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The compiled functions of one (model, loss, mesh, optimizer, microbatches) combination.

    Attributes:
      strategy: how gradients are computed (the accumulator or a pipeline schedule).
      state_shardings: TrainState of NamedShardings (parameters and optimizer state by the rules).
      batch_sharding: sharding of every batch leaf (leading dim over the batch axes).
    """

    model: Model
    loss: Loss
    mesh: Any
    rules: Rules
    optimizer: optax.GradientTransformation
    microbatches: int
    strategy: GradientStrategy
    state_shardings: TrainState
    batch_sharding: NamedSharding
    schedule: Schedule | None
    _init: Any
    _step: Any
    _eval: Any
    _predict: Any = None
    members: int = 1  # > 1: a population (shardml.parallel.members), every leaf stacked on axis 0
    eval_sharding: NamedSharding | None = None  # of evaluation batches, when not batch_sharding
    # Leading axes of a training batch leaf that index the examples one step trains on: 1 for
    # [rows, ...]; 2 for a population's per-member batches [members, rows, ...]; 3 for a federated
    # round's [slots, local steps, rows, ...].
    batch_axes: int = 1

    def examples_per_step(self, batch_shape: tuple[int, ...]) -> int:
        """How many examples one step trains on, from a training batch leaf's shape (a population
        sharing one batch trains every member on all of it)."""
        shared = self.members if self.batch_axes == 1 else 1
        return math.prod(batch_shape[:self.batch_axes]) * shared

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
        return put_batch(batch, self.eval_sharding or self.batch_sharding)


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
      ConfigError: before anything compiles, when a parameter does not divide over its mesh axes,
        a logical name has no rule, or the model cannot be pipelined.
    """
    rules = rules or Rules.default()
    stages = mesh.shape.get(PIPE, 1)
    schedule = (schedule or default_schedule(stages)) if stages > 1 else None
    if microbatches < 1:
        raise ConfigError(f"train.microbatches={microbatches} must be >= 1")
    check_logical(model)
    if stages > 1 and rules.mesh_axes("layers") != (PIPE,):
        raise ConfigError(f"mesh.pipeline={stages} needs the rules to map 'layers' to 'pipeline' "
                          f"(they map it to {rules.mesh_axes('layers') or None})")
    strategy = gradient_strategy(model, loss, mesh, microbatches, schedule)
    abstract = jax.eval_shape(strategy.layout, model.abstract_params)
    check_divisible(strategy.param_logical, abstract, rules, mesh.shape)
    shardings = state_shardings(strategy, optimizer, model, rules, mesh)
    data = batch_sharding(mesh, rules)
    one = replicated(mesh)
    step = functools.partial(train_step, strategy=strategy, optimizer=optimizer, rules=rules,
                             uses_rng=model.uses_rng)
    return Trainer(
        model=model, loss=loss, mesh=mesh, rules=rules, optimizer=optimizer, microbatches=microbatches,
        strategy=strategy, state_shardings=shardings, batch_sharding=data,
        schedule=schedule,
        _init=jax.jit(functools.partial(init_state, model=model, optimizer=optimizer, strategy=strategy,
                                        rules=rules),
                      out_shardings=shardings),
        _step=jax.jit(step, in_shardings=(shardings, data), out_shardings=(shardings, one), donate_argnums=0),
        _eval=jax.jit(functools.partial(eval_step, strategy=strategy, rules=rules),
                      in_shardings=(shardings.params, data), out_shardings=one),
        _predict=jax.jit(functools.partial(predict_step, model=model, strategy=strategy, rules=rules),
                         in_shardings=(shardings.params, data)),
    )
