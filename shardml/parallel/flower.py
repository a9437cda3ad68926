"""The client update a federated round compiles, as a Flower client for real deployments
(``pip install 'shardml[flower]'``).

A simulated round maps :func:`shardml.parallel.federated.client_update` over its client slots; a
:class:`ShardmlClient` jit-compiles that same function for one client on its own devices and
serves it through Flower's ``NumPyClient`` interface (the way Flower's JAX quickstart writes a
client): ``fit`` takes the global weights as NumPy arrays, runs the client's H local steps of
the round on its data and returns its weights and example count. Flower's ``FedAvg`` averages
them by example count, which is shardml's ``fedavg`` / ``fedprox`` round; :class:`ServerOptimizer`
is a Flower strategy that applies shardml's server optimizer to the same mean (``fedopt``,
``diloco``)::

    app = client_app(trainer, data, seed=0)          # flwr.clientapp.ClientApp: one client per node
    # or, on this machine: Flower's own Server and strategy, the clients in process
    params, history = run_in_process(trainer, data, rounds=3, seed=0)

Parameters travel as the leaves of the model's parameter tree in ``jax.tree.leaves`` order
(:func:`to_arrays` / :func:`from_arrays`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from shardml.core.errors import SettingError
from shardml.core.sharding import tree_shardings
from shardml.core.step import eval_step
from shardml.parallel.federated import FederatedTrainer, client_key, client_strategy, client_update, local_step


def _flwr():
    try:
        import flwr
    except ImportError:
        raise SettingError("the Flower export needs flwr: pip install 'shardml[flower]'") from None
    return flwr


def to_arrays(params: Any) -> list[np.ndarray]:
    """The parameter tree as the list of NumPy arrays Flower sends."""
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def from_arrays(arrays: list[np.ndarray], like: Any) -> Any:
    """The parameter tree (of ``like``'s structure) from Flower's list of arrays."""
    leaves, treedef = jax.tree.flatten(like)
    if len(arrays) != len(leaves):
        raise ValueError(f"got {len(arrays)} arrays for a model of {len(leaves)} parameter arrays")
    return jax.tree.unflatten(treedef, [np.asarray(a, np.float32) for a in arrays])


def run_key(seed: int) -> np.ndarray:
    """The run's key data for ``seed``, as a federated trainer's ``init(seed)`` makes it."""
    return np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1)))


class ClientUpdate:
    """:func:`client_update` of ``trainer``'s algorithm compiled for one client on ``devices``
    (default: the first device): ``update(params, opt_state, batches, round, client)``."""

    def __init__(self, trainer: FederatedTrainer, seed: int = 0, devices=None):
        from shardml.core.mesh import make_mesh

        self.trainer = trainer
        self.mesh = make_mesh({"data": len(devices)} if devices else {"data": 1}, devices=devices or jax.devices()[:1])
        model = trainer.model
        strategy = client_strategy(model, trainer.loss, self.mesh, trainer.microbatches, trainer.privacy)
        step = local_step(strategy, trainer.algorithm.client, trainer.rules, model, trainer.privacy)
        self.params_sharding = tree_shardings(strategy.param_logical, trainer.rules, self.mesh)
        self.rows = NamedSharding(self.mesh, P(None, *trainer.rules.spec(("batch",))))
        self.rng, self.seed = run_key(seed), seed
        self._update = jax.jit(functools.partial(client_update, step=step))
        self._init = jax.jit(trainer.algorithm.client.init)
        self._params = jax.jit(lambda key: strategy.layout(model.init(key)), out_shardings=self.params_sharding)
        self._sums = jax.jit(functools.partial(eval_step, strategy=strategy, rules=trainer.rules))

    def initial_params(self) -> Any:
        """The global model a federated trainer's ``init(seed)`` starts from."""
        with jax.set_mesh(self.mesh):
            return self._params(jax.random.fold_in(jax.random.key(self.seed), 0))

    def loss_sums(self, params: Any, batch: dict) -> dict:
        """Loss sums (``loss``, ``count``, ...) of ``params`` on one batch."""
        with jax.set_mesh(self.mesh):
            params = jax.device_put(params, self.params_sharding)
            return self._sums(params, jax.device_put(batch, NamedSharding(self.mesh, P(*self.rows.spec[1:]))))

    def init_opt(self, params: Any) -> Any:
        with jax.set_mesh(self.mesh):
            return self._init(jax.device_put(params, self.params_sharding))

    def __call__(self, params: Any, opt_state: Any, batches: dict, round_: int, client: int):
        key = client_key(jnp.asarray(self.rng), jnp.asarray(round_, jnp.int32), jnp.asarray(client, jnp.int32))
        with jax.set_mesh(self.mesh):
            params = jax.device_put(params, self.params_sharding)
            batches = jax.device_put(batches, self.rows)
            state, metrics = self._update(params, opt_state, batches, key)
        return state, metrics


def _numpy_client_class():
    flwr = _flwr()

    class ShardmlClient(flwr.client.NumPyClient):
        """One federated client: its data and the compiled client update (see the module docstring)."""

        def __init__(self, update: ClientUpdate, data, client: int):
            self.update, self.data, self.client = update, data, int(client)
            self.like = update.trainer.model.abstract_params
            self.opt_state = None  # kept across rounds when the algorithm keeps client state (DiLoCo)

        def get_parameters(self, config):
            return to_arrays(self.update.initial_params())

        def fit(self, parameters, config):
            round_ = int(config.get("round", 0))
            params = from_arrays(parameters, self.like)
            keep = self.update.trainer.algorithm.keep_client_state
            if self.opt_state is None or not keep:
                self.opt_state = self.update.init_opt(params)
            state, metrics = self.update(params, self.opt_state, self.data.client_batches(self.client, round_), round_,
                                         self.client)
            self.opt_state = state.opt_state
            count = np.asarray(metrics["count"], np.float64)
            loss = float(np.sum(np.asarray(metrics["loss"]) * count) / max(count.sum(), 1.0))
            return to_arrays(state.params), int(self.data.sizes[self.client]), {"loss": loss}

        def evaluate(self, parameters, config):
            """The loss (and accuracy for classifiers) of the global model on this client's data."""
            params, data = from_arrays(parameters, self.like), self.data.clients[self.client]
            n, b = len(data["targets"]), self.data.batch_size
            totals: dict = {}
            for start in range(0, n, b):
                rows = {k: np.asarray(v)[start:start + b] for k, v in data.items()}
                real = len(rows["targets"])
                batch = {k: np.concatenate([v, np.zeros((b - real, *v.shape[1:]), v.dtype)]) for k, v in rows.items()}
                mask = np.zeros(batch["targets"].shape, np.float32)
                mask[:real] = 1.0
                for key, value in jax.device_get(self.update.loss_sums(params, {**batch, "mask": mask})).items():
                    totals[key] = totals.get(key, 0.0) + float(value)
            count = max(totals.pop("count"), 1.0)
            metrics = {"accuracy": totals["correct"] / count} if "correct" in totals else {}
            return totals["loss"] / count, n, metrics

    return ShardmlClient


def flower_client(trainer: FederatedTrainer, data, client: int, seed: int = 0, devices=None, update=None):
    """Client ``client`` of ``data`` (:class:`~shardml.parallel.partition.ClientBatches`) as a Flower
    ``NumPyClient`` running ``trainer``'s compiled client update. ``fit``'s config carries the
    round (``{"round": t}``, 0-based), which picks the client's batches."""
    return _numpy_client_class()(update or ClientUpdate(trainer, seed, devices), data, client)


def client_app(trainer: FederatedTrainer, data, seed: int = 0):
    """A Flower ``ClientApp`` for deployment: each node runs the client of its
    ``node_config["partition-id"]``."""
    _flwr()
    from flwr.clientapp import ClientApp

    update = ClientUpdate(trainer, seed)

    def client_fn(context):
        return flower_client(trainer, data, int(context.node_config["partition-id"]), update=update).to_client()

    return ClientApp(client_fn=client_fn)


def fit_config(server_round: int) -> dict:
    """The config Flower's strategy sends with each round (Flower counts rounds from 1)."""
    return {"round": server_round - 1}


def _server_optimizer_strategy():
    flwr = _flwr()
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

    class ServerOptimizer(flwr.server.strategy.FedAvg):
        """Flower's ``FedAvg`` whose example-weighted mean of the client weights is handed, as the
        pseudo-gradient ``Δ = w_t − mean``, to shardml's server optimizer (any optax transformation):
        ``fedopt`` and ``diloco`` rounds on Flower."""

        def __init__(self, optimizer, initial: Any, **kwargs):
            super().__init__(initial_parameters=ndarrays_to_parameters(to_arrays(initial)), **kwargs)
            self.optimizer, self.params = optimizer, jax.tree.map(jnp.asarray, initial)
            self.opt_state = optimizer.init(self.params)

        def aggregate_fit(self, server_round, results, failures):
            mean, metrics = super().aggregate_fit(server_round, results, failures)
            if mean is None:
                return None, metrics
            mean = from_arrays(parameters_to_ndarrays(mean), self.params)
            delta = jax.tree.map(lambda w, m: w - m, self.params, mean)
            updates, self.opt_state = self.optimizer.update(delta, self.opt_state, self.params)
            self.params = jax.tree.map(lambda w, u: w + u, self.params, updates)
            return ndarrays_to_parameters(to_arrays(self.params)), metrics

    return ServerOptimizer


def server_strategy(trainer: FederatedTrainer, initial: Any, **kwargs):
    """The Flower strategy of ``trainer``'s algorithm, starting from ``initial`` (natural params):
    Flower's own ``FedAvg`` for ``fedavg`` / ``fedprox``, :class:`ServerOptimizer` otherwise.
    ``kwargs`` go to the strategy (default: the cohort fraction, no client-side evaluation)."""
    flwr = _flwr()
    from flwr.common import ndarrays_to_parameters

    settings = dict(fraction_fit=trainer.cohort / trainer.clients, min_fit_clients=trainer.cohort,
                    min_available_clients=trainer.clients, fraction_evaluate=0.0, min_evaluate_clients=0,
                    on_fit_config_fn=fit_config, accept_failures=False)
    settings.update(kwargs)
    if trainer.algorithm.name in ("fedavg", "fedprox"):
        return flwr.server.strategy.FedAvg(initial_parameters=ndarrays_to_parameters(to_arrays(initial)), **settings)
    return _server_optimizer_strategy()(trainer.algorithm.server, initial, **settings)


def _in_process_proxy():
    _flwr()
    from flwr.common import DisconnectRes
    from flwr.server.client_proxy import ClientProxy

    class InProcessProxy(ClientProxy):
        """A Flower client proxy that calls its client directly (no network, no Ray)."""

        def __init__(self, cid: str, client):
            super().__init__(cid)
            self.client = client

        def get_properties(self, ins, timeout, group_id):
            return self.client.get_properties(ins)

        def get_parameters(self, ins, timeout, group_id):
            return self.client.get_parameters(ins)

        def fit(self, ins, timeout, group_id):
            return self.client.fit(ins)

        def evaluate(self, ins, timeout, group_id):
            return self.client.evaluate(ins)

        def reconnect(self, ins, timeout, group_id):
            return DisconnectRes(reason="")

    return InProcessProxy


def run_in_process(trainer: FederatedTrainer, data, rounds: int, seed: int = 0, initial: Any = None,
                   strategy=None, max_workers: int | None = 1, update: ClientUpdate | None = None):
    """``rounds`` rounds of Flower's own ``Server`` (its round loop, client manager and strategy)
    with every client of ``data`` a :func:`flower_client` called in this process. Returns the final
    global parameters (natural layout, host arrays) and Flower's ``History``.

    ``initial`` defaults to ``trainer.init(seed).params``, the simulation's starting point;
    ``update`` (a :class:`ClientUpdate`) reuses a compiled client update.
    """
    _flwr()
    from flwr.common import parameters_to_ndarrays
    from flwr.server import Server
    from flwr.server.client_manager import SimpleClientManager

    if initial is None:
        initial = jax.device_get(trainer.natural(trainer.init(seed).params))
    strategy = strategy or server_strategy(trainer, initial)
    manager = SimpleClientManager()
    update = update or ClientUpdate(trainer, seed)
    proxy = _in_process_proxy()
    for k in range(len(data.clients)):
        manager.register(proxy(str(k), flower_client(trainer, data, k, update=update).to_client()))
    server = Server(client_manager=manager, strategy=strategy)
    server.set_max_workers(max_workers)
    history, _ = server.fit(num_rounds=rounds, timeout=None)
    return from_arrays(parameters_to_ndarrays(server.parameters), initial), history
