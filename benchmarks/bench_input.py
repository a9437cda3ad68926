"""Does the input pipeline keep up? Step time with real loading and preprocessing against synthetic
batches already on the devices, and 2 processes x 4 devices against 1 x 8.

Part 1, one process: each config is built as ``shardml train`` builds it
(:func:`shardml.run_parts`); its train step runs ``--steps`` timed steps (after ``--warmup``
untimed ones: compile, worker start) fed

- ``synthetic``: one global batch placed on the devices once and reused (no input work at all);
- ``workers=0``: each batch read and preprocessed in the training process when due;
- ``workers=N``: by :class:`shardml.Feeder` with N grain worker processes, prefetched to devices.

Configs: ``plain`` is the preset as it is (byte-level text: cutting windows is all the work);
``bpe`` adds ``data.tokenizer=bpe`` (each window of text tokenised by a BPE tokenizer of
``--vocab`` tokens: heavier preprocessing). The table gives ms/step and the slowdown against
synthetic (1.00: the pipeline keeps up).

Part 2: the same run as 2 ``shardml train`` processes x 4 emulated CPU devices (gloo over
loopback) and as 1 process x 8 devices, compared by their median training throughput
(``tokens_per_s`` of ``metrics.jsonl``, compile excluded); the ratio is 2x4 / 1x8.

    python benchmarks/bench_input.py                                  # tiny preset, 1/2/4 workers
    python benchmarks/bench_input.py --preset default --steps 40 --workers 1,2,4,8
    python benchmarks/bench_input.py --steps 6 --warmup 2 --workers 1 --skip-processes   # smoke run
"""

import shardml

shardml.emulate_cpu_devices(8)  # before any other JAX use; also avoids an XLA:CPU collective deadlock

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import _readme  # benchmarks/ (this script's folder) is on sys.path
import jax

from shardml import Feeder, load_config, run_parts

CONFIGS = ("plain", "bpe")


def overrides(name, args):
    return {"plain": [], "bpe": ["data.tokenizer=bpe", f"model.vocab={args.vocab}"]}[name] + args.set


def time_steps(trainer, state, batch_of, args):
    """Seconds per step over ``args.steps`` steps after ``args.warmup`` untimed ones."""
    for step in range(args.warmup):
        state, metrics = trainer.step(state, batch_of(step))
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        state, metrics = trainer.step(state, batch_of(step))
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / args.steps, state


def bench_config(name, args):
    parts = run_parts(load_config(args.preset, overrides(name, args)))
    trainer = parts.trainer
    state = trainer.init(0)
    fixed = trainer.put(parts.data.batch(0))
    rows = []
    per_step, state = time_steps(trainer, state, lambda step: fixed, args)
    rows.append(("synthetic", per_step))
    for workers in [0, *args.workers]:
        feeder = Feeder(parts.data, trainer.batch_sharding, workers=workers)
        try:
            feeder.start(0)
            per_step, state = time_steps(trainer, state, feeder.get, args)
        finally:
            feeder.close()
        rows.append((f"workers={workers}", per_step))
    base = rows[0][1]
    return [f"| {name} | {mode} | {1e3 * s:.1f} | {s / base:.2f} |" for mode, s in rows]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median_throughput(out_dir, skip):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    rates = [r["tokens_per_s"] for r in records if r["step"] > skip and r.get("tokens_per_s")]
    return statistics.median(rates)


def run_processes(args, root):
    """tokens/s of the same command on 1 process x 8 devices and 2 processes x 4 devices."""
    steps = args.warmup + args.steps
    command = [sys.executable, "-m", "shardml", "train", args.preset, f"train.steps={steps}", "train.log_every=1",
               "checkpoint.every=0", "train.eval_batches=0", "--quiet", *args.set]
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS", "NPROC")}
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(root, "jax-cache"))
    one = os.path.join(root, "one")
    subprocess.run([*command, f"out_dir={one}", "--cpu-devices", "8", "--num-processes", "1"], env=env, check=True)
    two, port = os.path.join(root, "two"), free_port()
    procs = [subprocess.Popen([*command, f"out_dir={two}", "--cpu-devices", "4", "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i)], env=env,
                              stdout=subprocess.DEVNULL) for i in (0, 1)]
    if any(proc.wait() for proc in procs):
        raise SystemExit("the 2-process run failed")
    rate_one, rate_two = median_throughput(one, args.warmup), median_throughput(two, args.warmup)
    return [f"| 1 x 8 | {rate_one:,.0f} | 1.00 |", f"| 2 x 4 | {rate_two:,.0f} | {rate_two / rate_one:.2f} |"]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--configs", type=_readme.comma_list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--workers", type=lambda text: [int(w) for w in text.split(",")], default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile, worker start)")
    parser.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary of the bpe config")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="key=value",
                        help="overrides for every config")
    parser.add_argument("--skip-processes", action="store_true", help="no 2-process part")
    parser.add_argument("--readme", default=None, help="also write the tables into this README's section")
    args = parser.parse_args(argv)
    load = _readme.load_average()
    with _readme.printed_section(args.readme, "bench_input", "benchmarks/bench_input.py", argv):
        print(f"Input pipeline, preset {args.preset} on {jax.device_count()} devices: ms per train step "
              f"({args.steps} timed after {args.warmup})\n")
        print("| config | batches | ms/step | vs synthetic |\n|---|---|---|---|")
        for name in args.configs:
            for row in bench_config(name, args):
                print(row, flush=True)
        if not args.skip_processes:
            with tempfile.TemporaryDirectory() as root:
                print("\nMany processes (median tokens/s, compile excluded)\n")
                print("| processes x devices | tokens/s | ratio |\n|---|---|---|")
                for row in run_processes(args, root):
                    print(row, flush=True)
        if args.readme is None:  # printed_section adds it to the README's copy itself
            print(f"\n{_readme.machine_line(load)}")


if __name__ == "__main__":
    main()
