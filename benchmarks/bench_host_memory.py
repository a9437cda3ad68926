"""What keeping freed host memory buys on XLA:CPU: the race decoder's step with glibc's default
allocator and with shardml's setting (``shardml.core.host_memory``), in alternating processes.

The allocator is set once per process, so each side is a child process of its own (the same
Python and JAX), started in turn, the order flipped every round: ``SHARDML_HOST_MALLOC=system``
(glibc as it comes) against shardml's default. Each child builds the race decoder of
``bench_maxtext.py`` (``--shape race`` or ``4x``) on a layout, compiles, runs ``--warmup`` steps,
then times ``--steps`` steps back to back and reports ms/step, CPU-seconds per step and minor page
faults per step (``getrusage``).

    python benchmarks/bench_host_memory.py                         # fsdp=8 and fsdp=2,tensor=4
    python benchmarks/bench_host_memory.py --shape 4x --layouts fsdp=8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import _readme  # benchmarks/ (this script's folder) is on sys.path
import bench_maxtext as bm

SIDES = {"glibc default": {"SHARDML_HOST_MALLOC": "system"}, "shardml (kept)": {}}


def child(args) -> None:
    """One side: train the race decoder in this process and print one JSON line of figures."""
    import resource

    import shardml

    shardml.emulate_cpu_devices(bm.DEVICES)  # applies (or, opted out, skips) the allocator setting
    import jax

    shape = bm.SHAPES[args.shape]
    overrides = bm.shardml_overrides([f"train.steps={args.warmup + args.steps + 1}"], shape)
    cfg = shardml.layout_config(shardml.load_config(None, overrides),
                        ",".join(f"mesh.{part}" for part in args.child.split(",")))
    parts = shardml.run_parts(cfg)
    trainer = parts.trainer
    state, batch = trainer.init(seed=0), trainer.put(parts.data.batch(0))
    for _ in range(args.warmup):
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready(state)
    before, cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
    for _ in range(args.steps):
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready(state)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before.ru_minflt
    print(json.dumps({"ms": wall / args.steps * 1e3, "cpu_s": cpu / args.steps, "faults": faults / args.steps,
                      "kept": shardml.keep_freed_host_memory(), "loss": float(metrics["loss"]),
                      "jax": jax.__version__}))


def run_side(args, layout: str, side: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("SHARDML_HOST_MALLOC", "XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(SIDES[side], JAX_PLATFORMS="cpu")
    cmd = [args.python, os.path.abspath(__file__), "--child", layout, "--shape", args.shape,
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise SystemExit(f"{side} on {layout} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def table(results: dict, args) -> str:
    rows = ["| layout | allocator | ms/step | CPU-s/step | page faults/step | speed-up |", "|---|---|---:|---:|---:|---:|"]
    base, kept = SIDES
    for layout, sides in results.items():
        med = {side: {k: statistics.median(r[k] for r in runs) for k in ("ms", "cpu_s", "faults")}
               for side, runs in sides.items()}
        for side in sides:
            ratio = med[base]["ms"] / med[side]["ms"]
            rows.append(f"| {layout} | {side} | {med[side]['ms']:.0f} | {med[side]['cpu_s']:.2f} | "
                        f"{med[side]['faults']:,.0f} | {ratio:.2f}x |")
    per_round = "; ".join(f"{layout} {side}: " + " ".join(f"{r['ms']:.0f}" for r in runs)
                          for layout, sides in results.items() for side, runs in sides.items())
    first = next(iter(next(iter(results.values())).values()))[0]
    applied = {side: {r["kept"] for s in results.values() for r in s[side]} for side in SIDES}
    return "\n".join(rows) + (
        f"\n\nmedian of {args.rounds} rounds, each side a fresh process per round (order flipped every round), "
        f"{args.warmup} untimed steps after compiling, then {args.steps} timed steps back to back; speed-up = the glibc "
        f"default's ms/step / this row's. Per round, ms/step: {per_round}.\nsetting applied: "
        + ", ".join(f"{side} {sorted(v)}" for side, v in applied.items())
        + f"\nshape {args.shape}: {bm.SHAPES[args.shape]}; JAX {first['jax']}, {bm.DEVICES} emulated CPU devices")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", nargs="+", default=["fsdp=8", "fsdp=2,tensor=4"])
    ap.add_argument("--shape", choices=tuple(bm.SHAPES), default="race")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--python", default=sys.executable, help="the interpreter of both sides (shardml installed)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--readme", default=None, help="also write the report as this file's bench_host_memory section")
    args = ap.parse_args()
    if args.child:
        return child(args)
    load_start = _readme.load_average()
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results = {layout: {side: [] for side in SIDES} for layout in args.layouts}
    for r in range(args.rounds):
        for layout in args.layouts:
            for side in (list(SIDES) if r % 2 == 0 else list(SIDES)[::-1]):
                results[layout][side].append(run_side(args, layout, side))
                print(f"  round {r + 1} {layout} {side}: {results[layout][side][-1]['ms']:.0f} ms/step",
                      file=sys.stderr, flush=True)
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    text = table(results, args) + f"\nuptime before: {uptime_before}\nuptime after: {uptime_after}"
    print(text)
    if args.readme:
        if load_start > bm.IDLE_LOAD:
            raise SystemExit(f"{args.readme} not written: the 1-minute load average was {load_start:.2f} at the start "
                             f"(> {bm.IDLE_LOAD}). Rerun on an idle machine.")
        _readme.write_section(args.readme, "bench_host_memory" + ("" if args.shape == "race" else f"_{args.shape}"),
                              text, _readme.shown_command("benchmarks/bench_host_memory.py", sys.argv[1:],
                                                          hidden=("--readme", "--python")))


if __name__ == "__main__":
    main()
