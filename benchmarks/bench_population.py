"""Populations against what a user would otherwise do: N members in one vmapped, sharded step vs N
single-model runs one after another on the same 8 devices, and shardml's Optuna generations vs
Optuna running the same trials one after another in one process; and what populations give on
real data (an ensemble against its members, a sweep, PBT).

Speed. For the digits MLP and the tiny transformer, N in {4, 8, 32}: the population trains N
members with different learning rates on one mesh (``mesh.members`` = min(N, 8), data filling the
rest); the sequential baseline trains the same N models on data=8 one after another, reusing one
compiled step (the best a sequential user can do: no recompilation). Both run the same number of
steps per model on the same batches; times are wall-clock, after one warm-up step (compile), and
the end-to-end time (compile included) is shown beside them.

Optuna. ``--trials`` trials of the digits MLP's learning rate (TPE, seeded): shardml asks for all
of a generation at once and trains them as one population; the baseline asks, trains and tells
one trial at a time (Optuna's usual loop), each a single-model run on data=8 reusing one compiled
step. Wall time and the best validation loss found.

Quality (digits, and the tiny transformer on the embedded text): an ensemble of 8 against its
average member (accuracy, loss, expected calibration error); a learning-rate sweep's best member;
PBT's best member.

    python benchmarks/bench_population.py                          # everything, ~10 min on 2 cores
    python benchmarks/bench_population.py --members 4,8 --steps 50 --quality none
    python benchmarks/bench_population.py --readme benchmarks/README.md --plot benchmarks/population.png
"""

import shardml

shardml.emulate_cpu_devices(8)  # before any other JAX use

import argparse
import sys
import time

import jax
import numpy as np

from shardml import evaluate, load_config, run_parts, train, with_hyperparams

import _readme  # benchmarks/ (this script's folder) is on sys.path

WORKLOADS = {
    "digits-mlp": ["model.kind=mlp", "data.corpus=digits", "model.d_ff=128", "model.dtype=float32",
                   "train.batch_size=64", "train.eval_batches=0", "optim.lr=1e-2", "optim.weight_decay=0"],
    "tiny-transformer": ["train.batch_size=16"],
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", default="4,8,32", help="population sizes N, comma separated")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), type=_readme.comma_list(tuple(WORKLOADS)))
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model")
    parser.add_argument("--trials", type=int, default=8, help="Optuna trials")
    parser.add_argument("--quality", default="digits,text", help="quality runs: digits,text or none")
    parser.add_argument("--quality-steps", type=int, default=300)
    parser.add_argument("--readme", default=None, help="rewrite this README's bench_population section")
    parser.add_argument("--plot", default=None, help="write the speed-up plot to this PNG")
    return parser.parse_args()


def lrs(n: int) -> list[float]:
    return [float(v) for v in np.geomspace(1e-3, 3e-2, n)]


def population_parts(workload: str, n: int, steps: int):
    overrides = [*WORKLOADS[workload], f"train.steps={steps + 1}", "population.kind=sweep", f"population.size={n}",
                 f"optim.lr={lrs(n)}", f"mesh.members={min(n, 8)}", "mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1"]
    return run_parts(load_config("tiny", overrides))


def single_parts(workload: str, steps: int):
    return run_parts(load_config("tiny", [*WORKLOADS[workload], f"train.steps={steps + 1}", "mesh.data=8"]))


def timed(trainer, state, batches):
    """Wall seconds of len(batches) steps (the state is computed at the end)."""
    start = time.perf_counter()
    for batch in batches:
        state, _ = trainer.step(state, batch)
    jax.block_until_ready(state)
    return time.perf_counter() - start, state


def speed(workload: str, n: int, steps: int) -> dict:
    start = time.perf_counter()
    pop = population_parts(workload, n, steps)
    batches = [pop.trainer.put(pop.data.batch(s)) for s in range(steps + 1)]
    state = pop.trainer.init(0)
    state, _ = pop.trainer.step(state, batches[0])  # compile
    jax.block_until_ready(state)
    compile_pop = time.perf_counter() - start
    pop_s, _ = timed(pop.trainer, state, batches[1:])

    start = time.perf_counter()
    one = single_parts(workload, steps)
    single = [one.trainer.put(one.data.batch(s)) for s in range(steps + 1)]
    compile_seq, seq_s = 0.0, 0.0
    for member in range(n):
        state = with_hyperparams(one.trainer.init(member), {"lr": np.float32(lrs(n)[member])})
        state, _ = one.trainer.step(state, single[0])
        jax.block_until_ready(state)
        if member == 0:
            compile_seq = time.perf_counter() - start
        seconds, _ = timed(one.trainer, state, single[1:])
        seq_s += seconds
    return {"workload": workload, "n": n, "pop_step_ms": 1e3 * pop_s / steps, "seq_step_ms": 1e3 * seq_s / steps,
            "ratio": seq_s / pop_s, "pop_total_s": compile_pop + pop_s, "seq_total_s": compile_seq + seq_s,
            "total_ratio": (compile_seq + seq_s) / (compile_pop + pop_s)}


def optuna_race(trials: int, steps: int) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = [*WORKLOADS["digits-mlp"], f"train.steps={steps}", "mesh.data=8"]
    distributions = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}  # loguniform(1e-4,1e-1)

    start = time.perf_counter()
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    one = run_parts(load_config("tiny", base))
    evals = one.data.eval_batches(0)
    batches = [one.trainer.put(one.data.batch(s)) for s in range(steps)]
    for _ in range(trials):
        trial = study.ask(distributions)
        state = with_hyperparams(one.trainer.init(trial.number), {"lr": np.float32(trial.params["lr"])})
        for batch in batches:
            state, _ = one.trainer.step(state, batch)
        study.tell(trial, evaluate(one.trainer, state.params, evals)["loss"])
    sequential_s, sequential_best = time.perf_counter() - start, study.best_value

    start = time.perf_counter()
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    asked = [study.ask(distributions) for _ in range(trials)]
    pop = run_parts(load_config("tiny", [*base[:-1], "population.kind=sweep", f"population.size={trials}",
                                     "optim.lr=loguniform(1e-4,1e-1)", f"mesh.members={min(trials, 8)}",
                                     "mesh.data=-1"]))
    state = with_hyperparams(pop.trainer.init(0), {"lr": np.array([t.params["lr"] for t in asked], np.float32)})
    for step in range(steps):
        state, _ = pop.trainer.step(state, pop.trainer.put(pop.data.batch(step)))
    val = evaluate(pop.trainer, state.params, evals)
    for trial, loss in zip(asked, val["loss"]):  # a diverged member is a failed trial, as `shardml train` tells it
        if np.isfinite(loss):
            study.tell(trial.number, loss)
        else:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    population_s = time.perf_counter() - start
    return {"trials": trials, "steps": steps, "sequential_s": sequential_s, "population_s": population_s,
            "ratio": sequential_s / population_s, "sequential_best": sequential_best, "population_best": study.best_value}


def quality(which: str, steps: int) -> list[str]:
    lines = []
    base = WORKLOADS["digits-mlp"] if which == "digits" else ["train.batch_size=16", "train.eval_batches=8"]
    common = [*base, f"train.steps={steps}", "train.log_every=1000", "mesh.members=2", "mesh.data=-1", "mesh.fsdp=1",
              "mesh.tensor=1", "checkpoint.every=0"]
    for label, extra in (("ensemble of 8", ["population.kind=ensemble", "population.size=8"]),
                         ("sweep of 8 (lr loguniform 1e-4..1e-1)", ["population.kind=sweep", "population.size=8",
                                                                    "optim.lr=loguniform(1e-4,1e-1)"]),
                         ("PBT of 8 (ready every steps/6)", ["population.kind=pbt", "population.size=8",
                                                            "optim.lr=loguniform(1e-4,1e-1)",
                                                            f"population.ready_every={max(1, steps // 6)}"])):
        import json
        import tempfile

        with tempfile.TemporaryDirectory() as out:
            train(load_config("tiny", [*common, *extra, f"out_dir={out}"]), verbose=False)
            report = json.load(open(f"{out}/population.json"))
        members = report["members"]
        best = min(members, key=lambda m: m["val_loss"])
        row = f"| {which} | {label} | best member {best['member']}: val loss {best['val_loss']:.4f}"
        if "val_accuracy" in best:
            row += f", accuracy {best['val_accuracy']:.4f}"
        row += f" (lr {best['hyperparams']['lr']:.2e})"
        if "ensemble" in report:
            e = report["ensemble"]
            row += (f"; ensemble loss {e['loss']:.4f} vs mean member {e['mean_member_loss']:.4f}")
            if which == "digits":
                row += (f", accuracy {e['accuracy']:.4f} vs mean member {e['mean_member_accuracy']:.4f}, ECE "
                        f"{e['ece']:.4f} vs mean member {e['mean_member_ece']:.4f}")
        lines.append(row + " |")
    return lines


def main():
    args = parse_args()
    sizes = [int(n) for n in args.members.split(",")]
    rows = []
    for workload in args.workloads:
        for n in sizes:
            rows.append(speed(workload, n, args.steps))
            r = rows[-1]
            print(f"{workload} N={n}: population {r['pop_step_ms']:.1f} ms/step, sequential {r['seq_step_ms']:.1f} "
                  f"ms/step, {r['ratio']:.2f}x", file=sys.stderr)
    lines = [f"jax {jax.__version__}; {args.steps} timed steps per model after one compiled step; sequential = the "
             "same N models one after another on data=8, one compiled step reused", "",
             "| workload | N | population ms/step | sequential ms/step (all N) | speed-up | end to end (compile incl.) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['n']} | {r['pop_step_ms']:.1f} | {r['seq_step_ms']:.1f} | "
                     f"**{r['ratio']:.2f}x** | {r['seq_total_s']:.1f} s / {r['pop_total_s']:.1f} s = "
                     f"{r['total_ratio']:.2f}x |")
    if args.trials:
        o = optuna_race(args.trials, args.steps)
        lines += ["", f"Optuna (TPE, seed 0), {o['trials']} trials of the digits MLP's lr, {o['steps']} steps each: "
                  f"one at a time {o['sequential_s']:.1f} s (best val loss {o['sequential_best']:.4f}); shardml, one "
                  f"generation of {o['trials']} as a population {o['population_s']:.1f} s (best "
                  f"{o['population_best']:.4f}): **{o['ratio']:.2f}x**"]
    if args.quality != "none":
        lines += ["", f"Quality, {args.quality_steps} steps, members on mesh.members=2 x data=4:", "",
                  "| data | population | result |", "|---|---|---|"]
        for which in args.quality.split(","):
            lines += quality(which, args.quality_steps)
    print("\n".join(lines))
    if args.plot:
        plt = _readme.pyplot(args.plot)
        if plt is not None:
            for workload in args.workloads:
                xs = [r["n"] for r in rows if r["workload"] == workload]
                plt.plot(xs, [r["ratio"] for r in rows if r["workload"] == workload], marker="o", label=workload)
            plt.xscale("log", base=2)
            plt.xlabel("members N")
            plt.ylabel("speed-up over N sequential runs")
            plt.legend()
            plt.savefig(args.plot, dpi=120, bbox_inches="tight")
    return "\n".join(lines)


if __name__ == "__main__":
    with _readme.printed_section(_readme.option(sys.argv, "--readme"), "bench_population", "benchmarks/bench_population.py",
                                 sys.argv[1:]):
        main()
