"""Pipeline schedules on emulated CPU devices: step time against the ideal, efficiency against the
theoretical bubble, temporary memory per device and permute bytes, from the compiled programs.

For each stage count p and microbatch count m (fixed microbatch size, so the batch grows with m),
every schedule trains the same transformer on mesh ``pipeline=p`` (p devices); the reference is the
same step on one device, and the ideal pipelined step takes 1/p of it. Efficiency = ideal / measured;
the theory is 1 - bubble = (v·m) / (v·m + p - 1). Timed rounds alternate between the schedules so
machine noise hits them alike; medians are reported.

On emulated devices all p "devices" share this machine's cores, so the measured efficiency is
bounded by cores / p and by total work (bubble slots that compute masked garbage cost time here,
while 1F1B skips its idle slots); the memory and permute columns are exact properties of the
compiled program and carry over to accelerators.

    python benchmarks/bench_pipeline.py                                 # p = 2, 4; m = p .. 8p
    python benchmarks/bench_pipeline.py --stages 2 --multiples 1,2 --plot /tmp/pipe.png
"""

import shardml

shardml.emulate_cpu_devices(8)  # before any other JAX use; also avoids an XLA:CPU collective deadlock

import argparse
import statistics
import time

import jax
import numpy as np

from shardml import SCHEDULES, Schedule, abstract_batch, collectives, load_config, memory, run_parts

import _readme  # benchmarks/ (this script's folder) is on sys.path


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", default="2,4", help="pipeline sizes p (comma-separated)")
    ap.add_argument("--multiples", default="1,2,4,8", help="microbatch counts as multiples of p ('' skips the timed table)")
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--repeats", type=int, default=2, help="virtual stages per device for circular")
    ap.add_argument("--rows", type=int, default=2, help="sequences per microbatch")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-ff", type=int, default=256)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (each one step of every schedule)")
    ap.add_argument("--plot", default="benchmarks/pipeline.png", help="PNG of efficiency and memory vs m ('' to skip)")
    ap.add_argument("--compile-m", default="8,64", help="microbatch counts for the compile-time check ('' to skip)")
    ap.add_argument("--memory-rows", type=int, default=8,
                    help="sequences per microbatch for the memory curve (compile only; m = 4p, 8p, 16p)")
    ap.add_argument("--readme", default=None, help="also write the printed report as this file's bench_pipeline section")
    return ap.parse_args()


def run_config(args, stages: int, rows: int, schedule: str = "1f1b", microbatches: int = 0, repeats: int = 1):
    """The benchmark's transformer (f32, remat dots, AdamW for 100 steps) as a run config on mesh
    ``pipeline=stages`` (``stages=1``: one device) with a global batch of ``rows`` sequences."""
    return load_config(None, [
        f"model.layers={args.layers}", f"model.d_model={args.d_model}", f"model.heads={args.heads}",
        f"model.d_ff={args.d_ff}", "model.dtype=float32", "model.remat=dots", f"data.seq_len={args.seq}",
        f"train.batch_size={rows}", "train.steps=100", "mesh.data=1", f"mesh.pipeline={stages}",
        f"pipeline.schedule={schedule}", f"pipeline.microbatches={microbatches}", f"pipeline.repeats={repeats}"])


def build_on_first(cfg):
    """``shardml train``'s parts of ``cfg`` on the first ``mesh.pipeline`` devices."""
    return run_parts(cfg, jax.devices()[:cfg.mesh.pipeline])


def permute_sends(schedule: Schedule) -> int:
    """Boundary crossings per pass in theory: every microbatch crosses v·p - 1 stage boundaries
    forward, and its cotangent as many backward: 2·m·(v·p - 1)."""
    return 2 * schedule.microbatches * (schedule.repeats * schedule.stages - 1)


class Runner:
    """One compiled trainer with its state and batch, ready to time."""

    def __init__(self, cfg):
        parts = build_on_first(cfg)
        self.trainer = parts.trainer
        self.batch = self.trainer.put(parts.data.batch(0))
        self.state = self.trainer.init(cfg.train.seed)
        start = time.perf_counter()
        self.compiled = compiled = self.trainer.lower_step(self.trainer.abstract_state(), self.batch).compile()
        self.compile_s = time.perf_counter() - start
        self.temp_bytes = memory(compiled).temporaries
        report = collectives(compiled.as_text(), self.trainer.mesh)
        self.permute_bytes = sum(op.bytes * op.trips * len(op.groups) for op in report.select("collective-permute"))
        self.step()  # warm up

    def step(self) -> float:
        start = time.perf_counter()
        with jax.set_mesh(self.trainer.mesh):
            self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready(metrics)
        return time.perf_counter() - start


def main():
    args = parse_args()
    stages_list = [int(p) for p in args.stages.split(",")]
    multiples = [int(k) for k in args.multiples.split(",") if k]
    schedules = args.schedules.split(",")
    model = build_on_first(run_config(args, 1, args.rows)).model
    print(f"model: {model.num_params:,} parameters, {args.layers} layers, d_model {args.d_model}; microbatch "
          f"{args.rows} x {args.seq} tokens; {jax.device_count()} emulated devices on this host\n")
    header = (f"{'p':>2} {'schedule':<9} {'v':>2} {'m':>3} {'step ms':>9} {'ideal ms':>9} {'eff':>6} {'theory':>6} "
              f"{'eff/th':>6} {'temp MiB':>9} {'permute KiB':>12} {'theory KiB':>11} {'compile s':>9}")
    print(header)
    rows = []
    for p in stages_list:
        for multiple in multiples:
            m = multiple * p
            batch_rows = m * args.rows
            ref = Runner(run_config(args, 1, batch_rows))
            runners = {}
            for name in schedules:
                v = args.repeats if name == "circular" else 1
                if args.layers % (p * v) or (v > 1 and m % p):
                    continue
                runners[name] = Runner(run_config(args, p, batch_rows, name, m, v))
            times = {name: [] for name in ["ref", *runners]}
            for _ in range(args.rounds):
                times["ref"].append(ref.step())
                for name, runner in runners.items():
                    times[name].append(runner.step())
            ideal = statistics.median(times["ref"]) / p
            for name, runner in runners.items():
                v = args.repeats if name == "circular" else 1
                schedule = Schedule(name, p, m, v)
                step = statistics.median(times[name])
                theory = 1 - schedule.bubble
                activation = args.rows * args.seq * args.d_model * 4
                row = dict(p=p, schedule=name, v=v, m=m, step_ms=1e3 * step, ideal_ms=1e3 * ideal,
                           efficiency=ideal / step, theory=theory, temp_mib=runner.temp_bytes / 2**20,
                           permute_kib=runner.permute_bytes / 2**10,
                           permute_theory_kib=permute_sends(schedule) * activation / 2**10,
                           compile_s=runner.compile_s)
                rows.append(row)
                print(f"{p:>2} {name:<9} {v:>2} {m:>3} {row['step_ms']:>9.1f} {row['ideal_ms']:>9.1f} "
                      f"{row['efficiency']:>6.3f} {theory:>6.3f} {row['efficiency'] / theory:>6.3f} "
                      f"{row['temp_mib']:>9.3f} {row['permute_kib']:>12.1f} {row['permute_theory_kib']:>11.1f} "
                      f"{row['compile_s']:>9.1f}", flush=True)
            if "1f1b" in runners and "gpipe" in runners:
                ratio = statistics.median(times["1f1b"]) / statistics.median(times["gpipe"])
                print(f"   p={p} m={m}: 1F1B / GPipe step time = {ratio:.3f}", flush=True)
    curve = memory_curve(args, schedules) if args.memory_rows else []
    if args.compile_m:
        compile_times(args, schedules, [int(m) for m in args.compile_m.split(",")])
    if args.plot:
        plot(rows, curve, args.plot)


def memory_curve(args, schedules):
    """Temporary bytes per device of the compiled step at a fixed (larger) microbatch, m = 4p .. 16p."""
    p = max(int(x) for x in args.stages.split(","))
    stage_input = args.memory_rows * args.seq * args.d_model * 4
    print(f"\ntemporary memory per device (compile only), p={p}, microbatch {args.memory_rows} x {args.seq} "
          f"(one stage input = {stage_input / 2**20:.3f} MiB):")
    curve = []
    for name in schedules:
        v = args.repeats if name == "circular" else 1
        cells = []
        for m in (4 * p, 8 * p, 16 * p):
            parts = build_on_first(run_config(args, p, m * args.memory_rows, name, m, v))
            compiled = parts.trainer.lower_step(parts.trainer.abstract_state(), abstract_batch(parts)).compile()
            temp = memory(compiled).temporaries / 2**20
            curve.append(dict(p=p, schedule=name, m=m, temp_mib=temp))
            cells.append(temp)
        print(f"  {name:<9} " + "  ".join(f"m={m}: {t:8.2f} MiB" for m, t in zip((4 * p, 8 * p, 16 * p), cells))
              + f"  growth 4p->16p {cells[-1] / cells[0] - 1:+.1%}", flush=True)
    return curve


def compile_times(args, schedules, ms, rounds=3):
    """lower + compile seconds of the train step at each m (largest p asked for); median of ``rounds``
    rounds that alternate between the m values, so machine load hits them alike."""
    p = max(int(x) for x in args.stages.split(","))
    print(f"\ncompile time (lower + compile, p={p}, median of {rounds}), seconds:")
    for name in schedules:
        v = args.repeats if name == "circular" else 1
        seconds = {m: [] for m in ms}
        for _ in range(rounds):
            for m in ms:
                parts = build_on_first(run_config(args, p, m * args.rows, name, m, v))
                trainer, batch = parts.trainer, abstract_batch(parts)
                start = time.perf_counter()
                trainer.lower_step(trainer.abstract_state(), batch).compile()
                seconds[m].append(time.perf_counter() - start)
        medians = [statistics.median(seconds[m]) for m in ms]
        cells = "  ".join(f"m={m}: {s:.1f}" for m, s in zip(ms, medians))
        print(f"  {name:<9} {cells}  ratio {medians[-1] / medians[0]:.2f}", flush=True)


def plot(rows, curve, path):
    plt = _readme.pyplot(path)
    if plt is None:
        return
    fig, (eff_ax, mem_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for p in sorted({r["p"] for r in rows}):
        for name in SCHEDULES:
            sel = [r for r in rows if r["p"] == p and r["schedule"] == name]
            if not sel:
                continue
            ms = [r["m"] for r in sel]
            line, = eff_ax.plot(ms, [r["efficiency"] for r in sel], "o-", label=f"{name} p={p}")
            eff_ax.plot(ms, [r["theory"] for r in sel], ":", color=line.get_color())
    for name in SCHEDULES:
        sel = [r for r in curve if r["schedule"] == name]
        if sel:
            mem_ax.plot([r["m"] for r in sel], [r["temp_mib"] for r in sel], "o-", label=f"{name} p={sel[0]['p']}")
    eff_ax.set(xscale="log", xlabel="microbatches m", ylabel="efficiency (ideal / measured)",
               title="measured (solid) vs 1 - bubble (dotted)")
    mem_ax.set(xscale="log", xlabel="microbatches m (fixed microbatch size)", ylabel="temporary MiB per device",
               title="compiled temporary memory (memory curve)")
    eff_ax.legend(fontsize=7)
    mem_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
