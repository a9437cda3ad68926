"""shardml vs MaxText: training tokens/s on the same decoder, 8 emulated CPU devices, alternating rounds.

Both train the same llama-style decoder (4 layers, d_model 256, 4 heads of 64, SwiGLU MLP 1024,
vocabulary 256, sequence 128, global batch 32, bf16 compute, f32 parameters, AdamW with global-norm
clipping) on the same mesh layout. shardml runs in this process; MaxText (PyPI ``maxtext[tpu]``,
which needs Python >= 3.12) runs as a subprocess in its own virtual environment
(``hardware=cpu dataset_type=synthetic``), and its per-step times are read from its log. Rounds
alternate between the two (the order flips every round) so load from other processes hits both
alike. Compilation and the first steps are never timed.

Install MaxText once, outside this repository (about 4 minutes and 2.8 GB)::

    python3.12 -m venv ~/maxtext-venv            # any Python >= 3.12
    ~/maxtext-venv/bin/pip install "maxtext[tpu]==0.2.5"

then point the benchmark at it with ``--maxtext-venv`` or ``MAXTEXT_VENV`` (default: a folder
``maxtext-venv`` beside the repository). Without it, shardml is measured alone and MaxText is
skipped with a message.

    python benchmarks/bench_maxtext.py                                  # fsdp=8 and fsdp=2,tensor=4
    python benchmarks/bench_maxtext.py --layouts fsdp=8 --rounds 3 --steps 10
    python benchmarks/bench_maxtext.py --remat dots,full --grad-dtype float32,compute   # shardml settings side by side
    python benchmarks/bench_maxtext.py --readme benchmarks/README.md    # also rewrite the README table
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shardml

shardml.emulate_cpu_devices(8)  # before any other JAX use; also avoids an XLA:CPU collective deadlock

import argparse
import glob
import pathlib
import re
import statistics
import subprocess
import sys
import time

import jax

from shardml import load_config
from shardml.models.transformer import GRAD_DTYPES, REMAT_POLICIES
from shardml.run.recipe import build

import _readme  # benchmarks/ (this script's folder) is on sys.path

REPO = pathlib.Path(__file__).resolve().parent.parent
SHAPE = {"layers": 4, "d_model": 256, "heads": 4, "head_dim": 64, "d_ff": 1024, "vocab": 256, "seq_len": 128,
         "batch": 32}
_STEP_LINE = re.compile(r"completed step: (\d+), seconds: ([\d.]+).*?loss: ([\d.]+)")


def parse_layout(text: str) -> dict[str, int]:
    sizes = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        if name.strip() not in ("data", "fsdp", "tensor") or not size.strip().isdigit():
            raise SystemExit(f"layout '{text}': write axis=size pairs over data, fsdp, tensor (e.g. fsdp=2,tensor=4)")
        sizes[name.strip()] = int(size)
    return sizes


# ----------------------------------------------------------------------------- MaxText (subprocess)
def maxtext_python(venv: str) -> str | None:
    path = pathlib.Path(venv) / "bin" / "python"
    if not path.exists():
        return None
    return str(path)


def maxtext_base_config(venv: str) -> str | None:
    found = glob.glob(os.path.join(venv, "lib", "python3*", "site-packages", "maxtext", "configs", "base.yml"))
    return found[0] if found else None


def maxtext_command(python: str, base_yml: str, sizes: dict[str, int], steps: int, remat: str, out: str):
    devices = 8
    return [
        python, "-m", "maxtext.trainers.pre_train.train", base_yml,
        "run_name=shardml_race", f"base_output_directory={out}", "hardware=cpu", "skip_jax_distributed_system=true",
        "dataset_type=synthetic", "enable_checkpointing=false", "enable_tensorboard=false",
        f"base_num_decoder_layers={SHAPE['layers']}", f"base_emb_dim={SHAPE['d_model']}",
        f"base_num_query_heads={SHAPE['heads']}", f"base_num_kv_heads={SHAPE['heads']}",
        f"head_dim={SHAPE['head_dim']}", f"base_mlp_dim={SHAPE['d_ff']}", f"vocab_size={SHAPE['vocab']}",
        f"max_target_length={SHAPE['seq_len']}", f"per_device_batch_size={SHAPE['batch'] / devices:g}",
        "dtype=bfloat16", "weight_dtype=float32", "logits_via_embedding=false",  # mlp_activations default: silu,linear
        "learning_rate=3e-3", "gradient_clipping_threshold=1.0", f"remat_policy={remat}",
        f"ici_data_parallelism={sizes.get('data', 1)}", f"ici_fsdp_parallelism={sizes.get('fsdp', 1)}",
        f"ici_tensor_parallelism={sizes.get('tensor', 1)}", f"steps={steps}",
    ]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (all its threads), from /proc."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def run_maxtext(python, base_yml, sizes, warmup, steps, remat, log_path):
    """One MaxText run of warmup + steps, timed on its own per-step log lines.

    Returns tokens/s over the timed steps (MaxText's own step seconds), tokens per CPU-second
    (the process's CPU time between the log lines of the timed steps) and the first loss.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "VIRTUAL_ENV")}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8", TF_CPP_MIN_LOG_LEVEL="1")
    out = os.path.join(os.path.dirname(log_path), "maxtext_out")
    cmd = maxtext_command(python, base_yml, sizes, warmup + steps + 1, remat, out)
    records, cpu_at = {}, {}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                cwd=os.path.dirname(log_path), errors="replace")
        for line in proc.stdout:
            log.write(line)
            if m := _STEP_LINE.search(line):
                step = int(m.group(1))
                cpu_at[step] = _cpu_seconds(proc.pid)
                records[step] = (float(m.group(2)), float(m.group(3)))
        proc.wait(timeout=600)
    # A step's line is printed once the next step is dispatched (MaxText logs one step late), so
    # the CPU time between the lines of steps s-1 and s belongs to step s; one extra step is run
    # so the last timed step's line has a successor.
    timed = range(warmup, warmup + steps)
    if proc.returncode != 0 or any(s not in records or s - 1 not in cpu_at for s in timed):
        tail = "\n".join(pathlib.Path(log_path).read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"MaxText run failed (exit {proc.returncode}, {len(records)} steps logged); "
                           f"log {log_path}:\n{tail}")
    tokens = steps * SHAPE["batch"] * SHAPE["seq_len"]
    cpu = cpu_at[warmup + steps - 1] - cpu_at[warmup - 1]
    return tokens / sum(records[s][0] for s in timed), tokens / cpu, records[0][1]


# ----------------------------------------------------------------------------- shardml (this process)
def shardml_config(sizes: dict[str, int], remat: str, total_steps: int, grad_dtype: str = "float32"):
    """The race decoder as a run config: ``SHAPE`` on ``sizes``, AdamW with the default settings
    (``shardml.OptimConfig``: peak lr 3e-3, global-norm clipping 1.0), pydoc batches of seed 0."""
    return load_config(None, [
        f"model.vocab={SHAPE['vocab']}", f"model.layers={SHAPE['layers']}", f"model.d_model={SHAPE['d_model']}",
        f"model.heads={SHAPE['heads']}", f"model.d_ff={SHAPE['d_ff']}", "model.dtype=bfloat16",
        f"model.remat={remat}", f"model.grad_dtype={grad_dtype}", f"data.seq_len={SHAPE['seq_len']}",
        f"train.batch_size={SHAPE['batch']}", f"train.steps={total_steps}", "train.microbatches=1",
        *(f"mesh.{axis}={sizes.get(axis, 1)}" for axis in ("data", "fsdp", "tensor"))])


class ShardmlRunner:
    def __init__(self, sizes, remat, total_steps, n_batches, grad_dtype="float32"):
        parts = build(shardml_config(sizes, remat, total_steps, grad_dtype))
        self.trainer = parts.trainer
        self.batches = [self.trainer.put(parts.data.batch(s)) for s in range(n_batches)]
        self.state = self.trainer.init(parts.cfg.train.seed)
        self.i = 0

    def run(self, steps):
        metrics = None
        for _ in range(steps):
            self.state, metrics = self.trainer.step(self.state, self.batches[self.i % len(self.batches)])
            self.i += 1
        jax.block_until_ready((self.state, metrics))
        return metrics


# ----------------------------------------------------------------------------- harness
def race(layout, args, python, base_yml, log_dir) -> list[dict]:
    """One result per shardml setting (each ``--remat`` x ``--grad-dtype``), each against the same MaxText rounds."""
    sizes = parse_layout(layout)
    total = 1 + args.warmup + args.rounds * args.steps
    runners, first_loss, compile_s = {}, {}, {}
    for remat in args.remat:
        for grad_dtype in args.grad_dtype:
            g = (remat, grad_dtype)
            runners[g] = ShardmlRunner(sizes, remat, total, n_batches=args.steps, grad_dtype=grad_dtype)
            t0 = time.perf_counter()
            first_loss[g] = float(runners[g].run(1)["loss"])
            compile_s[g] = time.perf_counter() - t0
            runners[g].run(args.warmup)
    times = {g: [] for g in runners}
    cpu = {g: [] for g in runners}
    mt_tps, mt_cpu, mt_loss = [], [], None
    names = [*runners, "maxtext"]
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            if name in runners:
                t0, c0 = time.perf_counter(), time.process_time()
                runners[name].run(args.steps)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
            elif python is not None:
                log = os.path.join(log_dir, f"maxtext_{layout.replace(',', '_').replace('=', '')}_r{r}.log")
                tps, per_cpu, mt_loss = run_maxtext(python, base_yml, sizes, args.warmup + 1, args.steps,
                                                    args.maxtext_remat, log)
                mt_tps.append(tps)
                mt_cpu.append(per_cpu)
            else:
                continue
            print(f"  {layout} round {r + 1}/{args.rounds}: {name} done", file=sys.stderr, flush=True)
    tokens = args.steps * SHAPE["batch"] * SHAPE["seq_len"]

    def label(g):  # the layout, and the shardml settings that vary between rows
        varied = [f"remat={g[0]}"] * (len(args.remat) > 1) + [f"grad_dtype={g[1]}"] * (len(args.grad_dtype) > 1)
        return ", ".join([layout, *varied])

    return [{
        "layout": label(g), "shardml": tokens / statistics.median(times[g]), "shardml_first_loss": first_loss[g],
        "shardml_compile_s": compile_s[g], "shardml_rounds": [tokens / t for t in times[g]],
        "shardml_per_cpu": tokens / statistics.median(cpu[g]),
        "maxtext": statistics.median(mt_tps) if mt_tps else None, "maxtext_rounds": mt_tps,
        "maxtext_per_cpu": statistics.median(mt_cpu) if mt_cpu else None,
        "maxtext_first_loss": mt_loss,
    } for g in runners]


def table(results, args, have_maxtext) -> str:
    lines = [
        (f"decoder: {SHAPE['layers']} layers, d_model {SHAPE['d_model']}, {SHAPE['heads']} heads x "
         f"{SHAPE['head_dim']}, SwiGLU {SHAPE['d_ff']}, vocab {SHAPE['vocab']}, seq {SHAPE['seq_len']}, "
         f"global batch {SHAPE['batch']}, bf16 compute / f32 params; 8 emulated CPU devices; "
         f"{args.rounds} alternating rounds x {args.steps} timed steps (median round); "
         f"remat: shardml {', '.join(args.remat)}, MaxText {args.maxtext_remat}; shardml grad_dtype "
         f"{', '.join(args.grad_dtype)}"),
        "",
        "| layout | shardml tokens/s | MaxText tokens/s | ratio | shardml tokens/CPU-s | MaxText tokens/CPU-s | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        have = res["maxtext"] is not None
        mt = f"{res['maxtext']:.0f}" if have else "skipped"
        ratio = f"{res['shardml'] / res['maxtext']:.2f}" if have else "-"
        mt_cpu = f"{res['maxtext_per_cpu']:.0f}" if have else "skipped"
        ratio_cpu = f"{res['shardml_per_cpu'] / res['maxtext_per_cpu']:.2f}" if have else "-"
        lines.append(f"| {res['layout']} | {res['shardml']:.0f} | {mt} | {ratio} | {res['shardml_per_cpu']:.0f} | "
                     f"{mt_cpu} | {ratio_cpu} |")
    lines.append("")
    lines.append("tokens/s: wall clock over the timed steps (MaxText: the step seconds it logs); tokens/CPU-s: "
                 "the same tokens over the CPU time the training process used, which other processes on "
                 "the machine disturb less. Ratio = shardml / MaxText.")
    lines.append("per-round tokens/s: " + "; ".join(
        f"{r['layout']}: shardml " + " ".join(f"{x:.0f}" for x in r["shardml_rounds"])
        + (", MaxText " + " ".join(f"{x:.0f}" for x in r["maxtext_rounds"]) if r["maxtext_rounds"] else "")
        for r in results))
    lines.append("first loss (sanity): " + "; ".join(
        f"{r['layout']}: shardml {r['shardml_first_loss']:.3f}"
        + (f", MaxText {r['maxtext_first_loss']:.3f}" if r["maxtext_first_loss"] is not None else "")
        for r in results))
    versions = f"shardml on jax {jax.__version__} (Python {sys.version.split()[0]})"
    if have_maxtext:
        versions += f"; MaxText venv: {args.maxtext_venv}"
    lines.append(versions)
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", nargs="+", default=["fsdp=8", "fsdp=2,tensor=4"], help="e.g. fsdp=8 data=2,tensor=4")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling (each side)")
    ap.add_argument("--remat", default="dots", type=_readme.comma_list(tuple(REMAT_POLICIES)),
                    help=f"shardml model.remat ({', '.join(REMAT_POLICIES)}); a comma list (dots,full) races each, in the same rounds")
    ap.add_argument("--maxtext-remat", default="full", help="MaxText remat_policy (its default: full)")
    ap.add_argument("--grad-dtype", default="float32", type=_readme.comma_list(GRAD_DTYPES),
                    help="shardml model.grad_dtype; a comma list (float32,compute) races each, in the same rounds")
    ap.add_argument("--maxtext-venv", default=os.environ.get("MAXTEXT_VENV", str(REPO.parent / "maxtext-venv")),
                    help="MaxText's virtual environment (env MAXTEXT_VENV; default: ../maxtext-venv)")
    ap.add_argument("--log-dir", default=None, help="where MaxText logs go (default: a temporary folder)")
    ap.add_argument("--readme", default=None, help="rewrite this file's bench_maxtext table")
    args = ap.parse_args()
    assert jax.device_count() == 8, f"expected 8 emulated CPU devices, got {jax.device_count()}"
    for layout in args.layouts:
        parse_layout(layout)

    python = maxtext_python(args.maxtext_venv)
    base_yml = maxtext_base_config(args.maxtext_venv) if python else None
    if python is None or base_yml is None:
        print(f"MaxText skipped: no MaxText virtual environment at {args.maxtext_venv} "
              "(create one with Python >= 3.12: `python3.12 -m venv DIR && DIR/bin/pip install "
              "\"maxtext[tpu]==0.2.5\"`, then pass --maxtext-venv DIR or set MAXTEXT_VENV=DIR)", file=sys.stderr)
        python = None
    import tempfile

    log_dir = args.log_dir or tempfile.mkdtemp(prefix="bench_maxtext_")
    os.makedirs(log_dir, exist_ok=True)
    load_before = _readme.load_average()
    results = [res for layout in args.layouts for res in race(layout, args, python, base_yml, log_dir)]
    text = table(results, args, python is not None) + "\n" + _readme.machine_line(load_before)
    print(text)
    if python is not None:
        print(f"MaxText logs: {log_dir}")
    if args.readme:
        _readme.write_section(args.readme, "bench_maxtext", text, _readme.shown_command(
            "benchmarks/bench_maxtext.py", sys.argv[1:], hidden=("--readme", "--log-dir")))


if __name__ == "__main__":
    main()
