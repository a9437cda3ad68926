"""The train step against an update written independently here (plain jax.grad + optax on one
device), on every layout and microbatch count; what the state holds; what the step donates."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import OPTIM, PARAMS_RTOL, assert_trees_close, host, lm_batch, max_rel_diff, tiny_transformer, trainer_for
from shardml.core.data import TextBatches, load_tokens
from shardml.core.optim import default_optimizer
from shardml.core.step import TrainState, train_step

STEPS = 3
BATCH = 32
SLOW = [pytest.mark.slow]  # the default suite keeps one layout of each axis and both accumulations
LAYOUTS = [pytest.param(name, sizes, k, marks=marks, id=name) for name, sizes, k, marks in [
    ("one device", {"data": 1}, 1, ()),
    ("data=8", {"data": 8}, 1, SLOW),
    ("fsdp=8", {"fsdp": 8}, 1, ()),
    ("data=2 x tensor=4", {"data": 2, "tensor": 4}, 1, SLOW),
    ("data=2 x fsdp=2 x tensor=2", {"data": 2, "fsdp": 2, "tensor": 2}, 1, SLOW),
    ("data=8, 4 microbatches", {"data": 8}, 4, ()),
    ("data=2 x fsdp=2 x tensor=2, 2 microbatches", {"data": 2, "fsdp": 2, "tensor": 2}, 2, ()),
]]


def batches():
    """Real text, a different batch each step, with ragged masks (so counts differ per microbatch)."""
    source = TextBatches(load_tokens("pydoc"), batch_size=BATCH, seq_len=16, seed=3)
    out = []
    for step in range(STEPS):
        batch = source.batch(step)
        batch["mask"] = lm_batch(BATCH, seed=step, ragged=True)["mask"]
        out.append(batch)
    return out


def independent_run(model, params, batches):
    """Mean token cross-entropy with jax.grad and the optimizer's optax update, one device, no shardml."""
    optimizer = default_optimizer(OPTIM, 10)

    def mean_loss(p, batch):
        logits = model(p, jnp.asarray(batch["inputs"])).astype(jnp.float32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(batch["targets"])[..., None], -1)[..., 0]
        mask = jnp.asarray(batch["mask"])
        return jnp.sum(nll * mask) / jnp.sum(mask)

    @jax.jit
    def update(p, opt_state, batch):
        loss, grads = jax.value_and_grad(mean_loss)(p, batch)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss, optax.tree.norm(grads)

    device = jax.devices()[0]
    params = jax.device_put(params, device)
    opt_state = optimizer.init(params)
    losses, norms = [], []
    for batch in batches:
        params, opt_state, loss, norm = update(params, opt_state, batch)
        losses.append(float(loss))
        norms.append(float(norm))
    return np.array(losses), np.array(norms), host(params)


@pytest.fixture(scope="module")
def reference(tiny_model):
    start = host(trainer_for(tiny_model, {"data": 1}).init(0).params)
    losses, norms, params = independent_run(tiny_model, start, batches())
    return losses, norms, params


def run(trainer):
    state, losses, norms = trainer.init(0), [], []
    for batch in batches():
        state, metrics = trainer.step(state, trainer.put(batch))
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return np.array(losses), np.array(norms), host(state.params)


@pytest.mark.parametrize("name,sizes,microbatches", LAYOUTS)
def test_every_layout_equals_the_independent_update(tiny_model, reference, name, sizes, microbatches):
    ref_losses, ref_norms, ref_params = reference
    assert ref_losses[-1] < ref_losses[0], f"the reference did not learn on distinct real batches: {ref_losses}"
    losses, norms, params = run(trainer_for(tiny_model, sizes, microbatches))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5,
                               err_msg=f"{name}: per-step losses differ from plain jax.grad + optax")
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-5, err_msg=f"{name}: grad_norm differs from optax.global_norm")
    assert_trees_close(params, ref_params, PARAMS_RTOL, f"{name}: parameters after {STEPS} steps vs the independent update")


def test_state_is_donated_and_counters_live_in_it(tiny_model):
    trainer = trainer_for(tiny_model, {"data": 8})
    state = trainer.init(0)
    assert isinstance(state, TrainState)
    assert (int(state.bad_steps), int(state.bad_streak)) == (0, 0)
    old_leaf = state.params["layers"]["wq"]
    new, _ = trainer.step(state, trainer.put(lm_batch(BATCH)))
    assert old_leaf.is_deleted(), "the step did not donate the input state (its buffers are still alive)"
    assert int(new.step) == 1


def test_nonfinite_steps_are_counted_in_the_state(tiny_model):
    trainer = trainer_for(tiny_model, {"data": 8})
    state = trainer.init(0)
    bad = lm_batch(BATCH)
    bad["mask"][0, 0] = np.nan
    streaks = []
    for batch in (bad, bad, lm_batch(BATCH), bad):
        state, metrics = trainer.step(state, trainer.put(batch))
        streaks.append((int(metrics["skipped"]), int(state.bad_steps), int(state.bad_streak)))
    assert streaks == [(1, 1, 1), (1, 2, 2), (0, 2, 0), (1, 3, 1)], streaks


def test_bf16_compute_keeps_parameters_and_optimizer_state_in_f32():
    trainer = trainer_for(tiny_transformer(dtype="bfloat16"), {"data": 2, "fsdp": 2, "tensor": 2})
    state = trainer.abstract_state()
    dtypes = {str(leaf.dtype) for leaf in jax.tree.leaves((state.params, state.opt_state)) if leaf.ndim}
    assert dtypes == {"float32"}, f"bf16 compute stored parameters / moments as {dtypes}"
    lowered = trainer.lower_step(state, {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding)
                                          for k, v in lm_batch(BATCH).items()})
    assert "bf16" in lowered.as_text(), "bf16 compute does not compute in bf16"


def test_init_differs_by_seed_and_models_differ_by_seed(tiny_model):
    trainer = trainer_for(tiny_model, {"data": 8})
    a, b = host(trainer.init(0)), host(trainer.init(1))
    assert max_rel_diff(a.params, b.params) > 0.1, "two seeds gave the same parameters"
    assert not np.array_equal(a.rng, b.rng), "two seeds gave the same RNG key"
    c = host(trainer.init(0))
    assert max_rel_diff(a.params, c.params) == 0.0, "the same seed gave different parameters"


def test_independent_reference_catches_a_wrong_divisor(tiny_model, reference):
    """Guards the comparison: a step that divides by a mean of per-microbatch counts would differ."""
    trainer = trainer_for(tiny_model, {"data": 8}, 4)
    strategy = trainer.strategy

    def wrong(params, batch, rng_rows=None):
        grads, sums = strategy.gradient_sums(params, batch, rng_rows)
        return grads, {**sums, "count": sums["count"] * 1.001}

    step = functools.partial(train_step, strategy=strategy._replace(gradient_sums=wrong),
                             optimizer=trainer.optimizer, rules=trainer.rules, uses_rng=False)
    broken = dataclasses.replace(trainer, _step=jax.jit(step))
    losses, _, _ = run(broken)
    assert not np.allclose(losses[1:], reference[0][1:], rtol=1e-5), "a 0.1 % wrong divisor went unnoticed"
