# %% [markdown]
# # Layouts explained: data, FSDP, tensor and pipeline parallelism
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/your-org/shardml/blob/main/colab/layouts.ipynb)
#
# What each layout does with the same transformer: a picture of the device mesh, where every
# parameter lives on it, and what each layout costs per device in memory and per step in
# communication, measured from the compiled train step by `shardml.compare_layouts` (what
# `shardml plan tiny --compare mesh.data=8 mesh.fsdp=8` prints). Nothing here trains: plans
# compile the step from abstract shapes and allocate nothing.

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
STEPS = 12 if SMALL else 200  # the optimizer's schedule length (part of the compiled step)
DEVICE_MEMORY = 16 * 2**30  # bytes of one device (a TPU v5e chip), for the "fits" row of the comparison

# %% [markdown]
# ## The mesh
#
# shardml arranges the devices in a mesh with five named axes, always in this order (size 1 where
# a layout does not use one):
#
# | axis | splits | parameters | communication |
# |---|---|---|---|
# | `members` | independent models (populations) | one member's on each group | none between members |
# | `pipeline` | the stacked layers into stages | each stage holds its layers | activations to the next stage (`ppermute`) |
# | `data` | the batch | replicated | one gradient all-reduce per step |
# | `fsdp` | the batch, and parameters + optimizer state on their model dimension (ZeRO-3) | 1/fsdp each | weights all-gathered per use, gradients reduce-scattered |
# | `tensor` | heads, MLP hidden and vocabulary (Megatron) | 1/tensor each | activations all-reduced per layer: twice forward, once per q, k, v, gate and up product backward |

# %%
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

LAYOUTS = {  # name: mesh axis sizes (8 devices each)
    "data=8": {"data": 8},
    "fsdp=8": {"fsdp": 8},
    "data=2 x tensor=4": {"data": 2, "tensor": 4},
    "pipeline=4 x data=2": {"pipeline": 4, "data": 2},
    "data=2 x fsdp=2 x tensor=2": {"data": 2, "fsdp": 2, "tensor": 2},
}


def overrides(sizes):
    """The config overrides of a layout: every mesh axis set (1 where unused)."""
    return [f"mesh.{axis}={sizes.get(axis, 1)}" for axis in shardml.MESH_AXES]


def config(sizes):
    return shardml.load_config(PRESET, [f"train.steps={STEPS}"] + overrides(sizes))


def draw_mesh(mesh, ax):
    """The device ids of a mesh as a grid: the last used axis across, the outer ones down."""
    used = [axis for axis in mesh.axis_names if mesh.shape[axis] > 1] or [mesh.axis_names[-1]]
    grid = mesh.devices.reshape([mesh.shape[a] for a in used])
    grid = grid.reshape(-1, grid.shape[-1])
    ax.imshow(np.arange(grid.size).reshape(grid.shape), cmap="Pastel1", vmin=0, vmax=8)
    for (r, c), device in np.ndenumerate(grid):
        ax.text(c, r, str(device.id), ha="center", va="center")
    rows = list(np.ndindex(*[mesh.shape[a] for a in used[:-1]]))
    ax.set_yticks(range(len(rows)), [",".join(map(str, row)) for row in rows] if used[:-1] else [""])
    ax.set_ylabel(",".join(used[:-1]))
    ax.set_xticks(range(grid.shape[1]))
    ax.set_xlabel(used[-1])
    ax.set_title(shardml.layout_name(mesh.shape, sep=" x\n"), fontsize=9)


meshes = [shardml.make_mesh(sizes) for sizes in LAYOUTS.values()]
widths = [max(3, m.shape[[a for a in m.axis_names if m.shape[a] > 1][-1]]) for m in meshes]
fig, axes = plt.subplots(1, len(meshes), figsize=(14, 2.8), width_ratios=widths)
for ax, mesh in zip(axes, meshes):
    draw_mesh(mesh, ax)
fig.suptitle("device ids on each mesh")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Logical axes and the rules table
#
# Models never name mesh axes. Each parameter dimension has a *logical* name (`vocab`, `embed`,
# `heads`, `mlp`, `layers`, ...), and one rules table maps logical names to mesh axes. The layout
# of every array follows from the table and the mesh; an axis of size 1 shards nothing.

# %%
rules = shardml.Rules.default()
for logical, mesh_axes in rules.table:
    print(f"{logical:>13} -> {mesh_axes}")

trainer = shardml.run_parts(config(LAYOUTS["data=2 x fsdp=2 x tensor=2"])).trainer
model = trainer.model
print(f"\n{model.name}: {model.num_params:,} parameters")
for name in ("embed", "layers/wq", "layers/w_up", "layers/w_down", "unembed"):
    path = name.split("/")
    logical, shape, sharding = model.logical, model.abstract_params, trainer.state_shardings.params
    for key in path:
        logical, shape, sharding = logical[key], shape[key], sharding[key]
    print(f"{name:<14} {shape.shape!s:<16} logical {logical!s:<40} -> {sharding.spec}")

# %% [markdown]
# ## Where each parameter lives
#
# Each panel is one parameter (the layered weights: one layer's slice, and for `attn_norm` all
# layers as rows), coloured by which devices hold each element, read from the trainer's
# `state_shardings` (`NamedSharding.devices_indices_map`). A colour held by all 8 devices is a
# full copy on each.

# %%
PANELS = {  # parameter path: (index of the displayed slice, rows x columns label)
    "embed": ((), "vocab x d_model"),
    "layers/wq": ((0,), "layer 0: d_model x heads·head_dim"),
    "layers/w_up": ((0,), "layer 0: d_model x d_ff"),
    "layers/w_down": ((0,), "layer 0: d_ff x d_model"),
    "layers/attn_norm": ((), "layers x d_model"),
}


def owners(sharding, shape, index):
    """A 2-D image of which devices hold each element (a bitmask of device ids), of ``shape``[index]."""
    mask = np.zeros(shape, np.int64)
    for device, where in sharding.devices_indices_map(shape).items():
        mask[where] |= 1 << device.id
    view = mask[index]
    return view.reshape(view.shape[0], -1) if view.ndim > 1 else view[None, :]


ALL = 2 ** jax.device_count() - 1  # the bitmask of every device


def draw_layout(name, sizes):
    trainer = shardml.run_parts(config(sizes)).trainer
    fig, axes = plt.subplots(1, len(PANELS), figsize=(3.3 * len(PANELS), 3))
    seen = {}
    for ax, (path, (index, label)) in zip(axes, PANELS.items()):
        sharding, shape = trainer.state_shardings.params, trainer.model.abstract_params
        for key in path.split("/"):
            sharding, shape = sharding[key], shape[key]
        image = owners(sharding, shape.shape, index)
        codes = np.vectorize(lambda m: seen.setdefault(int(m), len(seen)))(image)
        ax.imshow(codes, cmap=ListedColormap(plt.cm.tab20.colors), vmin=0, vmax=19, aspect="auto",
                  interpolation="nearest")
        ax.set_title(f"{path}\n{sharding.spec}", fontsize=8)
        ax.set_xlabel(label, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(color=plt.cm.tab20.colors[code % 20],
                     label="all devices" if mask == ALL else "devices " + ",".join(str(d) for d in range(jax.device_count())
                                                                                    if mask >> d & 1))
               for mask, code in seen.items()]
    fig.legend(handles=handles, loc="center right", fontsize=7)
    fig.suptitle(name)
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    plt.show()


for name, sizes in LAYOUTS.items():
    draw_layout(name, sizes)

# %% [markdown]
# - **data=8**: every device holds every parameter; each device takes 1/8 of the batch.
# - **fsdp=8**: each parameter is cut on its `embed` (d_model) dimension, so a device holds 1/8
#   of every weight and of its Adam moments; weights are gathered when a layer runs.
# - **tensor=4**: heads, the MLP hidden dimension and the vocabulary are cut in 4; within a
#   tensor group the devices hold different columns (or rows) of the same weights.
# - **pipeline=4**: the `layers` dimension is cut: stage s holds layers s·L/4 ... (s+1)·L/4 − 1
#   (the `attn_norm` panel); the embedding and the head are replicated over the stages.
#
# ## What each layout costs
#
# `shardml.compare_layouts` compiles the train step of each layout from abstract shapes and reads
# memory per device (parameter and optimizer bytes from the shardings, temporaries from XLA's
# memory analysis) and every collective of the compiled program with its bytes per step. Layout
# strings are the `--compare` columns of `shardml plan`.

# %%
cfg = shardml.load_config(PRESET, [f"train.steps={STEPS}"])
columns = {name: ",".join(f"mesh.{axis}={size}" for axis, size in sizes.items()) for name, sizes in LAYOUTS.items()}
plans = shardml.compare_layouts(cfg, list(columns.values()), device_memory=DEVICE_MEMORY)
print(shardml.format_comparison(plans))

# %%
names = list(LAYOUTS)
x = np.arange(len(names))
fig, (mem, comm) = plt.subplots(1, 2, figsize=(13, 4))
bottom = np.zeros(len(names))
for label, values in (("parameters", [p.params_bytes for p in plans]),
                      ("optimizer state", [p.opt_state_bytes for p in plans]),
                      ("temporaries", [p.temporaries_bytes for p in plans])):
    values = np.array(values) / 2**20
    mem.bar(x, values, bottom=bottom, label=label)
    bottom += values
mem.set(xticks=x, ylabel="MiB per device", title="memory per device")
mem.set_xticklabels(names, rotation=20, fontsize=8)
mem.legend()
kinds = sorted({row.kind for p in plans for row in p.comm})
bottom = np.zeros(len(names))
for kind in kinds:
    values = np.array([p.comm_bytes(kind) for p in plans]) / 2**20
    comm.bar(x, values, bottom=bottom, label=kind)
    bottom += values
comm.set(xticks=x, ylabel="MiB per step (one device)", title="communication per step")
comm.set_xticklabels(names, rotation=20, fontsize=8)
comm.legend()
fig.tight_layout()
plt.show()

# What the rules promise, counted by hand: data=8 holds every parameter (f32, 4 bytes each);
# fsdp=8 holds 1/8 of every parameter with an `embed` dimension and all of the others (the norms).
by_name = dict(zip(names, plans))
sizes = [(int(np.prod(s.shape)), axes) for s, axes in zip(jax.tree.leaves(model.abstract_params),
                                                        jax.tree.leaves(model.logical, is_leaf=lambda x: isinstance(x, tuple)))]
assert by_name["data=8"].params_bytes == 4 * sum(n for n, _ in sizes)
assert by_name["fsdp=8"].params_bytes == 4 * sum(n // 8 if "embed" in axes else n for n, axes in sizes)
assert not by_name["data=8"].comm_bytes(axis="tensor") and by_name["data=2 x tensor=4"].comm_bytes(axis="tensor")

# %% [markdown]
# ## Choosing a layout
#
# - Start with **data** parallelism while the parameters, gradients and Adam moments (16 bytes per
#   parameter in f32) fit on one device: one all-reduce per step, nothing else.
# - When they do not, move devices to **fsdp**: memory per device falls as 1/fsdp, at the price of
#   gathering weights every step (the all-gather rows above).
# - Use **tensor** parallelism when one layer's activations or weights are too big, or the batch
#   per device is too small for FSDP to pay off; its all-reduces move activations every layer, so
#   keep it within fast links (a TPU slice, one GPU node).
# - Use **pipeline** stages when the model is deep and the links between groups of devices are
#   slow: only activations at stage boundaries travel (see `pipeline.ipynb` for the bubble).
#
# From a terminal, the same comparison for any preset or YAML file, on any device count:
#
# ```bash
# shardml plan default --compare mesh.data=8 mesh.fsdp=8 mesh.data=2,mesh.tensor=4 --device-memory 16GiB
# shardml plan default mesh.data=1 mesh.tensor=1 mesh.fsdp=64 --cpu-devices 64 --device-memory 16GiB
# ```
#
# On XLA:CPU the collective forms and temporaries can differ from a TPU's or GPU's (the note under
# the table says so); parameter and optimizer bytes come from the shardings and hold everywhere.
