"""Behaviour against references written here: filtered sampling at temperatures other than 1 (the
frequencies of many seeded draws against the tempered, top-k and top-p filtered softmax), FedOpt's
server Adam / Yogi / Adagrad against their update rules in NumPy, and DP-SGD as a plain train step
(outside federated rounds) against per-example clipping and noise written here."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_trees_close, host
from shardml.core.data import put_batch
from shardml.core.losses import classification
from shardml.core.mesh import make_mesh
from shardml.core.privacy import private_accumulator
from shardml.core.sharding import Rules, batch_sharding
from shardml.core.step import init_state, train_step
from shardml.models import mlp_classifier
from shardml.parallel.federated import server_optimizer
from shardml.parallel.inference import sample_tokens

DRAWS = 40_000


def filtered_softmax(logits, temperature, top_k, top_p):
    """The distribution a filtered sampler draws from: softmax(logits / T), then the top_k most likely
    tokens, then the smallest most likely set holding top_p of their mass; renormalised."""
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros(len(p), bool)
    keep[order[:top_k or len(p)]] = True
    q = np.where(keep, p, 0.0) / p[keep].sum()
    mass = 0.0
    nucleus = np.zeros(len(p), bool)
    for token in order:
        if not keep[token] or mass >= top_p:
            break
        nucleus[token] = True
        mass += q[token]
    out = np.where(nucleus, p, 0.0)
    return out / out.sum()


@functools.cache
def _sampler(kind):
    return jax.jit(functools.partial(sample_tokens, sampler=kind))


def frequencies(logits, temperature, top_k, top_p, kind="filtered"):
    rows = jnp.arange(DRAWS, dtype=jnp.int32)
    logits_BV = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (DRAWS, len(logits)))
    sampling = {"temperature": jnp.float32(temperature), "top_k": jnp.int32(top_k), "top_p": jnp.float32(top_p),
                "seed": jnp.uint32(7)}
    tokens = np.asarray(_sampler(kind)(logits_BV, jnp.int32(3), rows, sampling))
    return np.bincount(tokens, minlength=len(logits)) / DRAWS


LOGITS = np.asarray([2.0, 1.2, 0.9, 0.3, -0.2, -1.0, -2.5])
BOUND = 0.02  # total variation; 40k draws from ~5 tokens stay within ~0.006 of their distribution


@pytest.mark.parametrize("temperature,top_k,top_p", [(2.5, 0, 0.9), (0.5, 0, 0.5), (2.0, 6, 0.8), (3.0, 4, 0.6), (1.7, 3, 1.0)])
def test_filtered_sampling_draws_from_the_tempered_then_filtered_softmax(temperature, top_k, top_p):
    want = filtered_softmax(LOGITS, temperature, top_k, top_p)
    untempered = filtered_softmax(LOGITS, 1.0, top_k, top_p)
    got = frequencies(LOGITS, temperature, top_k, top_p)
    tv = 0.5 * np.abs(got - want).sum()
    assert tv < BOUND, f"T={temperature} top_k={top_k} top_p={top_p}: frequencies {got.round(3)}, want {want.round(3)}"
    assert 0.5 * np.abs(untempered - want).sum() > 4 * BOUND, "the temperature must matter for this test"
    if top_p < 1:  # the test must tell the orders apart: cutting before the temperature keeps another set
        order_wrong = np.exp(LOGITS / temperature) * (filtered_softmax(LOGITS, 1.0, top_k, top_p) > 0)
        order_wrong /= order_wrong.sum()
        assert 0.5 * np.abs(order_wrong - want).sum() > 4 * BOUND, "cutting before the temperature must differ"


def test_temperature_sampling_draws_from_the_tempered_softmax():
    for temperature in (0.6, 2.0):
        want = filtered_softmax(LOGITS, temperature, 0, 1.0)
        got = frequencies(LOGITS, temperature, 0, 1.0, kind="temperature")
        assert 0.5 * np.abs(got - want).sum() < BOUND, f"T={temperature}: {got.round(3)} vs {want.round(3)}"


# ----------------------------------------------------------------------------- FedOpt's server optimizers

GRADS = [np.asarray([0.5, -1.0, 2.0, 0.0]), np.asarray([0.1, -0.3, -1.0, 0.4]), np.asarray([-0.2, 0.8, 0.5, 0.3])]


def numpy_server(name, lr, eps, b1=0.9, b2=0.99):
    """The pseudo-gradient updates of FedAdam / FedYogi / FedAdagrad (optax's conventions: Yogi's
    moments start at 1e-6, Adagrad's eps inside the root), step by step."""
    m = np.full(4, 1e-6 if name == "yogi" else 0.0)
    v = m.copy()
    out = []
    for t, g in enumerate(GRADS, start=1):
        if name == "adagrad":
            v = v + g * g
            out.append(-lr * g / np.sqrt(v + eps) * (v > 0))
            continue
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g if name == "adam" else v - (1 - b2) * np.sign(v - g * g) * g * g
        out.append(-lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps))
    return out


@pytest.mark.parametrize("name", ["adam", "yogi", "adagrad"])
def test_fedopt_server_optimizers_follow_their_update_rules(name):
    lr, eps = 0.03, 1e-3
    server = server_optimizer(name, lr, eps=eps)
    params = jnp.zeros(4)
    state = server.init(params)
    for step, (g, want) in enumerate(zip(GRADS, numpy_server(name, lr, eps))):
        update, state = server.update(jnp.asarray(g, jnp.float32), state, params)
        np.testing.assert_allclose(np.asarray(update), want, rtol=2e-5, atol=1e-8,
                                   err_msg=f"server {name}, round {step + 1}")


def test_fedavg_server_is_plain_sgd_with_momentum():
    server = server_optimizer("sgd", 0.5, momentum=0.9)
    state, velocity = server.init(jnp.zeros(4)), np.zeros(4)
    for g in GRADS:
        update, state = server.update(jnp.asarray(g, jnp.float32), state)
        velocity = 0.9 * velocity + g
        np.testing.assert_allclose(np.asarray(update), -0.5 * velocity, rtol=1e-6)


# ----------------------------------------------------------------------------- DP-SGD on its own

ROWS, FEATURES, CLASSES, CLIP = 16, 6, 4, 0.3


@functools.cache
def dp_step(noise, microbatches):
    """A jitted plain train step (SGD, lr 1) whose gradient strategy is DP-SGD, on data=2."""
    model = mlp_classifier(FEATURES, 8, CLASSES)
    mesh = make_mesh({"data": 2}, jax.devices()[:2])
    rules = Rules.default()
    strategy = private_accumulator(model, classification, mesh, microbatches, clip_norm=CLIP, noise_multiplier=noise)
    optimizer = optax.sgd(1.0)
    step = jax.jit(functools.partial(train_step, strategy=strategy, optimizer=optimizer, rules=rules, uses_rng=True))
    init = jax.jit(functools.partial(init_state, model=model, optimizer=optimizer, strategy=strategy, rules=rules))
    return model, mesh, rules, init, step


def dp_batch():
    rng = np.random.default_rng(5)
    mask = np.ones(ROWS, np.float32)
    mask[[3, 10]] = 0.0
    return {"inputs": (3 * rng.normal(size=(ROWS, FEATURES))).astype(np.float32),
            "targets": rng.integers(0, CLASSES, ROWS).astype(np.int32), "mask": mask}


def run_dp(noise, microbatches):
    model, mesh, rules, init, step = dp_step(noise, microbatches)
    batch = dp_batch()
    with jax.set_mesh(mesh):
        state = init(jnp.uint32(0))
        start = host(state.params)
        state, metrics = step(state, put_batch(batch, batch_sharding(mesh, rules)))
    return model, batch, start, host(state.params), metrics


def clipped_mean_gradient(model, params, batch):
    """Each real example's gradient clipped to CLIP (global norm), summed, divided by the real count."""

    def example_loss(p, x, y, w):
        return -jax.nn.log_softmax(model(p, x[None]))[0][y] * w

    per_example = host(jax.jit(jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0, 0)))(
        params, batch["inputs"], batch["targets"], batch["mask"]))
    norms = np.sqrt(sum(np.sum(leaf.astype(np.float64) ** 2, axis=tuple(range(1, leaf.ndim)))
                        for leaf in jax.tree.leaves(per_example)))
    factor = np.minimum(1.0, CLIP / np.maximum(norms, 1e-30))
    total = jax.tree.map(lambda g: np.tensordot(factor, g.astype(np.float64), axes=1), per_example)
    return jax.tree.map(lambda t: t / batch["mask"].sum(), total), int(np.sum(norms > CLIP))


def test_dp_sgd_step_is_the_mean_of_per_example_clipped_gradients():
    model, batch, start, after, metrics = run_dp(0.0, 2)
    want, clipped = clipped_mean_gradient(model, start, batch)
    assert clipped >= 4, f"only {clipped} examples exceed the clip: the test cannot tell clipping apart"
    applied = jax.tree.map(lambda a, b: a - b, start, after)
    assert_trees_close(applied, want, 1e-5, "DP-SGD step vs per-example clipping written here")
    assert float(metrics["count"]) == batch["mask"].sum()


def test_dp_sgd_noise_is_added_once_to_the_sum_of_clipped_gradients():
    """N(0, (noise · clip)²) on the sum, once per step whatever the microbatch count: after the
    division by the real count, std noise · clip / count per entry."""
    sigma = 2.0
    model, batch, start, after, _ = run_dp(sigma, 4)
    want, _ = clipped_mean_gradient(model, start, batch)
    noise = np.concatenate([np.ravel((a - b) - w) for a, b, w in
                            zip(jax.tree.leaves(start), jax.tree.leaves(after), jax.tree.leaves(want))])
    expected = sigma * CLIP / batch["mask"].sum()
    ratio = np.std(noise) / expected
    assert 0.85 < ratio < 1.15, f"noise std {np.std(noise):.3g}, want {expected:.3g} over {noise.size} entries"
    assert abs(np.mean(noise)) < 4 * expected / np.sqrt(noise.size), "the noise is biased"
