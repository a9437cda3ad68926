"""The one mechanism behind populations: N train states stacked on a leading axis, one vmapped step,
the stack sharded over the ``members`` mesh axis (N / mesh.members members per device group).

Every member is a model of its own: its own initialisation and RNG stream (member i starts from
seed + i), its own optimizer state and hyperparameters (values injected into the optimizer state,
so one compile serves every value), its own metrics. Inside each member the usual layouts apply
(data, fsdp and tensor over the devices of its group)::

    trainer = build_population(model, mesh, default_optimizer(OptimConfig(), 100), members=8,
                               hyperparams={"lr": [1e-3, 3e-3, 1e-2, 3e-2] * 2})
    state = trainer.init(seed=0)                      # TrainState, every leaf [8, ...]
    state, metrics = trainer.step(state, trainer.put(batch))   # metrics["loss"]: [8]

The returned :class:`~shardml.core.step.Trainer` has the same interface as a single model's, so
the loop, checkpoints and resume take a population as they take one model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from shardml.core.checks import check_divisible
from shardml.core.errors import ConfigError
from shardml.core.losses import Loss, token_cross_entropy
from shardml.core.pipeline import PIPE
from shardml.core.sharding import Rules, axes_owned_by_transform, batch_sharding
from shardml.core.step import (Trainer, eval_step, gradient_strategy, init_state, predict_step, state_shardings,
                               train_step)
from shardml.core.model import Model, check_logical

MEMBERS = "members"
GATE = "member_active"  # the injected multiplier of a member's updates: 1 trains it, 0 freezes it


def member_seeds(seed: int, members: int) -> np.ndarray:
    """Member i initialises from (and draws its random numbers from) seed + i."""
    return np.arange(members, dtype=np.uint32) + np.uint32(seed)


def _gate(member_active):
    return optax.scale(member_active)


def gated(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optimizer`` followed by a per-member multiplier (``GATE``, 1.0): early stopping a member
    sets it to 0, freezing its parameters without recompiling. Multiplying by 1.0 is exact, so a
    member trains bit for bit as the plain optimizer would."""
    return optax.chain(optimizer, optax.inject_hyperparams(_gate)(member_active=1.0))


def stacked(sharding: NamedSharding) -> NamedSharding:
    """The sharding of a stack of arrays laid out as ``sharding``: the leading axis over ``members``."""
    return NamedSharding(sharding.mesh, P(MEMBERS, *sharding.spec))


_stacked = stacked


def over_members(fn, in_axes: Any = 0):
    """``fn`` of one member applied to every member of a stack: ``vmap`` over the leading axis, which
    stays sharded over the ``members`` mesh axis (the constraints inside ``fn`` leave that axis to
    the vmap). Populations map the train step with it, federated rounds the local update."""

    def mapped(*args):
        with axes_owned_by_transform(MEMBERS):
            return jax.vmap(fn, in_axes=in_axes, spmd_axis_name=MEMBERS)(*args)

    return mapped


def set_hyperparams(opt_state: Any, values: Mapping[str, Any]) -> Any:
    """The optimizer state with injected hyperparameters replaced (arrays with the member axis).

    Raises:
      ConfigError: a name that is not an injected hyperparameter of the optimizer.
    """
    if not values:
        return opt_state
    try:
        return optax.tree_utils.tree_set(opt_state, **{k: jnp.asarray(v, jnp.float32) for k, v in values.items()})
    except (KeyError, ValueError) as err:
        raise ConfigError(f"cannot give members their own {sorted(values)}: the optimizer has no injected "
                          f"hyperparameter of that name ({err}); build it with optax.inject_hyperparams") from None


def with_hyperparams(state, values: Mapping[str, Any]):
    """``state`` with injected hyperparameters replaced, on the shardings the old values had (so a
    compiled step takes the new state without recompiling)."""
    opt_state = set_hyperparams(state.opt_state, values)
    opt_state = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), opt_state, state.opt_state)
    return dataclasses.replace(state, opt_state=opt_state)


def hyperparams_of(opt_state: Any) -> dict[str, Any]:
    """Every injected hyperparameter of an optimizer state, by name (``GATE`` included)."""
    found: dict[str, Any] = {}

    def visit(node):
        if hasattr(node, "hyperparams") and hasattr(node, "inner_state"):  # optax's Inject*HyperparamsState
            found.update(node.hyperparams)
            visit(node.inner_state)
        elif isinstance(node, (tuple, list)):
            for child in node:
                visit(child)

    visit(opt_state)
    return found


def check_members(members: int, mesh) -> None:
    groups = mesh.shape.get(MEMBERS, 1)
    if members < 1:
        raise ConfigError(f"population.size={members} must be >= 1")
    if members % groups:
        raise ConfigError(f"population.size={members} is not divisible by mesh.members={groups}; each device "
                          f"group holds the same number of members, so use a multiple of {groups}")
    if mesh.shape.get(PIPE, 1) > 1:
        raise ConfigError(f"mesh.pipeline={mesh.shape[PIPE]} with a population: members are vmapped, and the "
                          "pipeline's shard_map does not run under vmap; use mesh.pipeline=1 (data, fsdp and "
                          "tensor work inside each member)")


def build_population(model: Model, mesh, optimizer: optax.GradientTransformation, members: int, *,
                     loss: Loss = token_cross_entropy, microbatches: int = 1, rules: Rules | None = None,
                     hyperparams: Mapping[str, Sequence[float]] | None = None,
                     per_member_data: bool = False) -> Trainer:
    """A :class:`Trainer` of ``members`` stacked copies of ``model`` (see the module docstring).

    Args:
      optimizer: any optax optimizer; it is :func:`gated`. ``hyperparams`` names must be injected
        hyperparameters of it (``optax.inject_hyperparams``, as :func:`shardml.default_optimizer`).
      hyperparams: name -> one value per member.
      per_member_data: training batches carry a leading member axis (bootstrap resamples, client
        data); otherwise every member trains on the same global batch. Evaluation batches are
        always shared.

    Raises:
      ConfigError: before anything compiles.
    """
    rules = rules or Rules.default()
    check_members(members, mesh)
    check_logical(model)
    optimizer = gated(optimizer)
    values = {k: np.asarray(v, np.float32) for k, v in (hyperparams or {}).items()}
    for name, value in values.items():
        if value.shape != (members,):
            raise ConfigError(f"hyperparameter {name} has {value.size} values for {members} members")
    strategy = gradient_strategy(model, loss, mesh, microbatches)
    check_divisible(strategy.param_logical, model.abstract_params, rules, mesh.shape)
    one = state_shardings(strategy, optimizer, model, rules, mesh)
    shardings = jax.tree.map(_stacked, one)
    shared = batch_sharding(mesh, rules)
    data = _stacked(shared) if per_member_data else shared
    metric = NamedSharding(mesh, P(MEMBERS))
    set_values = functools.partial(set_hyperparams, values=values)

    def init(seed):
        seeds = jnp.arange(members, dtype=jnp.uint32) + seed
        state = jax.vmap(functools.partial(init_state, model=model, optimizer=optimizer, strategy=strategy,
                                              rules=rules))(seeds)
        return dataclasses.replace(state, opt_state=set_values(state.opt_state))

    one_step = functools.partial(train_step, strategy=strategy, optimizer=optimizer, rules=rules,
                                 uses_rng=model.uses_rng)

    step = over_members(one_step, in_axes=(0, 0 if per_member_data else None))
    evaluate = over_members(functools.partial(eval_step, strategy=strategy, rules=rules), in_axes=(0, None))
    predict = over_members(functools.partial(predict_step, model=model, strategy=strategy, rules=rules),
                           in_axes=(0, None))

    return Trainer(
        model=model, loss=loss, mesh=mesh, rules=rules, optimizer=optimizer, microbatches=microbatches,
        strategy=strategy, state_shardings=shardings, batch_sharding=data, schedule=None, members=members,
        batch_axes=2 if per_member_data else 1,
        _predict=jax.jit(predict, in_shardings=(shardings.params, shared)), eval_sharding=shared,
        _init=jax.jit(init, out_shardings=shardings),
        _step=jax.jit(step, in_shardings=(shardings, data), out_shardings=(shardings, metric), donate_argnums=0),
        _eval=jax.jit(evaluate, in_shardings=(shardings.params, shared), out_shardings=metric),
    )
