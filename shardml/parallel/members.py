"""The one mechanism behind populations: N train states stacked on a leading axis, one vmapped step,
the stack sharded over the ``members`` mesh axis (N / mesh.members members per device group).

:func:`over_population` is a transformation ``Program -> Program`` (:mod:`shardml.core.step`):
it maps a single model's pure init and step over the members and says how the stack is laid
out; :func:`build_population` builds, wraps and compiles. Every member is a model of its own:
its own initialisation and RNG stream (member i starts from seed + i), its own optimizer state
and hyperparameters (values injected into the optimizer state, so one compile serves every
value), its own metrics. Inside each member the usual layouts apply (data, fsdp and tensor over
the devices of its group)::

    trainer = build_population(model, mesh, default_optimizer(OptimConfig(), 100), members=8,
                               hyperparams={"lr": [1e-3, 3e-3, 1e-2, 3e-2] * 2})
    # the same, in its two steps:
    program = over_population(step_program(model, mesh, gated(optimizer)), 8, hyperparams=...)
    trainer = compile_trainer(program)
    state = trainer.init(seed=0)                      # TrainState, every leaf [8, ...]
    state, metrics = trainer.step(state, trainer.put(batch))   # metrics["loss"]: [8]

The returned :class:`~shardml.core.step.Trainer` has the same interface as a single model's, so
the loop, checkpoints and resume take a population as they take one model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from shardml.core.errors import LayoutError, SettingError
from shardml.core.losses import Loss, token_cross_entropy
from shardml.core.model import Model
from shardml.core.pipeline import PIPE
from shardml.core.sharding import Rules, axes_owned_by_transform
from shardml.core.step import Program, Shardings, Trainer, compile_trainer, step_program
from shardml.models.lora import MEMBER_SETTINGS, check_member_settings, shared_params, with_member_settings

MEMBERS = "members"
GATE = "member_active"  # the injected multiplier of a member's updates: 1 trains it, 0 freezes it


def member_seeds(seed, members: int) -> jax.Array:
    """Member i initialises from (and draws its random numbers from) seed + i (uint32; ``seed`` may
    be traced)."""
    return jnp.arange(members, dtype=jnp.uint32) + jnp.asarray(seed, jnp.uint32)


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
      SettingError: a name that is not an injected hyperparameter of the optimizer.
    """
    if not values:
        return opt_state
    try:
        return optax.tree_utils.tree_set(opt_state, **{k: jnp.asarray(v, jnp.float32) for k, v in values.items()})
    except (KeyError, ValueError) as err:
        raise SettingError(f"cannot give members their own {sorted(values)}: the optimizer has no injected "
                           f"hyperparameter of that name ({err}); build it with optax.inject_hyperparams",
                           subject="hyperparams", value=sorted(values)) from None


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


def check_stackable(program: Program, stacked_: str) -> None:
    """The one check that ``program`` can be vmapped over a stack of ``stacked_`` ("members",
    "clients"): it trains one model, and no pipeline (its shard_map does not run under vmap).

    Raises:
      SettingError: a program already stacked, or a ``pipeline`` mesh axis > 1 (subject ``pipeline``).
    """
    if program.members > 1:
        raise SettingError(f"the program already trains {program.members} stacked members; stack {stacked_} over "
                           f"one model's program", subject="members", value=program.members)
    stages = program.parts.mesh.shape.get(PIPE, 1)
    if stages > 1:
        raise SettingError(f"pipeline={stages} with stacked {stacked_}: {stacked_} are vmapped, and the pipeline's "
                           f"shard_map does not run under vmap; use pipeline=1 (data, fsdp and tensor work inside "
                           f"each of the {stacked_})", subject="pipeline", value=stages)


def check_members(members: int, mesh) -> None:
    """``members`` models fit the ``members`` mesh axis.

    Raises:
      SettingError: ``members`` < 1. LayoutError: ``members`` not a multiple of the ``members``
        mesh axis.
    """
    groups = mesh.shape.get(MEMBERS, 1)
    if members < 1:
        raise SettingError(f"members={members} must be >= 1", subject="members", value=members)
    if members % groups:
        raise LayoutError(f"members={members} is not divisible by the {groups} device groups of the mesh's members "
                          f"axis; each group holds the same number of members, so use a multiple of {groups}",
                          subject="members", value=members)


def member_values(hyperparams: Mapping[str, Sequence[float]] | None, members: int) -> dict[str, np.ndarray]:
    """name -> f32 [members], one value per member.

    Raises:
      SettingError: a name with another number of values.
    """
    values = {k: np.asarray(v, np.float32) for k, v in (hyperparams or {}).items()}
    for name, value in values.items():
        if value.shape != (members,):
            raise SettingError(f"hyperparameter {name} has {value.size} values for members={members}",
                               subject="hyperparams", value={name: value.tolist()})
    return values


def over_population(program: Program, members: int, *, hyperparams: Mapping[str, Sequence[float]] | None = None,
                    per_member_data: bool = False) -> Program:
    """``program`` for ``members`` stacked models: init and step vmapped over a leading axis sharded
    on the ``members`` mesh axis, member i from seed + i with its own ``hyperparams`` (name -> one
    value per member, injected into its optimizer state).

    ``per_member_data``: training batches carry a leading member axis (bootstrap resamples, client
    data); otherwise every member trains on the same global batch. Evaluation batches are shared.
    Frozen entries the model shares (:func:`shardml.models.lora.shared_params`: a LoRA base) are
    stored once, laid out by the model's rules and not over ``members``; only the rest (the
    adapters) is stacked. ``hyperparams`` named ``lora_alpha`` / ``lora_dropout`` go to the
    parameters instead, for a model built with :func:`shardml.lora`'s ``per_member``.

    Raises:
      ShardmlError: before anything compiles (:func:`check_stackable`, :func:`check_members`,
        :func:`member_values`).
    """
    check_stackable(program, "members")
    check_members(members, program.parts.mesh)
    values = member_values(hyperparams, members)
    own = {k: values.pop(k) for k in list(values) if k in MEMBER_SETTINGS}  # held in the parameters, not optax's
    check_member_settings(program.parts.model, own)
    shared = shared_params(program.parts.model)
    one_init = program.init

    def init(seed):
        state = jax.vmap(lambda s: _without(one_init(s), shared))(member_seeds(seed, members))
        state = _with(state, {k: one_init(seed).params[k] for k in shared})
        return dataclasses.replace(state, params=with_member_settings(state.params, own),
                                   opt_state=set_hyperparams(state.opt_state, values))

    sh = program.shardings
    data = stacked(sh.batch) if per_member_data else sh.batch
    examples = program.examples.under(MEMBERS) if per_member_data else program.examples.shared_by(members)
    params_axes = {k: None if k in shared else 0 for k in sh.state.params} if shared else 0
    state_sh = jax.tree.map(stacked, sh.state)
    state_sh = _with(state_sh, {k: sh.state.params[k] for k in shared}) if shared else state_sh
    return dataclasses.replace(
        program, init=init, step=_shared_step(program.step, shared, 0 if per_member_data else None),
        evaluate=over_members(program.evaluate, in_axes=(params_axes, None)),
        predict=over_members(program.predict, in_axes=(params_axes, None)),
        shardings=Shardings(state=state_sh, batch=data, eval=sh.eval, metrics=stacked(sh.metrics)),
        examples=examples, members=members)


def _without(state, shared: tuple[str, ...]):
    return dataclasses.replace(state, params={k: v for k, v in state.params.items() if k not in shared}) \
        if shared else state


def _with(state, entries: dict):
    return dataclasses.replace(state, params={**state.params, **entries}) if entries else state


def _shared_step(step, shared: tuple[str, ...], batch_axis):
    """The step of every member, vmapped; ``shared`` parameter entries (a frozen LoRA base) are
    stored once, outside the stack, and handed to each member unchanged (closed over, so not
    mapped: one copy serves every member)."""
    if not shared:
        return over_members(step, in_axes=(0, batch_axis))

    def one(member_state, batch, entries):
        new, metrics = step(_with(member_state, entries), batch)
        return _without(new, shared), metrics

    def mapped(state, batch):
        entries = {k: state.params[k] for k in shared}
        new, metrics = over_members(lambda s, b: one(s, b, entries), in_axes=(0, batch_axis))(
            _without(state, shared), batch)
        return _with(new, entries), metrics

    return mapped


def build_population(model: Model, mesh, optimizer: optax.GradientTransformation, members: int, *,
                     loss: Loss = token_cross_entropy, microbatches: int = 1, rules: Rules | None = None,
                     hyperparams: Mapping[str, Sequence[float]] | None = None,
                     per_member_data: bool = False) -> Trainer:
    """A :class:`Trainer` of ``members`` stacked copies of ``model``: :func:`over_population` of the
    step of ``model`` with the :func:`gated` ``optimizer``, compiled (see the module docstring).

    Args:
      optimizer: any optax optimizer; ``hyperparams`` names must be injected hyperparameters of it
        (``optax.inject_hyperparams``, as :func:`shardml.default_optimizer`).
      hyperparams, per_member_data: see :func:`over_population`.

    Raises:
      ShardmlError: before anything compiles.
    """
    program = step_program(model, mesh, gated(optimizer), loss=loss, microbatches=microbatches, rules=rules)
    return compile_trainer(over_population(program, members, hyperparams=hyperparams,
                                           per_member_data=per_member_data))
