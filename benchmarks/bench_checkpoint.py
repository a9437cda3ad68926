"""Training-time overhead of checkpointing every N steps: none vs. async vs. blocking Orbax saves.

Each preset's model, data, mesh and trainer are built as ``shardml train`` builds them
(:func:`shardml.run_parts`); the loop is ``shardml.fit``'s: dispatch step
s, then read step s-1's metrics; on a checkpoint step, read this step's metrics and save
(``shardml.Checkpointer``, keeping the last 2, as in training, with the metadata the loop writes).
A timed round is ``--steps`` steps with a save every ``--every`` steps, the first one ``every // 2`` steps
into the round (so each save, the last one too, has steps after it to overlap, as in a long run),
and ends when the state is computed *and every save of the round is written and finalized*: an async
save's background work is counted, not pushed into the next round. Rounds rotate the order of the
three modes so machine noise hits all alike; medians are reported, of wall-clock time and of this
process's CPU time (all its threads: XLA's, Orbax's writers). On a shared CPU machine the CPU time
is the steadier figure of the work a save adds; only the wall clock shows what async overlaps.

    python benchmarks/bench_checkpoint.py                      # tiny and default presets
    python benchmarks/bench_checkpoint.py --presets tiny --every 5 --steps 40 --rounds 7
"""

import shardml

shardml.emulate_cpu_devices(8)  # before any other JAX use; also avoids an XLA:CPU collective deadlock

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

from shardml import Checkpointer, RunDir, describe, load_config, run_parts

import _readme  # benchmarks/ (this script's folder) is on sys.path

MODES = ("none", "async", "blocking")


def bench_preset(preset, args, root):
    cfg = load_config(preset)
    parts = run_parts(cfg)  # the model, data, mesh and trainer `shardml train` builds
    trainer, t = parts.trainer, cfg.train
    mesh = trainer.mesh
    batches = [trainer.put(parts.data.batch(s)) for s in range(args.steps)]
    # What the loop records beside the arrays: the run's identity and config.
    ident = RunDir.identity(trainer, parts.data.fingerprint, dataclasses.asdict(cfg))
    checkpointers = {mode: Checkpointer(os.path.join(root, preset, mode), keep=2, async_save=mode == "async")
                     for mode in MODES if mode != "none"}
    state = {"state": trainer.init(t.seed), "step": 0}
    save_s = {mode: [] for mode in MODES}

    def round_of(mode):
        checkpointer = checkpointers.get(mode)
        previous = None
        for i in range(args.steps):
            state["state"], metrics = trainer.step(state["state"], batches[i])
            state["step"] += 1
            if previous is not None:
                float(np.asarray(previous["loss"]))  # the loop reads step s-1 after dispatching s
            previous = metrics
            if checkpointer is not None and (i + 1 + args.every // 2) % args.every == 0:
                float(np.asarray(metrics["loss"]))
                previous = None
                t0 = time.perf_counter()
                checkpointer.save(state["step"], state["state"], run=ident, mesh=mesh.shape)
                save_s[mode].append(time.perf_counter() - t0)
        jax.block_until_ready(state["state"])
        if checkpointer is not None:
            checkpointer.wait()

    for mode in MODES:  # compile, and one untimed round each (first saves set up Orbax's threads)
        round_of(mode)
    times = {mode: [] for mode in MODES}
    cpu = {mode: [] for mode in MODES}
    for mode in MODES:
        save_s[mode].clear()
    for r in range(args.rounds):
        order = MODES[r % 3:] + MODES[:r % 3]
        for mode in order:
            t0, c0 = time.perf_counter(), time.process_time()
            round_of(mode)
            times[mode].append(time.perf_counter() - t0)
            cpu[mode].append(time.process_time() - c0)
    for checkpointer in checkpointers.values():
        checkpointer.close()
    ms = {mode: 1e3 * statistics.median(times[mode]) / args.steps for mode in MODES}
    cpu_ms = {mode: 1e3 * statistics.median(cpu[mode]) / args.steps for mode in MODES}
    state_mb = sum(x.nbytes for x in jax.tree.leaves(state["state"])) / 2**20
    return {"preset": preset, "mesh": describe(mesh), "params": parts.model.num_params, "state_mb": state_mb, "ms": ms,
            "cpu_ms": cpu_ms,
            "save_ms": {m: 1e3 * statistics.median(v) for m, v in save_s.items() if v}, "times": times}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,default", help="comma-separated presets")
    parser.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round (a multiple of --every)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per mode")
    parser.add_argument("--readme", default=None, help="also write the printed report as this file's bench_checkpoint section")
    args = parser.parse_args()
    if args.steps % args.every:
        parser.error(f"--steps {args.steps} is not a multiple of --every {args.every}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as root:
        for preset in args.presets.split(","):
            results.append(bench_preset(preset, args, root))
    print(f"checkpoint every {args.every} steps; {args.rounds} rounds x {args.steps} steps per mode "
          f"(medians); {jax.device_count()} {jax.devices()[0].platform} devices")
    print(f"{'preset':8} {'params':>9} {'state MiB':>9}  {'per step':9} {'none':>8} {'async':>8} {'blocking':>8}  "
          f"{'async/none':>10} {'blocking/none':>13}")
    for r in results:
        for label, ms in (("wall ms", r["ms"]), ("CPU ms", r["cpu_ms"])):
            head = f"{r['preset']:8} {r['params']:9,} {r['state_mb']:9.2f}" if label == "wall ms" else " " * 28
            print(f"{head}  {label:9} {ms['none']:8.2f} {ms['async']:8.2f} {ms['blocking']:8.2f}  "
                  f"{ms['async'] / ms['none']:10.3f} {ms['blocking'] / ms['none']:13.3f}")
    for r in results:
        print(f"{r['preset']}: {r['mesh']}; save() returned after {r['save_ms']['async']:.1f} ms (async) / "
              f"{r['save_ms']['blocking']:.1f} ms (blocking), medians")
        print(f"{r['preset']} per-round wall seconds: " + "; ".join(
            f"{m} " + " ".join(f"{t:.3f}" for t in ts) for m, ts in r["times"].items()))


if __name__ == "__main__":
    with _readme.printed_section(_readme.option(sys.argv, "--readme"), "bench_checkpoint", "benchmarks/bench_checkpoint.py",
                                 sys.argv[1:]):
        main()
