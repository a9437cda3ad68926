# %% [markdown]
# # Fine-tune with LoRA; a sweep of adapters in one step
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/your-org/shardml/blob/main/colab/lora.ipynb)
#
# Low-rank adapters (LoRA) train a few small matrices beside a frozen model: `shardml.lora` wraps a
# transformer (shardml's own, or an open model from `shardml.load_hf`) so that each targeted
# projection computes `x W + (alpha / r) x A B`, with `W` frozen and only `A`, `B` trained. Here a
# tiny Llama-shaped model learns to name Python standard-library functions from their docstrings.
# One adapter is trained first; then a population of 4 adapters, each with its own learning rate,
# trains in one compiled step over one shared base (stored once, only the adapters stacked on the
# `members` axis). Finally an adapter is merged into the weights (`shardml.merge_lora`, for
# `shardml.save_hf`) and saved in PEFT's format (`shardml.save_peft`, for `peft.PeftModel`).

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
# Sizes: small on CPU (the tests run this notebook on CPU), larger on an accelerator.
SMALL = BACKEND == "cpu"
D_MODEL = 32 if SMALL else 256
LAYERS = 2 if SMALL else 4
SEQ = 128
STEPS = 20 if SMALL else 500
MEMBERS = 4

# %% [markdown]
# ## Data: docstrings and names from the standard library
#
# Each example is a prompt (the first line of a function's docstring) and a completion (the
# function's name). `shardml.read_sft` tokenizes a JSONL file of them with the loss on the
# completion only; tokens here are plain UTF-8 bytes, so nothing is downloaded.
# `shardml.pack_examples` packs several short examples into each row of `SEQ` tokens.

# %%
import inspect
import json
import math
import os.path
import pathlib
import shutil
import statistics
import string
import tempfile
import textwrap
import types

import numpy as np
import optax


class ByteTokenizer:
    def encode(self, text, add_special_tokens=False):
        return types.SimpleNamespace(ids=list(text.encode("utf-8")))


examples = {}
for module in (math, os.path, string, textwrap, shutil, statistics):
    for name, fn in inspect.getmembers(module, callable):
        doc = (inspect.getdoc(fn) or "").split("\n")[0].strip()
        if not name.startswith("_") and not inspect.isclass(fn) and 12 <= len(doc) <= 90 and name not in doc:
            examples.setdefault(name, doc)
work = pathlib.Path(tempfile.mkdtemp())
(work / "train.jsonl").write_text("".join(
    json.dumps({"prompt": f"Q: {doc}\nA: ", "completion": f"{name}\n"}) + "\n" for name, doc in examples.items()))
sft = shardml.read_sft(str(work / "train.jsonl"), ByteTokenizer(), SEQ, truncate=True)
data = shardml.SFTBatches(shardml.pack_examples(sft, SEQ), batch_size=16, examples=sft)
print(data.describe())
print(next(iter(examples.items())))

# %% [markdown]
# ## One adapter
#
# A Llama-shaped transformer (RMSNorm, rotary positions, SwiGLU, grouped-query attention), its
# weights frozen; adapters of rank 8 on the attention's q, k, v, o projections. `lora_optimizer`
# hands only the adapters to the optimizer (the base gets no update and no optimizer state). In a
# real fine-tune the base is a pretrained model (`shardml.lora(*shardml.load_hf("ckpt/"), ...)`);
# here it is a random one, so the adapters learn the task from scratch, slowly.

# %%
cfg = shardml.TransformerConfig(vocab=256, layers=LAYERS, d_model=D_MODEL, heads=4, kv_heads=2, d_ff=3 * D_MODEL,
                                dtype="float32")
base = shardml.transformer(cfg, SEQ)
base_params = jax.device_get(base.init(jax.random.key(0)))
model = shardml.lora(base, base_params, rank=8, alpha=16, targets=("q", "k", "v", "o"))
mesh = shardml.make_mesh({"data": 8})
trainer = shardml.build_trainer(model, mesh, shardml.lora_optimizer(optax.adamw(3e-3)))
state = trainer.init(0)
counts = {part: sum(x.size for x in jax.tree.leaves(state.params[part])) for part in ("base", "adapters")}
print(f"frozen base: {counts['base']:,} parameters; trained adapters: {counts['adapters']:,}")
losses = []
for step in range(STEPS):
    state, metrics = trainer.step(state, trainer.put(data.batch(step)))
    losses.append(float(metrics["loss"]))
print(f"completion loss: step 0 {losses[0]:.3f} -> step {STEPS - 1} {losses[-1]:.3f}")

# %% [markdown]
# ## A sweep of 4 adapters in one step
#
# `shardml.build_population` stacks 4 members on the `members` mesh axis (here `members=4 x
# data=2`); `hyperparams` gives each its own learning rate (injected into the optimizer state, so
# one compiled step serves all four). The frozen base is stored once, laid out as a single model's,
# and shared by every member: only the adapters carry the members axis.

# %%
rates = [1e-3, 3e-3, 1e-2, 3e-2]
sweep_optimizer = optax.inject_hyperparams(lambda learning_rate: shardml.lora_optimizer(
    optax.adamw(learning_rate)))(learning_rate=1e-3)
population = shardml.build_population(model, shardml.make_mesh({"members": MEMBERS, "data": 2}), sweep_optimizer,
                                      MEMBERS, hyperparams={"learning_rate": rates})
pop_state = population.init(0)
print("base:", pop_state.params["base"]["layers"]["wq"].shape, "(once);",
      "adapter a of wq:", pop_state.params["adapters"]["layers"]["wq"]["a"].shape, "(one per member)")
for step in range(STEPS):
    pop_state, pop_metrics = population.step(pop_state, population.put(data.batch(step)))
member_losses = np.asarray(pop_metrics["loss"])
for rate, loss in zip(rates, member_losses):
    print(f"learning rate {rate:g}: last-step completion loss {loss:.3f}")
best = int(np.argmin(member_losses))

# %% [markdown]
# ## Merge and save
#
# The best member's adapters, merged into the weights (`W + (alpha / r) A B`) for
# `shardml.save_hf` (a checkpoint `transformers` loads), and saved alone in PEFT's format
# (`adapter_config.json` + `adapter_model.safetensors`, for `peft.PeftModel.from_pretrained` on
# the base). The merged model gives the LoRA model's logits.

# %%
params = jax.device_get(pop_state.params)
member = {"base": params["base"], "adapters": jax.tree.map(lambda x: x[best], params["adapters"])}
merged_model, merged = shardml.merge_lora(model, member)
tokens = np.asarray(data.batch(0)["inputs"]["tokens"][:2])
gap = np.abs(np.asarray(jax.jit(model.apply)(member, tokens)) - np.asarray(jax.jit(merged_model.apply)(merged, tokens)))
print(f"member {best}: merged vs LoRA logits, largest difference {gap.max():.2e}")
shardml.save_hf(merged_model, merged, str(work / "merged"))
shardml.save_peft(model, member, str(work / "adapter"))
for folder in ("merged", "adapter"):
    print(folder, sorted(p.name for p in (work / folder).iterdir()))
