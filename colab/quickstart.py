# %% [markdown]
# # Quickstart: train, change the layout, get the same losses
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/your-org/shardml/blob/main/colab/quickstart.ipynb)
#
# Train shardml's reference transformer, then train it again on other device layouts (FSDP,
# tensor parallelism) and see that every layout gives the same losses. In shardml a layout is
# configuration, not a change to the model.
#
# On a Colab TPU runtime (8 cores) it trains the `default` preset; anywhere else it runs the
# `tiny` preset on 8 emulated CPU devices in under a minute.

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
# Sizes: small on CPU (the tests run this notebook on CPU), the default preset on a TPU.
SMALL = BACKEND == "cpu"
PRESET = "tiny" if SMALL else "default"
STEPS = 12 if SMALL else 200

# %% [markdown]
# ## Train
#
# A run is one config: a preset (`tiny`, `default`, or a YAML file of your own) and `key=value`
# overrides, exactly as on the command line (`shardml train tiny train.steps=12`). `shardml.train`
# prints a short header (the mesh, the model; the full resolved config is in `out_dir/config.yaml`,
# and `full_config=True` prints it), trains, evaluates and writes metrics and checkpoints in
# `out_dir`. The progress bar's `mfu_vs_matmul` (on CPU) is the model's FLOP/s over this host's
# measured matmul throughput, not a hardware peak; on a TPU or GPU it is `mfu`, against the datasheet.

# %%
import matplotlib.pyplot as plt
import numpy as np


def layout(**sizes):
    """Overrides that put the run on a mesh with these axis sizes (the others 1)."""
    return [f"mesh.{axis}={sizes.get(axis, 1)}" for axis in shardml.MESH_AXES]


base = [f"train.steps={STEPS}", "train.log_every=1", "checkpoint.every=0"]
cfg = shardml.load_config(PRESET, base + layout(data=2, fsdp=2, tensor=2) + ["out_dir=runs/quickstart/first"])
summary = shardml.train(cfg, fresh=True)  # fresh: start over if the notebook runs again

# %%
steps = [r["step"] for r in summary.records]
plt.plot(steps, [r["loss"] for r in summary.records], "o-")
plt.xlabel("step")
plt.ylabel("training loss")
plt.title(f"{PRESET} on {shardml.layout_name(summary.mesh)}")
plt.show()
print("validation:", summary.val)

# %% [markdown]
# ## Change the layout
#
# The same run on two other meshes: all 8 devices on FSDP (ZeRO-3), and data parallel x Megatron
# tensor parallel. This time with the pieces `shardml.train` is made of: `shardml.run_parts` gives
# the trainer (the compiled init and step of this model on this mesh) and the data the config
# describes, and a plain loop steps it. The global batch, the data order, the initialisation and the
# random numbers of every example are the same on every layout, so the losses agree step by step (to
# float rounding: about 1e-6 in float32; bfloat16 compute, the `default` preset's, is looser).

# %%
first = np.array([r["loss"] for r in summary.records])  # the run above, on data=2 x fsdp=2 x tensor=2


def losses_on(overrides):
    # config -> model, data and trainer, as shardml.train builds them
    parts = shardml.run_parts(shardml.load_config(PRESET, base + overrides))
    state = parts.trainer.init(seed=parts.cfg.train.seed)  # created already sharded
    losses = []
    for step in range(STEPS):
        state, metrics = parts.trainer.step(state, parts.trainer.put(parts.data.batch(step)))
        losses.append(float(metrics["loss"]))
    return np.array(losses)


losses = {"data=2 x fsdp=2 x tensor=2": first,
          "fsdp=8": losses_on(layout(fsdp=8)),
          "data=2 x tensor=4": losses_on(layout(data=2, tensor=4))}
reference = losses["data=2 x fsdp=2 x tensor=2"]
for (name, curve), style in zip(losses.items(), ("-", "--", ":")):
    gap = np.max(np.abs(curve - reference) / reference)
    print(f"{name:<28} final loss {curve[-1]:.5f}   largest relative gap to the first run {gap:.1e}")
    plt.plot(steps, curve, style, label=name, linewidth=3 if style == "-" else 2)  # on top of each other
plt.xlabel("step")
plt.ylabel("training loss")
plt.legend()
plt.show()
if SMALL:  # float32: the layouts agree to rounding
    assert all(np.allclose(curve, reference, rtol=1e-4) for curve in losses.values()), losses

# %% [markdown]
# ## Next
#
# - `layouts.ipynb`: what each layout (pipelines too) costs in memory and communication, and where
#   each parameter lives.
# - `multibatch.ipynb`: k microbatches in one step, the same update as one big batch.
# - `own_model.ipynb`: your own Flax model and data, with checkpoints and resume.
#
# The same runs from a terminal: `shardml train tiny mesh.data=2 mesh.tensor=4`.
