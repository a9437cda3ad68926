"""Mixture of experts: the layer against a dense loop over experts written here, routing counts and
the auxiliary losses against NumPy, layouts with an ``expert`` axis against one device, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from shardml.core.errors import LayoutError, ModelError, SettingError
from shardml.core.losses import token_cross_entropy
from shardml.core.mesh import make_mesh
from shardml.core.model import init_params
from shardml.core.step import build_trainer
from shardml.core.strategy import model_sums
from shardml.models.transformer import TransformerConfig, transformer
from shardml.models.transformer_layers import feed_forward, transformer_specs
from shardml.models.transformer_moe import aux_sums, route

CFG = TransformerConfig(vocab=32, layers=2, d_model=16, heads=2, d_ff=32, dtype="float32", experts=4, top_k=2,
                        shared_experts=1, remat="none", layer_loop="scan")


def dense_reference(h_BSD, layer, cfg):
    """Every expert on every token, combined by the renormalised top-k gates (plain jnp)."""
    logits = jnp.einsum("bsd,dn->bsn", h_BSD, layer["router"])
    scores = jax.nn.softmax(logits, -1) if cfg.moe_gate == "softmax" else jax.nn.sigmoid(logits)
    top, idx = jax.lax.top_k(scores, cfg.top_k)
    gates = top / top.sum(-1, keepdims=True)
    weight_BSN = jnp.sum(jax.nn.one_hot(idx, cfg.experts) * gates[..., None], axis=2)
    out = 0.0
    for n in range(cfg.experts):
        hidden = jax.nn.silu(h_BSD @ layer["we_gate"][n]) * (h_BSD @ layer["we_up"][n])
        out = out + weight_BSN[..., n:n + 1] * (hidden @ layer["we_down"][n])
    shared = jax.nn.silu(h_BSD @ layer["ws_gate"]) * (h_BSD @ layer["ws_up"]) @ layer["ws_down"]
    return out + shared


def capacity_reference(h_BSD, layer, cfg):
    """A loop over each sequence's tokens in order, each expert taking the first
    ceil(c x S x top_k / N) tokens that choose it; a dropped choice adds nothing (NumPy, float64)."""
    h = np.asarray(h_BSD, np.float64)
    w = {k: np.asarray(v, np.float64) for k, v in layer.items()}
    B, S, _ = h.shape
    cap = int(np.ceil(cfg.capacity_factor * S * cfg.top_k / cfg.experts))
    out = np.zeros_like(h)
    silu = lambda x: x / (1 + np.exp(-x))  # noqa: E731
    for b in range(B):
        taken = np.zeros(cfg.experts, int)
        for s in range(S):
            logits = h[b, s] @ w["router"]
            scores = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            top = np.argsort(-scores)[:cfg.top_k]
            gates = scores[top] / scores[top].sum()
            for n, g in zip(top, gates):
                if taken[n] < cap:
                    out[b, s] += g * (silu(h[b, s] @ w["we_gate"][n]) * (h[b, s] @ w["we_up"][n])) @ w["we_down"][n]
                taken[n] += 1
            out[b, s] += (silu(h[b, s] @ w["ws_gate"]) * (h[b, s] @ w["ws_up"])) @ w["ws_down"]
    return out


def test_capacity_drops_the_later_tokens_like_a_loop_in_order():
    layer = jax.tree.map(lambda w: w[0], init_params(transformer_specs(CFG), jax.random.key(0))["layers"])
    h = jax.random.normal(jax.random.key(1), (3, 5, CFG.d_model))
    h = jnp.concatenate([h, h[:, :2]], axis=1)  # S=7, repeated tokens: the same choices, later, are dropped
    layers = jax.jit(lambda layer, h, factors: [feed_forward(h, layer, TransformerConfig(
        **{**CFG.__dict__, "capacity_factor": f}))[0] for f in factors], static_argnums=2)
    dropless, *got = layers(layer, h, (0.0, 0.5, 1.0, float(CFG.experts)))  # the last: C >= S x top_k
    for factor, out in zip((0.5, 1.0), got):
        want = capacity_reference(h, layer, TransformerConfig(**{**CFG.__dict__, "capacity_factor": factor}))
        np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5, err_msg=f"capacity_factor={factor}")
        assert np.abs(np.asarray(dropless) - want).max() > 1e-3, f"capacity_factor={factor} dropped nothing"
    np.testing.assert_allclose(got[-1], dropless, atol=1e-6)


@pytest.fixture(scope="module", params=["softmax", "sigmoid"])
def case(request):
    cfg = TransformerConfig(**{**CFG.__dict__, "moe_gate": request.param})
    params = init_params(transformer_specs(cfg), jax.random.key(0))
    layer = jax.tree.map(lambda w: w[0], params["layers"])
    h = jax.random.normal(jax.random.key(1), (3, 5, cfg.d_model))
    return cfg, layer, h, params


def test_moe_layer_equals_dense_loop_values_and_gradients(case):
    cfg, layer, h = case[:3]
    ours = jax.jit(lambda layer, h: feed_forward(h, layer, cfg)[0])
    np.testing.assert_allclose(ours(layer, h), dense_reference(h, layer, cfg), atol=1e-5, rtol=1e-5)

    def loss(fn):
        return lambda layer, h: jnp.sum(jnp.sin(fn(layer, h)))

    got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(layer, h)
    want = jax.jit(jax.grad(loss(lambda layer, h: dense_reference(h, layer, cfg)), argnums=(0, 1)))(layer, h)
    for path, g, w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=str(path[0]))
    assert float(jnp.abs(got[0]["router"]).sum()) > 0, "the router must get a gradient through the gates"


def test_routing_counts_and_aux_losses_by_hand(case):
    cfg, layer, h = case[:3]
    B, S, _ = h.shape
    logits, scores, expert, gates = route(h.reshape(B * S, -1), layer["router"], cfg)
    x = np.asarray(h, np.float64).reshape(B * S, -1)
    lg = x @ np.asarray(layer["router"], np.float64)
    sc = np.exp(lg) / np.exp(lg).sum(-1, keepdims=True) if cfg.moe_gate == "softmax" else 1 / (1 + np.exp(-lg))
    top = np.argsort(-sc, axis=-1)[:, :cfg.top_k]
    assert (np.sort(np.asarray(expert), -1) == np.sort(top, -1)).all()
    picked = np.take_along_axis(sc, np.asarray(expert), -1)
    np.testing.assert_allclose(gates, picked / picked.sum(-1, keepdims=True), rtol=1e-5)
    aux, z = aux_sums(logits.reshape(B, S, -1), scores.reshape(B, S, -1), expert.reshape(B, S, -1), cfg.experts)
    want_aux = 0.0
    for b in range(B):
        rows = slice(b * S, (b + 1) * S)
        counts = np.bincount(top[rows].ravel(), minlength=cfg.experts)
        want_aux += S * cfg.experts * np.sum(counts / (S * cfg.top_k) * sc[rows].mean(0))
    lse = np.log(np.exp(lg).sum(-1))
    np.testing.assert_allclose(aux, want_aux, rtol=1e-5)
    np.testing.assert_allclose(z, np.sum(lse ** 2), rtol=1e-5)


def test_bad_moe_input_is_a_clear_error_before_compiling():
    with pytest.raises(ModelError, match=r"top_k=5 must be between 1 and experts=4"):
        transformer(TransformerConfig(**{**CFG.__dict__, "top_k": 5}), 8)
    with pytest.raises(SettingError, match=r"capacity_factor=-1.0 must be >= 0"):
        transformer(TransformerConfig(**{**CFG.__dict__, "capacity_factor": -1.0}), 8)
    with pytest.raises(ModelError, match=r"capacity_factor=1.5 does nothing with experts=0"):
        transformer(TransformerConfig(**{**CFG.__dict__, "experts": 0, "capacity_factor": 1.5}), 8)
    model = transformer(TransformerConfig(**{**CFG.__dict__, "experts": 3, "top_k": 1}), 8)
    with pytest.raises(LayoutError, match=r"'layers/we_\w+' has size 3 along 'experts'.*expert=2 = 2 does not"):
        build_trainer(model, make_mesh({"expert": 2, "data": 4}), optax.sgd(1.0))


def _step(sizes, batch, microbatches=1, cfg=CFG):
    model = transformer(cfg, 8)
    devices = jax.devices()[:int(np.prod(list(sizes.values())))]
    trainer = build_trainer(model, make_mesh(sizes, devices), optax.sgd(1.0), microbatches=microbatches)
    state, metrics = trainer.step(trainer.init(0), trainer.put(batch))
    return jax.device_get(state.params), {k: float(v) for k, v in metrics.items()}


@pytest.mark.slow
def test_expert_layouts_equal_one_device_loss_and_gradients():
    tokens = np.random.default_rng(0).integers(0, CFG.vocab, (8, 9))
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
    want_params, want = _step({"data": 1}, batch)
    assert want["moe_aux"] > 0.5 and want["moe_z"] > 0
    # The aux loss is per sequence, so microbatches (rows split within each shard) change nothing either.
    for sizes, microbatches in (({"expert": 2, "data": 2, "tensor": 2}, 2), ({"expert": 4, "fsdp": 2}, 1),
                                ({"fsdp": 4, "tensor": 2}, 2)):  # experts not split: each device its own tokens
        params, got = _step(sizes, batch, microbatches)
        for name in ("loss", "moe_aux", "moe_z", "grad_norm"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=f"{sizes} {name}")
        for g, w in zip(jax.tree.leaves(params), jax.tree.leaves(want_params)):  # sgd(1): params - gradients
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=str(sizes))


def test_the_weighted_aux_losses_are_added_to_the_loss_sums(case):
    cfg, params = case[0], case[3]
    model = transformer(cfg, 8)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab, (2, 9)))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

    def both(params):
        logits, extra = model.outputs_and_sums(params, batch["inputs"])
        return token_cross_entropy(logits, batch), extra, model_sums(model, token_cross_entropy)(params, batch)

    plain, extra, sums = jax.jit(both)(params)
    assert set(extra) == {"loss", "moe_aux", "moe_z"}
    np.testing.assert_allclose(extra["loss"], cfg.aux_loss_weight * extra["moe_aux"] + cfg.z_loss_weight
                               * extra["moe_z"], rtol=1e-6)
    np.testing.assert_allclose(sums["loss"], plain["loss"] + extra["loss"], rtol=1e-6)
    np.testing.assert_allclose(sums["moe_aux"] / sums["count"], extra["moe_aux"] / 16, rtol=1e-6)


@pytest.mark.slow
def test_capacity_drops_the_same_tokens_on_an_expert_layout():
    """The capacity is per sequence: an expert x data x tensor layout with microbatches drops what
    one device drops (same loss and SGD update; that capacity 0.5 drops pairs is held by the cheap
    test above)."""
    cfg = TransformerConfig(**{**CFG.__dict__, "capacity_factor": 0.5})
    tokens = np.random.default_rng(0).integers(0, CFG.vocab, (8, 9))
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
    want_params, want = _step({"data": 1}, batch, cfg=cfg)
    params, got = _step({"expert": 2, "data": 2, "tensor": 2}, batch, 2, cfg=cfg)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    for g, w in zip(jax.tree.leaves(params), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
