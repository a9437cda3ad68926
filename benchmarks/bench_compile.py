"""Compile time of shardml's train step against depth and against accumulator microbatches.

The layers run under one ``lax.scan`` and the accumulator's microbatches under another, so neither
the depth nor ``train.microbatches`` should grow the program XLA compiles. This measures it: for
each configuration a fresh trainer is built from the config as ``shardml train`` builds it
(:func:`shardml.run_parts`) and its step is lowered and compiled from abstract shapes, as
``shardml plan`` does (nothing is allocated or trained), timing ``lower`` (tracing + StableHLO) and
``compile`` (XLA) separately with ``time.perf_counter``. The compiled HLO
instruction count (``compiled.as_text()``) shows the same property without machine noise.

The persistent compilation cache is switched off, and every compile is checked to have reached
XLA's backend (one ``backend_compile`` event, no cache hit). Repeats alternate the order of the
configurations (forwards, then backwards) so drifting machine load hits them alike; the table
shows medians. The pipeline's own microbatch count (``pipeline.microbatches``) is measured by
``bench_pipeline.py``.

    python benchmarks/bench_compile.py                                # layers 2..64, microbatches 1..64
    python benchmarks/bench_compile.py --layers 2,8 --microbatches 1,4 --repeats 1 --plot ''
    python benchmarks/bench_compile.py --readme benchmarks/README.md  # also rewrite the README section
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shardml

shardml.emulate_cpu_devices(8)  # before any other JAX use; also avoids an XLA:CPU collective deadlock

import argparse
import re
import statistics
import sys
import time

import jax

import _readme

from shardml import abstract_batch, layout_config, load_config, make_mesh, run_parts

# One HLO instruction per line: `[ROOT] %name = type op(...)`.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s", re.MULTILINE)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="2,4,8,16,32,64", help="depths of the depth sweep (microbatches 1)")
    ap.add_argument("--microbatches", default="1,2,4,8,16,32,64",
                    help="train.microbatches of the microbatch sweep (at --base-layers)")
    ap.add_argument("--base-layers", type=int, default=4, help="depth of the microbatch sweep")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-ff", type=int, default=512)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--layout", default="data=2,fsdp=2,tensor=2", help="mesh axis=size pairs over 8 devices")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds over all configurations (median)")
    ap.add_argument("--plot", default="benchmarks/compile.png", help="PNG of both sweeps ('' to skip)")
    ap.add_argument("--readme", default=None, help="rewrite this file's bench_compile section")
    return ap.parse_args()


class CompileEvents:
    """Counts XLA backend compiles and persistent-cache hits, from JAX's monitoring events."""

    def __init__(self):
        self.backend_compiles, self.cache_hits, self.cache_requests = 0, 0, 0
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        jax.monitoring.register_event_listener(self._event)

    def _duration(self, event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            self.backend_compiles += 1

    def _event(self, event, **_):
        if event == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1
        elif event == "/jax/compilation_cache/compile_requests_use_cache":
            self.cache_requests += 1

    def snapshot(self) -> tuple[int, int, int]:
        return self.backend_compiles, self.cache_hits, self.cache_requests


def run_config(args, layers: int, microbatches: int, batch_size: int):
    """The default preset at this size, on ``--layout`` (a fresh mesh: ``data`` fills the devices
    unless given, the other axes are 1), with the layers scanned under ``remat=dots``: what the
    ``auto`` defaults take for models too big to unroll, and the loop whose compile time this
    measures (unrolled, it grows with depth)."""
    base = load_config("default", [
        "model.remat=dots", "model.layer_loop=scan",
        f"model.layers={layers}", f"model.d_model={args.d_model}", f"model.heads={args.heads}",
        f"model.d_ff={args.d_ff}", f"data.seq_len={args.seq}", f"train.batch_size={batch_size}",
        f"train.microbatches={microbatches}"])
    return layout_config(base, ",".join(f"mesh.{part.strip()}" for part in args.layout.split(",")))


def measure(cfg, events: CompileEvents) -> dict:
    """lower and compile seconds of a fresh trainer's step (a new jit: nothing cached in memory)."""
    parts = run_parts(cfg)  # `shardml train`'s trainer; rejects a layout that cannot work before compiling
    trainer = parts.trainer
    state = trainer.abstract_state()
    batch = abstract_batch(parts)
    before = events.snapshot()
    cpu_start = time.process_time()
    start = time.perf_counter()
    lowered = trainer.lower_step(state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    cpu_s = time.process_time() - cpu_start
    compiles, hits, requests = (a - b for a, b in zip(events.snapshot(), before))
    if compiles != 1 or hits or requests:
        raise RuntimeError(f"expected one backend compile without the persistent cache, saw {compiles} "
                           f"compile(s), {hits} cache hit(s), {requests} cache request(s)")
    return {"lower_s": lowered_at - start, "compile_s": done - lowered_at, "cpu_s": cpu_s,
            "instructions": len(_INSTRUCTION.findall(compiled.as_text()))}


def sweep_rows(points, results):
    """Medians per configuration, with ratios to the first one."""
    rows = []
    for key in points:
        runs = results[key]
        row = {"layers": key[0], "microbatches": key[1],
               "lower_s": statistics.median(r["lower_s"] for r in runs),
               "compile_s": statistics.median(r["compile_s"] for r in runs),
               "total_s": statistics.median(r["lower_s"] + r["compile_s"] for r in runs),
               "cpu_s": statistics.median(r["cpu_s"] for r in runs),
               "instructions": runs[0]["instructions"],
               "instructions_stable": len({r["instructions"] for r in runs}) == 1}
        rows.append(row)
    first = rows[0]
    for row in rows:
        row["ratio"] = row["total_s"] / first["total_s"]
        row["cpu_ratio"] = row["cpu_s"] / first["cpu_s"]
        row["instructions_ratio"] = row["instructions"] / first["instructions"]
    return rows


def format_table(rows, varying: str) -> str:
    lines = [(f"| {varying} | lower s | compile s | lower + compile s | ratio | CPU s | ratio | "
              "HLO instructions | ratio |"), "|---:" * 9 + "|"]
    for r in rows:
        stable = "" if r["instructions_stable"] else " (varied)"
        lines.append(f"| {r[varying]} | {r['lower_s']:.2f} | {r['compile_s']:.2f} | {r['total_s']:.2f} | "
                     f"{r['ratio']:.2f} | {r['cpu_s']:.2f} | {r['cpu_ratio']:.2f} | {r['instructions']:,}{stable} | "
                     f"{r['instructions_ratio']:.2f} |")
    return "\n".join(lines)


def plot(depth_rows, micro_rows, path):
    plt = _readme.pyplot(path)
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    micro_title = f"vs train.microbatches ({micro_rows[0]['layers']} layers)"
    for ax, rows, key, title in ((axes[0], depth_rows, "layers", "vs depth (microbatches 1)"),
                                 (axes[1], micro_rows, "microbatches", micro_title)):
        xs = [r[key] for r in rows]
        ax.plot(xs, [r["compile_s"] for r in rows], "o-", label="compile")
        ax.plot(xs, [r["lower_s"] for r in rows], "s-", label="lower")
        ax.plot(xs, [r["total_s"] for r in rows], "^-", label="lower + compile")
        ax.set_xscale("log", base=2)
        ax.set(xlabel=key, ylabel="seconds (median)", title=f"compile time {title}")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_ylim(0, 1.5 * max(r["total_s"] for r in rows))
        twin = ax.twinx()
        twin.plot(xs, [r["instructions"] for r in rows], "k:", label="HLO instructions (right axis)")
        twin.set_ylim(0, 1.5 * max(r["instructions"] for r in rows))
        twin.set_ylabel("compiled HLO instructions")
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


def main():
    args = parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    assert jax.device_count() == 8, f"expected 8 emulated CPU devices, got {jax.device_count()}"
    depths = [int(x) for x in args.layers.split(",") if x]
    micro = [int(x) for x in args.microbatches.split(",") if x]
    sizes = make_mesh(run_config(args, 2, 1, 1).mesh).shape  # the layout's axis sizes, -1 resolved
    batch_size = sizes["data"] * sizes["fsdp"] * max(micro + [1])  # one sequence per microbatch per shard at most
    depth_points = [(layers, 1) for layers in depths]
    micro_points = [(args.base_layers, k) for k in micro]
    points = list(dict.fromkeys(depth_points + micro_points))
    events = CompileEvents()
    load_start = _readme.load_average()
    print(f"load average {load_start:.1f}; {len(points)} configurations x {args.repeats} rounds", file=sys.stderr)
    results = {key: [] for key in points}
    for r in range(args.repeats):
        for key in (points if r % 2 == 0 else points[::-1]):
            results[key].append(measure(run_config(args, *key, batch_size), events))
            last = results[key][-1]
            print(f"  round {r + 1}/{args.repeats} layers={key[0]} microbatches={key[1]}: lower "
                  f"{last['lower_s']:.2f}s compile {last['compile_s']:.2f}s", file=sys.stderr, flush=True)
    depth_rows = sweep_rows(depth_points, results)
    micro_rows = sweep_rows(micro_points, results)

    layout = " x ".join(part.strip() for part in args.layout.split(","))
    text = "\n".join([
        (f"transformer d_model {args.d_model}, {args.heads} heads, d_ff {args.d_ff}, seq {args.seq}, bf16 compute, "
         f"remat dots; global batch {batch_size}; 8 emulated CPU devices ({layout}); XLA:CPU, jax "
         f"{jax.__version__}; persistent compilation cache off, every compile reached XLA "
         f"({sum(len(v) for v in results.values())} backend compiles, 0 cache hits); median of {args.repeats} "
         f"alternating rounds. Seconds are wall clock; CPU s is the process's CPU time (all threads) over lower + "
         f"compile, which other jobs on the machine disturb less. Ratio: to the first row."),
        "", "Depth (train.microbatches 1):", "", format_table(depth_rows, "layers"),
        "", f"Accumulator microbatches ({args.base_layers} layers; microbatch = global batch / microbatches):", "",
        format_table(micro_rows, "microbatches"),
        "", _readme.machine_line(load_start),
    ])
    print(text)
    if args.plot:
        plot(depth_rows, micro_rows, args.plot)
    if args.readme:
        _readme.write_section(args.readme, "bench_compile", text,
                              _readme.shown_command("benchmarks/bench_compile.py", sys.argv[1:]))


if __name__ == "__main__":
    main()
