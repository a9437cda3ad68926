"""Gradient scale under test: one SGD step of the trainer (learning rate 1, so the update *is* the
gradient) on sharded layouts, accumulated microbatches, a pipeline, a Flax model and a population,
against ``jax.grad`` of a mean loss written here on one device; and the step's ``grad_norm``
against the norm of that reference gradient.

Adam divides every update by the root mean square of its gradients, so a gradient wrong by a
constant factor (halved by a divisor, doubled by counting padding) trains almost identically under
Adam; under SGD it moves every parameter by the wrong amount.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import assert_trees_close, host, lm_batch, tiny_transformer
from shardml.core.losses import classification
from shardml.core.mesh import make_mesh
from shardml.core.pipeline import Schedule
from shardml.core.step import build_trainer
from shardml.models import from_linen, from_nnx, mlp_classifier
from shardml.parallel.members import build_population

GRAD_RTOL = 1e-4  # float32 gradients of another summation order; a scale error moves them by O(1)
NORM_RTOL = 1e-5
ROWS, FEATURES, CLASSES = 16, 8, 5


def token_mean_loss(model):
    """Mean next-token cross-entropy over the real tokens (mask 1), written here."""

    def loss(params, batch):
        logits = model(params, batch["inputs"]).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        return jnp.sum(nll * batch["mask"]) / jnp.sum(batch["mask"])

    return loss


def class_mean_loss(model):
    """Mean cross-entropy over the real rows (mask 1) of class logits, written here."""

    def loss(params, batch):
        logp = jax.nn.log_softmax(model(params, batch["inputs"]).astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, batch["targets"][:, None], axis=-1)[:, 0]
        return jnp.sum(nll * batch["mask"]) / jnp.sum(batch["mask"])

    return loss


def class_batch(seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones(ROWS, np.float32)
    mask[rng.choice(ROWS, 5, replace=False)] = 0.0  # padded rows: their count must not enter the divisor
    return {"inputs": rng.normal(size=(ROWS, FEATURES)).astype(np.float32),
            "targets": rng.integers(0, CLASSES, ROWS).astype(np.int32), "mask": mask}


def sgd_step_gradients(trainer, batch, seed=0):
    """(initial natural parameters, the gradient the trainer applied, its metrics) of one SGD step
    with learning rate 1."""
    state = trainer.init(seed)
    start = host(trainer.natural(state.params))
    state, metrics = trainer.step(state, trainer.put(batch))
    after = host(trainer.natural(state.params))
    return start, jax.tree.map(lambda a, b: a - b, start, after), host(metrics)


def check(trainer, loss_fn, batch, label):
    start, applied, metrics = sgd_step_gradients(trainer, batch)
    want = host(jax.jit(jax.grad(loss_fn))(start, batch))
    assert_trees_close(applied, want, GRAD_RTOL, f"{label}: the applied gradient vs jax.grad written here")
    norm = float(optax.tree.norm(want))
    assert abs(float(metrics["grad_norm"]) - norm) <= NORM_RTOL * norm, f"{label}: grad_norm {metrics['grad_norm']} vs {norm}"
    assert float(metrics["count"]) == batch["mask"].sum(), f"{label}: counted {metrics['count']} real examples"
    assert abs(float(metrics["loss"]) - float(loss_fn(start, batch))) <= 1e-5 * float(loss_fn(start, batch))
    return start


# test_step.py compares every layout's grad_norm with an independent update; here the whole gradient.
@pytest.mark.parametrize("sizes,microbatches", [
    pytest.param({"data": 2, "fsdp": 2, "tensor": 2}, 2, id="dp2-fsdp2-tp2-mb2", marks=pytest.mark.slow),
    pytest.param({"fsdp": 4}, 4, id="fsdp4-mb4")])
def test_transformer_gradient_on_padded_tokens_equals_jax_grad(sizes, microbatches):
    model = tiny_transformer()
    trainer = build_trainer(model, make_mesh(sizes, jax.devices()[:int(np.prod(list(sizes.values())))]),
                            optax.sgd(1.0), microbatches=microbatches)
    check(trainer, token_mean_loss(model), lm_batch(8, seed=3, ragged=True), f"transformer on {sizes}")


def test_pipelined_transformer_gradient_equals_jax_grad():
    model = tiny_transformer()
    trainer = build_trainer(model, make_mesh({"pipeline": 2, "data": 2}, jax.devices()[:4]), optax.sgd(1.0),
                            schedule=Schedule("1f1b", 2, 4))
    check(trainer, token_mean_loss(model), lm_batch(8, seed=4, ragged=True), "pipeline=2 x data=2, 1F1B")


@pytest.mark.parametrize("sizes,microbatches", [({"data": 2, "tensor": 2}, 2), ({"fsdp": 2}, 1)],
                         ids=["dp2-tp2-mb2", "fsdp2"])
def test_mlp_gradient_on_padded_rows_equals_jax_grad(sizes, microbatches):
    """Also the accuracy over the real rows only, against NumPy."""
    model = _mlp()
    trainer = build_trainer(model, make_mesh(sizes, jax.devices()[:int(np.prod(list(sizes.values())))]),
                            optax.sgd(1.0), loss=classification, microbatches=microbatches)
    batch = class_batch(2)
    state = trainer.init(0)
    logits = np.asarray(model(host(trainer.natural(state.params)), batch["inputs"]))
    _, metrics = trainer.step(state, trainer.put(batch))
    want = np.sum((logits.argmax(-1) == batch["targets"]) * batch["mask"]) / batch["mask"].sum()
    assert abs(float(metrics["accuracy"]) - want) < 1e-6, f"accuracy {metrics['accuracy']} vs {want} on real rows"
    check(trainer, class_mean_loss(model), batch, f"mlp classifier on {sizes}")


class _NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(FEATURES, 16, kernel_init=nnx.with_partitioning(
            nnx.initializers.lecun_normal(), ("embed", "mlp")), rngs=rngs)
        self.out = nnx.Linear(16, CLASSES, kernel_init=nnx.with_partitioning(
            nnx.initializers.lecun_normal(), ("mlp", "classes")), rngs=rngs)

    def __call__(self, x):
        return self.out(nn.with_logical_constraint(nnx.relu(self.hidden(x)), ("batch", "act_mlp")))


class _LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        h = nn.Dense(16, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")))(x)
        h = nn.with_logical_constraint(nn.relu(h), ("batch", "act_mlp"))
        return nn.Dense(CLASSES, kernel_init=nn.with_logical_partitioning(init, ("mlp", "classes")))(h)


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_flax_gradient_on_padded_rows_equals_jax_grad(kind):
    if kind == "nnx":
        model = from_nnx(lambda rngs: _NnxMLP(rngs))
    else:
        model = from_linen(_LinenMLP(), jnp.zeros((1, FEATURES)))
    trainer = build_trainer(model, make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), optax.sgd(1.0),
                            loss=classification, microbatches=2)
    check(trainer, class_mean_loss(model), class_batch(), f"Flax {kind} on data=2 x fsdp=2 x tensor=2")


@functools.cache
def _mlp():
    return mlp_classifier(FEATURES, 16, CLASSES)


def test_every_population_member_takes_its_own_sgd_step():
    """Each member: its own initialisation (seed + i), its own learning rate, the full gradient."""
    model, lrs, seed = _mlp(), [0.5, 1.0, 2.0, 4.0], 3
    optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
    trainer = build_population(model, make_mesh({"members": 2, "data": 2, "tensor": 2}), optimizer, 4,
                               loss=classification, hyperparams={"learning_rate": lrs})
    batch = class_batch(1)
    state = trainer.init(seed)
    start = host(state.params)
    state, metrics = trainer.step(state, trainer.put(batch))
    after = host(state.params)
    grad = jax.jit(jax.grad(class_mean_loss(model)))
    for i, lr in enumerate(lrs):
        own = host(model.init(jax.random.fold_in(jax.random.key(seed + i), 0)))
        # within an ulp or two, not bitwise: the sharded init fuses the sampler's arithmetic, the
        # eager one does not (at LLVM -O0, tests/conftest.py, they round differently); another seed
        # differs by O(1)
        assert_trees_close(jax.tree.map(lambda x: x[i], start), own, 1e-6, f"member {i}'s initialisation")
        want = host(grad(own, batch))
        applied = jax.tree.map(lambda a, b: (a[i] - b[i]) / lr, start, after)
        assert_trees_close(applied, want, GRAD_RTOL, f"member {i} (lr {lr}): applied gradient vs jax.grad")
        norm = float(optax.tree.norm(want))
        got = float(np.asarray(metrics["grad_norm"])[i])
        assert abs(got - norm) <= NORM_RTOL * norm, f"member {i}: grad_norm {got} vs {norm}"
