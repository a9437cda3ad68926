"""The reference transformer against the same architecture written here in NumPy (float64): RMS
norm, rotary positions on channel pairs (i, i + E/2), causal grouped-query attention scaled by
1/sqrt(E), a SwiGLU MLP, pre-norm residuals, a final norm and an untied unembedding. Every
layout test compares the model with itself; this one compares it with an implementation nobody
shares code with."""

import dataclasses

import jax
import numpy as np
import pytest

from conftest import TINY, host
from shardml.models import transformer

SEQ, ROWS = 8, 3


def rms_norm(x, scale):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def rotary(x_SHE, base):
    S, E = x_SHE.shape[0], x_SHE.shape[-1]
    half = E // 2
    out = np.empty_like(x_SHE)
    for s in range(S):
        for i in range(half):
            angle = s * base ** (-2.0 * i / E)
            a, b = x_SHE[s, :, i], x_SHE[s, :, i + half]
            out[s, :, i] = a * np.cos(angle) - b * np.sin(angle)
            out[s, :, i + half] = b * np.cos(angle) + a * np.sin(angle)
    return out


def silu(x):
    return x / (1.0 + np.exp(-x))


def forward(p, tokens_S, cfg):
    """Logits [S, V] of one sequence."""
    H = cfg.heads
    K = cfg.kv_heads or H
    E = cfg.d_model // H
    S = len(tokens_S)
    x = p["embed"][tokens_S]
    for layer in range(cfg.layers):
        w = {name: value[layer] for name, value in p["layers"].items()}
        h = rms_norm(x, w["attn_norm"])
        q = rotary(np.einsum("sd,dhe->she", h, w["wq"]), cfg.rope_base)
        k = rotary(np.einsum("sd,dke->ske", h, w["wk"]), cfg.rope_base)
        v = np.einsum("sd,dke->ske", h, w["wv"])
        o = np.zeros((S, H, E))
        for head in range(H):
            kv = head // (H // K)  # query heads grouped onto key/value heads in order
            scores = q[:, head] @ k[:, kv].T / np.sqrt(E)
            scores = np.where(np.tril(np.ones((S, S), bool)), scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            o[:, head] = probs @ v[:, kv]
        x = x + np.einsum("she,hed->sd", o, w["wo"])
        h = rms_norm(x, w["mlp_norm"])
        x = x + (silu(h @ w["w_gate"]) * (h @ w["w_up"])) @ w["w_down"]
    return rms_norm(x, p["final_norm"]) @ p["unembed"]


@pytest.mark.parametrize("kv_heads", [0, 2], ids=["multi-head", "grouped-query"])
def test_transformer_logits_equal_numpy_written_here(kv_heads):
    cfg = dataclasses.replace(TINY, kv_heads=kv_heads, rope_base=100.0)
    model = transformer(cfg, SEQ)
    params = host(model.init(jax.random.key(1)))
    # Norm scales start at 1; other values make a norm that ignores its scale fail.
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * rng.uniform(0.5, 1.5, x.shape).astype(np.float32) if "norm" in str(path) else x, params)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab, (ROWS, SEQ)).astype(np.int32)
    got = np.asarray(jax.jit(model.apply)(params, tokens))
    p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    want = np.stack([forward(p64, row, cfg) for row in tokens])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
