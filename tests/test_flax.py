"""Flax models the Flax way: NNX and Linen modules annotated with Flax's own partitioning metadata,
trained by shardml on every layout, against plain nnx / Linen + optax loops written here."""

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import PARAMS_RTOL, assert_trees_close, host
from shardml.core.errors import ConfigError, ModelError
from shardml.core.losses import classification
from shardml.core.mesh import make_mesh
from shardml.core.step import build_trainer
from shardml.models import from_linen, from_nnx

BATCH, FEATURES, CLASSES, STEPS = 32, 16, 10, 3
LR = 1e-2
LAYOUTS = [("data=8", {"data": 8}, 1), ("fsdp=8", {"fsdp": 8}, 1), ("tensor=8", {"tensor": 8}, 1),
           ("data=2 x fsdp=2 x tensor=2, 2 microbatches", {"data": 2, "fsdp": 2, "tensor": 2}, 2)]


def partitioned(*names):
    return nnx.with_partitioning(nnx.initializers.lecun_normal(), names)


class MLP(nnx.Module):
    """A user's NNX MLP: weights named with nnx.with_partitioning, an activation constraint."""

    def __init__(self, rngs: nnx.Rngs, dropout: float = 0.0, constrain: bool = True):
        self.hidden = nnx.Linear(FEATURES, 64, kernel_init=partitioned("embed", "mlp"), rngs=rngs)
        self.out = nnx.Linear(64, CLASSES, kernel_init=partitioned("mlp", "classes"), rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None
        self.constrain = constrain

    def __call__(self, x):
        h = nnx.relu(self.hidden(x))
        if self.constrain:
            h = nn.with_logical_constraint(h, ("batch", "act_mlp"))
        if self.dropout is not None:
            h = self.dropout(h)
        return self.out(h)


class CNN(nnx.Module):
    """A small NNX CNN on 4x4 images: output channels split over tensor."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 16, (3, 3), kernel_init=partitioned(None, None, None, "mlp"), rngs=rngs)
        self.head = nnx.Linear(16, CLASSES, kernel_init=partitioned("mlp", "classes"), rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.conv(x.reshape(x.shape[0], 4, 4, 1)))
        return self.head(jnp.mean(h, axis=(1, 2)))


class LinenMLP(nn.Module):
    """A user's Linen MLP with nn.with_logical_partitioning."""

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        h = nn.Dense(64, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")))(x)
        h = nn.with_logical_constraint(nn.relu(h), ("batch", "act_mlp"))
        return nn.Dense(CLASSES, kernel_init=nn.with_logical_partitioning(init, ("mlp", "classes")))(h)


def data(step):
    rng = np.random.default_rng(step)
    centers = np.random.default_rng(99).normal(size=(CLASSES, FEATURES)).astype(np.float32) * 2
    labels = rng.integers(0, CLASSES, BATCH)
    x = centers[labels] + rng.normal(size=(BATCH, FEATURES)).astype(np.float32)
    return {"inputs": x, "targets": labels.astype(np.int32)}


def mean_xent(logits, targets):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


def shardml_run(model, sizes, microbatches=1):
    devices = jax.devices()[:1] if sizes == {"data": 1} else None
    trainer = build_trainer(model, make_mesh(sizes, devices), optax.adam(LR), loss=classification,
                            microbatches=microbatches)
    state, losses, grad_norms = trainer.init(0), [], []
    start = host(state.params)
    for step in range(STEPS):
        state, metrics = trainer.step(state, trainer.put(data(step)))
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
    return np.array(losses), np.array(grad_norms), start, host(state.params)


def plain_nnx_run(factory, start):
    """The user's own loop: nnx.Optimizer and nnx.value_and_grad on one device, from shardml's init."""
    with nnx.use_eager_sharding(False):
        module = factory(nnx.Rngs(0))
    state = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(state, start)
    nnx.update(module, state)
    optimizer = nnx.Optimizer(module, optax.adam(LR), wrt=nnx.Param)

    @nnx.jit
    def step(module, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: mean_xent(m(x), y))(module)
        optimizer.update(module, grads)
        return loss, optax.tree.norm(grads)

    losses, grad_norms = zip(*[map(float, step(module, optimizer, jnp.asarray(b["inputs"]), jnp.asarray(b["targets"])))
                              for b in map(data, range(STEPS))])
    return np.array(losses), np.array(grad_norms), host(nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def plain_linen_run(module, start):
    optimizer = optax.adam(LR)
    params, losses, grad_norms = jax.tree.map(jnp.asarray, start), [], []
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: mean_xent(module.apply({"params": p}, x), y))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

    for b in map(data, range(STEPS)):
        params, opt_state, loss, grad_norm = step(params, opt_state, b["inputs"], b["targets"])
        losses.append(float(loss))
        grad_norms.append(float(grad_norm))
    return np.array(losses), np.array(grad_norms), host(params)


def as_str_keys(tree):
    return {str(k): as_str_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


MODELS = {
    "nnx-mlp": (lambda: from_nnx(MLP), lambda start: plain_nnx_run(MLP, start)),
    "nnx-cnn": (lambda: from_nnx(CNN), lambda start: plain_nnx_run(CNN, start)),
    "linen-mlp": (lambda: from_linen(LinenMLP(), jnp.zeros((1, FEATURES))),
                  lambda start: plain_linen_run(LinenMLP(), start)),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    make_model, plain = MODELS[request.param]
    model = make_model()
    _, _, start, _ = shardml_run(model, {"data": 1})
    losses, grad_norms, params = plain(start)
    assert losses[-1] < losses[0], f"{request.param}: the plain loop did not learn: {losses}"
    return request.param, model, losses, grad_norms, as_str_keys(params)


@pytest.mark.parametrize("name,sizes,microbatches", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_flax_model_on_every_layout_equals_the_plain_flax_loop(case, name, sizes, microbatches):
    model_name, model, ref_losses, ref_grad_norms, ref_params = case
    losses, grad_norms, _, params = shardml_run(model, sizes, microbatches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5,
                               err_msg=f"{model_name} on {name}: losses differ from the plain Flax + optax loop")
    # Adam normalises a gradient's scale away from the losses and parameters: compare it directly.
    np.testing.assert_allclose(grad_norms, ref_grad_norms, rtol=1e-5,
                               err_msg=f"{model_name} on {name}: gradient norms differ from the plain loop's")
    assert_trees_close(params, ref_params, PARAMS_RTOL, f"{model_name} on {name}: parameters vs the plain loop")


def test_annotations_become_shardings():
    model = from_nnx(MLP)
    assert model.logical["hidden"]["kernel"] == ("embed", "mlp")
    assert model.logical["hidden"]["bias"] == (None,), "an unannotated parameter must be replicated"
    trainer = build_trainer(model, make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), optax.adam(LR), loss=classification)
    spec = trainer.state_shardings.params["hidden"]["kernel"].spec
    assert tuple(spec) == ("fsdp", "tensor"), spec
    linen = from_linen(LinenMLP(), jnp.zeros((1, FEATURES)))
    assert linen.logical["Dense_0"]["kernel"] == ("embed", "mlp"), linen.logical


def _constraints_on_tensor(model):
    trainer = build_trainer(model, make_mesh({"data": 4, "tensor": 2}), optax.adam(LR), loss=classification)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding) for k, v in data(0).items()}
    jaxpr = trainer.trace_step(trainer.abstract_state(), batch).jaxpr
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "sharding_constraint" and "tensor" in str(eqn.params["sharding"].spec):
                found.append(eqn)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(jaxpr.jaxpr)
    return len(found)


def test_flax_activation_constraints_take_effect_under_shardml_rules():
    with_constraint = _constraints_on_tensor(from_nnx(lambda rngs: MLP(rngs)))
    without = _constraints_on_tensor(from_nnx(lambda rngs: MLP(rngs, constrain=False)))
    assert with_constraint > without, (f"nn.with_logical_constraint(h, ('batch', 'act_mlp')) added no constraint on "
                                       f"'tensor' ({with_constraint} with, {without} without)")
    assert _constraints_on_tensor(from_linen(LinenMLP(), jnp.zeros((1, FEATURES)))) > without


def test_dropout_gives_the_same_random_numbers_on_every_layout_and_microbatch_count():
    model = from_nnx(lambda rngs: MLP(rngs, dropout=0.5))
    assert model.uses_rng
    ref_losses, ref_grad_norms, _, ref_params = shardml_run(model, {"data": 1})
    no_dropout, _, _, _ = shardml_run(from_nnx(MLP), {"data": 1})
    assert abs(ref_losses[0] - no_dropout[0]) > 1e-3, "dropout=0.5 did not change the loss: masks not applied"
    for sizes, k in (({"data": 8}, 4), ({"data": 2, "fsdp": 2, "tensor": 2}, 2)):
        losses, grad_norms, _, params = shardml_run(model, sizes, k)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=f"dropout on {sizes}, k={k}")
        np.testing.assert_allclose(grad_norms, ref_grad_norms, rtol=1e-5, err_msg=f"dropout grad norms on {sizes}")
        assert_trees_close(params, ref_params, PARAMS_RTOL, f"dropout model on {sizes}, k={k}")


def test_unknown_logical_name_is_a_clear_error():
    class Odd(nnx.Module):
        def __init__(self, rngs):
            self.layer = nnx.Linear(4, 8, kernel_init=partitioned("embed", "hidden_units"), rngs=rngs)

        def __call__(self, x):
            return self.layer(x)

    with pytest.raises(ConfigError, match=r"logical axis 'hidden_units' has no sharding rule.*"
                                          r"replace\(hidden_units='tensor'\)"):
        build_trainer(from_nnx(Odd), make_mesh({"data": 8}), optax.adam(LR), loss=classification)


def test_batch_statistics_are_refused():
    class WithBatchNorm(nnx.Module):
        def __init__(self, rngs):
            self.layer = nnx.Linear(4, 8, rngs=rngs)
            self.norm = nnx.BatchNorm(8, rngs=rngs)

        def __call__(self, x):
            return self.norm(self.layer(x))

    with pytest.raises(ModelError, match=r"non-trainable variables \(norm/mean \(BatchStat\)") as caught:
        from_nnx(WithBatchNorm)
    assert (caught.value.subject, caught.value.value) == ("module", "WithBatchNorm")
