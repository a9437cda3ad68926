# %% [markdown]
# # Start from an open model: load, evaluate, generate, export
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/your-org/shardml/blob/main/colab/open_model.ipynb)
#
# A Hugging Face checkpoint (Llama, Qwen2/2.5, Qwen3, Mistral, Gemma 2/3) read straight into the
# shardings of a device mesh with `shardml.load_hf`, evaluated and decoded greedily there, written
# back with `shardml.save_hf` and loaded by `transformers`, which gives the same logits. On a TPU
# runtime it loads a real open model from the Hub (`Qwen/Qwen2.5-0.5B`, downloaded through
# `huggingface_hub`); on CPU (and in the tests, which have no network) a tiny random Llama that
# `transformers` builds and saves here. Colab ships `transformers` and `torch`; elsewhere
# `pip install transformers torch safetensors`.

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
# Sizes: a tiny random Llama on CPU, a real 0.5B open model on a TPU.
SMALL = BACKEND == "cpu"
REPO_ID = "Qwen/Qwen2.5-0.5B"  # TPU: any Llama / Qwen2 / Qwen3 / Mistral / Gemma 2-3 repo id (14 heads, 2 kv heads)
LAYOUT = {"data": 2, "fsdp": 2, "tensor": 2}  # tensor must divide the key/value heads
SEQ = 32 if SMALL else 256  # evaluation window
ROWS = 8  # windows per evaluation batch
NEW_TOKENS = 16 if SMALL else 32

# %% [markdown]
# ## A checkpoint
#
# On CPU: a random Llama of 2 layers with a byte-sized vocabulary (256), so that text is encoded
# as its UTF-8 bytes; saved as sharded safetensors with their index, as checkpoints on the Hub
# are. On a TPU: the repo id itself (`load_hf` downloads it, honouring the Hugging Face cache) and
# its own tokenizer.

# %%
import os
import tempfile
import time

import numpy as np
import torch
import transformers

if SMALL:
    CHECKPOINT = os.path.join(tempfile.mkdtemp(), "tiny-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    transformers.LlamaForCausalLM(config).save_pretrained(CHECKPOINT, max_shard_size="100KB")
    print(sorted(os.listdir(CHECKPOINT)))

    def encode(text):
        return list(text.encode())

    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")
else:
    CHECKPOINT = REPO_ID
    tokenizer = transformers.AutoTokenizer.from_pretrained(REPO_ID)
    encode, decode = tokenizer.encode, tokenizer.decode

# %% [markdown]
# ## Load onto the mesh
#
# `load_hf` builds the family's transformer from `config.json`, checks every tensor's shape and
# that the layout divides the heads before reading anything, then reads each device's block of
# each tensor from the memory-mapped files: no host ever holds the whole model. The parameters
# come back float32 (what shardml trains), already in the mesh's shardings.

# %%
mesh = shardml.make_mesh(LAYOUT)
start = time.perf_counter()
model, params = shardml.load_hf(CHECKPOINT, mesh=mesh, dtype="float32")
print(f"{model.num_params:,} parameters loaded in {time.perf_counter() - start:.1f}s onto {shardml.layout_name(mesh.shape)}")
print("wq:", params["layers"]["wq"].shape, params["layers"]["wq"].sharding.spec)

# %% [markdown]
# ## Evaluate
#
# The next-token loss over held-out text (Python's documentation, which ships with shardml),
# every prediction once, by a trainer's compiled evaluation (`shardml.evaluate`; the optimizer is
# not used). `transformers`' PyTorch forward on the same windows must give the same loss.

# %%
import optax

text = bytes(shardml.load_tokens("pydoc").val[:20_000].tolist()).decode("utf-8", errors="ignore")
ids = np.array(encode(text)[:ROWS * SEQ * 2 + 1])  # two full batches
batches = list(shardml.held_out_batches(ids, seq_len=SEQ, rows=ROWS))
trainer = shardml.build_trainer(model, mesh, optax.sgd(0.0))
loss = shardml.evaluate(trainer, params, batches)["loss"]

reference = transformers.AutoModelForCausalLM.from_pretrained(CHECKPOINT, dtype=torch.float32).eval()
with torch.no_grad():
    losses = [torch.nn.functional.cross_entropy(reference(torch.tensor(b["inputs"])).logits.flatten(0, 1),
                                                torch.tensor(b["targets"]).flatten().long()).item() for b in batches]
print(f"shardml loss {loss:.5f} nats/token, transformers {np.mean(losses):.5f}")
np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-4 if SMALL else 1e-2)  # a TPU multiplies f32 in bf16 passes

# %% [markdown]
# ## Generate
#
# `shardml.generate` decodes prompts of different lengths at once with a KV cache sharded like
# the activations; greedy here. `transformers`' greedy `generate` gives the same tokens (asserted
# on CPU, where both compute in float32; a random model's bytes are gibberish).

# %%
PROMPTS = ["def main():", "The sum of"]
gen = shardml.generate(model, params, [encode(p) for p in PROMPTS], mesh=mesh, max_new_tokens=NEW_TOKENS)
reference.generation_config.eos_token_id = None  # run for all the tokens, as shardml does without stop tokens
reference.generation_config.pad_token_id = 0
for prompt, new in zip(PROMPTS, gen.tokens):
    prompt_ids = encode(prompt)
    with torch.no_grad():
        want = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
    want = want[0, len(prompt_ids):].tolist()
    print(repr(prompt), "->", repr(decode(new.tolist())))
    if SMALL:
        assert new.tolist() == want, (new.tolist(), want)

# %% [markdown]
# ## Export and load in transformers
#
# `save_hf` gathers one tensor at a time and writes safetensors (sharded with an index above
# `max_shard_bytes`) and `config.json`, keeping the checkpoint's own dtype and context length.
# (Train first, with `shardml.build_trainer` or `shardml.fit`, to hand back a changed model.)

# %%
import json

import jax

OUT = os.path.join(tempfile.mkdtemp(), "export")
shardml.save_hf(model, params, OUT)
declared = json.load(open(os.path.join(OUT, "config.json")))
print(sorted(os.listdir(OUT)), declared["architectures"], declared["dtype"], declared["max_position_embeddings"])
exported = transformers.AutoModelForCausalLM.from_pretrained(OUT, dtype=torch.float32).eval()
tokens = ids[None, :SEQ]
with torch.no_grad():
    want = exported(torch.tensor(tokens)).logits.numpy()
got = np.asarray(jax.jit(model.apply)(jax.device_put(params, jax.devices()[0]), tokens))
error = np.abs(got - want).max() / np.abs(want).max()
print(f"largest logit difference, shardml vs the export in transformers: {error:.1e} of the largest logit")
assert error < (1e-4 if SMALL else 1e-2)
