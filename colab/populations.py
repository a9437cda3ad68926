# %% [markdown]
# # Populations: ensembles, sweeps and PBT in one compiled step
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/your-org/shardml/blob/main/colab/populations.ipynb)
#
# N copies of a model trained at once: their states are stacked on a leading axis, one vmapped
# step trains them all, and the stack is sharded over the `members` mesh axis. An ensemble's
# members differ by initialisation, a sweep's by hyperparameters, and population-based training
# (PBT) copies good members over bad ones as it goes. Each member is exactly the model you would
# have trained alone with its seed and hyperparameters, which this notebook checks too.

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
# Sizes: small on CPU (the tests run this notebook on CPU), longer runs on a TPU.
SMALL = BACKEND == "cpu"
MEMBERS = 8
HIDDEN = 64 if SMALL else 256
STEPS = 60 if SMALL else 600
PBT_EVERY = 20 if SMALL else 100  # PBT's exploit/explore interval in steps

# %% [markdown]
# ## An ensemble
#
# `shardml.fit(..., members=8)`: member i initialises from seed + i. On
# `members=2 x data=2 x tensor=2`, each group of 4 devices holds 4 members and splits their batch
# and weights as usual. `shardml.ensemble_metrics` scores every member and the ensemble (the mean of
# the members' probabilities).

# %%
import json
import pathlib

import matplotlib.pyplot as plt
import numpy as np
from flax import nnx


class Classifier(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.hidden = nnx.Linear(64, HIDDEN, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs)
        self.out = nnx.Linear(HIDDEN, 10, kernel_init=nnx.with_partitioning(init, ("mlp", "classes")), rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


model = shardml.from_nnx(Classifier)
digits = shardml.ArrayBatches(shardml.load_digits(), batch_size=64)  # scikit-learn's 8x8 digits
optimizer = shardml.default_optimizer(shardml.OptimConfig(lr=1e-2, warmup=10, weight_decay=0.0), steps=STEPS)

ensemble = shardml.fit(model, digits, optimizer, loss=shardml.classification, steps=STEPS, members=MEMBERS,
                       mesh={"members": 2, "data": 2, "tensor": 2}, verbose=False)
print("stacked kernel:", ensemble.state.params["hidden"]["kernel"].shape,
      ensemble.state.params["hidden"]["kernel"].sharding.spec)
scores = shardml.ensemble_metrics(ensemble.trainer, ensemble.state.params, digits.eval_batches())
print({k: round(v, 4) for k, v in scores.items() if not isinstance(v, list)})
plt.bar(range(MEMBERS), scores["member_accuracy"], label="members")
plt.axhline(scores["accuracy"], color="black", label="ensemble")
plt.ylim(min(scores["member_accuracy"]) - 0.05, 1)
plt.xlabel("member")
plt.ylabel("validation accuracy")
plt.legend()
plt.show()

# %% [markdown]
# ## A sweep
#
# `hyperparams` gives each member its own value of the optimizer's injected hyperparameters (here
# the learning rate). `shardml.default_optimizer` keeps `lr`, `b1`, `b2`, `weight_decay` and
# `clip_norm` as arrays in the optimizer state (`optax.inject_hyperparams`), so one compiled step
# serves every value.

# %%
rates = [1e-3, 3e-3, 1e-2, 3e-2]
sweep = shardml.fit(model, digits, optimizer, loss=shardml.classification, steps=STEPS, members=len(rates),
                    hyperparams={"lr": rates}, eval_data=digits.eval_batches(), verbose=False)
for rate, loss, accuracy in zip(rates, sweep.val["loss"], sweep.val["accuracy"]):
    print(f"lr {rate:g}: validation loss {loss:.4f}, accuracy {accuracy:.4f}")
plt.semilogx(rates, sweep.val["loss"], "o-")
plt.xlabel("learning rate")
plt.ylabel("validation loss")
plt.show()

# %% [markdown]
# ### A member is a model
#
# Member 2 of the sweep, trained alone: the same initialisation seed (2), learning rate and data.
# Its loss at every logged step matches the member's.

# %%
alone = shardml.fit(model, digits, shardml.default_optimizer(shardml.OptimConfig(lr=rates[2], warmup=10,
                                                                                 weight_decay=0.0), steps=STEPS),
                    loss=shardml.classification, steps=STEPS, seed=2, eval_data=digits.eval_batches(), verbose=False)
member = [r["loss"] for r in sweep.records if r["member"] == 2]
single = [r["loss"] for r in alone.records]
print(f"largest relative difference over {len(single)} logged steps: "
      f"{np.max(np.abs(np.subtract(member, single)) / np.abs(single)):.1e}")
assert np.allclose(member, single, rtol=1e-4 if SMALL else 1e-2), (member, single)

# %% [markdown]
# ## Population-based training, from a config
#
# PBT runs from a config like any `shardml train` run: every `population.ready_every` steps the
# worst quarter of the members copy the parameters and optimizer state of a better one (on device,
# along the sharded member axis) and multiply its hyperparameters by 0.8 or 1.2. The lineage and
# each member's final hyperparameters land in `OUT_DIR/population.json`. The same run from a
# terminal: `shardml train configs/digits.yaml population.kind=pbt population.size=8
# 'optim.lr=loguniform(1e-4,1e-1)' population.ready_every=20`.

# %%
cfg = shardml.load_config(None, [
    "model.kind=mlp", f"model.d_ff={HIDDEN}", "model.dtype=float32", "data.corpus=digits", "optim.warmup=10",
    "optim.weight_decay=0.0", "train.batch_size=64", f"train.steps={STEPS}", "train.log_every=5",
    "train.eval_batches=0", "mesh.members=2", "mesh.data=4", "population.kind=pbt", f"population.size={MEMBERS}",
    "optim.lr=loguniform(1e-4,1e-1)", f"population.ready_every={PBT_EVERY}", "out_dir=runs/populations/pbt"])
pbt = shardml.train(cfg, verbose=False, fresh=True)
report = json.loads(pathlib.Path("runs/populations/pbt/population.json").read_text())
for entry in report["members"]:
    print(f"member {entry['member']}: lr {entry['hyperparams']['lr']:.3g}, validation loss {entry['val_loss']:.4f}, "
          f"accuracy {entry['val_accuracy']:.4f} (started as: {' '.join(entry['overrides'])})")

# %%
fig, (losses, rates_ax) = plt.subplots(1, 2, figsize=(12, 4))
for entry in report["members"]:
    i = entry["member"]
    records = [r for r in pbt.records if r["member"] == i]
    losses.plot([r["step"] for r in records], [r["loss"] for r in records], label=f"member {i}")
    start = float(next(o.split("=")[1] for o in entry["overrides"] if o.startswith("optim.lr=")))
    steps, values = [0], [start]
    for event in entry.get("lineage", []):
        steps.append(event["step"])
        values.append(event["hyperparams"]["lr"])
    steps.append(STEPS)
    values.append(values[-1])
    rates_ax.step(steps, values, where="post")
for step in range(PBT_EVERY, STEPS, PBT_EVERY):
    losses.axvline(step, color="grey", linestyle=":")
losses.set(xlabel="step", ylabel="training loss", yscale="log", title="members (dotted: exploit / explore)")
losses.legend(fontsize=7)
rates_ax.set(xlabel="step", ylabel="learning rate", yscale="log", title="each member's learning rate")
fig.tight_layout()
plt.show()
copies = [(e["step"], e["member"], e["copied_from"]) for m in report["members"] for e in m.get("lineage", [])]
print(f"{len(copies)} copies (step, member, copied from): {sorted(copies)}")
print("best member:", report["best"], report["members"][report["best"]]["hyperparams"])
assert copies, "PBT copied no member"
