"""Federated runs from a config (``federated.algorithm`` set): the clients' partitions, the compiled
round, the loop (``train.steps`` counts rounds), and what a deployment would cost: the bytes sent
per round per client and in total next to synchronous data-parallel training, and the privacy
spent (ε for ``federated.delta`` from ``dp-accounting``), written to ``OUT_DIR/federated.json``::

    shardml train tiny model.kind=mlp data.corpus=digits mesh.members=8 federated.algorithm=fedavg \\
        federated.clients=64 federated.local_steps=8 federated.partition=dirichlet federated.alpha=0.3

Partitions: digits is split by its labels (``dirichlet``: per-label Dirichlet shares; ``natural``:
whole classes per client); a text corpus is cut into windows of ``data.seq_len`` + 1 tokens, their
"label" the tenth of the text they come from (``dirichlet`` skews clients towards some sections;
``natural`` gives each client one contiguous stretch of the text, its own documents).
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import optax

from shardml.core.mesh import describe
from shardml.core.optim import default_optimizer
from shardml.core.privacy import dp_fedavg_epsilon, dp_sgd_epsilon
from shardml.models.lora import shared_params
from shardml.parallel.federated import Algorithm, Privacy, proximal, server_optimizer
from shardml.parallel.partition import (ClientBatches, cohort_size, format_label_report, label_counts, label_report,
                                        partition, text_examples)
from shardml.run import config as config_lib
from shardml.run import distributed
from shardml.run.engine import Mode, TrainSummary

SECTIONS = 10  # a text corpus's "labels": which tenth of the text a window comes from
SERVER_LR = {"fedavg": 1.0, "fedprox": 1.0, "fedopt": 1e-2, "diloco": 0.7}
BYTES_PER_VALUE = 4  # weights travel as f32


def algorithm_of(cfg: config_lib.Config) -> Algorithm:
    """The clients' and the server's optimizers of ``cfg.federated`` (``auto`` / 0 / -1 settings
    take the algorithm's defaults: server SGD lr 1 for fedavg and fedprox, Adam lr 1e-2 for fedopt,
    SGD lr 0.7 with Nesterov momentum 0.9 for diloco, whose clients run ``optim.*`` AdamW)."""
    f = cfg.federated
    name = f.algorithm
    server = f.server_optimizer if f.server_optimizer != "auto" else ("adam" if name == "fedopt" else "sgd")
    lr = f.server_lr or SERVER_LR[name]
    momentum = f.server_momentum if f.server_momentum >= 0 else (0.9 if name == "diloco" else 0.0)
    if name == "diloco":
        client = default_optimizer(cfg.optim, cfg.train.steps * f.local_steps)
    else:
        client = optax.sgd(f.client_lr)
    mu = f.mu if name == "fedprox" else 0.0
    if name == "fedprox":
        client = optax.chain(proximal(mu), client)
    return Algorithm(name, client, server_optimizer(server, lr, momentum, name == "diloco" and momentum > 0,
                                                    f.server_eps), mu, keep_client_state=name == "diloco")


def privacy_of(cfg: config_lib.Config) -> Privacy:
    f = cfg.federated
    return Privacy(f.update_clip, f.update_noise, f.example_clip, f.example_noise)


def client_data(cfg: config_lib.Config, source, slots: int) -> ClientBatches:
    """The clients of ``cfg`` from a data source of the recipe (digits or text), with their label
    counts (``counts``: classes for digits, sections of the text for a corpus)."""
    f, t = cfg.federated, cfg.train
    if hasattr(source, "examples"):
        ex = source.examples
        x, y, labels, classes, field = ex.x_train, ex.y_train, ex.y_train, ex.classes, None
    else:
        examples = text_examples(source.tokens.train, cfg.data.seq_len)
        x, y = examples["inputs"], examples["targets"]
        field = np.arange(len(x))
        labels, classes = field * SECTIONS // len(x), SECTIONS
    parts = partition(f.partition, labels, f.clients, alpha=f.alpha, seed=t.seed, min_size=f.min_partition,
                      field=field)
    return ClientBatches.from_arrays(x, y, parts, batch_size=t.batch_size, local_steps=f.local_steps,
                                     cohort=cohort_size(f.clients, f.fraction), slots=slots, seed=t.seed,
                                     held_out=source, name=cfg.data.corpus, counts=label_counts(parts, labels, classes))


def communication(num_params: int, cohort: int, rounds: int, local_steps: int,
                  bytes_per_value: int = BYTES_PER_VALUE, sync_steps: int | None = None) -> dict:
    """What a deployment sends: every round each of the ``cohort`` clients downloads the global
    weights and uploads its own (2 × params values). Synchronous data-parallel training over the
    same ``cohort`` workers exchanges a gradient and the averaged gradient (2 × params values per
    worker, as a parameter server or about what a ring all-reduce moves) every step: at equal compute
    (``rounds · local_steps`` steps) that is ``local_steps`` times the federated bytes, and
    ``sync_steps`` (e.g. the steps it needs to the same loss) gives its own figure."""
    per_client = 2 * num_params * bytes_per_value
    out = {"bytes_per_round_per_client": per_client, "bytes_per_round": per_client * cohort,
           "bytes_total": per_client * cohort * rounds, "rounds": rounds, "cohort": cohort,
           "sync_bytes_per_step": per_client * cohort,
           "sync_bytes_equal_compute": per_client * cohort * rounds * local_steps}
    if sync_steps is not None:
        out["sync_steps"] = sync_steps
        out["sync_bytes"] = per_client * cohort * sync_steps
    return out


def sent(model) -> dict:
    """What a client downloads and uploads each round: the whole model's weights, or with LoRA
    only the adapters (the frozen base, :func:`shardml.models.lora.shared_params`, every client
    already holds and never sends). ``values``: how many go each way; ``model_values``: the model's."""
    shared = shared_params(model)
    if not shared:
        return {"sent": "weights", "values": model.num_params, "model_values": model.num_params}
    trained = {k: v for k, v in model.abstract_params.items() if k not in shared}
    values = sum(math.prod(x.shape) for x in jax.tree.leaves(trained))
    return {"sent": f"adapters only; the frozen {', '.join(shared)} is shared, not sent", "values": values,
            "model_values": model.num_params}


def communication_of(model, cohort: int, rounds: int, local_steps: int) -> dict:
    """:func:`communication` of what clients of ``model`` send (:func:`sent`), with what sending
    the whole model would cost (``model_bytes_per_round_per_client``) beside it."""
    what = sent(model)
    return {**communication(what["values"], cohort, rounds, local_steps), **what,
            "model_bytes_per_round_per_client": 2 * what["model_values"] * BYTES_PER_VALUE}


def privacy_report(cfg: config_lib.Config, data: ClientBatches) -> dict | None:
    """ε at ``federated.delta`` from ``dp-accounting``'s RDP accountant: client-level for DP-FedAvg
    (cohorts accounted as Poisson sampling), example-level for DP-SGD inside clients (each local
    step's batch sampling ``batch_size / n_k`` of the smallest client, every round counted: an
    upper bound when clients sit rounds out)."""
    f, rounds = cfg.federated, cfg.train.steps
    if not (f.update_clip or f.example_clip):
        return None
    out: dict = {"delta": f.delta}
    if f.update_clip:
        out["dp_fedavg"] = {"clip": f.update_clip, "noise_multiplier": f.update_noise, "rounds": rounds,
                            "cohort": data.cohort, "clients": len(data.clients),
                            "epsilon": dp_fedavg_epsilon(f.update_noise, len(data.clients), data.cohort, rounds,
                                                         f.delta)}
    if f.example_clip:
        smallest = int(data.sizes.min())
        rate = min(1.0, data.batch_size / smallest)
        steps = rounds * f.local_steps
        out["dp_sgd"] = {"clip": f.example_clip, "noise_multiplier": f.example_noise, "sample_rate": rate,
                         "steps": steps, "epsilon": dp_sgd_epsilon(f.example_noise, rate, steps, f.delta)}
    return out


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000.0
    return f"{n:.3g} TB"


def describe_run(parts, counts: np.ndarray, comm: dict, privacy: dict | None) -> list[str]:
    cfg, trainer, data = parts.cfg, parts.trainer, parts.data
    f = cfg.federated
    lines = [f"mesh: {describe(trainer.mesh)}",
             f"model: {parts.model.name}, {parts.model.num_params:,} parameters; data '{data.name}' split "
             f"{f.partition}" + (f" (alpha {f.alpha})" if f.partition == "dirichlet" else ""),
             f"federated: {f.algorithm}, {f.clients} clients, {data.cohort} per round in {trainer.slots} slots "
             f"({trainer.slots // trainer.mesh.shape.get('members', 1)} per device group of mesh.members="
             f"{trainer.mesh.shape.get('members', 1)}), {f.local_steps} local steps of {data.batch_size} rows; "
             f"train.steps={cfg.train.steps} rounds",
             format_label_report(counts),
             f"communication ({comm['sent']}): {_bytes(comm['bytes_per_round_per_client'])} per client per round, "
             f"{_bytes(comm['bytes_per_round'])} per round, {_bytes(comm['bytes_total'])} in total; synchronous "
             f"data-parallel training at equal compute: {_bytes(comm['sync_bytes_equal_compute'])} "
             f"({f.local_steps}x)" + ("" if comm["values"] == comm["model_values"] else
                                      f"; the whole model would be {_bytes(comm['model_bytes_per_round_per_client'])}"
                                      " per client per round")]
    for kind, what in (("dp_fedavg", "client-level (DP-FedAvg)"), ("dp_sgd", "example-level (DP-SGD)")):
        if privacy and kind in privacy:
            lines.append(f"privacy: {what} epsilon {privacy[kind]['epsilon']:.3g} at delta {privacy['delta']:g}")
    return lines


def federated_mode(parts) -> Mode:
    """What the driver prints and reports for a federated run ``parts`` describes: the clients,
    communication and privacy before; ``OUT_DIR/federated.json`` (written by process 0) after."""
    cfg, trainer, data = parts.cfg, parts.trainer, parts.data
    counts = data.counts
    comm = communication_of(parts.model, data.cohort, cfg.train.steps, cfg.federated.local_steps)
    privacy = privacy_report(cfg, data)

    def report(summary: TrainSummary) -> list[str]:
        out = {"algorithm": cfg.federated.algorithm, "clients": len(data.clients), "cohort": data.cohort,
               "slots": trainer.slots, "local_steps": cfg.federated.local_steps, "rounds": cfg.train.steps,
               "partition": {"kind": cfg.federated.partition, **label_report(counts)}, "communication": comm,
               "privacy": privacy, "val": summary.val}
        path = os.path.join(cfg.out_dir, "federated.json")
        if distributed.primary():
            with open(path, "w") as f:
                json.dump(out, f, indent=1)
        if summary.val is None:
            return []
        extra = f", accuracy {summary.val['accuracy']:.4f}" if "accuracy" in summary.val else ""
        return [f"done: {cfg.train.steps} rounds in {summary.seconds:.1f}s (first incl. compile "
                f"{summary.compile_seconds:.1f}s); global model validation loss {summary.val['loss']:.4f}{extra}; "
                f"{path}"]

    return Mode(describe_run(parts, counts, comm, privacy), report)
