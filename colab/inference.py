# %% [markdown]
# # Inference: sharded evaluation and KV-cache generation
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/your-org/shardml/blob/main/colab/inference.ipynb)
#
# Evaluation over a whole held-out set and text generation with a KV cache, sharded as training
# shards. Evaluation batches are split over the batch axes with the weights where the trainer keeps
# them; generation runs a prefill and a compiled decode loop over a key/value cache sharded like
# the activations (batch over `data` x `fsdp`, key/value heads over `tensor`). This notebook
# trains a tiny byte-level transformer for a moment, evaluates it on two layouts and against a
# one-device computation written here, generates text, checks the KV-cache decode against a plain
# decode that reruns the whole sequence for every token, and draws what the cache costs.

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
# Sizes: small on CPU (the tests run this notebook on CPU), a larger model and longer training on a TPU.
SMALL = BACKEND == "cpu"
CONFIG = (shardml.TransformerConfig(layers=2, d_model=64, heads=4, d_ff=256, dtype="float32") if SMALL else
          shardml.TransformerConfig(layers=4, d_model=256, heads=8, d_ff=1024, dtype="float32"))
SEQ = 64 if SMALL else 256  # the context: training windows, and the longest prompt + continuation
BATCH = 16 if SMALL else 64
STEPS = 100 if SMALL else 1000
NEW_TOKENS = 32 if SMALL else 128

# %% [markdown]
# ## A model to run
#
# `shardml.transformer` is the reference decoder (byte-level here: 256 token ids), trained by
# `shardml.fit` on `data=2 x fsdp=2 x tensor=2` over the Python documentation corpus that ships
# with shardml. `summary.trainer` is what trained it, and its compiled evaluation is what the
# next section uses.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

tokens = shardml.load_tokens("pydoc")  # byte-level: train and validation streams of ids 0..255
model = shardml.transformer(CONFIG, seq_len=SEQ)
optimizer = shardml.default_optimizer(shardml.OptimConfig(lr=1e-2, warmup=10), steps=STEPS)
summary = shardml.fit(model, shardml.TextBatches(tokens, batch_size=BATCH, seq_len=SEQ), optimizer, steps=STEPS,
                      mesh={"data": 2, "fsdp": 2, "tensor": 2}, verbose=False)
trainer, params = summary.trainer, summary.state.params
print(f"{model.num_params:,} parameters; training loss {summary.records[0]['loss']:.3f} at step 1, "
      f"{summary.records[-1]['loss']:.3f} at step {STEPS}")

# %% [markdown]
# ## Evaluation over the whole held-out set, on two layouts
#
# `shardml.held_out_batches` cuts the validation stream into windows so that every next-token
# prediction is made exactly once; the last window and the last batch are padded, and the padding
# is masked. `shardml.evaluate` runs a trainer's compiled evaluation over them and gives the means
# (`loss`: nats per byte here): the sums are added in float64 on the host and divided once at the
# end, so the padding counts nothing.
#
# The second layout is another trainer of the same model on `fsdp=2 x tensor=4`: the parameters
# only move to its shardings (`jax.device_put`), as a checkpoint restored onto another mesh would.
# Both must give the mean loss of a plain one-device computation written here.

# %%
import jax.numpy as jnp

ROWS = 64  # windows per evaluation batch


def held_out():
    return shardml.held_out_batches(tokens.val, seq_len=SEQ, rows=ROWS)


other = shardml.build_trainer(model, shardml.make_mesh({"fsdp": 2, "tensor": 4}), optimizer)
layouts = {"data=2 x fsdp=2 x tensor=2": (trainer, params),
           "fsdp=2 x tensor=4": (other, jax.device_put(params, other.state_shardings.params))}
results = {}
predictions = sum(int(batch["mask"].sum()) for batch in held_out())
assert predictions == len(tokens.val) - 1, "every next-token prediction of the stream is made once"
for name, (t, p) in layouts.items():
    start = time.perf_counter()
    results[name] = shardml.evaluate(t, p, held_out())["loss"]
    seconds = time.perf_counter() - start
    print(f"{name:<28} {predictions:,} predictions: loss {results[name]:.6f} nats/byte, perplexity "
          f"{np.exp(results[name]):.4f}; {predictions / seconds:,.0f} tokens/s, compiling included")

# The same figure on one device, written here: log-softmax of the logits, the target's entry, masked.
device = jax.devices()[0]
plain_params = jax.device_put(jax.device_get(trainer.natural(params)), device)


@jax.jit
def nll_sum(params, inputs, targets, mask):
    logp = jax.nn.log_softmax(model.apply(params, inputs).astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * mask)


total = count = 0.0
for batch in held_out():
    arrays = (jax.device_put(batch[k], device) for k in ("inputs", "targets", "mask"))
    total += float(nll_sum(plain_params, *arrays))
    count += float(batch["mask"].sum())
print(f"{'one device, written here':<28} {int(count):,} predictions: loss {total / count:.6f}")
for name, loss in results.items():  # float32 on CPU; a TPU multiplies f32 at lower precision by default
    np.testing.assert_allclose(loss, total / count, rtol=1e-5 if SMALL else 1e-3, err_msg=f"{name} vs one device")

# %% [markdown]
# ## Generation with a KV cache
#
# `shardml.generate` takes prompts of any lengths at once: they are right-aligned in one batch
# and run through the model in one prefill, which fills a cache of keys and values for every
# layer; a compiled `lax.while_loop` then adds one token per row per step, attending over the
# cache instead of rerunning the sequence. Greedy decoding (temperature 0, the default) picks the
# most likely byte each time; `temperature`, `top_k` and `top_p` sample instead, from `seed`.

# %%
PROMPTS = ["def ", "The value of ", "    return "]
prompts = [list(p.encode()) for p in PROMPTS]


def text(prompt, new):
    return repr(prompt + bytes(new).decode("utf-8", errors="replace"))


gen = shardml.generate(CONFIG, trainer.natural(params), prompts, mesh=trainer.mesh, max_new_tokens=NEW_TOKENS,
                       context=SEQ)
for prompt, new in zip(PROMPTS, gen.tokens):
    print("greedy: ", text(prompt, new.tolist()))
print(f"prefill {gen.prefill_tokens_per_s:,.0f} tokens/s, decode {gen.decode_tokens_per_s:,.0f} tokens/s "
      f"({gen.decode_steps} decode steps; compiling took {gen.compile_seconds:.1f}s)")
sampled = shardml.generate(CONFIG, trainer.natural(params), prompts, mesh=trainer.mesh, max_new_tokens=NEW_TOKENS,
                           context=SEQ, temperature=1.0, seed=1)
for prompt, new in zip(PROMPTS, sampled.tokens):
    print("sampled:", text(prompt, new.tolist()))

# %% [markdown]
# A model this small, trained this briefly, loops when decoded greedily; sampling at temperature 1
# gives it some variety (and the check below more to compare).
#
# ### The cache changes the cost, not the tokens
#
# The plain way to decode: keep each sequence in a buffer and, for every new token, run the whole
# model over the whole buffer and pick the next token from the logits at the sequence's last
# position. Causal attention makes whatever follows that position irrelevant, so one fixed-length
# buffer (one compile) serves every step. It is written here on one device, greedy (the argmax)
# and sampled with the keys `generate` documents (prompt r's new token i draws with
# `fold_in(fold_in(key(seed), r), i)`); the KV-cache decode on the 8 devices must give the same
# tokens.

# %%
forward = jax.jit(model.apply)


def plain_decode(temperature=0.0, seed=0):
    """New tokens of every prompt, each from a forward pass over the whole buffer."""
    buffer = np.zeros((len(prompts), max(map(len, prompts)) + NEW_TOKENS), np.int32)
    cursor = [len(p) for p in prompts]
    for row, prompt in enumerate(prompts):
        buffer[row, :len(prompt)] = prompt
    out = [[] for _ in prompts]
    for i in range(NEW_TOKENS):
        logits = np.asarray(forward(plain_params, buffer))
        for row in range(len(prompts)):
            last = logits[row, cursor[row] - 1]
            if temperature:
                key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), row), i)
                token = int(jax.random.categorical(key, last / np.float32(temperature)))
            else:
                token = int(np.argmax(last))
            out[row].append(token)
            buffer[row, cursor[row]] = token
            cursor[row] += 1
    return out


plain_decode()  # compiles the forward pass before timing
start = time.perf_counter()
plain = plain_decode()
plain_seconds = time.perf_counter() - start
plain_sampled = plain_decode(temperature=1.0, seed=1)
for what, cached, reference in (("greedy", gen, plain), ("sampled", sampled, plain_sampled)):
    agree = sum(a == b for row, new in zip(reference, cached.tokens) for a, b in zip(row, new.tolist()))
    print(f"{what:<8} KV cache vs plain decode: {agree} of {len(prompts) * NEW_TOKENS} tokens agree "
          f"({len({t for row in reference for t in row})} distinct tokens)")
if SMALL:  # float32 on CPU: the same arithmetic up to rounding, the same tokens
    assert [new.tolist() for new in gen.tokens] == plain, "greedy KV-cache decode vs the plain decode written here"
    assert [new.tolist() for new in sampled.tokens] == plain_sampled, "sampled KV-cache decode vs the plain decode"
    assert len({t for row in plain_sampled for t in row}) > 10, "an uninformative reference: the check would be weak"
print(f"greedy decode speed: plain decode on one device {len(prompts) * NEW_TOKENS / plain_seconds:,.0f} tokens/s, "
      f"KV cache on {shardml.layout_name(summary.mesh)} {gen.decode_tokens_per_s:,.0f} tokens/s")


# %% [markdown]
# ## What the cache costs
#
# The cache holds a key and a value vector per layer, row, slot and key/value head:
# `2 x layers x rows x slots x kv_heads x head_dim` numbers in the compute dtype. Rows are split
# over `data` x `fsdp` and key/value heads over `tensor`, so each device holds its share. The
# slots are the longest prompt rounded up to a multiple of 8, plus the new tokens; the rows are
# the prompts rounded up to a multiple of the batch shards. Below, this closed form against the
# cache `generate` allocated (it measures one device's share), then per device against the
# sequence length for a batch of 64 rows on four layouts (on 8 devices, every layout that splits
# rows and key/value heads over all of them holds an eighth).
#
# What the cache buys is work: with it, a new token at sequence length t costs one token's forward
# pass, about 2 FLOPs per matmul parameter N plus 4 x layers x d_model x t for attention over the
# t cached keys and values; without it, every new token reruns the forward pass over all t tokens
# (about 2Nt + 2 x layers x d_model x t², causal). The right plot draws both.

# %%
def cache_bytes_per_device(rows, slots, sizes, cfg=CONFIG):
    kv_heads = cfg.kv_heads or cfg.heads
    batch_shards = sizes.get("data", 1) * sizes.get("fsdp", 1)
    per_row_slot = 2 * cfg.layers * (kv_heads // sizes.get("tensor", 1)) * (cfg.d_model // cfg.heads)
    return -(-rows // batch_shards) * slots * per_row_slot * np.dtype(cfg.dtype).itemsize


slots = -(-max(map(len, prompts)) // 8) * 8 + NEW_TOKENS
shards = summary.mesh["data"] * summary.mesh["fsdp"]  # the batch shards
rows = -(-len(prompts) // shards) * shards
want = cache_bytes_per_device(rows, slots, summary.mesh)
print(f"cache per device: measured {gen.cache_bytes_per_device:,} bytes, closed form {want:,} "
      f"({rows} rows x {slots} slots)")
assert gen.cache_bytes_per_device == want

lengths = np.arange(64, 4097, 64)
fig, (mem, speed) = plt.subplots(1, 2, figsize=(12, 4))
for name, sizes in (("one device", {}), ("tensor=2", {"tensor": 2}), ("data=2 x tensor=2", {"data": 2, "tensor": 2}),
                    ("data=2 x fsdp=2 x tensor=2\n(= data=8 = fsdp=2 x tensor=4)", summary.mesh)):
    mem.plot(lengths, [cache_bytes_per_device(64, n, sizes) / 2**20 for n in lengths], label=name)
mem.set(xlabel="sequence length (slots)", ylabel="KV cache per device (MiB)",
        title=f"64 rows, {CONFIG.layers} layers, d_model {CONFIG.d_model}, {CONFIG.dtype}")
mem.legend()
L, D, F, V = CONFIG.layers, CONFIG.d_model, CONFIG.d_ff, CONFIG.vocab
N = L * (4 * D * D + 3 * D * F) + D * V  # matmul parameters (kv_heads = heads): attention, gated MLP, unembedding
speed.plot(lengths, 2 * N * lengths + 2 * L * D * lengths ** 2, color="grey", label="rerun the sequence")
speed.plot(lengths, 2 * N + 4 * L * D * lengths, color="tab:blue", label="KV cache")
speed.set(xlabel="sequence length t", ylabel="FLOPs per new token", yscale="log",
          title="work per new token (closed form)")
speed.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# At the few dozen tokens of this notebook, on emulated CPU devices, the two decodes above run
# at similar speeds: per-step overheads dominate such tiny steps. The gap opens with the sequence
# length, as the right plot says; `benchmarks/bench_inference.py` measures both across lengths and
# layouts, and the cache's memory against this closed form. From a terminal, the same on a run
# directory:
# `shardml eval RUN_DIR mesh.fsdp=2 mesh.tensor=4` and
# `shardml generate RUN_DIR --prompt "def " --max-tokens 32`.
