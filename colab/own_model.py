# %% [markdown]
# # Your own Flax model and data, with checkpoints and resume
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/your-org/shardml/blob/main/colab/own_model.ipynb)
#
# A Flax NNX module of your own, trained by `shardml.fit` on a 2 x 2 x 2 mesh from your own NumPy
# data, with checkpoints; then a run interrupted half-way and resumed (bitwise the same result as
# a run that never stopped), a resume on another mesh, and the trained parameters loaded back for
# predictions.

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
# Sizes: small on CPU (the tests run this notebook on CPU), larger on a TPU.
SMALL = BACKEND == "cpu"
FEATURES, CLASSES = 32, 10
HIDDEN = 128 if SMALL else 2048
BATCH = 64 if SMALL else 1024
STEPS = 40 if SMALL else 1000
CHECKPOINT_EVERY = 10 if SMALL else 250

# %% [markdown]
# ## The model
#
# An ordinary NNX module. The only shardml-specific thing in it is what Flax already offers:
# `nnx.with_partitioning` names the *logical* axes of each weight; shardml's rules map `embed` to
# the `fsdp` mesh axis and `mlp` to `tensor` (`shardml.Rules.default()`). Unannotated parameters
# (the biases here) are replicated. Dropout draws one key per example, so it is the same on every
# layout.

# %%
import json
import os
import pathlib

import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.hidden = nnx.Linear(FEATURES, HIDDEN, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
                                 rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, CLASSES, kernel_init=nnx.with_partitioning(init, ("mlp", "classes")), rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(nnx.relu(self.hidden(x))))


model = shardml.from_nnx(MLP)  # a function rngs -> module: each seed gets its own initialisation
print(f"{model.num_params:,} parameters; logical axes read from the module:")
print(model.logical)

# %% [markdown]
# ## Your data
#
# Any of these plugs into `fit`: a source with `batch(step)` (`shardml.ArrayBatches` over your
# arrays, `shardml.TextBatches` over tokens), a function `step -> batch`, a list of batches, or an
# iterator. A batch is a dict of host NumPy arrays with `inputs` and what the loss reads
# (`targets`, and `mask` for padding). Here: ten Gaussian clusters, made up on the spot, as
# arrays. When the batch of step s is a function of s (arrays and functions), a resumed run sees
# exactly the batches it would have seen.

# %%
rng = np.random.default_rng(0)
centers = rng.normal(size=(CLASSES, FEATURES))
labels = rng.integers(0, CLASSES, 4000)
points = centers[labels] + 1.5 * rng.normal(size=(len(labels), FEATURES))
examples = shardml.split_examples("clusters", points, labels, val_fraction=0.2)  # shuffled, then split
data = shardml.ArrayBatches(examples, batch_size=BATCH)  # a new permutation every epoch
print({key: (value.shape, value.dtype) for key, value in data.batch(0).items()})


def fresh_batches(step):  # the same thing as a function: new points every step, a pure function of step
    r = np.random.default_rng([1, step])
    y = r.integers(0, CLASSES, BATCH)
    return {"inputs": (centers[y] + 1.5 * r.normal(size=(BATCH, FEATURES))).astype(np.float32),
            "targets": y.astype(np.int32)}


print({key: value.shape for key, value in fresh_batches(0).items()})

# %% [markdown]
# ## Train, with checkpoints
#
# `out_dir` turns on metrics (`metrics.jsonl`), the run record (`run.json`) and checkpoints of the
# whole state every `checkpoint_every` steps and at the end. `fresh=True` moves an earlier run in
# that directory aside, so the notebook can run again.

# %%
optimizer = optax.adamw(3e-3)
settings = {"loss": shardml.classification, "mesh": {"data": 2, "fsdp": 2, "tensor": 2},
            "eval_data": data.eval_batches(), "checkpoint_every": CHECKPOINT_EVERY, "log_every": 5, "verbose": False}
whole = shardml.fit(model, data, optimizer, steps=STEPS, out_dir="runs/own_model/whole", fresh=True, **settings)
print("validation:", whole.val)
print("checkpoints:", sorted(os.listdir("runs/own_model/whole/checkpoints"), key=int))
records = [json.loads(line) for line in pathlib.Path("runs/own_model/whole/metrics.jsonl").read_text().splitlines()]
plt.plot([r["step"] for r in records], [r["loss"] for r in records], label="training loss")
plt.plot([r["step"] for r in records], [r["accuracy"] for r in records], label="training accuracy")
plt.xlabel("step")
plt.legend()
plt.show()

# %% [markdown]
# ## Interrupted and resumed
#
# A second run stops half-way (as if the machine were preempted: `SIGTERM` or Ctrl-C would also
# save a checkpoint and stop). Calling `fit` again with the same `out_dir` restores the latest
# checkpoint (`resume="auto"`, the default) and finishes. The batches, dropout masks and every
# update are functions of the step, so the result is bitwise that of the run that never stopped.

# %%
half = shardml.fit(model, data, optimizer, steps=STEPS // 2, out_dir="runs/own_model/resumed", fresh=True, **settings)
resumed = shardml.fit(model, data, optimizer, steps=STEPS, out_dir="runs/own_model/resumed", **settings)
print(f"stopped at step {int(half.state.step)}; the second call resumed from step {resumed.resumed_from}")
pairs = list(zip(jax.tree.leaves(jax.device_get(whole.state.params)),
                 jax.tree.leaves(jax.device_get(resumed.state.params))))
same = all(np.array_equal(a, b) for a, b in pairs)
print("final parameters bitwise equal to the uninterrupted run:", same)
assert resumed.resumed_from == STEPS // 2
assert same if SMALL else all(np.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in pairs)  # bitwise tested on CPU

# %% [markdown]
# ## Resumed on another mesh
#
# A checkpoint is restored with the shardings of the *current* mesh, so a run saved on
# data=2 x fsdp=2 x tensor=2 goes on with FSDP over all 8 devices.

# %%
longer = shardml.fit(model, data, optimizer, steps=STEPS + CHECKPOINT_EVERY, out_dir="runs/own_model/resumed",
                     **{**settings, "mesh": {"fsdp": 8}})
print(f"resumed from step {longer.resumed_from} on {shardml.layout_name(longer.mesh)}; validation {longer.val}")
print("hidden kernel, sharded as", longer.state.params["hidden"]["kernel"].sharding.spec)

# %% [markdown]
# ## The trained parameters
#
# `shardml.load_params` reads the latest checkpoint's parameters, checked against the checksums
# saved with them: onto any trainer's mesh (here the first run's), or as NumPy arrays without a
# target. `trainer.predict` gives the model's deterministic outputs (dropout off).

# %%
trainer = whole.trainer
params = shardml.load_params("runs/own_model/whole", trainer.abstract_state().params)
batch = data.eval_batches()[0]
logits = trainer.predict(params, trainer.put_eval(batch)["inputs"])
accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == batch["targets"]))
print(f"accuracy on the first validation batch: {accuracy:.3f}")
print("on the host:", jax.tree.map(lambda a: (type(a).__name__, a.shape), shardml.load_params("runs/own_model/whole")))
assert accuracy > 0.5

# %% [markdown]
# The same from a terminal for the reference models: `shardml train tiny out_dir=runs/tiny`, and
# again to resume. Next: `populations.ipynb` trains many copies of a model like this one at once.
