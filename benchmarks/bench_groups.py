"""Different architectures at once: a sweep of 4 architectures, each on its own group of 2 of the 8
devices (``model.*`` lists, one ``shardml train``), against the same 4 runs one after another on
all 8 devices each; and a heterogeneous ensemble against its best member on the digits.

Speed. The digits MLP with ``model.d_ff`` in {32, 64, 128, 256}: ``--steps`` steps of each, end to
end (data, compile, training, evaluation) as a user runs them. On emulated CPU devices this mostly
measures scheduling, not speed: XLA:CPU executes the queued programs of different groups one after
another (they do not overlap as they would on accelerators, where each device runs its own queue),
and 8 emulated devices share the machine's cores.

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

from shardml import load_config, train

import _readme  # benchmarks/ (this script's folder) is on sys.path

BASE = ["model.kind=mlp", "data.corpus=digits", "model.dtype=float32", "train.batch_size=64", "train.eval_batches=0",
        "optim.lr=1e-2", "optim.weight_decay=0", "checkpoint.every=0", "mesh.data=-1", "mesh.fsdp=1",
        "mesh.tensor=1"]
WIDTHS = (32, 64, 128, 256)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
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
    print(f"\nCompilation cache {cache}. XLA:CPU runs the groups' queued programs one after another: the figure "
          "shows scheduling, not the overlap an accelerator gives.\n")


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
        quality(args.steps, root)


if __name__ == "__main__":
    with _readme.printed_section(_readme.option(sys.argv, "--readme"), "bench_groups", "benchmarks/bench_groups.py",
                                 sys.argv[1:]):
        main()
