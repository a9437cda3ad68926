"""Different architectures at once: a sweep of 4 architectures, each on its own group of 2 of the 8
devices (``model.*`` lists, one ``shardml train``), against the same 4 runs one after another on
all 8 devices each; and a heterogeneous ensemble against its best member on the digits.

Speed. The digits MLP with ``model.d_ff`` in {32, 64, 128, 256}: ``--steps`` steps of each, end to
end (data, compile, training, evaluation) as a user runs them. On emulated CPU devices this mostly
measures scheduling, not speed: 8 emulated devices share the machine's cores, so the groups'
programs, though dispatched at once, wait for cores (an accelerator runs each device's queue on
its own chip).

Overlap. Two groups of one device each (``train_groups`` over compute-bound MLP steps): the time
per step of both at once against each one's alone. XLA:CPU runs programs on disjoint devices
concurrently as long as cores are free; a large product already spreads over every core (with
``--overlap-batch 4096`` the two take 0.98x the sum here), and with 8 emulated devices in four
groups on 2 cores they are not free, which is why the speed table above shows scheduling.

Quality. ``population.kind=ensemble`` of the same 4 architectures: the ensemble's validation
accuracy, loss and expected calibration error against its best member's.

    python benchmarks/bench_groups.py                     # ~2 min on 2 cores
    python benchmarks/bench_groups.py --steps 100 --readme benchmarks/README.md
"""

import shardml

shardml.emulate_cpu_devices(8)  # before any other JAX use

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np
import optax

from shardml import GroupSpec, build_groups, classification, load_config, mlp_classifier, train, train_groups

import _readme  # benchmarks/ (this script's folder) is on sys.path

BASE = ["model.kind=mlp", "data.corpus=digits", "model.dtype=float32", "train.batch_size=64", "train.eval_batches=0",
        "optim.lr=1e-2", "optim.weight_decay=0", "checkpoint.every=0", "mesh.data=-1", "mesh.fsdp=1",
        "mesh.tensor=1"]
WIDTHS = (32, 64, 128, 256)
OVERLAP_WIDTHS = (2048, 1536)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--overlap-batch", type=int, default=512, help="rows per step in the overlap table")
    parser.add_argument("--readme", default=None, help="also write the printed report into this README section")
    return parser.parse_args()


def timed(overrides: list[str], out_dir: str):
    start = time.perf_counter()
    result = train(load_config("tiny", [*overrides, f"out_dir={out_dir}"]), verbose=False)
    return time.perf_counter() - start, result


def speed(steps: int, root: str) -> None:
    common = [*BASE, f"train.steps={steps}", f"train.log_every={steps}"]
    grouped, _ = timed([*common, "population.kind=sweep", "population.size=4",
                        f"model.d_ff=[{','.join(map(str, WIDTHS))}]"], os.path.join(root, "groups"))
    one_by_one = [timed([*common, f"model.d_ff={w}"], os.path.join(root, f"alone-{w}"))[0] for w in WIDTHS]
    print(f"### Speed: {len(WIDTHS)} architectures (digits MLP, d_ff {list(WIDTHS)}), {steps} steps each, "
          "end to end\n")
    print("| how | wall clock (s) |\n|---|---|")
    print(f"| one run, {len(WIDTHS)} groups of devices, steps dispatched without waiting | {grouped:.1f} |")
    print(f"| {len(WIDTHS)} runs one after another, 8 devices each | {sum(one_by_one):.1f} "
          f"({' + '.join(f'{t:.1f}' for t in one_by_one)}) |")
    cache = "on" if os.environ.get("JAX_COMPILATION_CACHE_DIR") else "off"
    print(f"\nCompilation cache {cache}. On {os.cpu_count()} cores the 8 emulated devices of the four groups "
          "compete for the same cores: the figure shows scheduling more than overlap (see the next table).\n")


def overlap_batches(rows: int):
    def batch(step: int) -> dict:
        rng = np.random.default_rng(step)
        return {"inputs": rng.normal(size=(rows, 64)).astype(np.float32),
                "targets": rng.integers(0, 10, rows).astype(np.int32)}
    return batch


def seconds_per_step(specs: list, steps: int, data) -> float:
    """Steady-state seconds per iteration of :func:`train_groups` over ``specs``, one device each
    (compiled and warmed by a first call)."""
    groups = build_groups(specs, jax.devices()[:len(specs)])
    train_groups(groups, data, 2)
    start = time.perf_counter()
    train_groups(groups, data, steps)  # reads every step's metrics: all work has finished
    return (time.perf_counter() - start) / steps


def overlap(steps: int, rows: int) -> None:
    """Two groups of one device each: does a step of both take the sum of their steps or the larger?"""
    spec = lambda width: GroupSpec(mlp_classifier(64, width, 10), optax.sgd(0.01), loss=classification,
                                   name=f"d_ff={width}")
    a, b = spec(OVERLAP_WIDTHS[0]), spec(OVERLAP_WIDTHS[1])
    data = overlap_batches(rows)
    alone_a, alone_b = seconds_per_step([a], steps, data), seconds_per_step([b], steps, data)
    both = seconds_per_step([a, b], steps, data)
    print(f"### Overlap: two groups of one emulated CPU device each, {steps} steps of {rows} rows, "
          f"{os.cpu_count()} cores\n")
    print("| groups trained | ms per step |\n|---|---|")
    print(f"| {a.name} alone | {1e3 * alone_a:.1f} |\n| {b.name} alone | {1e3 * alone_b:.1f} |")
    print(f"| both at once (`train_groups`) | {1e3 * both:.1f} |")
    print(f"\nBoth at once take {both / (alone_a + alone_b):.2f}x the sum of their steps alone and "
          f"{both / max(alone_a, alone_b):.2f}x the slower one's: 0.5x-1x of the sum is overlap (1x the slower "
          "one's is perfect overlap); 1x the sum would mean one group waits for the other.\n")


def quality(steps: int, root: str) -> None:
    out = os.path.join(root, "ensemble")
    train(load_config("tiny", [*BASE, f"train.steps={steps}", f"train.log_every={steps}", "population.kind=ensemble",
                               "population.size=4", f"model.d_ff=[{','.join(map(str, WIDTHS))}]",
                               f"out_dir={out}"]), verbose=False)
    report = json.load(open(os.path.join(out, "population.json")))
    ens = report["ensemble"]
    best = max(range(len(WIDTHS)), key=lambda i: (ens["member_accuracy"][i], -ens["member_loss"][i]))
    print(f"### Quality: a heterogeneous ensemble (digits MLP, d_ff {list(WIDTHS)}), {steps} steps, validation set\n")
    print("| model | accuracy | loss | ECE |\n|---|---|---|---|")
    for i, width in enumerate(WIDTHS):
        mark = " (best)" if i == best else ""
        print(f"| d_ff={width}{mark} | {ens['member_accuracy'][i]:.4f} | {ens['member_loss'][i]:.4f} | "
              f"{ens['member_ece'][i]:.4f} |")
    print(f"| ensemble (mean of probabilities) | {ens['accuracy']:.4f} | {ens['loss']:.4f} | {ens['ece']:.4f} |")


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory() as root:
        speed(args.steps, root)
        overlap(args.steps, args.overlap_batch)
        quality(args.steps, root)


if __name__ == "__main__":
    with _readme.printed_section(_readme.option(sys.argv, "--readme"), "bench_groups", "benchmarks/bench_groups.py",
                                 sys.argv[1:]):
        main()
