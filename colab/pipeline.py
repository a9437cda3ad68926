# %% [markdown]
# # Pipeline schedules: the bubble and the memory of GPipe, circular and 1F1B
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/your-org/shardml/blob/main/colab/pipeline.ipynb)
#
# `mesh.pipeline = p` cuts a model's stacked layers into p stages, one per device group; a step
# pushes m microbatches through them. How long stages sit idle (the bubble) and how many
# activations each one keeps depend on the schedule. This notebook draws each schedule tick by
# tick from shardml's own `Schedule`, plots the bubble against m, measures each schedule's memory
# from its compiled train step, and checks that a pipelined run trains exactly like an unpipelined
# one. The model is a deep MLP written for the occasion: any `shardml.Model` with `Stages` can be
# pipelined.

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
STAGES = 4  # mesh.pipeline (x data=2: 8 devices)
REPEATS = 2  # virtual stages per device for the circular schedule
LAYERS, WIDTH, HIDDEN = (8, 128, 256) if SMALL else (16, 1024, 4096)
ROWS = 64 if SMALL else 256  # examples per microbatch on each data shard
MEASURED_M = [4, 16] if SMALL else [4, 8, 16, 32]  # microbatch counts whose compiled memory is measured

# %% [markdown]
# ## A model that can be pipelined
#
# `shardml.Stages` cuts a model in three: `embed` runs on the first stage, `layers` on every stage
# with its own slice of the stacked layer parameters (their leading `layers` dimension, which the
# rules map to the `pipeline` mesh axis), and `head` (plus the loss) on the last one.

# %%
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from matplotlib.patches import Patch

specs = {
    "w_in": shardml.ParamSpec((64, WIDTH), (None, "embed")),
    "layers": {"w1": shardml.ParamSpec((LAYERS, WIDTH, HIDDEN), ("layers", "embed", "mlp"), fan_in_dims=(1,)),
               "w2": shardml.ParamSpec((LAYERS, HIDDEN, WIDTH), ("layers", "mlp", "embed"), fan_in_dims=(1,),
                                       scale=0.2)},
    "w_out": shardml.ParamSpec((WIDTH, 10), ("embed", "classes")),
}


def embed(params, x_BI):
    return x_BI @ params["w_in"]


def layers(stack, h_BD):
    """Residual MLP blocks, one per entry of the stack's leading axis (a stage gets a slice)."""
    def block(h_BD, w):
        return h_BD + jax.nn.relu(h_BD @ w["w1"]) @ w["w2"], None
    return jax.lax.scan(block, h_BD, stack)[0]


def head(params, h_BD):
    return h_BD @ params["w_out"]


model = shardml.from_specs(specs, lambda p, x: head(p, layers(p["layers"], embed(p, x))),
                           stages=shardml.Stages(embed, layers, head), name="deep-mlp")
print(f"{model.name}: {model.num_params:,} parameters in {LAYERS} layers")

# %% [markdown]
# ## Tick by tick
#
# Each row is a stage, each coloured box a microbatch's forward (solid) or backward (hatched, taken
# to cost twice a forward); white is the bubble. The boxes come from `Schedule.forward_slot` and
# `backward_slot`, the functions the compiled loop itself uses.
#
# - **GPipe**: all forwards, then all backwards. Bubble (p−1)/(m+p−1).
# - **Circular** (v repeats): each device holds v chunks of layers dealt round-robin and every
#   microbatch goes round the ring v times; a box is 1/v of a stage's work. Bubble (p−1)/(v·m+p−1).
# - **1F1B**: after p−1 warm-up forwards every stage alternates one forward and one backward,
#   so a stage holds at most 2p−1 microbatches' inputs, however large m is. Bubble as GPipe's.

# %%


def timeline(schedule):
    """Boxes (stage, start, width, microbatch, forward?) of one pass, and its length, in forward-units."""
    p, v = schedule.stages, schedule.repeats
    boxes, now = [], 0.0
    if schedule.name == "1f1b":
        for t in range(schedule.ticks):
            any_forward, any_backward = schedule.work(t)
            for s in range(p):
                valid, i, _ = schedule.forward_slot(t, s)
                if valid:
                    boxes.append((s, now, 1.0, i, True))
                valid, i = schedule.backward_slot(t, s)
                if valid:
                    boxes.append((s, now + any_forward, 2.0, i, False))
            now += any_forward + 2.0 * any_backward
        return boxes, now
    for t in range(schedule.ticks):  # forward loop; its gradient runs the same ticks backwards
        boxes += [(s, now, 1.0 / v, schedule.forward_slot(t, s)[1], True)
                  for s in range(p) if schedule.forward_slot(t, s)[0]]
        now += 1.0 / v
    for t in reversed(range(schedule.ticks)):
        boxes += [(s, now, 2.0 / v, schedule.forward_slot(t, s)[1], False)
                  for s in range(p) if schedule.forward_slot(t, s)[0]]
        now += 2.0 / v
    return boxes, now


def idle_fraction(schedule):
    boxes, length = timeline(schedule)
    return 1 - sum(width for _, _, width, _, _ in boxes) / (length * schedule.stages)


SCHEDULES = {"gpipe": 1, "circular": REPEATS, "1f1b": 1}
m = 2 * STAGES
fig, axes = plt.subplots(len(SCHEDULES), 1, figsize=(13, 2.2 * len(SCHEDULES)), sharex=True)
for ax, (name, v) in zip(axes, SCHEDULES.items()):
    schedule = shardml.Schedule(name, STAGES, m, v)
    boxes, length = timeline(schedule)
    for s, start, width, i, forward in boxes:
        ax.barh(s, width, left=start, color=plt.cm.tab10(i % 10), edgecolor="black", linewidth=0.4,
                hatch=None if forward else "///")
    ax.set(yticks=range(STAGES), ylabel="stage", ylim=(STAGES - 0.5, -0.5))
    ax.set_title(f"{name}{f' (v={v})' if v > 1 else ''}: p={STAGES}, m={m}, bubble {schedule.bubble:.1%} "
                 f"(drawn: {idle_fraction(schedule):.1%})", fontsize=9)
axes[-1].set_xlabel("time (one microbatch forward through one stage = 1)")
fig.legend(handles=[Patch(color=plt.cm.tab10(i), label=f"microbatch {i}") for i in range(m)], loc="upper right",
           fontsize=7, ncol=m)
fig.tight_layout(rect=(0, 0, 1, 0.93))
plt.show()

# %% [markdown]
# ## The bubble against m
#
# Lines: the closed forms (`Schedule.bubble`); dots: the idle share of the drawn schedules.

# %%
ms = [1, 2, 4, 8, 16, 32, 64]
for name, v in SCHEDULES.items():
    valid = [m for m in ms if v == 1 or m % STAGES == 0]
    line, = plt.plot(valid, [shardml.Schedule(name, STAGES, m, v).bubble for m in valid], "--" if name == "1f1b" else "-",
                     linewidth=4 if name == "gpipe" else 2, label=name)  # GPipe's and 1F1B's bubbles coincide
    drawn = [idle_fraction(shardml.Schedule(name, STAGES, m, v)) for m in valid]
    plt.plot(valid, drawn, "o", color=line.get_color())
    assert np.allclose(drawn, [shardml.Schedule(name, STAGES, m, v).bubble for m in valid])
plt.xscale("log", base=2)
plt.xlabel("microbatches m per pass")
plt.ylabel("idle share of each stage")
plt.title(f"bubble, p = {STAGES} (circular: v = {REPEATS}, m a multiple of p)")
plt.legend()
plt.show()

# %% [markdown]
# ## Memory against m, measured
#
# The compiled train step's temporary memory per device (XLA's memory analysis), at a fixed
# microbatch size, so the batch grows with m. GPipe keeps every microbatch's stage input until its
# backward (one more per microbatch), circular one per pass round the ring (v per microbatch; the
# loop XLA:CPU compiles keeps more besides), 1F1B at most 2p−1 whatever m is. The compiled step
# also holds a copy of each microbatch's inputs, which grows with m under every schedule.

# %%
from shardml.analysis import compiled_step, plan_of  # a Plan of any trainer

mesh = shardml.make_mesh({"pipeline": STAGES, "data": 2})
optimizer = optax.adam(1e-3)
temporaries = {}
for name, v in SCHEDULES.items():
    temporaries[name] = []
    for m in MEASURED_M:
        trainer = shardml.build_trainer(model, mesh, optimizer, loss=shardml.classification,
                                        schedule=shardml.Schedule(name, STAGES, m, v))
        rows = 2 * m * ROWS
        batch = {"inputs": jax.ShapeDtypeStruct((rows, 64), jnp.float32),
                 "targets": jax.ShapeDtypeStruct((rows,), jnp.int32), "mask": jax.ShapeDtypeStruct((rows,), jnp.float32)}
        temporaries[name].append(plan_of(compiled_step(trainer, batch)).temporaries_bytes)
    print(f"{name:<9} " + "  ".join(f"m={m}: {t / 2**20:.2f} MiB" for m, t in zip(MEASURED_M, temporaries[name])))
stage_input = ROWS * WIDTH * 4
for name in SCHEDULES:
    plt.plot(MEASURED_M, np.array(temporaries[name]) / 2**20, "o-", label=name)
plt.xscale("log", base=2)
plt.xticks(MEASURED_M, MEASURED_M)
plt.xlabel("microbatches m per pass")
plt.ylabel("temporary MiB per device")
plt.title(f"compiled temporaries, p = {STAGES}; one stage input = {stage_input / 2**10:.0f} KiB")
plt.legend()
plt.show()
growth = {name: (t[-1] - t[0]) / (MEASURED_M[-1] - MEASURED_M[0]) for name, t in temporaries.items()}
print({name: f"{g / stage_input:.2f} stage inputs per extra microbatch" for name, g in growth.items()})
if SMALL:  # the program XLA:CPU compiled here; other compilers may schedule memory differently
    assert growth["1f1b"] < growth["gpipe"], growth

# %% [markdown]
# ## Pipelined training equals unpipelined training
#
# The same model, data and optimizer on `data=8` and on `pipeline=4 x data=2` with 1F1B: the
# loss of every step agrees to float rounding, as the pipeline computes the same gradient sums.

# %%
digits = shardml.ArrayBatches(shardml.load_digits(), batch_size=16 * STAGES)
losses = {}
for name, sizes, schedule in (("data=8", {"data": 8}, None),
                              (f"pipeline={STAGES} x data=2, 1f1b", {"pipeline": STAGES, "data": 2},
                               shardml.Schedule("1f1b", STAGES, 2 * STAGES))):
    trainer = shardml.build_trainer(model, shardml.make_mesh(sizes), optimizer, loss=shardml.classification,
                                    schedule=schedule)
    state, losses[name] = trainer.init(seed=0), []
    for step in range(5):
        state, metrics = trainer.step(state, trainer.put(digits.batch(step)))
        losses[name].append(float(metrics["loss"]))
    print(f"{name:<28} {np.round(losses[name], 6)}")
a, b = losses.values()
assert np.allclose(a, b, rtol=1e-5 if SMALL else 1e-2), losses  # accelerators multiply f32 in bf16 passes

# %% [markdown]
# With the reference transformer the same choices are config keys:
#
# ```bash
# shardml train tiny mesh.pipeline=4 mesh.data=2 pipeline.schedule=1f1b pipeline.microbatches=8
# shardml plan tiny mesh.pipeline=4 mesh.data=2 --compare pipeline.schedule=gpipe pipeline.schedule=1f1b
# ```
#
# Raise `pipeline.microbatches` (m) to shrink the bubble; with GPipe or circular that costs memory,
# with 1F1B it does not. `train.microbatches` (k) runs k such passes per step, each paying the
# bubble again: raise m before k.
