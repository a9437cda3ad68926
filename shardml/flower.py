"""Federated clients and servers on Flower (``pip install 'shardml[flower]'``): the client update a
federated trainer's rounds compile, served through Flower's interfaces.

    trainer = shardml.build_federated(model, mesh, shardml.fedavg(), clients=16, local_steps=4)
    app = shardml.flower.client_app(trainer, data, seed=0)       # flwr.clientapp.ClientApp, one client per node
    strategy = shardml.flower.server_strategy(trainer, initial)  # the algorithm's server side
    params, history = shardml.flower.run_in_process(trainer, data, rounds=3, seed=0)   # all on this machine

Parameters travel as the leaves of the model's parameter tree in ``jax.tree.leaves`` order
(:func:`to_arrays` / :func:`from_arrays`).
"""

from shardml.parallel.flower import (ClientUpdate, client_app, fit_config, flower_client, from_arrays, run_in_process,
                                     run_key, server_strategy, to_arrays)

__all__ = ["ClientUpdate", "client_app", "fit_config", "flower_client", "from_arrays", "run_in_process", "run_key",
           "server_strategy", "to_arrays"]
