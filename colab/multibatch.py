# %% [markdown]
# # Multi-batch accumulation: k microbatches are one big batch
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/your-org/shardml/blob/main/colab/multibatch.ipynb)
#
# `train.microbatches = k` splits each step's batch into k microbatches inside the compiled step:
# activation memory falls with k, the update stays exactly the full-batch update, and the gradient
# is still reduced across data-parallel devices once per step. This notebook shows all three: the
# same parameters for k = 1 and k = 8, memory against k from `shardml.compare_layouts`, and the
# one reduction in the compiled program, read by shardml's HLO audit.

# %%
# Setup: install shardml where it is missing (from a wheel uploaded here, else a checkout, else the repository),
# then take the TPU or GPU if it has 8 devices, else 8 emulated CPU devices (same layouts, only slower).
import importlib.metadata
import importlib.util
import os
import pathlib
import subprocess
import sys
import tomllib

SHARDML_REPOSITORY = "https://github.com/your-org/shardml"  # [project.urls] of pyproject.toml, via colab/sync.py
ACCELERATOR = ("tpu" if importlib.util.find_spec("libtpu") else
               "gpu" if importlib.util.find_spec("jax_cuda12_plugin") or importlib.util.find_spec("jax_cuda13_plugin")
               else "cpu")


def shardml_installed() -> bool:
    # Installed means pip's record, not find_spec: a clone in ./shardml would pass for an (empty) package.
    try:
        return importlib.metadata.distribution("shardml") is not None
    except importlib.metadata.PackageNotFoundError:
        return False


def is_checkout(folder: pathlib.Path) -> bool:
    try:
        return tomllib.loads((folder / "pyproject.toml").read_text())["project"]["name"] == "shardml"
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return False


def install_shardml(extra: str) -> None:
    """pip-installs shardml from the first source that works: the newest shardml-*.whl in the working
    directory, a checkout (the working directory, a parent of it, or ./shardml), the repository."""
    here = pathlib.Path.cwd()
    wheels = sorted(here.glob("shardml-*.whl"), key=lambda wheel: wheel.stat().st_mtime, reverse=True)
    checkouts = [folder for folder in (here, *here.parents, here / "shardml") if is_checkout(folder)]
    sources = [path.as_uri() for path in (*wheels[:1], *checkouts)] + [f"git+{SHARDML_REPOSITORY}"]
    failed = []
    for source in sources:
        print(f"installing shardml{extra} from {source}")
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"shardml{extra} @ {source}"],
                             capture_output=True, text=True, check=False)
        if pip.returncode == 0:
            importlib.invalidate_caches()  # this Python has looked at site-packages before the install
            return
        failed.append(f"  {source}: {(pip.stderr.strip().splitlines() or ['pip failed'])[-1]}")
    raise SystemExit("\n".join([
        "could not install shardml:", *failed, "Do one of these, then run this cell again:",
        "  - upload a wheel: in a shardml checkout run `pip install build && python -m build --wheel` and upload",
        f"    dist/shardml-*.whl to {here} (Colab: the Files pane on the left);",
        f"  - clone the repository into the runtime: `!git clone {SHARDML_REPOSITORY} {here / 'shardml'}`."]))


if not shardml_installed() and not os.environ.get("SHARDML_NO_INSTALL"):
    install_shardml({"tpu": "[tpu]", "gpu": "[cuda]", "cpu": ""}[ACCELERATOR])
if ACCELERATOR != "cpu":  # count the accelerator's devices in a child process: JAX starts only once here
    probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"], capture_output=True,
                           text=True, check=False)
    if probe.returncode or int(probe.stdout.split()[-1]) < 8:
        print(f"fewer than 8 {ACCELERATOR} devices: running on 8 emulated CPU devices instead")
        os.environ["JAX_PLATFORMS"], ACCELERATOR = "cpu", "cpu"

import shardml

if ACCELERATOR == "cpu":
    shardml.emulate_cpu_devices(8)  # before JAX starts its backend
import jax

BACKEND = jax.default_backend()
print(f"shardml {shardml.__version__}, jax {jax.__version__}: {jax.device_count()} {BACKEND} devices")

# %% tags=["parameters"]
# Sizes: the tiny preset on CPU (the tests run this notebook on CPU), the default preset on a TPU.
SMALL = BACKEND == "cpu"
PRESET = "tiny" if SMALL else "default"
BATCH = 64 if SMALL else 256  # global batch (sequences), the same for every k
STEPS = 12 if SMALL else 200  # the optimizer's schedule length
KS = [1, 2, 4, 8]
LAYOUT = {"data": 2, "fsdp": 2, "tensor": 2}

# %% [markdown]
# ## The same update for every k
#
# Two trainers that differ only in k, the same initial state and the same batches. The
# accumulator sums f32 gradients and loss sums over the microbatches and divides once by the
# total token count, so k = 8 is the k = 1 update up to float rounding (not a mean of means).

# %%
import matplotlib.pyplot as plt
import numpy as np


def config(k):
    mesh = [f"mesh.{axis}={LAYOUT.get(axis, 1)}" for axis in shardml.MESH_AXES]
    return shardml.load_config(PRESET, [f"train.steps={STEPS}", f"train.batch_size={BATCH}", f"train.microbatches={k}",
                                        *mesh])


cfg = config(1)
data = shardml.TextBatches(shardml.load_tokens(cfg.data.corpus), batch_size=BATCH, seq_len=cfg.data.seq_len,
                           seed=cfg.train.seed)
runs = {}
for k in (1, KS[-1]):
    trainer = shardml.run_parts(config(k)).trainer
    state = trainer.init(seed=0)
    losses = []
    for step in range(3):
        state, metrics = trainer.step(state, trainer.put(data.batch(step)))
        losses.append(float(metrics["loss"]))
    runs[k] = (trainer, jax.device_get(state.params), losses)

one, many = runs[1][1], runs[KS[-1]][1]
gap = max(float(np.max(np.abs(a - b)) / np.max(np.abs(a))) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)))
print(f"losses k=1: {np.round(runs[1][2], 5)}")
print(f"losses k={KS[-1]}: {np.round(runs[KS[-1]][2], 5)}")
print(f"parameters after 3 steps differ by at most {gap:.1e} (relative, per array)")
if SMALL:  # float32
    assert gap < 1e-4, gap

# %% [markdown]
# ## One reduction per step, whatever k is
#
# `shardml.collectives` reads the compiled program's HLO: every all-reduce, all-gather,
# reduce-scatter and collective-permute, the mesh axes it spans, and whether it runs inside a loop
# (there multiplied by the loop's trip count). The accumulator keeps one f32 gradient sum per
# `data` shard through the microbatch loop, so nothing crosses `data` inside it: the reduction
# over `data` is one all-reduce after the loop, with the same bytes for every k.

# %%
# Compiles a trainer's step from shapes (what plans do), here to read its HLO.
from shardml.analysis import compiled_step

reports = {}
for k, (trainer, _, _) in runs.items():
    compiled = compiled_step(trainer, data.batch(0)).compiled
    reports[k] = shardml.collectives(compiled.as_text(), trainer.mesh)
    print(f"k = {k}\n{reports[k].table()}\n")

for k, report in reports.items():
    inside = report.select("all-reduce", in_loop=True, axis="data")
    after = report.select("all-reduce", in_loop=False, axis="data")
    print(f"k = {k}: all-reduces over data inside loops {len(inside)}, after the loop {len(after)} "
          f"({report.bytes('all-reduce', in_loop=False, axis='data'):,} bytes)")
    assert not inside
assert reports[1].bytes("all-reduce", axis="data") == reports[KS[-1]].bytes("all-reduce", axis="data")

# %% [markdown]
# The `fsdp` rows are the other side of the policy: with FSDP the gradient accumulator is itself
# sharded over `fsdp` (memory 1/fsdp), so each microbatch's gradient is reduce-scattered into it
# inside the loop (XLA:CPU writes it as an all-reduce): k reductions over `fsdp` per step, and
# still exactly one over `data`.
#
# ## Memory against k
#
# The same global batch in k microbatches: activations live for one microbatch at a time, so the
# step's temporaries fall with k while parameters, optimizer state and the data reduction stay.

# %%
plans = shardml.compare_layouts(config(1), [f"train.microbatches={k}" for k in KS])
print(shardml.format_comparison(plans))
fig, (mem, comm) = plt.subplots(1, 2, figsize=(11, 3.5))
mem.plot(KS, [p.temporaries_bytes / 2**20 for p in plans], "o-", label="temporaries")
mem.plot(KS, [(p.params_bytes + p.opt_state_bytes) / 2**20 for p in plans], "s--", label="parameters + optimizer")
mem.set(xscale="log", xticks=KS, xticklabels=KS, xlabel="microbatches k", ylabel="MiB per device",
        title=f"memory per device, batch {BATCH}")
mem.legend()
for axis in ("data", "fsdp"):
    comm.plot(KS, [p.comm_bytes(axis=axis) / 2**10 for p in plans], "o-", label=f"collectives over {axis}")
comm.set(xscale="log", xticks=KS, xticklabels=KS, xlabel="microbatches k", ylabel="KiB per step (one device)",
         title="communication per step")
comm.legend()
for ax in (mem, comm):
    ax.minorticks_off()
fig.tight_layout()
plt.show()
temporaries = [p.temporaries_bytes for p in plans]
assert temporaries[-1] < temporaries[0], temporaries
assert len({p.comm_bytes(axis="data") for p in plans}) == 1, [p.comm_bytes(axis="data") for p in plans]

# %% [markdown]
# From a terminal: `shardml plan tiny --compare train.microbatches=1 train.microbatches=8`, and
# `shardml train tiny train.microbatches=4` to train with it. Raise k when the activations of one
# step do not fit; with a pipeline, `pipeline.microbatches` comes first (see `pipeline.ipynb`).
