"""Model FLOPs utilisation of shardml's train step against this machine's measured matmul peak.

The peak: jitted ``jnp.dot`` of square matrices (``--peak-sizes``) in float32 and bfloat16, best of
``--peak-repeats``, run two ways: on one device, and row-sharded over all devices (every device
multiplies its block at once, as the sharded step uses the machine). A dtype's peak is the best
figure of any size, way and measurement; it is measured before every round and once at the end, so
load from other processes hits it as it hits the steps. On CPU the emulated devices share the
host's cores, so this is the host's peak, not a per-device one. On GPU/TPU the reference is
``shardml.analysis.peak_flops`` (datasheet dense bf16 per chip x chips), the measured one beside it.

The step: shardml trains each config (``--configs``) on real text batches; compile and
``--warmup`` steps are not timed, then each round times ``--steps`` steps one by one
(``time.perf_counter`` around the step and ``block_until_ready``), rounds alternating the order of
the configs; the table shows the median step. Model FLOPs per step come from
``Model.flops_per_example`` (6 x matmul parameters + 12 x layers x d_model x seq per token), checked
against an independent count: the FLOPs of every ``dot_general`` in the step's jaxpr (scans x their
length). MFU = model FLOPs per step / step seconds / peak. On CPU, ``--breakdown`` (the default)
also times the step's matmuls alone, kind by kind, with the compiled step's per-device shapes,
types and counts, on all devices at once: how fast can these matrices be multiplied here at all
(a ceiling on MFU), and how much of the step is that.

Mesh: each preset's own mesh when it fits the devices (on CPU: 8 emulated devices), else all
devices on ``fsdp`` (all axes 1 on one GPU). ``--set key=value`` overrides every config; a ``mesh.*``
key starts from a fresh mesh (``--set mesh.data=8``).

    python benchmarks/bench_mfu.py                                   # tiny, default, 100m (+1b on GPU/TPU)
    python benchmarks/bench_mfu.py --configs default --steps 5 --peak-sizes 1024
    python benchmarks/bench_mfu.py --configs 1b                      # on an H100 / H200
    python benchmarks/bench_mfu.py --readme benchmarks/README.md     # also rewrite the README section
"""

import argparse
import collections
import dataclasses
import math
import os
import statistics
import sys
import time

import _readme
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardml import (MeshConfig, ShardmlError, abstract_batch, emulate_cpu_devices, layout_config, layout_name,
                     load_config, run_parts, validate)
from shardml.analysis import dot_flops, dot_inventory, dots, inventory_flops, peak_flops

# name -> (preset, overrides). 100m and 1b are the default preset's model at a larger size.
CONFIGS = {
    "tiny": ("tiny", []),
    "default": ("default", []),
    "100m": ("default", ["model.layers=12", "model.d_model=768", "model.heads=12", "model.d_ff=3072",
                         "data.seq_len=256", "train.batch_size=4"]),
    "1b": ("default", ["model.layers=16", "model.d_model=2048", "model.heads=16", "model.d_ff=8192",
                       "data.seq_len=2048", "train.batch_size=8"]),
}


def setup_devices() -> None:
    """8 emulated CPU devices, as the CLI makes them on a CPU-only machine (or the count the user set
    in JAX_NUM_CPU_DEVICES); call before any JAX use. On an accelerator the CPU devices go unused."""
    emulate_cpu_devices(int(os.environ.get("JAX_NUM_CPU_DEVICES") or 8))  # also the XLA:CPU deadlock workaround


def parse_args(accelerator: bool):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_configs = "tiny,default,100m,1b" if accelerator else "tiny,default,100m"
    ap.add_argument("--configs", default=default_configs, help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                    help="overrides for every config; a mesh.* key starts from a fresh mesh (e.g. mesh.data=8)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per config and round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (peak, then every config's steps)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    ap.add_argument("--peak-sizes", default="4096,8192" if accelerator else "1024,2048",
                    help="square matmul sizes for the peak")
    ap.add_argument("--peak-repeats", type=int, default=3 if not accelerator else 10)
    ap.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=not accelerator,
                    help="also time the step's matmuls alone (default on CPU; holds a copy of every "
                         "left operand, too much memory for the 1b config)")
    ap.add_argument("--slowest", type=int, default=3, help="list this many slowest matmul kinds per config")
    ap.add_argument("--readme", default=None, help="rewrite this file's bench_mfu section")
    return ap.parse_args()


# ----------------------------------------------------------------------------- peak


def matmul_throughput(dtype: str, size: int, repeats: int, sharded: bool) -> tuple[float, float]:
    """Best FLOP/s of a jitted ``jnp.dot`` of two [size, size] matrices, per wall second and per CPU second.

    ``sharded``: the left matrix's rows are split over all devices (the right one replicated), so
    every device multiplies its block at once; otherwise both live on the first device.
    """
    if sharded:
        mesh = jax.make_mesh((jax.device_count(),), ("rows",))
        x = jax.device_put(jnp.ones((size, size), dtype), NamedSharding(mesh, P("rows", None)))
        w = jax.device_put(jnp.ones((size, size), dtype), NamedSharding(mesh, P()))
    else:
        x = w = jax.device_put(jnp.ones((size, size), dtype), jax.devices()[0])
    dot = jax.jit(lambda a, b: jnp.dot(a, b))
    dot(x, w).block_until_ready()
    wall, cpu = math.inf, math.inf
    for _ in range(repeats):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        dot(x, w).block_until_ready()
        wall, cpu = min(wall, time.perf_counter() - wall0), min(cpu, time.process_time() - cpu0)
    return 2.0 * size**3 / wall, 2.0 * size**3 / max(cpu, 1e-9)


def measure_peak(sizes: list[int], repeats: int) -> dict:
    """{dtype: {(way, size): (FLOP/s, FLOP per CPU-s)}}, and the share of the cores used meanwhile."""
    figures = {}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for dtype in ("float32", "bfloat16"):
        figures[dtype] = {}
        for size in sizes:
            figures[dtype][("one device", size)] = matmul_throughput(dtype, size, repeats, sharded=False)
            if jax.device_count() > 1 and size % jax.device_count() == 0:
                figures[dtype][("all devices", size)] = matmul_throughput(dtype, size, repeats, sharded=True)
    cpu_use = (time.process_time() - cpu0) / (time.perf_counter() - wall0) / os.cpu_count()
    return {"figures": figures, "cpu_use": cpu_use}


def reference_peak() -> tuple[float, str]:
    """On accelerators: ``shardml.analysis.peak_flops`` (datasheet dense bf16 per chip x chips)."""
    return peak_flops("bfloat16")


# ----------------------------------------------------------------------------- FLOP counts


def step_dots(parts) -> collections.Counter:
    """The dot inventory of one train step of a built run (:func:`shardml.run_parts`),
    traced from abstract shapes, not compiled."""
    trainer = parts.trainer
    return dot_inventory(trainer.trace_step(trainer.abstract_state(), abstract_batch(parts)).jaxpr.jaxpr)


def compiled_dots(parts) -> collections.Counter:
    """The dots of the compiled step as (lhs, rhs, dimension numbers, result dtype) -> executions per
    step, with per-device shapes and the types XLA gave them (XLA:CPU multiplies most bf16 products in f32)."""
    trainer = parts.trainer
    text = trainer.lower_step(trainer.abstract_state(), abstract_batch(parts)).compile().as_text()
    names = {"f64": "float64", "f32": "float32", "bf16": "bfloat16", "f16": "float16", "s32": "int32", "s8": "int8"}
    found = collections.Counter()
    for dot in dots(text):
        found[(jax.ShapeDtypeStruct(dot.lhs[1], names[dot.lhs[0]]), jax.ShapeDtypeStruct(dot.rhs[1], names[dot.rhs[0]]),
               ((dot.lhs_contracting, dot.rhs_contracting), (dot.lhs_batch, dot.rhs_batch)),
               jnp.dtype(names[dot.result[0]]))] += dot.trips
    return found


class MatmulsAlone:
    """The step's matmuls and nothing else: for every kind of dot the compiled step runs, a program
    that runs it as often as the step does, with the same per-device shapes and types, on every
    device at once (as the step does), so the time is what these products cost here at the least.

    The left operands are distinct stacked copies scanned over (XLA would hoist a repeated identical
    product out of a loop), and each product passes an optimization barrier (XLA would otherwise
    compute only the element that is read).
    """

    def __init__(self, found: collections.Counter):
        self.kinds = list(found)
        self.counts = [found[k] for k in self.kinds]
        n = jax.device_count()
        self.flops = [dot_flops(k) * found[k] * n for k in self.kinds]  # all devices
        mesh = jax.make_mesh((n,), ("all",))
        self.programs = []
        for (lhs, rhs, dims, out_dtype), count in zip(self.kinds, self.counts):
            operands = (jax.device_put(jnp.ones((n * count, *lhs.shape), lhs.dtype), NamedSharding(mesh, P("all"))),
                        jax.device_put(jnp.ones((n, *rhs.shape), rhs.dtype), NamedSharding(mesh, P("all"))))

            def run(stack, right, dims=dims, out_dtype=out_dtype):
                def body(acc, left):
                    out = jax.lax.optimization_barrier(
                        jax.lax.dot_general(left, right[0], dims, preferred_element_type=out_dtype))
                    return acc + out.reshape(-1)[0].astype(jnp.float32), None

                zero = stack.reshape(-1)[0].astype(jnp.float32) * 0  # per device, as the carry must be
                return jax.lax.scan(body, zero, stack)[0][None]

            program = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P("all"), P("all")), out_specs=P("all")))
            program(*operands).block_until_ready()
            self.programs.append((program, operands))

    def time(self) -> tuple[float, float, list[float]]:
        """Wall and CPU seconds of running every kind once, and the wall seconds of each kind."""
        wall0, cpu0 = time.perf_counter(), time.process_time()
        each = []
        for program, operands in self.programs:
            start = time.perf_counter()
            program(*operands).block_until_ready()
            each.append(time.perf_counter() - start)
        return time.perf_counter() - wall0, time.process_time() - cpu0, each


def describe_dot(key) -> str:
    lhs, rhs, ((lc, rc), (lb, rb)), out_dtype = key
    short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
    text = (f"{short.get(str(lhs.dtype), lhs.dtype)}{list(lhs.shape)} x {short.get(str(rhs.dtype), rhs.dtype)}"
            f"{list(rhs.shape)}, contracting {tuple(lc)} x {tuple(rc)}")
    text += f", batch {tuple(lb)} x {tuple(rb)}" if lb else ""
    return text + (f" -> {short.get(str(out_dtype), out_dtype)}" if out_dtype is not None else "")


# ----------------------------------------------------------------------------- configs and steps


def resolve_config(name: str, overrides: list[str]):
    """The named config; its preset's mesh when that fits the devices, else all devices on fsdp."""
    preset, own = CONFIGS[name]
    cfg = load_config(preset, own)
    n = jax.device_count()
    try:
        validate(cfg, n)
    except ShardmlError:
        cfg = dataclasses.replace(cfg, mesh=MeshConfig(data=1, fsdp=n))  # all axes 1 on one device
    if overrides:  # like `shardml plan --compare`: a mesh.* key starts from a fresh mesh
        cfg = layout_config(cfg, ",".join(overrides))
    validate(cfg, n)
    return cfg


class Runner:
    """One config's trainer, state and batches: compiled and warmed up, then timed step by step.

    With ``breakdown``, each timed step is followed by one run of the step's matmuls alone
    (:class:`MatmulsAlone`), so both see the same machine load.
    """

    def __init__(self, name: str, cfg, warmup: int, breakdown: bool):
        self.name, self.cfg = name, cfg
        self.parts = run_parts(cfg)  # `shardml train`'s model, data and trainer
        self.trainer = self.parts.trainer
        self.batches = [self.trainer.put(self.parts.data.batch(s)) for s in range(4)]
        self.state, self.i = self.trainer.init(cfg.train.seed), 0
        start = time.perf_counter()
        self.loss = float(self._step()["loss"])
        self.compile_s = time.perf_counter() - start
        for _ in range(warmup):
            self._step()
        self.dots = step_dots(self.parts)
        # On GPU the compiled products are library calls, not HLO dots: only the CPU breakdown reads them.
        self.compiled = compiled_dots(self.parts) if breakdown else None
        self.alone = MatmulsAlone(self.compiled) if breakdown else None
        self.wall, self.cpu, self.alone_wall, self.alone_cpu, self.alone_each = [], [], [], [], []

    def _step(self):
        self.state, metrics = self.trainer.step(self.state, self.batches[self.i % len(self.batches)])
        self.i += 1
        jax.block_until_ready((self.state, metrics))
        return metrics

    def run(self, steps: int) -> None:
        for _ in range(steps):
            wall0, cpu0 = time.perf_counter(), time.process_time()
            self._step()
            self.wall.append(time.perf_counter() - wall0)
            self.cpu.append(time.process_time() - cpu0)
            if self.alone is not None:
                wall, cpu, each = self.alone.time()
                self.alone_wall.append(wall)
                self.alone_cpu.append(cpu)
                self.alone_each.append(each)

    def _slowest(self) -> list[tuple[float, float, int, str]]:
        """(share of the matmuls-alone time, GFLOP/s, executions, description) per dot kind, slowest first."""
        if not self.alone_each:
            return []
        medians = [statistics.median(runs) for runs in zip(*self.alone_each)]
        total = sum(medians)
        rows = [(t / total, f / t, c, describe_dot(k))
                for t, f, c, k in zip(medians, self.alone.flops, self.alone.counts, self.alone.kinds)]
        return sorted(rows, reverse=True)

    def result(self) -> dict:
        cfg, model = self.cfg, self.trainer.model
        tokens = cfg.train.batch_size * cfg.data.seq_len
        remat_none = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat="none"))
        return {
            "name": self.name, "cfg": cfg, "params": model.num_params, "tokens": tokens,
            "mesh": layout_name(self.trainer.mesh.shape),
            "compile_s": self.compile_s, "loss": self.loss, "wall": self.wall,
            "step_s": statistics.median(self.wall), "cpu_s": statistics.median(self.cpu),
            "model_flops": model.flops_per_example * cfg.train.batch_size,
            "counted_flops": inventory_flops(step_dots(run_parts(remat_none))),
            "executed_flops": inventory_flops(self.dots),
            "compiled_flops": inventory_flops(self.compiled) * jax.device_count() if self.compiled else None,
            # The embedding is a one-hot product here: forward and weight gradient, 2 x V x D each per token.
            "embed_onehot_flops": 4.0 * cfg.model.vocab * cfg.model.d_model * tokens,
            "alone_s": statistics.median(self.alone_wall) if self.alone_wall else None,
            "alone_flops": sum(self.alone.flops) if self.alone else None,
            "slowest": self._slowest(),
            "alone_cpu_s": statistics.median(self.alone_cpu) if self.alone_cpu else None,
        }


# ----------------------------------------------------------------------------- report


def _g(flops: float) -> str:
    return f"{flops / 1e9:,.1f}"


def _best(peaks, dtype: str, index: int, way: str | None = None) -> float:
    """Best FLOP/s (index 0) or FLOP per CPU-s (index 1) of ``dtype`` over all measurements."""
    return max(fig[index] for p in peaks for (w, _), fig in p["figures"][dtype].items() if way in (None, w))


def peak_table(peaks, args, accelerator: bool) -> list[str]:
    keys = list(peaks[0]["figures"]["float32"])
    lines = [(f"Peak matmul, GFLOP/s (best of {args.peak_repeats} per measurement; the range over the "
              f"{len(peaks)} measurements, one before each round and one at the end):"), "",
             "| dtype | " + " | ".join(f"{way}, {size}" for way, size in keys) + " | peak | peak per CPU-s |",
             "|---|" + "---:|" * (len(keys) + 2)]
    for dtype in ("float32", "bfloat16"):
        cells = []
        for key in keys:
            values = [p["figures"][dtype][key][0] for p in peaks]
            cells.append(f"{_g(min(values))} - {_g(max(values))}")
        lines.append(f"| {dtype} | " + " | ".join(cells) + f" | **{_g(_best(peaks, dtype, 0))}** | "
                     f"{_g(_best(peaks, dtype, 1))} |")
    if accelerator:
        return [*lines, "", "peak = the best figure of any size, way and measurement."]
    use = [p["cpu_use"] for p in peaks]
    lines += ["", (f"peak = the best figure of any size, way and measurement; per CPU-s: FLOPs over the "
                   f"process's CPU time (all threads). While measuring, the process used {min(use):.0%} - "
                   f"{max(use):.0%} of the machine's {os.cpu_count()} cores.")]
    return lines


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def breakdown(results, peaks, args) -> list[str]:
    """The FLOP-count check, and with ``--breakdown`` the step's matmuls alone and the slowest of them."""
    timed = [r for r in results if r["alone_s"]]
    head = ["config", "jaxpr matmul GFLOP/step: no remat / as run", "formula check"]
    if timed:
        head += ["compiled matmul GFLOP/step", "matmuls alone s", "their GFLOP/s", "of f32 / bf16 peak", "matmuls alone / step: wall / CPU"]
    lines = ["", "Where the FLOPs and the time go:", "", _row(head), "|---|" + "---:|" * (len(head) - 1)]
    f32, bf16 = _best(peaks, "float32", 0), _best(peaks, "bfloat16", 0)
    for r in results:
        cells = [r["name"], f"{_g(r['counted_flops'])} / {_g(r['executed_flops'])}",
                 f"{(r['counted_flops'] - r['model_flops']) / r['embed_onehot_flops']:.3f}"]
        if r["alone_s"]:
            rate = r["alone_flops"] / r["alone_s"]
            cells += [_g(r["compiled_flops"]), f"{r['alone_s']:.3f}", _g(rate), f"{rate / f32:.0%} / {rate / bf16:.0%}",
                      f"{r['alone_s'] / r['step_s']:.0%} / {r['alone_cpu_s'] / r['cpu_s']:.0%}"]
        lines.append(_row(cells))
    lines += ["", ("Jaxpr matmul FLOPs: every dot_general of the traced step (scans x their length), with remat "
                   "off and as run (remat recomputes some products in the backward pass). Formula check = "
                   "(no-remat count - model FLOPs) / the embedding's one-hot product (4 x vocab x d_model per "
                   "token: forward and weight gradient), which the formula leaves out as a lookup; 1.000 means "
                   "the formula counts every other matmul exactly.")]
    if timed:
        lines[-1] += (" Compiled: every dot of the partitioned program (`shardml.analysis.dots`, "
                      "per-device shapes x loop trips x devices); more than the jaxpr's would mean work repeated on "
                      "several devices. Matmuls alone: each kind of dot of the compiled step, as often as the step runs it, "
                      "with the same per-device shapes and types (XLA:CPU multiplies most bf16 products in f32) "
                      "and nothing else, on every device at once; timed after each step (median), so under "
                      "the same load. Their GFLOP/s bound the step's: MFU cannot exceed their share of the peak.")
        if args.slowest:
            lines += ["", f"Slowest matmuls alone (the {args.slowest} largest shares of their time):", "",
                      "| config | share | GFLOP/s | per step per device | dot (per-device shapes, as compiled) |",
                      "|---|---:|---:|---:|---|"]
            for r in timed:
                for share, rate, count, text in r["slowest"][:args.slowest]:
                    lines.append(f"| {r['name']} | {share:.0%} | {_g(rate)} | {count} | {text} |")
    return lines


def report(results, peaks, accelerator, args, load_start) -> str:
    device = jax.devices()[0]
    lines = [f"{jax.device_count()} {device.platform} device(s) ({device.device_kind}), jax {jax.__version__}; "
             f"{args.rounds} rounds x {args.steps} timed steps per config after {args.warmup} warm-up steps; "
             "rounds alternate the order of the configs."
             + (f" XLA:CPU thread pool: NPROC={os.environ['NPROC']}." if device.platform == "cpu"
                and "NPROC" in os.environ else ""), ""]
    lines += peak_table(peaks, args, accelerator)
    sheet = reference_peak() if accelerator else None
    if accelerator:
        lines.append(f"Reference peak (shardml.analysis.peak_flops): {sheet[1]} = {sheet[0] / 1e12:,.0f} TFLOP/s.")
    f32, bf16 = _best(peaks, "float32", 0), _best(peaks, "bfloat16", 0)
    f32_cpu, bf16_cpu = _best(peaks, "float32", 1), _best(peaks, "bfloat16", 1)

    head = ["config", "params", "mesh", "dtype", "batch x seq", "step s", "tokens/s", "model GFLOP/step"]
    if accelerator:
        head += ["MFU vs reference peak", "MFU vs measured bf16 peak"]
    else:
        head += ["MFU vs f32 peak", "MFU vs bf16 peak", "cores used", "per CPU-s: MFU vs f32 / bf16"]
    lines += ["", _row(head), "|---|---:|---|---|---|" + "---:|" * (len(head) - 5)]
    for r in results:
        cfg = r["cfg"]
        achieved = r["model_flops"] / r["step_s"]
        cells = [r["name"], f"{r['params'] / 1e6:,.2f} M", r["mesh"], cfg.model.dtype,
                 f"{cfg.train.batch_size} x {cfg.data.seq_len}", f"{r['step_s']:.3f}",
                 f"{r['tokens'] / r['step_s']:,.0f}", _g(r["model_flops"])]
        if accelerator:
            cells += [f"**{achieved / sheet[0]:.1%}**", f"{achieved / bf16:.1%}"]
        else:
            per_cpu = r["model_flops"] / r["cpu_s"]
            cells += [f"**{achieved / f32:.1%}**", f"{achieved / bf16:.1%}",
                      f"{r['cpu_s'] / r['step_s'] / os.cpu_count():.0%}",
                      f"{per_cpu / f32_cpu:.1%} / {per_cpu / bf16_cpu:.1%}"]
        lines.append(_row(cells))
    lines += ["", ("MFU = model FLOPs per step (`Model.flops_per_example` x batch: 6 x matmul parameters + "
                   "12 x layers x d_model x seq per token) / median step seconds / peak."
                   + ("" if accelerator else
                      " Per CPU-s: model FLOPs over the step's median CPU time (all threads) against the peak's "
                      "FLOPs per CPU-s; load from other processes disturbs it less than the wall clock. "
                      "Cores used = step CPU time / wall time / cores."))]

    lines += breakdown(results, peaks, args)
    steps = "; ".join(f"{r['name']} " + " ".join(f"{t:.3f}" for t in r["wall"]) for r in results)
    lines += ["", f"Step times, s: {steps}"
                 + ". Compile + first step, s: " + ", ".join(f"{r['name']} {r['compile_s']:.1f}" for r in results)
                 + ". First loss: " + ", ".join(f"{r['name']} {r['loss']:.3f}" for r in results) + "."]
    lines.append(_readme.machine_line(load_start))
    return "\n".join(lines)


def main():
    accelerator = jax.devices()[0].platform != "cpu"
    args = parse_args(accelerator)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    configs = [(name, resolve_config(name, args.set)) for name in names]
    sizes = [int(s) for s in args.peak_sizes.split(",") if s]
    load_start = _readme.load_average()
    print(f"load average {load_start:.1f}", file=sys.stderr, flush=True)
    runners = []
    for name, cfg in configs:
        print(f"  {name}: compiling and warming up", file=sys.stderr, flush=True)
        runners.append(Runner(name, cfg, args.warmup, args.breakdown))
    peaks = []
    for r in range(args.rounds):
        print(f"  round {r + 1}/{args.rounds}: matmul peak", file=sys.stderr, flush=True)
        peaks.append(measure_peak(sizes, args.peak_repeats))
        for runner in (runners if r % 2 == 0 else runners[::-1]):
            print(f"  round {r + 1}/{args.rounds}: {runner.name}", file=sys.stderr, flush=True)
            runner.run(args.steps)
    peaks.append(measure_peak(sizes, args.peak_repeats))
    text = report([runner.result() for runner in runners], peaks, accelerator, args, load_start)
    print(text)
    if args.readme:
        _readme.write_section(args.readme, "bench_mfu", text,
                              _readme.shown_command("benchmarks/bench_mfu.py", sys.argv[1:]))


if __name__ == "__main__":
    setup_devices()
    main()
