"""Communication and memory audit: the compiled train step of each layout against closed-form theory.

For every layout the run's trainer is built from the config (:func:`shardml.run_parts`, every
layout checked before the first compile) and its train step compiled from abstract shapes on 8
emulated CPU devices, as ``shardml plan`` does (nothing trained); its collectives are read from the HLO
(:func:`shardml.analysis.collectives`) and its per-device arguments from the shardings the compiled program
takes, and both are set against :func:`shardml.analysis.layout_theory` (scaling-book formulas from the config
alone).

Bytes are what one device sends per step on ring algorithms (all-reduce 2(N-1)/N x array,
all-gather and reduce-scatter (N-1)/N x the full array, collective-permute the array averaged over
devices). Every ratio above 1.1 is split into factors read off the program: XLA:CPU running a bf16
collective in f32, the program's element type against the theory's, an all-reduce standing in for
a reduce-scatter, and what remains (more arrays than the theory; their JAX sources are listed).

    python benchmarks/bench_audit.py                                    # all layouts, tables on stdout
    python benchmarks/bench_audit.py --layouts fsdp=8 data=2,tensor=4
    python benchmarks/bench_audit.py --readme benchmarks/README.md --plot benchmarks/memory.png

A layout is ``axis=size`` pairs over the mesh plus any ``section.key=value`` config override;
``data`` fills the remaining devices unless given, and a layout using fewer than 8 devices (e.g.
``data=1,tensor=4``) is compiled on the first ones.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shardml

shardml.emulate_cpu_devices(8)  # before any other JAX use; also avoids an XLA:CPU collective deadlock

import argparse
import collections
import math
import pathlib
import re
import sys

import jax

from shardml import (MESH_AXES, ShardmlError, abstract_batch, collectives, layout_config, layout_theory, load_config,
                     memory, run_parts, workload)
from shardml.analysis import DTYPE_BYTES as ITEM, KINDS, SHORT, compiled_step, format_bytes, sent_per_device

import _readme  # benchmarks/ (this script's folder) is on sys.path

# The race decoder of bench_maxtext.py: 4 layers, d_model 256, 4 heads, SwiGLU 1024, vocabulary 256,
# sequence 128, global batch 32, bf16 compute, f32 parameters, AdamW.
RACE = ["model.layers=4", "model.d_model=256", "model.heads=4", "model.d_ff=1024", "model.vocab=256",
        "model.dtype=bfloat16", "data.seq_len=128", "train.batch_size=32"]
LAYOUTS = ["data=8", "data=8,train.microbatches=4", "fsdp=8", "data=1,tensor=4", "data=2,tensor=4",
           "fsdp=2,tensor=4", "pipeline=4,data=2,pipeline.schedule=1f1b",
           "pipeline=4,data=2,pipeline.schedule=gpipe"]
GOAL = 1.1


def layout_overrides(layout: str) -> list[str]:
    """``fsdp=2,tensor=4,train.microbatches=2`` -> ``mesh.fsdp=2``, ``mesh.tensor=4``, ``train.microbatches=2``."""
    out = []
    for item in filter(None, (part.strip() for part in layout.split(","))):
        key = item.split("=", 1)[0].strip()
        out.append(f"mesh.{item}" if key in MESH_AXES else item)
    return out


def layout_devices(cfg) -> list:
    sizes = [getattr(cfg.mesh, axis) for axis in MESH_AXES]
    return jax.devices() if -1 in sizes else jax.devices()[:math.prod(sizes)]


# ----------------------------------------------------------------------------- measured


def _array_sources(op) -> list[str]:
    """A short JAX source per result array: the einsum (``bwd`` when it is a transpose) or the op."""
    name = op.op_name
    parts = [name] * len(op.arrays)
    inner = re.search(r"/\(([^()]*(?:\([^()]*\)[^()]*)*)\)$", name)
    if inner and len(inner.group(1).split(":")) == len(op.arrays):
        prefix = name[:inner.start()]
        parts = [prefix + "/" + p for p in inner.group(1).split(":")]
    labels = []
    for part in parts:
        einsum = re.search(r"[a-z]+(?:,[a-z]+)*->[a-z]+", part)
        what = einsum.group(0) if einsum else part.rstrip("/)").split("/")[-1].split("(")[0] or "?"
        labels.append(f"{'bwd' if 'transpose(' in part else 'fwd'} {what}")
    return labels


def measured_rows(report, sizes: dict[str, int]) -> dict:
    """Per (kind, axes): arrays per step, sent elements, sent bytes as compiled and in the program's
    own element types, dtypes and sources; single-element arrays go to ``scalars``."""
    devices = math.prod(sizes.values())
    rows = collections.defaultdict(lambda: {"count": 0.0, "in_loops": 0.0, "elements": 0.0, "bytes": 0.0,
                                            "program": 0.0, "dtypes": collections.Counter(),
                                            "sources": collections.Counter()})
    for op in report.ops:
        axes = op.axes(report.mesh)
        for (dtype, n), src, label in zip(op.arrays, op.source_dtypes, _array_sources(op)):
            row = rows["scalars" if n == 1 else (op.kind, axes)]
            sent = sent_per_device(op, n, devices) * op.trips
            count = op.trips * (len(op.groups) / devices if op.kind == "collective-permute" else 1)
            row["count"] += count
            row["in_loops"] += count if op.in_loop else 0
            row["elements"] += sent
            row["bytes"] += sent * ITEM[dtype]
            row["program"] += sent * ITEM[src]
            row["dtypes"][src] += sent
            row["sources"][f"{label}{f' (loop of {op.trips})' if op.in_loop else ''}"] += op.trips
    return rows


# ----------------------------------------------------------------------------- theory vs measured


def _empty_row(kind: str, axes: tuple[str, ...]) -> dict:
    return {"kind": kind, "axes": axes, "t_count": 0.0, "t_elements": 0.0, "t_bytes": 0.0,
            "t_dtypes": collections.Counter(), "t_what": [], "swap": 0.0, "m": None, "also": []}


def _add_theory(row: dict, other: dict) -> None:
    for key in ("t_count", "t_elements", "t_bytes", "t_dtypes", "t_what"):
        row[key] += other[key]


def compare(theory, measured: dict) -> list[dict]:
    """Rows of (kind, axes) with measured and theory figures, matched as follows: the same kind
    over the same axes; a theory reduce-scatter with no measured one joins the measured all-reduce
    over its axes (``swap``: what XLA:CPU does); a measured row the theory lacks joins the theory
    row of its kind sharing most axes (``also``), or stands alone."""
    rows = {}
    for t in theory.traffic:
        row = rows.setdefault((t.kind, t.axes), _empty_row(t.kind, t.axes))
        _add_theory(row, {"t_count": t.count, "t_elements": t.sent_elements, "t_bytes": t.sent_bytes,
                          "t_dtypes": collections.Counter({SHORT[t.dtype]: t.sent_elements}),
                          "t_what": [t.what]})
    for key, row in rows.items():
        row["m"] = measured.get(key)
    for (kind, axes), row in list(rows.items()):
        if kind == "reduce-scatter" and row["m"] is None and ("all-reduce", axes) in measured:
            target = rows.setdefault(("all-reduce", axes), {**_empty_row("all-reduce", axes),
                                                            "m": measured[("all-reduce", axes)]})
            _add_theory(target, row)
            target["swap"] += row["t_elements"]
            del rows[(kind, axes)]
    for key, m in measured.items():
        if key == "scalars" or key in rows:
            continue
        near = [r for r in rows.values() if r["kind"] == key[0] and set(r["axes"]) & set(key[1])]
        if near:
            max(near, key=lambda r: len(set(r["axes"]) & set(key[1])))["also"].append((key[1], m))
        else:
            rows[key] = {**_empty_row(*key), "m": m}
    out = []
    for row in sorted(rows.values(), key=lambda r: (KINDS.index(r["kind"]), r["axes"])):
        parts = ([row["m"]] if row["m"] else []) + [m for _, m in row["also"]]
        merged = {key: sum(p[key] for p in parts) for key in ("count", "in_loops", "elements", "bytes", "program")}
        for key in ("dtypes", "sources"):
            merged[key] = sum((p[key] for p in parts), collections.Counter())
        out.append({**row, **merged})
    return out


def _share(counter: collections.Counter) -> str:
    total = sum(counter.values())
    if not total:
        return "-"
    def pct(n):
        share = 100 * n / total
        return f"{share:.0f}%" if share >= 10 else f"{share:.1f}%" if share >= 0.1 else "<0.1%"

    return ", ".join(f"{d} {pct(n)}" if len(counter) > 1 else d for d, n in counter.most_common())


def _per_iteration(sources: collections.Counter) -> str:
    """``; per iteration of the 4-trip loops: fwd 2, bwd 5`` from sources labelled by their loops."""
    loops = collections.defaultdict(collections.Counter)
    for label, n in sources.items():
        found = re.search(r"\(loop of (\d+)\)", label)
        if found:
            loops[int(found.group(1))][label.split()[0]] += n / int(found.group(1))
    return "".join(f"; per iteration of the {trips}-trip loops: "
                   + ", ".join(f"{way} {n:g}" for way, n in sorted(c.items(), reverse=True))
                   for trips, c in sorted(loops.items()))


def factors(row: dict) -> dict | None:
    """``ratio`` (compiled bytes / theory bytes) = ``widened`` x ``dtype`` x ``kind`` x ``residual``:
    XLA widening the collective, the program's element type against the theory's, an all-reduce
    for a reduce-scatter (a ring all-reduce sends twice the bytes), and the elements that remain."""
    if not row["t_bytes"] or not row["bytes"]:
        return None
    kind = (row["t_elements"] + row["swap"]) / row["t_elements"]
    return {"ratio": row["bytes"] / row["t_bytes"], "widened": row["bytes"] / row["program"],
            "dtype": (row["program"] / row["elements"]) / (row["t_bytes"] / row["t_elements"]),
            "kind": kind, "residual": row["elements"] / (row["t_elements"] * kind)}


def explain(row: dict, notes: list[str]) -> str:
    """The ratio's factors in words (appends the JAX sources of unexplained elements to ``notes``)."""
    f = factors(row)
    if f is None and not row["t_bytes"]:
        notes.append(f"{row['kind']} over {'+'.join(row['axes'])}: not in the theory; sources: "
                     + ", ".join(f"{s} x{n:g}" for s, n in row["sources"].most_common(8)))
        return f"not in the theory [{len(notes)}]"
    if f is None:
        return "not in the program"
    items = []
    if abs(f["widened"] - 1) > 0.01:
        widened = "+".join(sorted(d for d in row["dtypes"] if d not in ("f32", "f64")))
        items.append(f"x{f['widened']:.2f} {widened} carried in f32 (XLA widened the collective)")
    if abs(f["dtype"] - 1) > 0.01:
        items.append(f"x{f['dtype']:.2f} program {_share(row['dtypes'])} vs theory {_share(row['t_dtypes'])}")
    if row["swap"]:
        items.append(f"x{f['kind']:.2f} all-reduce where theory says reduce-scatter (none in the program)")
    if abs(f["residual"] - 1) > 0.01:
        text = f"x{f['residual']:.2f} elements ({row['count']:g} arrays vs {row['t_count']:g})"
        if f["residual"] > GOAL:
            notes.append(f"{row['kind']} over {'+'.join(row['axes'])}: arrays per step by JAX source: "
                         + ", ".join(f"{s} x{n:g}" for s, n in sorted(row["sources"].items()))
                         + _per_iteration(row["sources"]) + "; theory: " + "; ".join(row["t_what"]))
            text += f" [{len(notes)}]"
        items.append(text)
    for axes, _ in row["also"]:
        items.append(f"incl. {'+'.join(axes)}")
    return "; ".join(items) or "as theory"


# ----------------------------------------------------------------------------- one layout


def layout_parts(base, layout: str):
    """The built trainer of one layout (:func:`shardml.run_parts`: model, data, trainer, mesh
    sizes); rejects a layout that cannot work before anything compiles."""
    try:
        cfg = layout_config(base, ",".join(layout_overrides(layout)))
        return run_parts(cfg, layout_devices(cfg))
    except ShardmlError as err:
        raise SystemExit(f"layout '{layout}': {err}") from None


def audit(parts, layout: str) -> dict:
    step = compiled_step(parts.trainer, abstract_batch(parts))
    cfg, sizes = parts.cfg, parts.sizes
    theory = layout_theory(workload(cfg), sizes)
    report = collectives(step.compiled.as_text(), step.mesh)
    measured = measured_rows(report, sizes)
    rows = compare(theory, measured)
    scalars = measured.get("scalars")
    args, mem = step.argument_bytes(), memory(step.compiled)
    return {"layout": layout, "cfg": cfg, "sizes": sizes, "theory": theory, "rows": rows,
            "scalars": scalars, "args": args, "memory": mem, "compile_s": step.compile_s}


# ----------------------------------------------------------------------------- tables


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else ("-" if not a else "inf")


def comm_table(results: list[dict]) -> tuple[str, list[str]]:
    lines = ["| layout | collective | axes | count | in loops | bytes | theory count | theory bytes | ratio "
             "| explained |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    notes: list[str] = []
    for res in results:
        total_m = total_t = 0.0
        for row in res["rows"]:
            total_m += row["bytes"]
            total_t += row["t_bytes"]
            ratio = _ratio(row["bytes"], row["t_bytes"])
            flag = "**" if row["t_bytes"] and row["bytes"] / row["t_bytes"] > GOAL else ""
            cells = [res["layout"], row["kind"], "+".join(row["axes"]), f"{row['count']:g}", f"{row['in_loops']:g}",
                     format_bytes(row["bytes"]), f"{row['t_count']:g}", format_bytes(row["t_bytes"]),
                     f"{flag}{ratio}{flag}", explain(row, notes)]
            lines.append("| " + " | ".join(cells) + " |")
        if res["scalars"]:
            s = res["scalars"]
            total_m += s["bytes"]
            lines.append(f"| {res['layout']} | scalars | (any) | {s['count']:g} | {s['in_loops']:g} | "
                         f"{format_bytes(s['bytes'])} | - | - | - | loss, token count, norm partial sums: "
                         "left out of the theory |")
        lines.append(f"| **{res['layout']}** | **total** | | | | **{format_bytes(total_m)}** | | "
                     f"**{format_bytes(total_t)}** | **{_ratio(total_m, total_t)}** | |")
    return "\n".join(lines), notes


def memory_rows(res: dict) -> dict:
    t, args, mem = res["theory"], res["args"], res["memory"]
    return {"params": (args["params"], t.params_bytes), "opt_state": (args["opt_state"], t.opt_state_bytes),
            "arguments": mem.arguments, "temporaries": mem.temporaries, "activations": t.activation_bytes,
            "gradients": t.params_bytes}


def memory_table(results: list[dict]) -> str:
    lines = ["| layout | params | theory | ratio | optimizer | theory | ratio | arguments | temporaries | "
             "activation estimate | f32 gradients |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        r = memory_rows(res)
        (p, pt), (o, ot) = r["params"], r["opt_state"]
        cells = [format_bytes(p), format_bytes(pt), _ratio(p, pt), format_bytes(o), format_bytes(ot), _ratio(o, ot),
                 format_bytes(r["arguments"]), format_bytes(r["temporaries"]), format_bytes(r["activations"]),
                 format_bytes(r["gradients"])]
        lines.append(f"| {res['layout']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_text(results: list[dict]) -> str:
    cfg = results[0]["cfg"]
    m = cfg.model
    comm, notes = comm_table(results)
    bad = [(res["layout"], row) for res in results for row in res["rows"]
           if row["t_bytes"] and row["bytes"] / row["t_bytes"] > GOAL]
    head = (f"decoder: {m.layers} layers, d_model {m.d_model}, {m.heads} heads, SwiGLU {m.d_ff}, vocab {m.vocab}, "
            f"seq {cfg.data.seq_len}, global batch {cfg.train.batch_size}, {SHORT[m.dtype]} compute / f32 params, "
            f"remat {m.remat}, AdamW; compiled by XLA:CPU ({jax.__version__}) for emulated devices")
    parts = [head, "", "Communication per device and step (bytes a device sends, ring convention):", "", comm, ""]
    parts += [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    residual = [(name, row) for name, row in bad if factors(row)["residual"] > GOAL]
    parts += ["", f"{len(bad)} of {sum(len(r['rows']) for r in results)} rows above {GOAL}; "
              f"{len(residual)} of them still above {GOAL} once the named factors are divided out"
              + (": " + ", ".join(f"{name} {row['kind']} {'+'.join(row['axes'])} (x{factors(row)['residual']:.2f})"
                                  for name, row in residual) if residual else ""), "",
              "Memory per device (parameters and optimizer state from the compiled program's argument "
              "shardings; arguments and temporaries from its memory analysis):", "", memory_table(results)]
    worst = max(abs(memory_rows(r)[k][0] / memory_rows(r)[k][1] - 1) for r in results for k in ("params", "opt_state"))
    parts += ["", f"parameters and optimizer state: largest deviation from theory {100 * worst:.2f}% (goal 10%)",
              "compile s: " + ", ".join(f"{r['layout']} {r['compile_s']:.1f}" for r in results)]
    return "\n".join(parts)


def plot(results: list[dict], path: str) -> None:
    plt = _readme.pyplot(path)
    if plt is None:
        return
    names = [r["layout"].replace("pipeline.schedule=", "").replace("train.", "").replace(",", "\n")
             for r in results]
    mib = 2**20
    params = [memory_rows(r)["params"][0] / mib for r in results]
    opt = [memory_rows(r)["opt_state"][0] / mib for r in results]
    temp = [memory_rows(r)["temporaries"] / mib for r in results]
    theory = [(memory_rows(r)["params"][1] + memory_rows(r)["opt_state"][1]) / mib for r in results]
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(results)), 4.5))
    x = range(len(results))
    ax.bar(x, params, label="parameters (f32)")
    ax.bar(x, opt, bottom=params, label="optimizer state (AdamW)")
    ax.bar(x, temp, bottom=[a + b for a, b in zip(params, opt)], label="temporaries (compiled)")
    ax.scatter(x, theory, marker="_", s=600, color="black", zorder=3, label="theory: parameters + optimizer")
    ax.set_xticks(list(x), names, fontsize=7)
    ax.set_ylabel("MiB per device")
    ax.set_title("Memory per device by layout (compiled train step, XLA:CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", nargs="+", default=LAYOUTS, help="e.g. fsdp=8 data=2,tensor=4 "
                    "pipeline=4,data=2,pipeline.schedule=gpipe")
    ap.add_argument("--preset", default="default", help="config preset the race shape overrides")
    ap.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                    help="more overrides for every layout (e.g. model.remat=full)")
    ap.add_argument("--readme", default=None, help="rewrite this file's bench_audit section")
    ap.add_argument("--plot", default=None, help="write the memory bar chart (PNG) here")
    args = ap.parse_args()
    base = load_config(args.preset, RACE + args.set)
    built = [layout_parts(base, layout) for layout in args.layouts]  # every layout checked first
    results = []
    for layout, parts in zip(args.layouts, built):
        print(f"compiling {layout} ...", file=sys.stderr, flush=True)
        results.append(audit(parts, layout))
    text = report_text(results)
    print(text)
    if args.plot:
        plot(results, args.plot)
    if args.readme:
        command = _readme.shown_command("benchmarks/bench_audit.py", sys.argv[1:])
        figure = f"\n\n![memory per layout]({pathlib.Path(args.plot).name})" if args.plot else ""
        _readme.write_section(args.readme, "bench_audit", text + figure, command)


if __name__ == "__main__":
    main()
