"""The pure train update of one model: its state, one step on a global batch, the non-finite guard.

Nothing here knows about meshes or jit; :mod:`shardml.core.step` compiles these functions with
their shardings, and the population and federated transformations map or scan them::

    state = init_state(seed, model=model, optimizer=opt, strategy=strategy, rules=rules)
    state, metrics = train_step(state, batch, strategy=strategy, optimizer=opt, rules=rules, uses_rng=False)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from shardml.core.losses import means
from shardml.core.model import Model
from shardml.core.sharding import Rules, constrain, is_axes, use_rules
from shardml.core.strategy import GradientStrategy


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
    return state_of(params, seed, optimizer=optimizer)


def state_of(params: Any, seed: jax.Array, *, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0 with these parameters (already in the strategy's layout): the optimizer's fresh state
    and the run's random key from ``seed`` — what :func:`init_state` gives, for parameters that come
    from elsewhere (an imported checkpoint), without making random ones first.

        state = jax.jit(functools.partial(state_of, optimizer=opt))(params, seed)
    """
    key = jax.random.key(seed)
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


def advance(state: TrainState, params: Any, opt_state: Any, finite: jax.Array,
            metrics: dict) -> tuple[TrainState, dict]:
    """The next state, guarded: when ``finite`` is false, ``params`` and ``opt_state`` stay as they
    were in ``state`` and the step counts as skipped; the step counter (the data position) always
    advances, since the batch is consumed, not retried. Every step (a train step, a federated
    round) ends here, so the counters mean the same everywhere."""
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                     (params, opt_state), (state.params, state.opt_state))
    bad = 1 - finite.astype(jnp.int32)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng,
                     bad_steps=state.bad_steps + bad, bad_streak=(state.bad_streak + 1) * bad)
    return new, {**metrics, "skipped": bad, "bad_steps": new.bad_steps, "bad_streak": new.bad_streak}


def train_step(state: TrainState, batch: dict, *, strategy: GradientStrategy, optimizer: optax.GradientTransformation,
               rules: Rules, uses_rng: bool) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch; call it under ``jax.set_mesh`` (the trainer does).

    A non-finite loss or gradient leaves the parameters and optimizer state as they were
    (:func:`advance`).
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
    return advance(state, params, opt_state, finite, metrics)


def eval_step(params: Any, batch: dict, *, strategy: GradientStrategy, rules: Rules) -> dict:
    """Loss sums of a batch (``loss``, ``count``, ...): add them over batches, divide once at the end."""
    with use_rules(rules):
        return strategy.loss_sums(params, batch)


def predict_step(params: Any, inputs: Any, *, model: Model, strategy: GradientStrategy, rules: Rules) -> Any:
    """The model's deterministic outputs for ``inputs`` (parameters in the strategy's layout)."""
    with use_rules(rules):
        return model(strategy.natural(params), inputs)
