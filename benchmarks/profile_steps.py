"""Where a training step's time goes: shardml and MaxText, per op category, side by side.

Each system trains the race decoder of ``bench_maxtext.py`` (same shape, layout, JAX, environment
and command lines: ``--shape``, ``--moe`` and the layouts as there) as a child process under
``jax.profiler`` (one trace of the whole process, started before JAX's backend) with XLA's
optimized HLO dumped beside it, no persistent compilation cache on either side (a cache hit would
dump nothing). Each run trains ``--steps`` steps; every program that ran at least once per step
(the train step) is averaged over its executions after the first ``--skip`` steps (the first
execution pays XLA:CPU's first-run costs), one-off programs (initialisation) are left out, and
compilation is not an XLA op and is not counted. The step program's total in each kept step is
printed too: on a loaded machine it shows how far to trust the table.

Trace events are XLA:CPU's thunks (``hlo_op`` / ``hlo_module`` stats), each device's own;
times are self times (a while loop's body ops are not counted twice) summed over the 8 emulated
devices, so the table's "ms/step" is device-milliseconds (8 x wall time if every device were busy
all the time); collectives include the wait for the slowest device. Each op is put in a category
from its optimized HLO (the op, or a fusion's fused ops) and its metadata:

- collectives by opcode (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute);
- by the Python stack that emitted the op (XLA's dumps keep it): ``optimizer update`` (any frame in
  optax or MaxText's optimizers: Adam, clipping, apply_updates), ``non-finite guard`` (``is-finite``
  and shardml's ``update.advance`` selects), ``loss`` (frames in ``losses.py`` or a cross-entropy
  function, or emitted by MaxText's ``loss_fn`` itself; products excluded), ``one-hot embedding``
  (``one_hot`` in the op's name, and shardml's ``embed_tokens``: the one-hot and its product,
  forward and backward);
- then by content: ``matrix products`` (dot /
  convolution, also ragged dots), ``gathers`` (gather, dynamic-slice), ``scatters``,
  ``converts`` (fusions of converts only), ``copies / transposes``, ``reductions``, ``elementwise``
  (other fusions) and ``control / other``.

    python benchmarks/profile_steps.py --shardml-python ../py312/bin/python --layouts fsdp=8
    python benchmarks/profile_steps.py --layouts expert=4,fsdp=2 fsdp=8 --moe --steps 4 --skip 1
    python benchmarks/profile_steps.py --trace-dir /tmp/prof --top 15   # also the 15 costliest ops per system
    python benchmarks/profile_steps.py --config 100m --steps 5   # shardml alone on bench_mfu.py's 100m config

``--config NAME`` leaves the race: shardml alone trains one of ``bench_mfu.py``'s configs (its
preset, sizes and the preset's mesh, plus any ``--set``) through ``shardml train``, and only the
train step's program is counted (the run's last evaluation and sample also run once per step).

The parsing uses ``jax.profiler.ProfileData`` (in jaxlib, no extra package) on the ``.xplane.pb``
both sides write, so run this script with an interpreter that has JAX (e.g. the shardml one).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import pathlib
import re
import shutil
import sys
import tempfile

import _readme
import bench_maxtext as bm  # benchmarks/ (this script's folder) is on sys.path; it imports no JAX

CATEGORIES = ("matrix products", "gathers", "scatters", "all-reduce", "all-gather", "reduce-scatter", "all-to-all",
              "collective-permute", "converts", "copies / transposes", "non-finite guard", "one-hot embedding", "loss",
              "optimizer update", "reductions", "elementwise", "control / other")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_CONTROL = {"while", "conditional", "call", "parameter", "get-tuple-element", "tuple", "constant", "bitcast",
            "after-all", "partition-id", "replica-id", "custom-call", "rng-get-and-update-state"}

# The wrapper each child runs in its own interpreter: the whole process under one trace. The trace
# starts JAX's backend, so shardml's device setup (its XLA:CPU settings and allocator, which the
# command line applies only before the backend starts) runs first, as in a plain `shardml train`.
_WRAP = """
import os, runpy, sys, jax
trace_dir, module, *argv = sys.argv[1:]
sys.argv = [module, *argv]
if module == "shardml":
    import shardml
    shardml.emulate_cpu_devices(int(os.environ["JAX_NUM_CPU_DEVICES"]))
jax.profiler.start_trace(trace_dir)
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
    jax.profiler.stop_trace()
"""


# ----------------------------------------------------------------------------- HLO
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_SOURCE = re.compile(r'source_file="([^"]*)"')
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_TABLE_ROW = re.compile(r'^(\d+) (?:"(.*)"|\{(.*)\})\s*$')
_FIELD = re.compile(r"(\w+)=(\d+)")


def stack_tables(text: str) -> dict[int, str]:
    """The Python stacks of an HLO dump's ``FileNames``/``FunctionNames``/``FileLocations``/``StackFrames``
    tables: stack_frame_id -> ``file:function`` frames, innermost first, joined by `` < ``."""
    tables, current = collections.defaultdict(dict), None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = line
        elif current and (m := _TABLE_ROW.match(line)):
            tables[current][int(m.group(1))] = m.group(2) if m.group(2) is not None else dict(
                (k, int(v)) for k, v in _FIELD.findall(m.group(3)))
        elif line.strip():
            current = None
    files, funcs, locs, frames = (tables[k] for k in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"))
    out = {}
    for fid in frames:
        parts, seen, f = [], set(), fid
        while f in frames and f not in seen:
            seen.add(f)
            loc = locs.get(frames[f].get("file_location_id"), {})
            parts.append(f"{files.get(loc.get('file_name_id'), '?')}:{funcs.get(loc.get('function_name_id'), '?')}")
            # XLA prints a frame's parent as its 1-based id + 1 (1: no parent); checked on JAX 0.12 dumps,
            # whose frames 1, 2, 3, ... are the nested calls <string> < runpy < shardml/__main__.py ...
            f = frames[f].get("parent_frame_id", 1) - 1
        out[fid] = " < ".join(parts)
    return out


def parse_hlo(text: str) -> dict[str, dict]:
    """Instructions of an HLO module's text: name -> {opcode, computation, calls, op_name, source}
    (``source``: the Python stack that emitted it, innermost frame first, where the dump has one).

    >>> hlo = "ENTRY %main (p: f32[2]) -> f32[2] {\\n  ROOT %c.1 = f32[2]{0} convert(f32[2]{0} %p)\\n}"
    >>> parse_hlo(hlo)["c.1"]["opcode"]
    'convert'
    """
    stacks = stack_tables(text)
    out, comp = {}, None
    for line in text.splitlines():
        if (m := _COMP.match(line)) and " = " not in line:
            comp = m.group(1)
            continue
        if comp is None or not (m := _INSTR.match(line)):
            continue
        rest = " " + m.group(2)
        op = _OPCODE.search(rest)
        calls, name, src, frame = _CALLS.search(rest), _OP_NAME.search(rest), _SOURCE.search(rest), _FRAME_ID.search(rest)
        source = stacks.get(int(frame.group(1)), "") if frame else (src.group(1) if src else "")
        out[m.group(1)] = {"opcode": op.group(1) if op else "?", "computation": comp,
                           "calls": calls.group(1) if calls else None, "op_name": name.group(1) if name else "",
                           "source": source}
    return out


def _fused(instrs: dict, comp: str | None) -> list[dict]:
    return [i for i in instrs.values() if comp and i["computation"] == comp]


def category(instr: dict, instrs: dict) -> str:
    """The table's category of one executed instruction (see the module docstring for the rules).

    >>> category({"opcode": "all-gather-start", "calls": None, "op_name": "", "source": ""}, {})
    'all-gather'
    """
    base = re.sub(r"-(start|done)$", "", instr["opcode"])
    if base in _COLLECTIVES:
        return base
    body = [instr, *_fused(instrs, instr["calls"])] if instr["opcode"] == "fusion" else [instr]
    ops = {i["opcode"] for i in body if i["opcode"] not in ("parameter", "constant", "fusion")}
    stack = (instr["source"] or next((i["source"] for i in body if i["source"]), "")).lower()
    meta = " ".join(i["op_name"] for i in body).lower()
    has_dot = bool(ops & {"dot", "convolution", "ragged-dot"}) or "ragged_dot" in meta
    if "/optax/" in stack or "/optimizers/" in stack:
        return "optimizer update"
    if "is-finite" in ops or "update.py:advance" in stack:  # shardml's guard: the selects in update.advance
        return "non-finite guard"
    inner = stack.split(" < ")[0]  # the frame that emitted it: MaxText's loss_fn body is the loss, its callees not
    if (re.search(r"losses\.py|cross_entropy|log_softmax", stack) or inner.endswith(":loss_fn")) and not has_dot:
        return "loss"
    if "one_hot" in meta or "embed_tokens" in stack:  # shardml's embed_tokens: one_hot and its product
        return "one-hot embedding"
    if has_dot:
        return "matrix products"
    if ops & {"gather", "dynamic-slice"}:
        return "gathers"
    if ops & {"scatter", "dynamic-update-slice"}:
        return "scatters"
    if ops and ops <= {"convert", "bitcast", "reshape", "broadcast", "tuple", "get-tuple-element"} and "convert" in ops:
        return "converts"
    if ops and ops <= {"copy", "transpose", "bitcast", "reshape", "concatenate", "slice", "pad", "broadcast", "tuple",
                       "get-tuple-element"}:
        return "copies / transposes"
    if ops & {"reduce", "reduce-window", "sort"}:
        return "reductions"
    if instr["opcode"] == "fusion" or not ops <= _CONTROL:
        return "elementwise"
    return "control / other"


def load_modules(dump_dir: str) -> dict[str, list[dict]]:
    """The optimized HLO modules XLA dumped: module name -> [parsed instructions of each dump of that name]."""
    modules = collections.defaultdict(list)
    for path in sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt"))):
        m = re.match(r"module_\d+\.(.+?)\.(?:cpu_)?after_optimizations\.txt$", os.path.basename(path))
        if m:
            modules[m.group(1)].append(parse_hlo(pathlib.Path(path).read_text(errors="replace")))
    return modules


# ----------------------------------------------------------------------------- trace
def executions(xplane: str) -> dict[str, list[dict[str, float]]]:
    """Every executed XLA program of a trace: module name -> its executions in start order, each as
    op -> self time in ns summed over the devices (one execution = one ``run_id``, all devices).
    Nested ops (a while loop's body) count once, in the innermost."""
    from jax.profiler import ProfileData  # imported here: the race's other helpers import no JAX

    runs = collections.defaultdict(lambda: [float("inf"), collections.defaultdict(float)])
    for plane in ProfileData.from_file(xplane).planes:
        for line in plane.lines:
            events = []
            for e in line.events:
                stats = dict(e.stats)
                if "hlo_op" in stats:
                    events.append((e.start_ns, e.duration_ns, (str(stats.get("hlo_module", "?")),
                                                               stats.get("run_id")), str(stats["hlo_op"])))
            for start, key, op, ns in self_times(events):
                run = runs[key]
                run[0] = min(run[0], start)
                run[1][op] += ns
    out = collections.defaultdict(list)
    for (module, _), (_, ops) in sorted(runs.items(), key=lambda kv: kv[1][0]):
        out[module].append(dict(ops))
    return dict(out)


def self_times(events):
    """(start, duration, run key, op) events of one thread -> (start, run key, op, self time): an
    event's time less the time of the events nested in it.

    >>> list(self_times([(0, 10, "r", "while"), (2, 3, "r", "dot")]))
    [(0, 'r', 'while', 7), (2, 'r', 'dot', 3)]
    """
    events = sorted(events, key=lambda x: (x[0], -x[1]))
    children = [0] * len(events)
    stack = []  # indices of the open events
    for i, (start, dur, _, _) in enumerate(events):
        while stack and events[stack[-1]][0] + events[stack[-1]][1] <= start:
            stack.pop()
        if stack:
            children[stack[-1]] += dur
        stack.append(i)
    return [(start, key, op, dur - children[i]) for i, (start, dur, key, op) in enumerate(events)]


def steady_steps(runs: dict[str, list[dict]], steps: int, skip: int,
                 only: str = "") -> tuple[dict[tuple[str, str], float], list]:
    """The average step after the first ``skip``: (module, op) -> ns per step, over the programs that
    ran at least once per step (the train step; one-off programs such as initialisation are left
    out), and each step's total of the costliest such program (ns), to show the spread. ``only``:
    keep just the modules whose name holds it (``shardml train``'s last evaluation runs as often)."""
    per_step, spread = collections.defaultdict(float), []
    for module, execs in runs.items():
        per = len(execs) // steps
        if per < 1 or only not in module:
            continue
        kept = execs[skip * per:]
        for ex in kept:
            for op, ns in ex.items():
                per_step[module, op] += ns / (steps - skip)
        totals = [sum(ex.values()) for ex in kept]
        if sum(totals) > sum(spread):
            spread = totals
    return dict(per_step), spread


def categorise(times: dict[tuple[str, str], float], modules: dict[str, list[dict]]) -> dict[tuple[str, str], str]:
    """Each (module, op) of a trace to its category; an op no dump holds is 'control / other'."""
    out = {}
    for module, op in times:
        dumps = [d for d in modules.get(module, []) if op in d]
        out[module, op] = category(dumps[0][op], dumps[0]) if dumps else "control / other"
    return out


# ----------------------------------------------------------------------------- runs
def run_profiled(name: str, command: list[str], env: dict, work: str, tag: str, timeout: float) -> tuple[str, str]:
    """Runs ``command`` (``python -m MODULE args...``) under the tracing wrapper; (xplane path, dump dir)."""
    trace_dir, dump_dir = os.path.join(work, tag + "_trace"), os.path.join(work, tag + "_hlo")
    for d in (trace_dir, dump_dir, os.path.join(work, tag)):
        shutil.rmtree(d, ignore_errors=True)
    python, module, args = command[0], command[2], command[3:]
    env = {**env, "XLA_FLAGS": (env.get("XLA_FLAGS", "") + f" --xla_dump_to={dump_dir} --xla_dump_hlo_as_text").strip()}
    log = os.path.join(work, tag + ".log")
    wall, _, code = bm.run_child([python, "-c", _WRAP, trace_dir, module, *args], env, work, log, timeout)
    if code:
        raise bm._fail(name, code, log)
    found = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not found:
        raise SystemExit(f"{name}: no .xplane.pb under {trace_dir}; log {log}")
    print(f"  {tag}: {wall:.1f}s", file=sys.stderr, flush=True)
    return found[-1], dump_dir


def profile(xplane: str, dumps: str, steps: int, skip: int,
            only: str = "") -> tuple[dict[str, float], list, list[float]]:
    """(ms per step per category, [(ms, category, module, op)] costliest first, per-step totals in ms)."""
    times, spread = steady_steps(executions(xplane), steps, skip, only)
    cats = categorise(times, load_modules(dumps))
    by_cat = collections.defaultdict(float)
    for key, ns in times.items():
        by_cat[cats[key]] += ns / 1e6
    rows = sorted(((ns / 1e6, cats[key], *key) for key, ns in times.items()), reverse=True)
    return {c: by_cat[c] for c in CATEGORIES}, rows, [ns / 1e6 for ns in spread]


def side_by_side(layout: str, results: dict[str, dict[str, float]]) -> str:
    """The markdown table: per category each system's device-ms per step and share of its step."""
    names = list(results)
    totals = {n: sum(results[n].values()) for n in names}
    head = "| category | " + " | ".join(f"{n} ms/step | {n} share" for n in names) + " |"
    lines = [f"layout {layout}:", "", head, "|---|" + "---:|---:|" * len(names)]
    for c in CATEGORIES:
        if all(abs(results[n][c]) < 0.05 for n in names):
            continue
        lines.append(f"| {c} | " + " | ".join(
            f"{results[n][c]:.1f} | {100 * results[n][c] / totals[n]:.0f} %" for n in names) + " |")
    lines.append("| **total** | " + " | ".join(f"**{totals[n]:.1f}** | 100 %" for n in names) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", nargs="+", default=["fsdp=8"], help="e.g. fsdp=8 fsdp=2,tensor=4 expert=4,fsdp=2")
    ap.add_argument("--shape", choices=tuple(bm.SHAPES), default="race", help="as bench_maxtext.py --shape")
    ap.add_argument("--moe", action="store_true", help="as bench_maxtext.py --moe")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="steps each system runs under the profiler")
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the average (the first is slow)")
    ap.add_argument("--shardml-python", default=os.environ.get("SHARDML_PYTHON", sys.executable))
    ap.add_argument("--maxtext-venv", default=os.environ.get("MAXTEXT_VENV", str(bm.REPO.parent / "maxtext-venv")))
    ap.add_argument("--maxtext-remat", default="full", help="MaxText remat_policy (its default: full)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another shardml override")
    ap.add_argument("--maxtext-set", action="append", default=[], metavar="KEY=VALUE", help="another MaxText override")
    ap.add_argument("--config", default=None, metavar="NAME",
                    help="instead of the race: shardml alone on this bench_mfu.py config (e.g. 100m: its preset, "
                         "sizes and the preset's mesh; --set adds overrides), the train step's program only")
    ap.add_argument("--devices", type=int, default=bm.DEVICES,
                    help="emulated CPU devices, with --config only (its mesh must fit them: --devices 1 --set "
                         "mesh.data=1 --set mesh.fsdp=1 --set mesh.tensor=1 profiles one device, no communication)")
    ap.add_argument("--top", type=int, default=0, help="also list each system's N costliest ops per step")
    ap.add_argument("--trace-dir", default=None, help="where traces, HLO dumps and logs go (default: a temporary folder)")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--readme", default=None,
                    help="also write the printed tables as this file's profile_steps section (an idle machine only: "
                         "refused when the 1-minute load average is above 0.5 at the start)")
    args = ap.parse_args(argv)
    if not 0 <= args.skip < args.steps:
        raise SystemExit(f"--skip {args.skip} / --steps {args.steps}: need 0 <= skip < steps")
    if args.devices != bm.DEVICES and not args.config:
        raise SystemExit(f"--devices {args.devices}: only with --config (the race runs on {bm.DEVICES} devices)")
    if args.devices < 1:
        raise SystemExit(f"--devices {args.devices}: need at least 1")
    return args


def main():
    args = parse_args()
    load = _readme.load_average()
    if args.readme and not load <= bm.IDLE_LOAD:
        raise SystemExit(f"{args.readme} not written: the 1-minute load average is {load:.2f} (> {bm.IDLE_LOAD}); "
                         "rerun on an idle machine, or without --readme")
    if args.config:
        section = f"profile_steps_{args.config}"
    else:
        section = bm.readme_section(args.shape, args.moe).replace("bench_maxtext", "profile_steps")
    with _readme.printed_section(args.readme, section, "benchmarks/profile_steps.py", sys.argv[1:],
                                 hidden=("--readme", "--trace-dir", "--shardml-python", "--maxtext-venv")):
        (profile_config if args.config else profile_all)(args)


def _setup(args, what: str, overrides: list[str]) -> tuple[str, str, dict, dict]:
    """(work folder, shardml's interpreter, its probe, the children's environment)."""
    work = os.path.abspath(args.trace_dir or tempfile.mkdtemp(prefix="profile_steps_"))
    os.makedirs(work, exist_ok=True)
    shardml_python = os.path.abspath(args.shardml_python) if os.sep in args.shardml_python else args.shardml_python
    found = bm.probe(shardml_python, what, bm.child_environment({}), work, overrides)
    # No persistent compilation cache on either side: a cache hit compiles nothing, so XLA would dump no HLO.
    env = {k: v for k, v in bm.child_environment(found["xla"]).items() if k != "JAX_COMPILATION_CACHE_DIR"}
    return work, shardml_python, found, env


def _print_profiles(layout: str, results: dict, tops: dict, spreads: dict, top: int) -> None:
    print(side_by_side(layout, results))
    for name, totals in spreads.items():
        print(f"{name}: the step program's device-ms in each profiled step: " + ", ".join(f"{x:.0f}" for x in totals))
    for name, rows in tops.items():
        if top:
            print(f"\n{name}, costliest ops at {layout} (device-ms/step, category, module/op):")
            print("\n".join(f"  {ms:8.1f}  {cat:20s} {mod}/{op}" for ms, cat, mod, op in rows[:top]))
    print()


def profile_config(args):
    """shardml alone on one of ``bench_mfu.py``'s configs, as ``shardml train`` runs it (its preset,
    overrides and the preset's mesh); only the train step's program is counted."""
    from bench_mfu import CONFIGS  # imports JAX: only this mode needs it in this process

    if args.config not in CONFIGS:
        raise SystemExit(f"--config {args.config}: not a bench_mfu.py config; one of {', '.join(CONFIGS)}")
    preset, own = CONFIGS[args.config]
    overrides = [*own, *args.set]
    bm.DEVICES = args.devices  # the children's device count (bench_maxtext.child_environment) and the printed one
    work, python, found, env = _setup(args, f"shardml:{preset}", overrides)
    print(f"shardml: JAX {found['jax']}, {found['settings']}", file=sys.stderr)
    print(f"traces, HLO dumps and logs: {work}", file=sys.stderr)
    command = [python, "-m", "shardml", "train", preset, *overrides, f"train.steps={args.steps}", "train.log_every=1",
               f"out_dir={os.path.join(work, args.config)}", "--quiet", "--num-processes", "1"]
    xplane, dumps = run_profiled("shardml", command, env, work, args.config, args.timeout)
    result, rows, spread = profile(xplane, dumps, args.steps, args.skip, only="train_step")
    _print_profiles(args.config, {"shardml": result}, {"shardml": rows}, {"shardml": spread}, args.top)
    print(f"config {args.config}: preset {preset}, its mesh, {' '.join(overrides)}; {args.steps} steps under "
          f"jax.profiler, the first {args.skip} left out; ms/step is device time summed over the {bm.DEVICES} "
          f"emulated devices; files: {work}")


def profile_all(args):
    layouts = {layout: bm.parse_layout(layout) for layout in args.layouts}
    bm.SHAPE.clear()
    bm.SHAPE.update(bm.race_shape(args.shape, args.experts if args.moe else 0, args.top_k))
    work, shardml_python, found, env = _setup(args, "shardml", bm.shardml_overrides(args.set))
    defaults_yml = os.path.join(work, "builtin_defaults.yaml")
    pathlib.Path(defaults_yml).write_text("{}\n")
    commands = {"shardml": lambda sizes, out: bm.shardml_command(shardml_python, defaults_yml, sizes, args.steps,
                                                                 args.set, out)}
    python = bm.maxtext_python(args.maxtext_venv)
    base_yml = bm.maxtext_base_config(args.maxtext_venv) if python else None
    if base_yml:
        commands["maxtext"] = lambda sizes, out: bm.maxtext_command(
            python, base_yml, sizes, args.steps, args.maxtext_remat, out, extra=["jax_cache_dir=", *args.maxtext_set])
    else:
        print(f"MaxText skipped: no MaxText virtual environment at {args.maxtext_venv}", file=sys.stderr)
    print(f"shardml: JAX {found['jax']}, {found['settings']}; MaxText remat_policy={args.maxtext_remat}"
          f"{''.join(' ' + o for o in args.maxtext_set)}", file=sys.stderr)
    print(f"traces, HLO dumps and logs: {work}", file=sys.stderr)
    for layout, sizes in layouts.items():
        results, tops, spreads = {}, {}, {}
        for name, command in commands.items():
            tag = f"{name}_{bm._slug(layout)}"
            xplane, dumps = run_profiled(name, command(sizes, os.path.join(work, tag)), env, work, tag, args.timeout)
            results[name], tops[name], spreads[name] = profile(xplane, dumps, args.steps, args.skip)
        _print_profiles(layout, results, tops, spreads, args.top)
    print(f"shape {bm.SHAPE}; {args.steps} steps per system under jax.profiler, the first {args.skip} left out; "
          f"ms/step is device time summed over the {bm.DEVICES} emulated devices; files: {work}")


if __name__ == "__main__":
    main()
