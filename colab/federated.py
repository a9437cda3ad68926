# %% [markdown]
# # Federated learning: simulated clients in one compiled round
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/your-org/shardml/blob/main/colab/federated.ipynb)
#
# Clients that each hold a skewed slice of the data train one model without pooling it, simulated
# a whole round at a time in one compiled step. In every round each sampled client runs a few
# local SGD steps from the global weights, and the server averages their updates (FedAvg); FedProx
# also pulls the clients towards the global weights. shardml stacks the round's clients on the
# `members` mesh axis, the population mechanism, with `data`, `fsdp` and `tensor` working inside
# each client. This notebook splits scikit-learn's digits over clients by a Dirichlet draw,
# compares FedAvg with FedProx round by round, counts the bytes a deployment would send next to
# synchronous data-parallel training, and checks a round against an update written here with
# plain `jax.grad`.

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
# Sizes: small on CPU (the tests run this notebook on CPU), more clients and rounds on a TPU.
SMALL = BACKEND == "cpu"
CLIENTS = 16 if SMALL else 100
COHORT = 8 if SMALL else 20  # clients sampled per round
LOCAL_STEPS = 8 if SMALL else 10  # H: local SGD steps per client per round
ROUNDS = 15 if SMALL else 100
HIDDEN = 32 if SMALL else 128
ALPHA = 0.3  # Dirichlet concentration: small = few classes per client
BATCH = 16  # rows per local step
CLIENT_LR = 0.5
MU = 0.1  # FedProx's proximal weight

# %% [markdown]
# ## Clients with skewed labels
#
# `shardml.dirichlet` deals each class's examples to the clients in proportions drawn from
# Dir(α): with a small α such as 0.3 most clients hold a few classes and some hold many more examples than
# others (the non-IID setting of Hsu et al. 2019). `shardml.label_counts` and
# `shardml.format_label_report` summarise the split; the "effective number of classes" is the
# exponential of a client's label entropy (10 for a perfectly balanced client).

# %%
import matplotlib.pyplot as plt
import numpy as np

digits = shardml.load_digits()  # scikit-learn's 8x8 digits: train and validation splits
parts = shardml.dirichlet(digits.y_train, clients=CLIENTS, alpha=ALPHA, seed=0)
counts = shardml.label_counts(parts, digits.y_train, classes=10)  # [clients, classes]
print(shardml.format_label_report(counts, show=6))

fig, ax = plt.subplots(figsize=(10, 3.5))
bottom = np.zeros(CLIENTS)
colors = plt.get_cmap("tab10")
for c in range(10):
    ax.bar(range(CLIENTS), counts[:, c], bottom=bottom, color=colors(c), label=str(c))
    bottom += counts[:, c]
ax.set(xlabel="client", ylabel="examples", title=f"label mix per client (Dirichlet alpha = {ALPHA})")
ax.legend(title="digit", fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
plt.show()

# %% [markdown]
# ## FedAvg and FedProx, one compiled round each
#
# `shardml.build_federated` compiles a round: `COHORT` client slots stacked over the `members`
# axis of a `members=4 x data=2` mesh (`COHORT` / 4 clients per device group, each client's
# batch split over the group's 2 devices), `LOCAL_STEPS` local steps each in a `lax.scan`, then the server's
# example-weighted mean of the client updates. `shardml.ClientBatches` deals each round's batches:
# a seeded cohort of clients, each with its own `LOCAL_STEPS` batches, stacked as
# `[slot, local step, row, feature]`. A trainer's step is a whole round and its state's `params`
# are the global model, which `shardml.evaluate` scores on the held-out digits after each round.
#
# FedProx (Li et al. 2020) adds μ (w − w_t) to every client gradient, pulling the clients towards
# the round's global weights w_t; with μ = 0 it is FedAvg exactly.

# %%
model = shardml.mlp_classifier(digits.features, HIDDEN, digits.classes)
mesh = shardml.make_mesh({"members": 4, "data": 2})
held_out = shardml.ArrayBatches(digits, batch_size=120)  # its eval_batches(): the validation split, padded


def run_rounds(algorithm):
    """Trains ROUNDS rounds; returns the trainer, the final state and the accuracy after each round."""
    trainer = shardml.build_federated(model, mesh, algorithm, clients=CLIENTS, cohort=COHORT,
                                      local_steps=LOCAL_STEPS, loss=shardml.classification)
    data = shardml.ClientBatches.from_arrays(digits.x_train, digits.y_train, parts, batch_size=BATCH,
                                             local_steps=LOCAL_STEPS, cohort=COHORT, slots=trainer.slots,
                                             held_out=held_out)
    state = trainer.init(seed=0)  # the same initial global model for every algorithm
    accuracy = [shardml.evaluate(trainer, state.params, data.eval_batches())["accuracy"]]
    for r in range(ROUNDS):
        state, metrics = trainer.step(state, trainer.put(data.batch(r)))  # one whole round
        accuracy.append(shardml.evaluate(trainer, state.params, data.eval_batches())["accuracy"])
    return trainer, data, state, np.array(accuracy)


runs = {"FedAvg": run_rounds(shardml.fedavg(client_lr=CLIENT_LR)),
        f"FedProx (mu={MU})": run_rounds(shardml.fedprox(client_lr=CLIENT_LR, mu=MU))}
trainer, data, _, _ = runs["FedAvg"]
batch = data.batch(0)
print(f"{trainer.slots} slots over members={mesh.shape['members']}; round batch inputs {batch['inputs'].shape} "
      f"[slot, local step, row, feature]; round 0's clients {batch['client'].tolist()}, "
      f"their examples {batch['weight'].astype(int).tolist()}")
for name, (_, _, _, accuracy) in runs.items():
    print(f"{name:<16} validation accuracy after round 1: {accuracy[1]:.3f}, after round {ROUNDS}: "
          f"{accuracy[-1]:.3f}")

# %% [markdown]
# ## What a deployment sends: FedAvg against synchronous data parallel
#
# In a round each sampled client downloads the global weights and uploads its own: 2 × P values
# for a model of P parameters, whatever the number of local steps. Synchronous data-parallel
# training over the same `COHORT` workers exchanges a gradient and the averaged gradient, also
# 2 × P values per worker, but every step: `LOCAL_STEPS` times as much at equal compute. Below, a
# data-parallel run on `data=8` that takes `COHORT × BATCH` rows of the pooled (IID) data per
# step, as many examples per step as the cohort's clients together, evaluated every
# `LOCAL_STEPS` steps. `shardml.collectives` reads its compiled step: the gradient all-reduce over
# `data` carries the P f32 values (and the loss sums), once per step.

# %%
import optax
from shardml.analysis import compiled_step

P = model.num_params
per_client_round = 2 * P * 4  # f32 weights down and up
dp = shardml.build_trainer(model, shardml.make_mesh({"data": 8}), optax.sgd(CLIENT_LR), loss=shardml.classification)
pooled = shardml.ArrayBatches(digits, batch_size=COHORT * BATCH)
report = shardml.collectives(compiled_step(dp, pooled.batch(0)).compiled.as_text(), dp.mesh)
reduced = report.bytes("all-reduce", axis="data")
print(report.table())
print(f"P = {P:,} parameters: {P * 4:,} bytes of f32 gradient; the step all-reduces {reduced:,} bytes over data")
if SMALL:  # XLA:CPU's program; another compiler may split the reduction into other collectives
    assert P * 4 <= reduced <= P * 4 + 1024, "the data-parallel step should reduce the gradient once per step"

state = dp.init(seed=0)
dp_accuracy = [shardml.evaluate(dp, state.params, held_out.eval_batches())["accuracy"]]
for step in range(ROUNDS * LOCAL_STEPS):
    state, _ = dp.step(state, dp.put(pooled.batch(step)))
    if (step + 1) % LOCAL_STEPS == 0:
        dp_accuracy.append(shardml.evaluate(dp, state.params, held_out.eval_batches())["accuracy"])

rounds = np.arange(ROUNDS + 1)
fig, (acc_ax, bytes_ax) = plt.subplots(1, 2, figsize=(12, 4))
for name, (_, _, _, accuracy) in runs.items():
    acc_ax.plot(rounds, accuracy, "o-", label=name)
    bytes_ax.plot(rounds * per_client_round / 1e6, accuracy, "o-", label=name)
acc_ax.plot(rounds, dp_accuracy, "k--", label=f"data parallel, IID ({LOCAL_STEPS} steps per round)")
bytes_ax.plot(rounds * LOCAL_STEPS * per_client_round / 1e6, dp_accuracy, "k--", label="data parallel, IID")
acc_ax.set(xlabel="round", ylabel="validation accuracy", title=f"{CLIENTS} clients, {COHORT} per round, "
           f"{LOCAL_STEPS} local steps")
bytes_ax.set(xlabel="MB sent and received per client (worker)", ylabel="validation accuracy",
             title="accuracy against communication")
acc_ax.legend(fontsize=8)
bytes_ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
federated_total = ROUNDS * COHORT * per_client_round
print(f"per client per round: {per_client_round:,} bytes; data parallel per worker over the same compute: "
      f"{LOCAL_STEPS * per_client_round:,} bytes ({LOCAL_STEPS}x); over {ROUNDS} rounds of {COHORT} clients: "
      f"{federated_total / 1e6:.2f} MB against {LOCAL_STEPS * federated_total / 1e6:.2f} MB")

# %% [markdown]
# The data-parallel run sees the pooled, shuffled data: the best case federated learning is
# measured against. The federated clients only ever see their own skewed slices, and between two
# averages their local steps pull apart (client drift), which costs accuracy per round and buys
# the `LOCAL_STEPS`-fold saving in communication. FedProx's term trades some of each client's
# progress for less drift; with μ = 0.1 on this small problem its curve stays close to FedAvg's.
# Try a smaller `ALPHA`, more `LOCAL_STEPS` or a larger `MU` in the parameters cell.
#
# A federated run from a terminal writes the label report, these byte counts and the final
# evaluation to `OUT_DIR/federated.json`:
# `shardml train tiny model.kind=mlp data.corpus=digits mesh.members=4 mesh.data=2
# federated.algorithm=fedprox federated.mu=0.1 federated.clients=16 federated.fraction=0.5
# federated.local_steps=8 federated.client_lr=0.5 federated.partition=dirichlet federated.alpha=0.3`.
#
# ## A round checked against plain `jax.grad`
#
# With one local step per round and clients whose whole data fits one batch, FedAvg's
# example-weighted mean of the client models is one plain SGD step on the union of the clients'
# batches: `w − lr · (Σ_k n_k ∇L_k(w)) / Σ_k n_k` is the gradient of the mean loss over all their
# examples. Below, 8 clients of unequal sizes (they weigh by their example counts) in one round,
# against that SGD step written here with `jax.nn.log_softmax` and `jax.grad` on one device.

# %%
import jax.numpy as jnp

sizes = [16, 3, 11, 16, 7, 14, 9, 5]
cuts = np.cumsum([0, *sizes])
one_step = [np.arange(a, b) for a, b in zip(cuts[:-1], cuts[1:])]  # client k: consecutive examples
check = shardml.build_federated(model, mesh, shardml.fedavg(client_lr=0.5), clients=len(sizes), local_steps=1,
                                loss=shardml.classification)
check_data = shardml.ClientBatches.from_arrays(digits.x_train, digits.y_train, one_step, batch_size=16,
                                               local_steps=1, slots=check.slots)
state = check.init(seed=1)
w0 = jax.device_get(check.natural(state.params))
state, _ = check.step(state, check.put(check_data.batch(0)))
got = jax.device_get(check.natural(state.params))


def mean_loss(params, x, y):
    """Mean cross-entropy of the MLP written out: relu(x W_in + b_in) W_out + b_out."""
    logits = jax.nn.relu(x @ params["w_in"] + params["b_in"]) @ params["w_out"] + params["b_out"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


union = np.arange(cuts[-1])
cpu = jax.devices()[0]
grads = jax.grad(mean_loss)(jax.device_put(w0, cpu), jax.device_put(digits.x_train[union], cpu),
                            jax.device_put(digits.y_train[union], cpu))
want = jax.tree.map(lambda w, g: np.asarray(w) - 0.5 * np.asarray(g), w0, grads)
for name in want:
    gap = np.max(np.abs(got[name] - want[name]))
    moved = np.max(np.abs(want[name] - w0[name]))
    print(f"{name:<6} moved by up to {moved:.2e}; round vs SGD step written here: max difference {gap:.1e}")
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
assert max(np.max(np.abs(want[k] - w0[k])) for k in want) > 1e-3, "the step moved nothing: the check is void"

# %% [markdown]
# ## The same client update on Flower
#
# For a real deployment the client update the round compiles runs in
# [Flower](https://flower.ai) clients (`pip install 'shardml[flower]'`):
# `shardml.flower.client_app(trainer, data)` is a Flower `ClientApp` (one client per node, by its
# `partition-id`), `shardml.flower.flower_client(trainer, data, k)` one `NumPyClient`. Where `flwr`
# is installed, the cell below runs Flower's own `Server` and `FedAvg` strategy in this process
# with these clients for one round of the check above, and gets the simulated global model.

# %%
if importlib.util.find_spec("flwr") is None:
    print("flwr is not installed: pip install 'shardml[flower]' to run this cell")
else:
    import logging

    import flwr  # noqa: F401 - its logger is set up on import

    logging.getLogger("flwr").setLevel(logging.ERROR)  # Flower logs every step of its round at INFO
    params, history = shardml.flower.run_in_process(check, check_data, rounds=1, seed=1)
    gap = max(float(np.max(np.abs(params[k] - got[k]))) for k in got)
    print(f"Flower's FedAvg round vs the simulated round: max difference {gap:.1e}")
    assert gap < 1e-5, gap
