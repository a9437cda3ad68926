"""Federated learning on digits: rounds and bytes to a target held-out accuracy for FedAvg, FedProx
and DiLoCo against synchronous data-parallel training, IID and non-IID (Dirichlet alpha 1 and 0.1);
and the wall time of one round of K clients in shardml (one compiled round) against the same round
on Flower.

Quality. K clients (default 64) split digits' 1,437 training examples (``iid``, ``dir1``, ``dir0.1``);
every round all of them run H local steps of B rows; the global model is evaluated on the 360
held-out examples after every round. A deployment sends 2 x params f32 values per client per round
(the global weights down, the client's up). The synchronous baseline trains one model with the same
optimizer on batches of K x B rows drawn from all the data (one local step of every client), its
workers exchanging a gradient and the averaged gradient every step: 2 x params values per worker
per step. Reported: rounds (steps) and bytes to the target accuracy, and the best accuracy seen.

Speed. One round of K clients (all taking part, H local steps each): shardml's compiled round on
8 emulated devices (``members=8``), timed after a warm-up round; Flower's own ``Server`` and
``FedAvg`` strategy with the same K clients as ``NumPyClient`` objects, each running shardml's
compiled client update (one compile shared by all), timed the same way. Flower runs in process
(its clients called directly through a ClientProxy, no network): Flower's simulation engine needs
Ray, which adds actor start-up and serialisation on top, so this in-process Flower is a lower bound
of its round time and the ratio a conservative one.

    python benchmarks/bench_federated.py                                    # ~10 min on 2 cores
    python benchmarks/bench_federated.py --clients 8 --rounds 3 --partitions iid --algorithms fedavg \\
        --speed-clients 8                                                   # a smoke run, ~1 min
    python benchmarks/bench_federated.py --plot benchmarks/federated.png --readme benchmarks/README.md
"""

import shardml

shardml.emulate_cpu_devices(8)  # before any other JAX use

import argparse
import sys
import time

import jax
import numpy as np
import optax

import _readme  # benchmarks/ (this script's folder) is on sys.path

PARTITIONS = {"iid": ("iid", None), "dir1": ("dirichlet", 1.0), "dir0.1": ("dirichlet", 0.1)}
ALGORITHMS = ("fedavg", "fedprox", "diloco")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64, help="K clients (quality runs)")
    parser.add_argument("--local-steps", type=int, default=8, help="H local steps per round")
    parser.add_argument("--batch-size", type=int, default=8, help="B rows per local step")
    parser.add_argument("--rounds", type=int, default=60, help="rounds per quality run (sync: the same steps x H)")
    parser.add_argument("--target", type=float, default=0.9, help="held-out accuracy to reach")
    parser.add_argument("--hidden", type=int, default=64, help="the MLP's hidden units")
    parser.add_argument("--client-lr", type=float, default=0.1, help="client (and synchronous) SGD learning rate")
    parser.add_argument("--mu", type=float, default=0.01, help="FedProx's proximal weight")
    parser.add_argument("--partitions", default=",".join(PARTITIONS), type=_readme.comma_list(tuple(PARTITIONS)))
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), type=_readme.comma_list(ALGORITHMS))
    parser.add_argument("--speed-clients", type=int, default=64, help="K of the timed round (0: skip)")
    parser.add_argument("--speed-rounds", type=int, default=3, help="timed rounds (after one warm-up)")
    parser.add_argument("--plot", default=None, help="write accuracy against bytes to this PNG")
    parser.add_argument("--readme", default=None, help="rewrite this README's bench_federated section")
    return parser.parse_args()


def algorithm(name: str, args):
    if name == "fedavg":
        return shardml.fedavg(args.client_lr)
    if name == "fedprox":
        return shardml.fedprox(args.client_lr, mu=args.mu)
    # DiLoCo: inner AdamW (its state kept by every client), outer SGD lr 0.7 with Nesterov momentum 0.9.
    inner = shardml.default_optimizer(shardml.OptimConfig(lr=3e-3, warmup=0, weight_decay=0.0),
                                      args.rounds * args.local_steps)
    return shardml.diloco(inner, outer_lr=0.7, momentum=0.9)


def clients(examples, kind: str, args, k: int, slots: int):
    how, alpha = PARTITIONS[kind]
    parts = shardml.partition(how, examples.y_train, k, alpha=alpha or 1.0, seed=0)
    held_out = shardml.ArrayBatches(examples, 120)
    return shardml.ClientBatches.from_arrays(examples.x_train, examples.y_train, parts, batch_size=args.batch_size,
                                             local_steps=args.local_steps, slots=slots, held_out=held_out)


def run_federated(model, examples, kind: str, name: str, args) -> list[float]:
    """Held-out accuracy after every round."""
    mesh = shardml.make_mesh({"members": 8})
    trainer = shardml.build_federated(model, mesh, algorithm(name, args), clients=args.clients,
                                      local_steps=args.local_steps, loss=shardml.classification)
    data = clients(examples, kind, args, args.clients, trainer.slots)
    eval_batches = data.eval_batches()
    state, accuracy = trainer.init(0), []
    for r in range(args.rounds):
        state, _ = trainer.step(state, trainer.put(data.batch(r)))
        accuracy.append(shardml.evaluate(trainer, state.params, eval_batches)["accuracy"])
    return accuracy


def run_synchronous(model, examples, args) -> list[float]:
    """Held-out accuracy after every step of data-parallel SGD on K x B rows."""
    trainer = shardml.build_trainer(model, shardml.make_mesh({"data": 8}), optax.sgd(args.client_lr),
                                    loss=shardml.classification)
    data = shardml.ArrayBatches(examples, args.clients * args.batch_size)
    eval_batches = shardml.ArrayBatches(examples, 120).eval_batches()
    state, accuracy = trainer.init(0), []
    for step in range(args.rounds * args.local_steps):
        state, _ = trainer.step(state, trainer.put(data.batch(step)))
        accuracy.append(shardml.evaluate(trainer, state.params, eval_batches)["accuracy"])
    return accuracy


def first_reaching(accuracy: list[float], target: float) -> int | None:
    hits = [i + 1 for i, a in enumerate(accuracy) if a >= target]
    return hits[0] if hits else None


def quality(model, examples, args):
    bytes_per_exchange = 2 * model.num_params * 4 * args.clients  # every client (worker) once
    curves, rows = {}, []
    sync = run_synchronous(model, examples, args)
    steps = first_reaching(sync, args.target)
    curves["sync"] = (np.arange(1, len(sync) + 1) * bytes_per_exchange, sync)
    for kind in args.partitions:
        rows.append((kind, "sync (data-parallel SGD)", steps, steps and steps * bytes_per_exchange, max(sync)))
        for name in args.algorithms:
            accuracy = run_federated(model, examples, kind, name, args)
            rounds = first_reaching(accuracy, args.target)
            curves[(kind, name)] = (np.arange(1, len(accuracy) + 1) * bytes_per_exchange, accuracy)
            rows.append((kind, name, rounds, rounds and rounds * bytes_per_exchange, max(accuracy)))
    print(f"digits, {args.clients} clients x {args.local_steps} local steps x {args.batch_size} rows, MLP "
          f"{model.num_params:,} parameters, target held-out accuracy {args.target}:")
    print("| data | algorithm | rounds (sync: steps) to target | bytes to target | best accuracy |")
    print("|---|---|---|---|---|")
    for kind, name, n, sent, best in rows:
        budget = args.rounds * (args.local_steps if name.startswith("sync") else 1)
        print(f"| {kind} | {name} | {n or f'> {budget}'} | {_mb(sent)} | {best:.3f} |")
    return curves


def _mb(n) -> str:
    return "-" if not n else f"{n / 1e6:.1f} MB"


def speed(model, examples, args):
    from shardml.flower import ClientUpdate, run_in_process

    k = args.speed_clients
    mesh = shardml.make_mesh({"members": 8})
    trainer = shardml.build_federated(model, mesh, shardml.fedavg(args.client_lr), clients=k,
                                      local_steps=args.local_steps, loss=shardml.classification)
    data = clients(examples, "iid", args, k, trainer.slots)
    state = trainer.init(0)
    state, metrics = trainer.step(state, trainer.put(data.batch(0)))  # warm-up: compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for r in range(1, args.speed_rounds + 1):
        state, metrics = trainer.step(state, trainer.put(data.batch(r)))
    jax.block_until_ready(state.params)
    ours = (time.perf_counter() - start) / args.speed_rounds
    update = ClientUpdate(trainer)
    run_in_process(trainer, data, rounds=1, update=update)  # warm-up: the client update's compile
    start = time.perf_counter()
    run_in_process(trainer, data, rounds=args.speed_rounds, update=update)
    flower = (time.perf_counter() - start) / args.speed_rounds
    print(f"\none round, {k} clients x {args.local_steps} local steps x {args.batch_size} rows (after a warm-up):")
    print("| engine | seconds per round | ratio |")
    print("|---|---|---|")
    print(f"| shardml, one compiled round on 8 devices (members=8) | {ours:.4f} | 1.0 |")
    print(f"| Flower Server + FedAvg, {k} NumPyClients in process (shardml's client update) | {flower:.4f} | "
          f"{flower / ours:.1f}x |")


def plot(curves, args):
    plt = _readme.pyplot(args.plot)
    if plt is None:
        return
    kinds = args.partitions
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        x, y = curves["sync"]
        ax.plot(x / 1e6, y, "k--", label="synchronous SGD")
        for name in args.algorithms:
            x, y = curves[(kind, name)]
            ax.plot(x / 1e6, y, label=name)
        ax.axhline(args.target, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_title(f"digits, {kind}")
        ax.set_xlabel("MB sent (all clients)")
        ax.set_ylabel("held-out accuracy")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"\nwrote {args.plot}")


def main(args):
    examples = shardml.load_digits()
    model = shardml.mlp_classifier(examples.features, args.hidden, examples.classes)
    curves = quality(model, examples, args) if args.rounds else None
    if args.speed_clients:
        speed(model, examples, args)
    if args.plot and curves:
        plot(curves, args)


if __name__ == "__main__":
    with _readme.printed_section(_readme.option(sys.argv[1:], "--readme"), "bench_federated",
                                 "benchmarks/bench_federated.py", sys.argv[1:]):
        main(parse_args())
