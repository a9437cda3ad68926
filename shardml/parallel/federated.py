"""Federated learning in one compiled round: the cohort's clients stacked on the ``members`` axis
(the population mechanism of :mod:`shardml.parallel.members`), each running H local steps of the
ordinary train step inside the round (``lax.scan``), then the server aggregating their updates and
applying a server optimizer.

Notation (section 3 of the research notes; McMahan et al. 2017, Reddi et al. 2021, Li et al. 2020,
Douillard et al. 2023): round t, server weights w_t, client k with n_k examples ends its H local
steps at w_t^k; its update is Δ_k = w_t − w_t^k and the round's pseudo-gradient is the
example-weighted mean ``Δ = Σ_k n_k Δ_k / Σ_k n_k`` (empty slots and padded rows weigh 0). The
server optimizer takes Δ as a gradient: ``w_{t+1} = w_t + server.update(Δ)``.

- ``fedavg``: client SGD, server SGD with lr 1, so ``w_{t+1} = Σ_k (n_k/n) w_t^k``.
- ``fedprox``: fedavg whose clients add ``μ (w − w_t)`` to their gradients (the proximal term
  ``μ/2 ‖w − w_t‖²``); μ = 0 is fedavg exactly.
- ``fedopt``: server Adam, Yogi or Adagrad on Δ (FedAdam / FedYogi / FedAdagrad).
- ``diloco``: inner AdamW on every client (its state kept across rounds), outer SGD with Nesterov
  momentum on Δ. Outer lr 1 without momentum is fedavg.

LoRA (:func:`shardml.lora`): the clients train and send only the adapters. The frozen base is
stored once in the state and read by every client (closed over by the local steps, not stacked per
slot, not aggregated); the server averages the adapters (FedAvg's weights as above) and FedProx's
term pulls each client's adapters towards the round's global adapters.

Privacy (``Privacy``): DP-FedAvg clips every Δ_k to ``update_clip``, weights the clients equally
and adds ``N(0, (update_noise · update_clip)²)`` once to their sum at the server (the mean then
divides by the cohort); DP-SGD inside clients is :func:`shardml.core.privacy.private_accumulator`.

    trainer = build_federated(model, mesh, fedavg(client_lr=0.1), clients=64, cohort=16, local_steps=8,
                              loss=classification)
    data = ClientBatches.from_arrays(x, y, dirichlet(y, 64, alpha=0.3), batch_size=16, local_steps=8,
                                     cohort=16, slots=trainer.slots)
    state = trainer.init(seed=0)                    # a TrainState: step counts rounds, params = w_t
    state, metrics = trainer.step(state, trainer.put(data.batch(0)))     # one whole round

:func:`federated_rounds` is the transformation ``Program -> Program`` (:mod:`shardml.core.step`)
that turns the clients' step into a round; :func:`build_federated` builds, wraps and compiles.
The trainer is a :class:`~shardml.core.step.Trainer` whose step is a round, so the loop,
checkpoints and resume take a federated run as they take any other; its state's ``params`` are
the global model (``load_params`` of a federated run gives it). :func:`client_update` is the one
client's update the round maps over the slots; :mod:`shardml.parallel.flower` compiles the same
function for a Flower client.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from shardml.core.errors import SettingError
from shardml.core.losses import Loss, token_cross_entropy
from shardml.core.model import Model
from shardml.core.optim import OptimConfig, default_optimizer
from shardml.core.privacy import clip_tree, gaussian_noise, private_accumulator, tree_norms
from shardml.core.sharding import Rules, use_rules
from shardml.core.step import (Program, Shardings, Trainer, compile_trainer, gradient_strategy, opt_state_shardings,
                               step_program)
from shardml.core.update import TrainState, advance, train_step
from shardml.models.lora import lora_optimizer, shared_params
from shardml.parallel.members import MEMBERS, check_stackable, over_members, stacked

ALGORITHMS = ("fedavg", "fedprox", "fedopt", "diloco")
SERVER_OPTIMIZERS = ("sgd", "adam", "yogi", "adagrad")
_CLIENT_TAG, _SERVER_TAG = 0xC11E, 0x5E4E  # key streams of the clients and of the server's noise


# ----------------------------------------------------------------------------- algorithms


def proximal(mu: float) -> optax.GradientTransformation:
    """FedProx's term: adds ``mu · (params − anchor)`` to the gradients, the anchor being the
    parameters the state was initialised with (the round's server weights). ``mu = 0`` adds an
    exact zero."""

    def init(params):
        return {"anchor": jax.tree.map(jnp.asarray, params)}

    def update(updates, state, params=None):
        if params is None:
            raise SettingError("proximal needs the parameters (optimizer.update(grads, state, params))",
                               subject="params")
        updates = jax.tree.map(lambda g, p, a: g + mu * (p - a), updates, params, state["anchor"])
        return updates, state

    return optax.GradientTransformation(init, update)


def server_optimizer(name: str = "sgd", lr: float = 1.0, momentum: float = 0.0, nesterov: bool = False,
                     eps: float = 1e-3) -> optax.GradientTransformation:
    """The server's optimizer of the pseudo-gradient Δ: ``sgd`` (with ``momentum``/``nesterov``),
    or FedOpt's ``adam``, ``yogi``, ``adagrad`` (optax's, b1 = 0.9, b2 = 0.99, ``eps`` = τ)."""
    if name == "sgd":
        return optax.sgd(lr, momentum=momentum or None, nesterov=nesterov)
    if name == "adam":
        return optax.adam(lr, b1=0.9, b2=0.99, eps=eps)
    if name == "yogi":
        return optax.yogi(lr, b1=0.9, b2=0.99, eps=eps)
    if name == "adagrad":
        return optax.adagrad(lr, initial_accumulator_value=0.0, eps=eps)
    raise SettingError(f"server_optimizer={name!r} is not one of {', '.join(SERVER_OPTIMIZERS)}",
                       subject="server_optimizer", value=name)


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """What clients and server run: the client optimizer (FedProx's term included), the server
    optimizer, and whether clients keep their optimizer state across rounds."""

    name: str
    client: optax.GradientTransformation
    server: optax.GradientTransformation
    mu: float = 0.0
    keep_client_state: bool = False


def fedavg(client_lr: float = 0.1) -> Algorithm:
    """Client SGD, server SGD with lr 1 (McMahan et al. 2017)."""
    return Algorithm("fedavg", optax.sgd(client_lr), server_optimizer("sgd", 1.0))


def fedprox(client_lr: float = 0.1, mu: float = 0.01) -> Algorithm:
    """FedAvg with the proximal term ``mu/2 ‖w − w_t‖²`` on the clients (Li et al. 2020)."""
    return Algorithm("fedprox", optax.chain(proximal(mu), optax.sgd(client_lr)), server_optimizer("sgd", 1.0), mu)


def fedopt(client_lr: float = 0.1, server: str = "adam", server_lr: float = 1e-2, eps: float = 1e-3) -> Algorithm:
    """Client SGD, server Adam / Yogi / Adagrad on the pseudo-gradient (Reddi et al. 2021)."""
    return Algorithm("fedopt", optax.sgd(client_lr), server_optimizer(server, server_lr, eps=eps))


def diloco(inner: optax.GradientTransformation | None = None, outer_lr: float = 0.7, momentum: float = 0.9,
           nesterov: bool = True, steps: int = 1000) -> Algorithm:
    """Inner AdamW on every client, its state kept across rounds; outer SGD with Nesterov momentum
    on the pseudo-gradient (Douillard et al. 2023). ``inner`` defaults to
    :func:`shardml.default_optimizer` over ``steps`` inner steps."""
    inner = inner if inner is not None else default_optimizer(OptimConfig(), steps)
    return Algorithm("diloco", inner, server_optimizer("sgd", outer_lr, momentum, nesterov and momentum > 0),
                     keep_client_state=True)


@dataclasses.dataclass(frozen=True)
class Privacy:
    """``update_clip`` > 0: DP-FedAvg (client updates clipped to it, clients weighted equally,
    ``update_noise`` × clip Gaussian noise on their sum). ``example_clip`` > 0: DP-SGD inside the
    clients (per-example clipping before the accumulator sums, ``example_noise`` × clip noise once
    per local step's batch)."""

    update_clip: float = 0.0
    update_noise: float = 0.0
    example_clip: float = 0.0
    example_noise: float = 0.0

    def __post_init__(self):
        for name in ("update_clip", "update_noise", "example_clip", "example_noise"):
            if getattr(self, name) < 0:
                value = getattr(self, name)
                raise SettingError(f"{name}={value} must be >= 0", subject=name, value=value)
        for noise, clip in (("update_noise", "update_clip"), ("example_noise", "example_clip")):
            if getattr(self, noise) and not getattr(self, clip):
                raise SettingError(f"{noise}={getattr(self, noise)} needs {clip} > 0 (the noise is scaled by it)",
                                   subject=noise, value=getattr(self, noise))


class FederatedOptState(NamedTuple):
    """The optimizer state of a federated run: the server optimizer's, and the clients' stacked on
    the slot axis when they keep it across rounds (``()`` otherwise)."""

    server: Any
    clients: Any


# ----------------------------------------------------------------------------- the client update


def client_key(rng: jax.Array, round_: jax.Array, client: jax.Array) -> jax.Array:
    """Key data of client ``client`` in round ``round_`` (``rng``: the run's key data)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng), _CLIENT_TAG), round_)
    return jax.random.key_data(jax.random.fold_in(key, client.astype(jnp.uint32)))


def client_update(params: Any, opt_state: Any, batches: dict, rng: jax.Array, *, step) -> tuple[TrainState, dict]:
    """One client's round: ``step`` (a train step) on each of its H batches (leaves [H, rows, ...]),
    from ``params``; returns its final state and the per-step metrics [H]."""
    zero = jnp.zeros((), jnp.int32)
    state = TrainState(step=zero, params=params, opt_state=opt_state, rng=rng, bad_steps=zero, bad_streak=zero)
    return jax.lax.scan(step, state, batches)


def client_strategy(model: Model, loss: Loss, mesh, microbatches: int, privacy: Privacy):
    """The clients' gradient strategy: the accumulator, with DP-SGD when ``privacy.example_clip``."""
    if privacy.example_clip:
        return private_accumulator(model, loss, mesh, microbatches, clip_norm=privacy.example_clip,
                                   noise_multiplier=privacy.example_noise)
    return gradient_strategy(model, loss, mesh, microbatches)


def client_uses_rng(model: Model, privacy: Privacy) -> bool:
    """Whether a client's step draws row keys: for the model's dropout, or for DP-SGD's noise."""
    return model.uses_rng or bool(privacy.example_clip)


def local_step(strategy, optimizer, rules: Rules, model: Model, privacy: Privacy):
    """The train step every client runs (with row keys under DP-SGD: its noise draws from them)."""
    return functools.partial(train_step, strategy=strategy, optimizer=optimizer, rules=rules,
                             uses_rng=client_uses_rng(model, privacy))


# ----------------------------------------------------------------------------- the round


def aggregate(server_params: Any, client_params: Any, weight: jax.Array, privacy: Privacy,
              key: jax.Array, logical: Any) -> tuple[Any, dict]:
    """The round's pseudo-gradient Δ from the clients' final parameters [slots, ...].

    Plain: ``Σ_k n_k Δ_k / Σ_k n_k`` over the slots (``weight`` n_k, 0 for empty slots). DP-FedAvg:
    ``(Σ_k clip(Δ_k) + N(0, (noise · clip)²)) / cohort``, the real clients weighted equally.
    """
    deltas = jax.tree.map(lambda w, wk: w[None] - wk, server_params, client_params)
    norms = jax.vmap(tree_norms)(deltas)
    real = (weight > 0).astype(jnp.float32)
    if privacy.update_clip:
        deltas = jax.vmap(lambda d: clip_tree(d, privacy.update_clip)[0])(deltas)
        weight = real
    total = jnp.maximum(jnp.sum(weight), 1e-30)
    summed = jax.tree.map(lambda d: jnp.tensordot(weight, d, axes=1), deltas)
    if privacy.update_noise:
        summed = jax.tree.map(jnp.add, summed, gaussian_noise(key, summed, privacy.update_noise * privacy.update_clip,
                                                              logical))
    mean = jax.tree.map(lambda s: s / total, summed)
    clipped = jnp.sum(real * (norms > privacy.update_clip)) if privacy.update_clip else jnp.zeros(())
    return mean, {"delta_norm": jnp.sum(real * norms) / jnp.maximum(jnp.sum(real), 1.0), "clipped_clients": clipped}


def _round_metrics(metrics_SH: dict, weight: jax.Array) -> dict:
    """Client-step metrics [slots, H] -> the round's: sums over real client steps, divided once."""
    real = (weight > 0).astype(jnp.float32)[:, None]
    count = metrics_SH["count"] * real
    total = jnp.maximum(jnp.sum(count), 1.0)
    out = {k: jnp.sum(metrics_SH[k] * count) / total for k in ("loss", "accuracy", "clipped") if k in metrics_SH}
    if "clipped" in out:
        out["clipped_examples"] = out.pop("clipped")
    out["count"] = jnp.sum(count)
    out["grad_norm"] = jnp.sum(metrics_SH["grad_norm"] * real) / jnp.maximum(jnp.sum(real) * count.shape[1], 1.0)
    out["skipped_local_steps"] = jnp.sum(metrics_SH["skipped"] * real.astype(jnp.int32))
    out["clients"] = jnp.sum(real)
    return out


@dataclasses.dataclass(frozen=True)
class FederatedTrainer(Trainer):
    """A :class:`Trainer` whose step is one federated round (see the module docstring).

    Attributes:
      algorithm: what the clients and the server run.
      clients: K, the simulated clients; ``cohort`` of them take part in each round, in ``slots``
        compiled slots (the cohort rounded up to a multiple of the ``members`` mesh axis).
      local_steps: H.
      batch_sharding: of every leaf of a round batch: the slot axis over ``members`` (the rows of a
        client's batches are split over its ``data`` / ``fsdp`` devices inside the round).
    """

    algorithm: Algorithm | None = None
    privacy: Privacy = Privacy()
    clients: int = 0
    cohort: int = 0
    slots: int = 0
    local_steps: int = 0


def federated_round(state: TrainState, batch: dict, *, update, client_init, algorithm: Algorithm, privacy: Privacy,
                    rules: Rules, logical: Any, slots: int, client_params_sh: Any,
                    shared: tuple[str, ...] = ()) -> tuple[TrainState, dict]:
    """One round (the federated trainer's step): every slot runs ``update`` (the clients' H local
    steps, vmapped over the members axis) from the server weights, the server aggregates their
    updates and applies its optimizer; a non-finite round leaves the state as it was (the guard of
    every step, :func:`shardml.core.update.advance`). ``client_init`` starts a client's optimizer
    state when clients do not keep theirs. ``shared`` entries of the parameters (a frozen LoRA
    base) are neither stacked per slot nor aggregated: every client reads the one copy, and only
    the rest (the adapters) is trained, sent and averaged."""
    weight, client = batch["weight"], batch["client"]
    data = {k: v for k, v in batch.items() if k not in ("weight", "client")}
    base, w = _split(state.params, shared)
    keep = algorithm.keep_client_state
    start = jax.tree.map(lambda p, sh: jax.lax.with_sharding_constraint(jnp.broadcast_to(p, (slots, *p.shape)), sh),
                         w, client_params_sh)
    opt = state.opt_state.clients if keep else jax.vmap(lambda p: client_init(_join(p, base)))(start)
    keys = jax.vmap(lambda c: client_key(state.rng, state.step, c))(client)
    finals, metrics_SH = update(start, opt, data, keys, base)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), _SERVER_TAG), state.step)
    with use_rules(rules):
        delta, server_metrics = aggregate(w, finals.params, weight, privacy, key, logical)
    updates, server_opt = algorithm.server.update(delta, state.opt_state.server, w)
    metrics = {**_round_metrics(metrics_SH, weight), **server_metrics, "update_norm": tree_norms(updates)}
    opt_state = FederatedOptState(server_opt, finals.opt_state if keep else ())
    params = _join(optax.apply_updates(w, updates), base)
    return advance(state, params, opt_state, jnp.isfinite(metrics["update_norm"]), metrics)


def _split(params: Any, shared: tuple[str, ...]) -> tuple[dict, Any]:
    """``(shared entries, the rest)`` of the parameters (``({}, params)`` when nothing is shared)."""
    if not shared:
        return {}, params
    return {k: params[k] for k in shared}, {k: v for k, v in params.items() if k not in shared}


def _join(params: Any, base: dict) -> Any:
    return {**params, **base} if base else params


def client_round(params: Any, opt_state: Any, batches: dict, rng: jax.Array, base: dict, *, step,
                 shared: tuple[str, ...]) -> tuple[TrainState, dict]:
    """:func:`client_update` of a client that holds ``params`` (its trained entries) over ``base``
    (the shared entries: closed over by every local step, so not carried, stacked or sent back)."""
    if not shared:
        return client_update(params, opt_state, batches, rng, step=step)

    def local(state, batch):
        new, metrics = step(dataclasses.replace(state, params=_join(state.params, base)), batch)
        return dataclasses.replace(new, params=_split(new.params, shared)[1]), metrics

    return client_update(params, opt_state, batches, rng, step=local)


def round_slots(cohort: int, mesh) -> int:
    """The compiled slots of a round: the cohort rounded up to a multiple of the ``members`` mesh axis."""
    groups = mesh.shape.get(MEMBERS, 1)
    return -(-cohort // groups) * groups


def check_round(algorithm: Algorithm, clients: int, cohort: int, local_steps: int) -> None:
    """What a round of ``cohort`` of ``clients`` clients with ``local_steps`` each needs.

    Raises:
      SettingError: a cohort outside 1..clients, ``local_steps`` < 1, or a partial cohort of an
        algorithm whose clients keep their state.
    """
    if not 1 <= cohort <= clients:
        raise SettingError(f"cohort={cohort} must be between 1 and clients={clients}", subject="cohort", value=cohort)
    if local_steps < 1:
        raise SettingError(f"local_steps={local_steps} must be >= 1", subject="local_steps", value=local_steps)
    if algorithm.keep_client_state and cohort < clients:
        raise SettingError(f"{algorithm.name} keeps every client's optimizer state across rounds, so every client "
                           f"takes part in every round: use cohort=clients (got cohort={cohort} of clients={clients})",
                           subject="cohort", value=cohort)


def round_shardings(program: Program, algorithm: Algorithm) -> Shardings:
    """Where a round keeps its arrays: the server weights as the clients' parameters, the server
    optimizer's state following the trained entries (not a shared LoRA base), the clients'
    optimizer states (kept by DiLoCo) stacked on the slot axis, every round batch leaf's slot axis
    over ``members``."""
    inner, parts = program.shardings, program.parts
    shared = shared_params(parts.model)
    abstract = _split(jax.eval_shape(parts.strategy.layout, parts.model.abstract_params), shared)[1]
    server = opt_state_shardings(algorithm.server, abstract, _split(inner.state.params, shared)[1], parts.mesh)
    clients = jax.tree.map(stacked, inner.state.opt_state) if algorithm.keep_client_state else ()
    state = dataclasses.replace(inner.state, opt_state=FederatedOptState(server=server, clients=clients))
    return inner._replace(state=state, batch=NamedSharding(parts.mesh, P(MEMBERS)))


def federated_rounds(program: Program, algorithm: Algorithm, *, clients: int, local_steps: int,
                     cohort: int | None = None, privacy: Privacy = Privacy()) -> Program:
    """``program`` (the clients' step, built with ``algorithm.client``) as one federated round per
    step: ``cohort`` (default all) of ``clients`` clients in slots stacked on the ``members`` mesh
    axis, ``local_steps`` steps of ``program`` each (a ``lax.scan``), then the server's
    aggregation (DP-FedAvg by ``privacy.update_clip`` / ``update_noise``; DP-SGD is the program's
    strategy, :func:`client_strategy`) and optimizer. The state's ``params`` are the server's.
    A LoRA model's frozen base (:func:`shardml.models.lora.shared_params`) is stored once and read
    by every client; only the adapters are stacked per slot, sent and aggregated.

    Raises:
      SettingError: before anything compiles (:func:`check_stackable`, :func:`check_round`).
    """
    cohort = cohort or clients
    check_stackable(program, "clients")
    check_round(algorithm, clients, cohort, local_steps)
    slots, keep, inner_init = round_slots(cohort, program.parts.mesh), algorithm.keep_client_state, program.init
    shardings, shared = round_shardings(program, algorithm), shared_params(program.parts.model)

    def init(seed):
        # The clients' stacked optimizer states are the one client's, every slot starting alike.
        state = inner_init(seed)
        clients_opt = jax.tree.map(lambda x: jnp.broadcast_to(x, (slots, *x.shape)), state.opt_state) if keep else ()
        server_opt = algorithm.server.init(_split(state.params, shared)[1])
        return dataclasses.replace(state, opt_state=FederatedOptState(server_opt, clients_opt))

    update = functools.partial(client_round, step=program.step, shared=shared)
    step = functools.partial(
        federated_round, update=over_members(update, in_axes=(0, 0, 0, 0, None)),
        client_init=program.parts.optimizer.init, algorithm=algorithm, privacy=privacy, rules=program.parts.rules,
        logical=_split(program.parts.strategy.param_logical, shared)[1], slots=slots,
        client_params_sh=jax.tree.map(stacked, _split(program.shardings.state.params, shared)[1]), shared=shared)
    return dataclasses.replace(program, init=init, step=step, shardings=shardings,
                               examples=program.examples.under("slots", "local_steps"))


def build_federated(model: Model, mesh, algorithm: Algorithm, *, clients: int, local_steps: int,
                    cohort: int | None = None, loss: Loss = token_cross_entropy, microbatches: int = 1,
                    rules: Rules | None = None, privacy: Privacy = Privacy()) -> FederatedTrainer:
    """A :class:`FederatedTrainer`: ``clients`` simulated clients, ``cohort`` (default all) per
    round, ``local_steps`` local steps each, in one compiled round (:func:`federated_rounds` of the
    clients' step). A LoRA model (:func:`shardml.lora`) trains its adapters only: the clients'
    optimizer is ``algorithm.client`` under :func:`shardml.lora_optimizer`, the base is shared.

    The round's slots are stacked on the ``members`` mesh axis (slots / mesh.members per device
    group); the ``data``, ``fsdp`` and ``tensor`` axes work inside each client as in a single run.

    Raises:
      ShardmlError: before anything compiles.
    """
    rules = rules or Rules.default()
    # A LoRA model's clients update (and keep optimizer state for) the adapters only.
    client = lora_optimizer(algorithm.client) if shared_params(model) else algorithm.client
    program = step_program(model, mesh, client, loss=loss, microbatches=microbatches, rules=rules,
                           strategy=client_strategy(model, loss, mesh, microbatches, privacy),
                           uses_rng=client_uses_rng(model, privacy))
    cohort = cohort or clients
    rounds = federated_rounds(program, algorithm, clients=clients, local_steps=local_steps, cohort=cohort,
                              privacy=privacy)
    return compile_trainer(rounds, FederatedTrainer, algorithm=algorithm, privacy=privacy, clients=clients,
                           cohort=cohort, slots=round_slots(cohort, mesh), local_steps=local_steps)
