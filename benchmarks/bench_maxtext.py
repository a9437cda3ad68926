"""shardml vs MaxText: training tokens/s on the same decoder, 8 emulated CPU devices, each in its own process.

Both train the same llama-style decoder (``--shape race``: 4 layers, d_model 256, 4 heads of 64,
SwiGLU MLP 1024, vocabulary 256, sequence 128, global batch 32; ``--shape 4x``: 8 layers, d_model
512, 8 heads of 64, SwiGLU 2048, sequence 256; bf16 compute, f32 parameters, AdamW with global-norm
clipping) on the same mesh layout (axes data, fsdp, expert, tensor), and both are started the same
way: as a child process of this script, one at a time, with nothing else of ours alive. This script
imports neither JAX nor shardml.

``--moe`` puts ``--experts`` (8) SwiGLU experts with top-``--top-k`` (2) routing in every layer of
both: shardml's ``model.experts`` / ``model.top_k`` (dropless, ``capacity_factor=0``: tokens sorted
by expert and three ``jax.lax.ragged_dot`` products; load-balancing loss 0.01, no router z-loss)
against MaxText's Mixtral block with ``num_experts`` / ``num_experts_per_tok``, ``sparse_matmul=true,
megablox=false`` (its ``jax.lax.ragged_dot`` path; megablox' Pallas kernels only run interpreted off
TPU) and ``capacity_factor=-1`` (dropless), ``load_balance_loss_weight=0.01``. Both gate by a softmax
over the chosen experts' logits. That is the same algorithm on layouts without an ``expert`` axis.
Under one, MaxText's sparse paths do not run on XLA:CPU (``ragged_all_to_all`` does not compile;
``use_ring_of_experts`` fails with ragged_dot), so MaxText runs its dense path there
(``sparse_matmul=false``: every expert on every token, the gates weighting the sum -- the same
function, experts/top_k times the expert FLOPs), and the table says so; shardml keeps its dropless
ragged_dot and leaves the dispatch to the partitioner (all-gathers / all-reduces over ``expert``).

Warm caches: MaxText keeps a persistent compilation cache (its ``jax_cache_dir``, ``~/jax_cache`` by
default; ``--maxtext-cache``), so shardml gets one too (``JAX_COMPILATION_CACHE_DIR``,
``--shardml-cache``, default ``~/jax_cache_shardml``), and before any timed run each system runs
once per layout and run length, untimed (``--no-warmup`` skips it). Without that, whichever
system's first timed run compiled cold paid the compile in one run of the long/short pair and not
in the other, which biased its whole-process figure. Both lengths: MaxText builds its learning-rate
schedule from ``steps`` into the compiled step, so its long and short runs are different programs. The output prints both cache directories with
their size before and after, the warm-up times, and the settings each side ran with: shardml's
``model.remat`` / ``model.layer_loop`` as its run resolves them, MaxText's ``remat_policy`` /
``scan_layers`` (and the MoE keys) from its ``Config param`` log lines.

- shardml runs as ``PY -m shardml train`` (``--shardml-python`` or ``SHARDML_PYTHON``, default: the
  Python running this script) with the race decoder as ``key=value`` overrides of the built-in
  defaults, no evaluation, a record per step in ``metrics.jsonl``, and no checkpoint but the final one.
- MaxText (PyPI ``maxtext[tpu]``, which needs Python >= 3.12) runs as
  ``python -m maxtext.trainers.pre_train.train base.yml key=value ...`` in its own virtual
  environment (``hardware=cpu dataset_type=synthetic``, checkpointing off).

The two must run on the same JAX: both interpreters are asked for their JAX version first, and the
race is refused when they differ (``--allow-jax-mismatch`` runs it anyway, marked not comparable,
and never writes the README). Both children get the same environment: 8 CPU devices through
``JAX_NUM_CPU_DEVICES``, and the XLA:CPU settings shardml's workaround against a collective
deadlock would add (what ``shardml.emulate_cpu_devices`` sets; none on a JAX that does
not need it), so the thread pool and scheduler are the same for both (``--xla-env own`` gives
MaxText JAX's defaults instead).

Two measures, side by side:

- whole process: (wall time of a ``--long`` run - wall time of a ``--short`` run) / (long - short)
  steps. Start-up, compilation, the first steps, the final checkpoint and exit cancel out; what is
  left is the cost of a step as the whole process pays it (also in CPU-seconds, from the
  children's resource usage). Each round runs every system's long and short run in the order
  A-long B-long B-short A-short; the next round flips both orders (B-short A-short A-long B-long),
  so a drift in machine load hits both alike. The median round is shown.
- in loop: the step times each training loop records itself, over the same steps (those after the
  first ``--short``) of the long run: MaxText's ``completed step: N, seconds: X`` log lines (the time
  between two step dispatches; its loop reads a step's metrics after dispatching the next), and
  shardml's ``metrics.jsonl`` records (``tokens_per_s`` over the time between the completions of two
  steps; its loop also reads a step's metrics after dispatching the next).

A trustworthy figure needs an idle machine, and the run itself keeps every core busy, so the load
average after it says nothing. The machine is judged by what ran besides the benchmark: the CPU
time of all other processes (``/proc/stat``'s busy time, steal included, minus the CPU time of this
script and its children), over 3 seconds before the first run and over the whole measurement.
``--readme`` refuses to write (exit 2) when the 1-minute load average as the script starts (before its
version probes) is above 0.5, or other processes used more than 0.2 cores on average before or
during the measurement.

Install MaxText once, outside this repository (about 4 minutes and 2.8 GB)::

    python3.12 -m venv ~/maxtext-venv            # any Python >= 3.12
    ~/maxtext-venv/bin/pip install "maxtext[tpu]==0.2.5"

then point the benchmark at it with ``--maxtext-venv`` or ``MAXTEXT_VENV`` (default: a folder
``maxtext-venv`` beside the repository). Without it, shardml is measured alone and MaxText is
skipped with a message. shardml needs an interpreter with the same JAX as MaxText's (0.12 for
MaxText 0.2.5), e.g. a Python 3.12 virtual environment with ``pip install -e .``::

    python benchmarks/bench_maxtext.py --shardml-python ../py312/bin/python    # fsdp=8 and fsdp=2,tensor=4
    python benchmarks/bench_maxtext.py --layouts fsdp=8 --rounds 3 --long 46 --short 6
    python benchmarks/bench_maxtext.py --remat dots,full       # shardml settings side by side (each a system)
    python benchmarks/bench_maxtext.py --maxtext-also-env MALLOC_ARENA_MAX=1,MALLOC_MMAP_MAX_=0,MALLOC_TRIM_THRESHOLD_=1099511627776
        # MaxText also with the allocator setting shardml makes for itself (system maxtext[env1])
    python benchmarks/bench_maxtext.py --shape 4x --readme benchmarks/README.md   # section bench_maxtext_4x
    python benchmarks/bench_maxtext.py --moe --layouts expert=4,fsdp=2 fsdp=8     # section bench_maxtext_moe
    python benchmarks/bench_maxtext.py --readme benchmarks/README.md    # also rewrite the README section

``benchmarks/profile_steps.py`` profiles the two compiled steps at the same shapes, per op category.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import _readme  # benchmarks/ (this script's folder) is on sys.path; it imports no JAX

REPO = pathlib.Path(__file__).resolve().parent.parent
# The race decoder (``--shape race``) and one 4x larger in layers x d_model x seq (``--shape 4x``: about 16x the
# weight FLOPs per token row, 8x per step). ``experts``/``top_k`` 0: a dense SwiGLU MLP; ``--moe`` sets them.
SHAPES = {
    "race": {"layers": 4, "d_model": 256, "heads": 4, "head_dim": 64, "d_ff": 1024, "vocab": 256, "seq_len": 128,
             "batch": 32, "experts": 0, "top_k": 0},
    "4x": {"layers": 8, "d_model": 512, "heads": 8, "head_dim": 64, "d_ff": 2048, "vocab": 256, "seq_len": 256,
           "batch": 32, "experts": 0, "top_k": 0},
}
SHAPE = dict(SHAPES["race"])  # the shape raced; main() sets it from --shape / --moe before anything runs
AXES = ("data", "fsdp", "expert", "tensor")  # the mesh axes both systems have (MaxText: ici_<axis>_parallelism)
DEVICES = 8
_STEP_LINE = re.compile(r"completed step: (\d+), seconds: ([\d.]+).*?loss: ([\d.]+)")
IDLE_LOAD = 0.5  # --readme: the most 1-minute load average before the start
IDLE_OTHERS = 0.2  # --readme: the most cores other processes may use, before or during the measurement


def parse_layout(text: str) -> dict[str, int]:
    sizes = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        if name.strip() not in AXES or not size.strip().isdigit():
            raise SystemExit(f"layout '{text}': write axis=size pairs over {', '.join(AXES)} (e.g. fsdp=2,tensor=4)")
        sizes[name.strip()] = int(size)
    product = 1
    for size in sizes.values():
        product *= size
    if product != DEVICES:
        raise SystemExit(f"layout '{text}' uses {product} devices; the race has {DEVICES}")
    return sizes


def _slug(layout: str) -> str:
    return layout.replace(",", "_").replace("=", "")


# ----------------------------------------------------------------------------- the machine
def _busy_seconds() -> float:
    """CPU-seconds the whole machine has been busy (user, nice, system, irq, softirq, steal)."""
    fields = pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _our_seconds() -> float:
    """CPU-seconds of this process and of its children that have exited (none is left running)."""
    me = os.times()
    return me.user + me.system + me.children_user + me.children_system


class OtherLoad:
    """CPU used by every process but this script and its children, in cores, over an interval.

    ``mark()`` between runs (no child alive) closes one interval and starts the next.
    """

    def __init__(self):
        self.available = os.path.exists("/proc/stat")
        self.intervals: list[tuple[float, float]] = []  # (seconds, others' CPU-seconds)
        self._at = self._sample()

    def _sample(self):
        return (time.perf_counter(), _busy_seconds(), _our_seconds()) if self.available else None

    def mark(self) -> float:
        """Others' cores over the interval just closed (NaN without /proc)."""
        now = self._sample()
        if now is None:
            return float("nan")
        (t0, busy0, ours0), (t1, busy1, ours1) = self._at, now
        self._at = now
        others = max(0.0, (busy1 - busy0) - (ours1 - ours0))
        self.intervals.append((t1 - t0, others))
        return others / max(t1 - t0, 1e-9)

    @staticmethod
    def mean(intervals) -> float:
        seconds = sum(s for s, _ in intervals)
        return sum(o for _, o in intervals) / seconds if seconds else float("nan")


# ----------------------------------------------------------------------------- children
def child_environment(xla: dict[str, str]) -> dict[str, str]:
    """What both children start with: this environment without settings that would reach into
    them (a PYTHONPATH, XLA flags, a device count, another virtual environment), plus 8 CPU devices
    and ``xla`` (XLA_FLAGS / NPROC)."""
    drop = ("PYTHONPATH", "XLA_FLAGS", "NPROC", "VIRTUAL_ENV", "JAX_NUM_CPU_DEVICES", "JAX_PLATFORMS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(DEVICES), TF_CPP_MIN_LOG_LEVEL="1", **xla)
    return env


_PROBE = """
import json, os, sys
import jax
out = {"jax": jax.__version__, "python": sys.version.split()[0], "executable": sys.executable}
what, _, preset = sys.argv[1].partition(":")  # shardml[:PRESET]: the built-in defaults, or that preset
if what == "shardml":
    import shardml
    devices = int(os.environ["JAX_NUM_CPU_DEVICES"])
    cfg = shardml.load_config(preset or None, sys.argv[2:])  # the overrides: a typo or a bad value fails here, before any run
    shardml.validate(cfg, devices)
    before = {k: os.environ.get(k) for k in ("XLA_FLAGS", "NPROC")}
    shardml.emulate_cpu_devices(devices)  # the same count: only its XLA:CPU settings change anything
    out["xla"] = {k: os.environ[k] for k in before if os.environ.get(k) != before[k]}
    model = shardml.run_parts(cfg).cfg.model  # "auto" settings as the run resolves them on these devices
    out["settings"] = (f"remat={model.remat}, layer_loop={model.layer_loop} (given: {cfg.model.remat}, "
                       f"{cfg.model.layer_loop}), grad_dtype={model.grad_dtype}, freed host memory "
                       + ("kept" if shardml.keep_freed_host_memory() else "returned (glibc's default)"))
    out["package"] = os.path.dirname(shardml.__file__)
else:
    import importlib.metadata, maxtext.trainers.pre_train.train
    from maxtext.configs import pyconfig
    out["package"] = "maxtext " + importlib.metadata.version("maxtext")
    if sys.argv[2:]:  # the race's MaxText command line: a key it rejects fails here, before any run
        pyconfig.initialize(["train", *sys.argv[2:]])
print("PROBE " + json.dumps(out))
"""


def probe(python: str, what: str, env: dict, cwd: str, overrides: list[str] = ()) -> dict:
    """JAX and Python versions of an interpreter (and, for shardml, the XLA settings its deadlock
    workaround adds, with the race's overrides checked); exits with the child's error otherwise.
    ``what``: "maxtext", "shardml" (the built-in defaults) or "shardml:PRESET"."""
    cmd = [python, "-c", _PROBE, what, *overrides]
    done = subprocess.run(cmd, check=False, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    for line in done.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-12:])
    raise SystemExit(f"{what}: {python} cannot run the race (exit {done.returncode}):\n{tail}")


def maxtext_python(venv: str) -> str | None:
    path = pathlib.Path(venv) / "bin" / "python"
    return str(path) if path.exists() else None


def maxtext_base_config(venv: str) -> str | None:
    found = sorted(pathlib.Path(venv).glob("lib/python3*/site-packages/maxtext/configs/base.yml"))
    return str(found[0]) if found else None


def maxtext_moe_path(sizes: dict[str, int]) -> str:
    """Which MoE path MaxText runs on layout ``sizes`` (see :func:`maxtext_moe`).

    >>> maxtext_moe_path({"fsdp": 8})[:6]
    'sparse'
    """
    if sizes.get("expert", 1) > 1:
        return ("dense (sparse_matmul=false: every expert computes every token, gates weight the sum; dropless, "
                "same function, experts/top_k x the expert FLOPs)")
    return "sparse (sparse_matmul=true, megablox=false: sorted tokens, jax.lax.ragged_dot; dropless, as shardml)"


def maxtext_moe(shape: dict, sizes: dict[str, int]) -> list[str]:
    """MaxText's MoE keys for ``shape`` on layout ``sizes`` (none for a dense shape).

    Its Mixtral block is the llama decoder with a routed MLP (softmax over the chosen experts'
    logits = softmax gates renormalised over top-k, as shardml's ``moe_gate=softmax, norm_topk=true``),
    dropless (``capacity_factor=-1``). Without an ``expert`` axis: ``sparse_matmul=true, megablox=false``,
    the tokens sorted by expert and three ``jax.lax.ragged_dot`` products -- the algorithm of
    shardml's ``moe_ffn`` (megablox' Pallas kernels run only interpreted off TPU). Under an ``expert``
    axis MaxText's sparse paths do not run on XLA:CPU with JAX 0.12: its default dispatch,
    ``ragged_all_to_all``, does not compile ("HLO opcode `ragged-all-to-all` is not supported by
    XLA:CPU ThunkEmitter") and ``use_ring_of_experts=true`` with ragged_dot fails in tracing ("expected
    rhs group dimension size to be 8, got 2"), so there it runs its dense path (``sparse_matmul=false``).
    """
    if not shape["experts"]:
        return []
    sparse = sizes.get("expert", 1) == 1
    return ["decoder_block=mixtral", f"num_experts={shape['experts']}", f"num_experts_per_tok={shape['top_k']}",
            f"base_moe_mlp_dim={shape['d_ff']}",  # each expert as wide as the dense MLP (shardml: expert_d_ff=0)
            f"sparse_matmul={'true' if sparse else 'false'}", "megablox=false", "capacity_factor=-1",
            "load_balance_loss_weight=0.01"]


def maxtext_command(python: str, base_yml: str, sizes: dict[str, int], steps: int, remat: str, out: str,
                    shape: dict | None = None, cache_dir: str | None = None, extra: list[str] = ()):
    """MaxText's command line for ``shape`` (default: the raced ``SHAPE``) on layout ``sizes``;
    ``cache_dir`` its ``jax_cache_dir`` (None: its default, ~/jax_cache), ``extra`` more key=value."""
    shape = shape or SHAPE
    return [
        python, "-m", "maxtext.trainers.pre_train.train", base_yml,
        "run_name=shardml_race", f"base_output_directory={out}", "hardware=cpu", "skip_jax_distributed_system=true",
        "dataset_type=synthetic", "enable_checkpointing=false", "enable_tensorboard=false",
        f"base_num_decoder_layers={shape['layers']}", f"base_emb_dim={shape['d_model']}",
        f"base_num_query_heads={shape['heads']}", f"base_num_kv_heads={shape['heads']}",
        f"head_dim={shape['head_dim']}", f"base_mlp_dim={shape['d_ff']}", f"vocab_size={shape['vocab']}",
        f"max_target_length={shape['seq_len']}", f"per_device_batch_size={shape['batch'] / DEVICES:g}",
        "dtype=bfloat16", "weight_dtype=float32", "logits_via_embedding=false",  # mlp_activations default: silu,linear
        "learning_rate=3e-3", "gradient_clipping_threshold=1.0", f"remat_policy={remat}",
        *(f"ici_{axis}_parallelism={sizes.get(axis, 1)}" for axis in AXES), f"steps={steps}",
        *([f"jax_cache_dir={cache_dir}"] if cache_dir else []), *maxtext_moe(shape, sizes), *extra,
    ]


def shardml_overrides(settings: list[str], shape: dict | None = None) -> list[str]:
    """The race decoder as overrides of shardml's built-in defaults (``shardml.OptimConfig``: AdamW,
    peak lr 3e-3, global-norm clipping 1.0; pydoc text batches of seed 0), then ``settings``. With
    experts: dropless top-k routing (capacity_factor 0), softmax gates renormalised over the k, the
    load-balancing loss at MaxText's weight and no router z-loss (MaxText has none)."""
    shape = shape or SHAPE
    moe = [f"model.experts={shape['experts']}", f"model.top_k={shape['top_k']}", "model.capacity_factor=0",
           "model.moe_gate=softmax", "model.norm_topk=true", "model.aux_loss_weight=0.01",
           "model.z_loss_weight=0"] if shape["experts"] else []
    return [
        f"model.vocab={shape['vocab']}", f"model.layers={shape['layers']}", f"model.d_model={shape['d_model']}",
        f"model.heads={shape['heads']}", f"model.d_ff={shape['d_ff']}", "model.dtype=bfloat16", *moe,
        f"data.seq_len={shape['seq_len']}", f"train.batch_size={shape['batch']}", "train.microbatches=1",
        "train.log_every=1", "train.eval_batches=0", "checkpoint.every=0", *settings]


def shardml_command(python: str, defaults_yml: str, sizes: dict[str, int], steps: int, settings: list[str],
                    out: str, shape: dict | None = None):
    # An explicit empty config file: the built-in defaults (the CLI's own default is the 'default' preset).
    return [python, "-m", "shardml", "train", defaults_yml, *shardml_overrides(settings, shape),
            *(f"mesh.{axis}={sizes.get(axis, 1)}" for axis in AXES),
            f"train.steps={steps}", f"out_dir={out}", "--quiet", "--num-processes", "1"]


def run_child(cmd: list[str], env: dict, cwd: str, log_path: str, timeout: float) -> tuple[float, float, int]:
    """Runs ``cmd`` to its end, its output into ``log_path``; (wall seconds, CPU-seconds of it and its
    children, exit status). Nothing of this process runs meanwhile but the wait."""
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=cwd, start_new_session=True)
        killer = threading.Timer(timeout, lambda: os.killpg(proc.pid, 9))
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, proc.returncode


def _fail(name: str, code: int, log_path: str, why: str = "") -> SystemExit:
    tail = "\n".join(pathlib.Path(log_path).read_text(errors="replace").splitlines()[-15:])
    return SystemExit(f"{name} run failed (exit {code}{why}); log {log_path}:\n{tail}")


def maxtext_steps(log_path: str) -> dict[int, tuple[float, float]]:
    """MaxText's ``completed step`` lines: 0-based step -> (seconds, loss)."""
    steps = {}
    for line in pathlib.Path(log_path).read_text(errors="replace").splitlines():
        if m := _STEP_LINE.search(line):
            steps[int(m.group(1))] = (float(m.group(2)), float(m.group(3)))
    return steps


def shardml_steps(out_dir: str) -> dict[int, tuple[float, float]]:
    """shardml's ``metrics.jsonl`` records as 0-based step -> (seconds, loss).

    Record ``k`` (1-based) holds ``tokens_per_s`` over the time since the record before; with
    ``train.log_every=1`` that is step k alone. The first record's rate is 0: the loop's clock
    starts when the first step (compilation) has finished.
    """
    steps = {}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            seconds = SHAPE["batch"] * SHAPE["seq_len"] / r["tokens_per_s"] if r.get("tokens_per_s") else float("nan")
            steps[r["step"] - 1] = (seconds, r["loss"])
    return steps


# ----------------------------------------------------------------------------- the race
class System:
    """One racer: ``command(sizes, steps, out)`` is its command line, ``steps_of(out, log)`` reads its
    in-loop step records (0-based step -> (seconds, loss)), ``env`` is its environment."""

    def __init__(self, name: str, command, steps_of, env: dict, cache: str = "", settings_of=None):
        self.name, self.command, self.steps_of, self.env, self.cache = name, command, steps_of, env, cache
        self.settings_of = settings_of or (lambda out, log: "")


_CONFIG_LINE = re.compile(r"Config param (\w+): (.*)$")
MAXTEXT_SHOWN = ("remat_policy", "scan_layers", "jax_cache_dir", "decoder_block", "num_experts", "num_experts_per_tok",
                 "sparse_matmul", "megablox", "capacity_factor")


def maxtext_settings(log_path: str) -> str:
    """The settings MaxText resolved, from its ``Config param KEY: VALUE`` log lines (those in
    ``MAXTEXT_SHOWN``; the MoE ones only with experts)."""
    found = {}
    for line in pathlib.Path(log_path).read_text(errors="replace").splitlines():
        if (m := _CONFIG_LINE.search(line)) and m.group(1) in MAXTEXT_SHOWN:
            found[m.group(1)] = m.group(2).strip()
    if found.get("num_experts", "1") in ("1", "0"):
        found = {k: v for k, v in found.items() if k in MAXTEXT_SHOWN[:3]}
    return ", ".join(f"{k}={found[k]}" for k in MAXTEXT_SHOWN if k in found) or "no 'Config param' lines in its log"


def cache_state(path: str) -> str:
    """Files and MB in a persistent compilation cache directory."""
    files = [f for f in pathlib.Path(path).rglob("*") if f.is_file()] if os.path.isdir(path) else []
    return f"{path}: {len(files)} files, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB"


def warm_up(layout: str, systems: list[System], args, log_dir: str, res: dict) -> None:
    """Untimed runs of each system, one per run length (``--short`` and ``--long`` steps), so that both
    compilation caches hold every program the timed runs will ask for: otherwise the first timed run
    pays the compile and later ones do not, which biases the long-minus-short difference. Both lengths,
    because MaxText builds its learning-rate schedule from ``steps`` into the step program (a
    different program per length; shardml passes its schedule as data, one program)."""
    sizes = parse_layout(layout)
    for system in systems:
        for steps in (args.short, args.long):
            out = os.path.join(log_dir, f"{system.name}_{_slug(layout)}_warmup{steps}")
            shutil.rmtree(out, ignore_errors=True)
            wall, _, code = run_child(system.command(sizes, steps, out), system.env, log_dir, out + ".log", args.timeout)
            if code:
                raise _fail(system.name, code, out + ".log", ", warm-up run")
            res[system.name]["warmup"].append(wall)
            res[system.name]["resolved"] = system.settings_of(out, out + ".log")
            print(f"  {layout} warm-up (untimed): {system.name} {steps} steps {wall:.1f}s; cache "
                  f"{cache_state(system.cache) if system.cache else '-'}", file=sys.stderr, flush=True)


def race(layout: str, systems: list[System], args, log_dir: str, load: OtherLoad) -> dict:
    """Every system's long and short runs for ``layout``, ``args.rounds`` rounds; per system the
    per-round whole-process and in-loop seconds per step, CPU-seconds per step and first loss."""
    sizes = parse_layout(layout)
    res = {s.name: {"wall": [], "cpu": [], "loop": [], "startup": [], "loss": None, "others": [], "warmup": [],
                    "resolved": ""} for s in systems}
    if args.warmup:
        warm_up(layout, systems, args, log_dir, res)
    for r in range(args.rounds):
        order = systems if r % 2 == 0 else systems[::-1]
        first, second = (args.long, args.short) if r % 2 == 0 else (args.short, args.long)
        runs, timed = [(s, first) for s in order] + [(s, second) for s in order[::-1]], {}
        for system, steps in runs:
            tag = f"{system.name}_{_slug(layout)}_r{r}_{steps}steps"
            out = os.path.join(log_dir, tag)
            shutil.rmtree(out, ignore_errors=True)  # a run left here would be resumed
            log_path = out + ".log"
            load.mark()
            wall, cpu, code = run_child(system.command(sizes, steps, out), system.env, log_dir, log_path, args.timeout)
            others = load.mark()
            res[system.name]["others"].append(others)
            if code:
                raise _fail(system.name, code, log_path, ", killed at the timeout" if wall >= args.timeout else "")
            timed[system.name, steps] = (wall, cpu)
            print(f"  {layout} round {r + 1}/{args.rounds}: {system.name} {steps} steps {wall:.1f}s "
                  f"(others: {others:.2f} cores)", file=sys.stderr, flush=True)
            if steps == args.long:
                per_step = system.steps_of(out, log_path)
                loop = [per_step[s][0] for s in range(args.short, args.long) if s in per_step]
                if len(loop) < args.long - args.short - 1:  # MaxText may leave the last step's line out
                    raise _fail(system.name, code, log_path, f"; {len(per_step)} step records of {args.long}")
                res[system.name]["loop"].append(statistics.fmean(loop))
                res[system.name]["loss"] = per_step[min(per_step)][1]
        for s in systems:
            (wall_l, cpu_l), (wall_s, cpu_s) = timed[s.name, args.long], timed[s.name, args.short]
            step = (wall_l - wall_s) / (args.long - args.short)
            res[s.name]["wall"].append(step)
            res[s.name]["cpu"].append((cpu_l - cpu_s) / (args.long - args.short))
            res[s.name]["startup"].append(wall_l - args.long * step)
    return res


# ----------------------------------------------------------------------------- report
def _tps(seconds: float) -> float:
    return SHAPE["batch"] * SHAPE["seq_len"] / seconds if seconds > 0 else float("nan")


def _ms(seconds: list[float]) -> str:
    return " ".join(f"{1000 * x:.0f}" for x in seconds)


def table(layouts, results, systems, args, info, comparable: bool) -> str:
    maxtexts = [s.name for s in systems if s.name.startswith("maxtext")]
    shardmls = [s.name for s in systems if s.name not in maxtexts]
    pairs = [(n, m) for n in shardmls for m in maxtexts]
    moe = (f", {SHAPE['experts']} experts top-{SHAPE['top_k']} (dropless)" if SHAPE["experts"] else "")
    lines = [
        (f"decoder ({args.shape}): {SHAPE['layers']} layers, d_model {SHAPE['d_model']}, {SHAPE['heads']} heads x "
         f"{SHAPE['head_dim']}, SwiGLU {SHAPE['d_ff']}{moe}, vocab {SHAPE['vocab']}, seq {SHAPE['seq_len']}, "
         f"global batch {SHAPE['batch']}, bf16 compute / f32 params; {DEVICES} emulated CPU devices; each system a "
         f"child process; {'untimed warm-up runs of each system and length per layout, then ' if args.warmup else 'NO warm-up, '}"
         f"{args.rounds} rounds of {args.long}- and {args.short}-step runs (median round); "
         f"shardml {info['shardml']['settings']}{''.join(f', {o}' for o in args.set)}; MaxText "
         f"remat_policy={args.maxtext_remat}"),
    ]
    if SHAPE["experts"]:
        lines.append("MoE paths: shardml dropless top-k, tokens sorted by expert, jax.lax.ragged_dot (capacity_factor=0) "
                     "on every layout; MaxText " + "; ".join(f"{layout}: {maxtext_moe_path(parse_layout(layout))}"
                                                             for layout in layouts))
    if not comparable:
        lines.append(f"NOT COMPARABLE: shardml runs on JAX {info['shardml']['jax']}, MaxText on JAX "
                     f"{info['maxtext']['jax']}")
    lines += ["",
              "| layout | measure | " + " | ".join(
                  [f"{n} tokens/s" for n in shardmls] + [f"{m.replace('maxtext', 'MaxText')} tokens/s" for m in maxtexts]
                  + [f"ratio {n}/{m}" if len(pairs) > 1 else "ratio" for n, m in pairs]) + " |",
              "|---|---|" + "---:|" * (len(shardmls) + len(maxtexts) + len(pairs))]
    measures = (("whole process", "wall"), ("in loop", "loop"), ("whole process, per CPU-s", "cpu"))
    for layout in layouts:
        res = results[layout]
        for label, key in measures:
            tps = {n: _tps(statistics.median(res[n][key])) for n in res}
            cells = ([f"{tps[n]:.0f}" for n in shardmls + maxtexts]
                     + [f"{tps[n] / tps[m]:.2f}" for n, m in pairs])
            lines.append(f"| {layout} | {label} | " + " | ".join(cells) + " |")
    lines += ["",
              (f"whole process: (wall time of a {args.long}-step run - that of a {args.short}-step run) / "
               f"{args.long - args.short} steps, start-up and compilation cancelled out; in loop: the step times the "
               f"training loop records (shardml metrics.jsonl, MaxText 'completed step' lines), steps "
               f"{args.short + 1}-{args.long} of the long run; per CPU-s: the same tokens over the CPU-seconds the "
               "process used per step. Ratio = shardml / MaxText.")]
    for layout in layouts:
        res = results[layout]
        parts = [f"{n}: whole {_ms(r['wall'])}, loop {_ms(r['loop'])}, start-up+compile "
                 + " ".join(f"{x:.1f}s" for x in r["startup"]) for n, r in res.items()]
        lines.append(f"per-round ms/step, {layout}: " + "; ".join(parts))
        if args.warmup:
            lines.append(f"warm-up (untimed, {args.short} and {args.long} steps), {layout}: " + "; ".join(
                f"{n} " + " ".join(f"{x:.1f}s" for x in r["warmup"]) + (f" [{r['resolved']}]" if r["resolved"] else "")
                for n, r in res.items()))
    lines.append("first loss (sanity; ln 256 = 5.545): " + "; ".join(
        f"{layout}: " + ", ".join(f"{n} {results[layout][n]['loss']:.3f}" for n in results[layout])
        for layout in layouts))
    for name, i in info.items():
        lines.append(f"{name}: Python {i['python']}, JAX {i['jax']}, {i['package']} ({i['executable']}); "
                     f"environment settings: {i['xla_env'] or 'JAX defaults'}; compilation cache {i.get('cache', '-')}")
    lines += [f"{name}: MaxText as above, its environment also " + " ".join(f"{k}={v}" for k, v in extra.items())
              for name, extra in info.get("maxtext", {}).get("variants", {}).items()]
    return "\n".join(lines)


def race_shape(name: str, experts: int = 0, top_k: int = 2) -> dict:
    """The shape preset ``name`` with ``experts`` (0: dense) of which each token takes ``top_k``.

    >>> race_shape("race", 8, 2)["experts"], race_shape("4x")["d_model"]
    (8, 512)
    """
    if experts and not 1 <= top_k <= experts:
        raise SystemExit(f"--top-k {top_k}: must be between 1 and --experts {experts}")
    if experts and DEVICES % experts and experts % DEVICES:
        raise SystemExit(f"--experts {experts}: use a divisor or multiple of {DEVICES} so an expert axis can split them")
    return {**SHAPES[name], "experts": experts, "top_k": top_k if experts else 0}


def readme_section(shape: str, moe: bool) -> str:
    """The README section a race writes: ``bench_maxtext`` for the race shape, dense; one per other case."""
    return "bench_maxtext" + ("" if shape == "race" else f"_{shape}") + ("_moe" if moe else "")


def _xla_text(xla: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in xla.items())


def main():
    load_before = _readme.load_average()  # before the version probes, which load the machine themselves
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", nargs="+", default=["fsdp=8", "fsdp=2,tensor=4"], help="e.g. fsdp=8 data=2,tensor=4")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of long and short runs (the order flips each round)")
    ap.add_argument("--long", type=int, default=36, help="steps of the long runs")
    ap.add_argument("--short", type=int, default=6, help="steps of the short runs (and steps not timed in the loop)")
    ap.add_argument("--shardml-python", default=os.environ.get("SHARDML_PYTHON", sys.executable),
                    help="the interpreter that runs `-m shardml train` (env SHARDML_PYTHON; default: this one); "
                         "its JAX must be MaxText's")
    ap.add_argument("--remat", default=None,
                    help="shardml model.remat (default: shardml's own); a comma list (dots,full) races each")
    ap.add_argument("--grad-dtype", default=None,
                    help="shardml model.grad_dtype (default: shardml's own); a comma list races each")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="another shardml override for every shardml run (repeatable)")
    ap.add_argument("--also", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="race shardml a second time with these overrides too, beside its defaults (repeatable), "
                         "e.g. --also model.remat=dots,model.layer_loop=scan")
    ap.add_argument("--shape", choices=tuple(SHAPES), default="race",
                    help="race: 4 layers, d_model 256, seq 128; 4x: 8 layers, d_model 512, seq 256 (8 heads, SwiGLU 2048)")
    ap.add_argument("--moe", action="store_true",
                    help="mixture of experts in every layer (--experts, --top-k; dropless ragged_dot on both sides)")
    ap.add_argument("--experts", type=int, default=8, help="with --moe: experts per layer (default 8)")
    ap.add_argument("--top-k", type=int, default=2, help="with --moe: experts per token (default 2)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip the untimed run of each system per layout that fills both compilation caches first")
    ap.add_argument("--shardml-cache", default=os.path.expanduser("~/jax_cache_shardml"),
                    help="shardml's persistent compilation cache (JAX_COMPILATION_CACHE_DIR; default ~/jax_cache_shardml)")
    ap.add_argument("--maxtext-cache", default=os.path.expanduser("~/jax_cache"),
                    help="MaxText's jax_cache_dir (default ~/jax_cache, MaxText's own default)")
    ap.add_argument("--maxtext-set", action="append", default=[], metavar="KEY=VALUE",
                    help="another MaxText override for every MaxText run (repeatable), e.g. scan_layers=false")
    ap.add_argument("--maxtext-remat", default="full", help="MaxText remat_policy (its default: full)")
    ap.add_argument("--maxtext-env", action="append", default=[], metavar="KEY=VALUE",
                    help="an environment variable for MaxText's runs (repeatable), e.g. the allocator setting "
                         "shardml makes for itself: MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...")
    ap.add_argument("--maxtext-also-env", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="race MaxText a second time per round with these variables added to its environment, "
                         "as the system maxtext[env1] (repeatable: env2, ...), e.g. shardml's allocator setting: "
                         "MALLOC_ARENA_MAX=1,MALLOC_MMAP_MAX_=0,MALLOC_TRIM_THRESHOLD_=1099511627776")
    ap.add_argument("--maxtext-venv", default=os.environ.get("MAXTEXT_VENV", str(REPO.parent / "maxtext-venv")),
                    help="MaxText's virtual environment (env MAXTEXT_VENV; default: ../maxtext-venv)")
    ap.add_argument("--xla-env", choices=("same", "own"), default="same",
                    help="same (default): MaxText gets the XLA_FLAGS / NPROC shardml sets for itself; own: JAX's defaults")
    ap.add_argument("--allow-jax-mismatch", action="store_true",
                    help="race interpreters with different JAX versions anyway (marked not comparable)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds before a run counts as hung and is killed")
    ap.add_argument("--log-dir", default=None, help="where the runs' logs and outputs go (default: a temporary folder)")
    ap.add_argument("--readme", default=None, help="rewrite this file's bench_maxtext section (an idle machine only)")
    args = ap.parse_args()
    if not 0 < args.short < args.long:
        raise SystemExit(f"--short {args.short} / --long {args.long}: need 0 < short < long")
    for layout in args.layouts:
        parse_layout(layout)
    for extra in args.maxtext_also_env:
        if not all("=" in kv.strip("=") for kv in extra.split(",")):
            raise SystemExit(f"--maxtext-also-env {extra!r}: expected KEY=VALUE[,KEY=VALUE], "
                             "e.g. MALLOC_ARENA_MAX=1,MALLOC_MMAP_MAX_=0")
    SHAPE.clear()
    SHAPE.update(race_shape(args.shape, args.experts if args.moe else 0, args.top_k))

    if os.sep in args.shardml_python:  # the children run in log_dir: a relative path means from here
        args.shardml_python = os.path.abspath(args.shardml_python)
    args.maxtext_venv = os.path.abspath(args.maxtext_venv)
    log_dir = os.path.abspath(args.log_dir or tempfile.mkdtemp(prefix="bench_maxtext_"))
    os.makedirs(log_dir, exist_ok=True)
    defaults_yml = os.path.join(log_dir, "builtin_defaults.yaml")
    pathlib.Path(defaults_yml).write_text("# shardml's built-in defaults; the race is the command line's overrides\n{}\n")

    variants = [[f"model.remat={r}"] if r else [] for r in (args.remat.split(",") if args.remat else [None])]
    variants = [v + ([f"model.grad_dtype={g}"] if g else []) for v in variants
                for g in (args.grad_dtype.split(",") if args.grad_dtype else [None])]
    variants += [extra.split(",") for extra in args.also]
    bare = child_environment({})
    info, settings = {}, []
    for extra in variants:  # each variant's overrides checked by shardml's own config, before anything runs
        found = probe(args.shardml_python, "shardml", bare, log_dir, shardml_overrides([*args.set, *extra]))
        info.setdefault("shardml", found)
        settings.append(found["settings"])
    info["shardml"]["settings"] = "; ".join(settings)
    xla = info["shardml"]["xla"]
    env = child_environment(xla)
    # Both sides keep a persistent compilation cache, each in its own directory (MaxText's is its
    # jax_cache_dir); JAX's thresholds (cache compiles over 1 s) hold for both unless MaxText changes them.
    shardml_env = {**env, "JAX_COMPILATION_CACHE_DIR": args.shardml_cache}
    info["shardml"]["xla_env"] = _xla_text(xla)
    info["shardml"]["cache"] = f"JAX_COMPILATION_CACHE_DIR={args.shardml_cache}, before the race " + cache_state(
        args.shardml_cache)

    systems = []
    for extra in variants:
        name = "shardml" + ("" if len(variants) == 1 else
                            "[" + (",".join(o.split(".", 1)[1] for o in extra) or "defaults") + "]")
        systems.append(System(
            name, lambda sizes, steps, out, s=[*args.set, *extra]: shardml_command(
                args.shardml_python, defaults_yml, sizes, steps, s, out),
            lambda out, log: shardml_steps(out), shardml_env, args.shardml_cache))
    python = maxtext_python(args.maxtext_venv)
    base_yml = maxtext_base_config(args.maxtext_venv) if python else None
    comparable = True
    if python is None or base_yml is None:
        print(f"MaxText skipped: no MaxText virtual environment at {args.maxtext_venv} "
              "(create one with Python >= 3.12: `python3.12 -m venv DIR && DIR/bin/pip install "
              "\"maxtext[tpu]==0.2.5\"`, then pass --maxtext-venv DIR or set MAXTEXT_VENV=DIR)", file=sys.stderr)
    else:
        info["maxtext"] = probe(python, "maxtext", bare, log_dir, maxtext_command(
            python, base_yml, parse_layout(args.layouts[0]), 1, args.maxtext_remat, os.path.join(log_dir, "probe"),
            cache_dir="", extra=args.maxtext_set)[3:])
        maxtext_env = dict(kv.split("=", 1) for kv in args.maxtext_env)
        info["maxtext"]["xla_env"] = " ".join(filter(None, [_xla_text(xla) if args.xla_env == "same" else "",
                                                            *args.maxtext_env]))
        info["maxtext"]["cache"] = f"jax_cache_dir={args.maxtext_cache}, before the race " + cache_state(
            args.maxtext_cache)
        comparable = info["maxtext"]["jax"] == info["shardml"]["jax"]
        if not comparable and not args.allow_jax_mismatch:
            raise SystemExit(f"not comparable: shardml's interpreter ({args.shardml_python}) has JAX "
                             f"{info['shardml']['jax']}, MaxText's ({python}) JAX {info['maxtext']['jax']}. Pass "
                             "--shardml-python (or SHARDML_PYTHON) with an interpreter of MaxText's JAX and shardml "
                             "installed (pip install -e .), or --allow-jax-mismatch to race anyway")
        info["maxtext"]["variants"] = {f"maxtext[env{i}]": dict(kv.split("=", 1) for kv in extra.split(","))
                                       for i, extra in enumerate(args.maxtext_also_env, 1)}
        for name, variant_env in [("maxtext", {}), *info["maxtext"]["variants"].items()]:
            # One compilation cache for every MaxText variant: its environment (an allocator's
            # variables, say) does not change the programs it compiles.
            systems.append(System(
                name, lambda sizes, steps, out: maxtext_command(
                    python, base_yml, sizes, steps, args.maxtext_remat, out, cache_dir=args.maxtext_cache,
                    extra=args.maxtext_set),
                lambda out, log: maxtext_steps(log),
                {**(env if args.xla_env == "same" else bare), **maxtext_env, **variant_env},
                args.maxtext_cache, lambda out, log: maxtext_settings(log)))
    for name, i in info.items():
        print(f"{name}: Python {i['python']}, JAX {i['jax']}, {i['package']}; environment settings: "
              f"{i['xla_env'] or 'JAX defaults'}; compilation cache {i['cache']}", file=sys.stderr)
    print("shardml settings (as its run resolves them): " + info["shardml"]["settings"], file=sys.stderr)

    load = OtherLoad()
    time.sleep(3.0)
    others_before = load.mark()
    print(f"1-minute load average {load_before:.2f}; other processes used {others_before:.2f} cores over 3 s",
          file=sys.stderr, flush=True)
    measured_from = len(load.intervals)
    results = {}
    for layout in args.layouts:
        results[layout] = race(layout, systems, args, log_dir, load)
    load.mark()
    others_during = OtherLoad.mean(load.intervals[measured_from:])
    others_most = max(max(r["others"]) for res in results.values() for r in res.values())
    load_after = _readme.load_average()
    text = table(args.layouts, results, systems, args, info, comparable)
    text += (f"\nmachine: {os.cpu_count()} CPUs; 1-minute load average {load_before:.2f} before, {load_after:.2f} "
             f"after (the race's own); other processes: {others_before:.2f} cores before, {others_during:.2f} during "
             f"(at most {others_most:.2f} over one run)")
    text += "\ncompilation caches after the race: " + "; ".join(
        f"{s.name} {cache_state(s.cache)}" for s in systems if s.cache)
    print(text)
    print(f"logs: {log_dir}")
    if args.readme:
        reasons = []
        if not comparable:
            reasons.append("the two run on different JAX versions")
        if load_before > IDLE_LOAD:
            reasons.append(f"the 1-minute load average was {load_before:.2f} before the start (> {IDLE_LOAD})")
        if not others_before <= IDLE_OTHERS or not others_during <= IDLE_OTHERS:
            reasons.append(f"other processes used {others_before:.2f} cores before and {others_during:.2f} during "
                           f"the measurement (> {IDLE_OTHERS})")
        if reasons:
            print(f"{args.readme} not written: " + "; ".join(reasons) + ". Rerun on an idle machine.", file=sys.stderr)
            sys.exit(2)
        _readme.write_section(args.readme, readme_section(args.shape, args.moe), text, _readme.shown_command(
            "benchmarks/bench_maxtext.py", sys.argv[1:], hidden=("--readme", "--log-dir", "--shardml-python", "--maxtext-venv")))


if __name__ == "__main__":
    main()
