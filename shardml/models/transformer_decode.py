"""Decoding the reference transformer with a KV cache: a prefill of the prompts, then one token at
a time.

Inference only; the training path (:mod:`shardml.models.transformer_layers`) is untouched and its
layers are reused. Prompts are right-aligned in a [B, P] buffer (row b's real tokens start at slot
``starts[b]``), so every row writes its next key and value at the same cache slot and one
``dynamic_update_slice`` serves the batch (as jax-llm-examples does). Rotary positions count from
each row's own start, so a token sees exactly the positions a plain forward pass over its unpadded
sequence gives it. T is the cache length (static); other shape letters as in the layers module.

    logits_BV, cache = prefill(params, tokens_BP, starts_B, cfg, length=P + new_tokens)
    logits_BV, cache = decode_step(params, cache, next_B, slot=P, starts_B=starts_B, cfg=cfg)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shardml.core.sharding import constrain
from shardml.models.transformer_layers import (
    TransformerConfig,
    attend,
    embed_tokens,
    is_local,
    output_logits,
    qkv,
    residual_block,
    rotary_angles,
    rotate,
    visible_keys,
)

KV_CACHE_LOGICAL = ("layers", "batch", "act_seq", "act_kv_heads", "head_dim")  # of k and v [L, B, T, K, E]


def rotary_at(x_BSHE, positions_BS, base: float):
    """:func:`~shardml.models.transformer_layers.rotary` at explicit positions per row (the same
    arithmetic for the same position)."""
    return rotate(x_BSHE, rotary_angles(positions_BS, x_BSHE.shape[-1], base))


def _qkv_at(h_BSD, layer, positions_BS, cfg: TransformerConfig, local=True):
    """Rotated queries and keys and the values of ``h`` at the given positions (the training path's
    :func:`~shardml.models.transformer_layers.qkv`, values constrained for the cache)."""
    q_BSHE, k_BSKE, v_BSKE = qkv(h_BSD, layer, positions_BS, cfg, local)
    return q_BSHE, k_BSKE, constrain(v_BSKE, ("batch", "act_seq", "act_kv_heads", None))


def _masked_attention(q_BSHE, k_BTKE, v_BTKE, visible_BST, layer, cfg: TransformerConfig):
    """Attention of S queries over T keys where ``visible`` (the training path's arithmetic)."""
    return attend(q_BSHE, k_BTKE, v_BTKE, visible_BST[:, None, None, :, :], layer, cfg)


def _layers(params) -> int:
    return jax.tree.leaves(params["layers"])[0].shape[0]


def _indices(params):
    return jnp.arange(_layers(params))


def _last_logits(params, x_B1D, cfg: TransformerConfig):
    return output_logits(params, x_B1D, cfg)[:, 0, :]


def prefill(params, tokens_BP, starts_B, cfg: TransformerConfig, length: int):
    """Runs right-aligned prompts through the model and fills a KV cache of ``length`` slots.

    Args:
      tokens_BP: int prompts, row b's real tokens in slots ``starts[b]:P`` (the rest is padding).
      starts_B: where each row's prompt starts.
      length: T >= P, the cache length (prompt + new tokens).

    Returns:
      ``(logits_BV, cache)``: f32 logits of each row's last prompt token (the next token's
      distribution) and ``{"k", "v"}`` [L, B, T, K, E] in the compute dtype, slots P.. empty.
    """
    P = tokens_BP.shape[1]
    slots_P = jnp.arange(P)
    positions_BP = jnp.maximum(slots_P[None, :] - starts_B[:, None], 0)
    key_P, query_P = slots_P[None, None, :], slots_P[None, :, None]

    def block(x_BPD, layer_l):
        layer, l = layer_l
        local = is_local(l, cfg)
        visible_BPP = visible_keys(query_P, key_P, cfg, local) & (key_P >= starts_B[:, None, None])  # no left pad

        def attend_fn(h_BPD):
            q_BPHE, k_BPKE, v_BPKE = _qkv_at(h_BPD, layer, positions_BP, cfg, local)
            return _masked_attention(q_BPHE, k_BPKE, v_BPKE, visible_BPP, layer, cfg), (k_BPKE, v_BPKE)

        return residual_block(x_BPD, layer, cfg, attend_fn)

    x_BPD = embed_tokens(params, tokens_BP, cfg).astype(jnp.dtype(cfg.dtype))
    x_BPD, (k_LBPKE, v_LBPKE) = jax.lax.scan(block, x_BPD, (params["layers"], _indices(params)))
    pad = ((0, 0), (0, 0), (0, length - P), (0, 0), (0, 0))
    cache = {name: constrain(jnp.pad(kv, pad), KV_CACHE_LOGICAL) for name, kv in (("k", k_LBPKE), ("v", v_LBPKE))}
    return _last_logits(params, x_BPD[:, -1:, :], cfg), cache


def decode_step(params, cache, tokens_B, slot, starts_B, cfg: TransformerConfig):
    """One new token per row at cache slot ``slot`` (the same for every row): writes its key and
    value there and attends over slots ``starts[b]..slot``.

    Returns:
      ``(logits_BV, cache)``: the next token's f32 logits and the updated cache.
    """
    T = cache["k"].shape[2]
    positions_B1 = (slot - starts_B)[:, None]
    slots_T = jnp.arange(T)

    def block(carry, layer_l):
        x_B1D, k_cache, v_cache = carry
        layer, l = layer_l
        local = is_local(l, cfg)
        visible_B1T = (visible_keys(slot, slots_T[None, :], cfg, local) & (slots_T[None, :] >= starts_B[:, None]))

        def attend_fn(h_B1D):
            q_B1HE, k_B1KE, v_B1KE = _qkv_at(h_B1D, layer, positions_B1, cfg, local)
            at = (l, 0, slot, 0, 0)
            k_new = jax.lax.dynamic_update_slice(k_cache, k_B1KE[None].astype(k_cache.dtype), at)
            v_new = jax.lax.dynamic_update_slice(v_cache, v_B1KE[None].astype(v_cache.dtype), at)
            out = _masked_attention(q_B1HE, k_new[l], v_new[l], visible_B1T[:, None, :], layer, cfg)
            return out, (k_new, v_new)

        x_B1D, (k_cache, v_cache) = residual_block(x_B1D, layer, cfg, attend_fn)
        return (x_B1D, k_cache, v_cache), None

    x_B1D = embed_tokens(params, tokens_B[:, None], cfg).astype(jnp.dtype(cfg.dtype))
    (x_B1D, k_cache, v_cache), _ = jax.lax.scan(block, (x_B1D, cache["k"], cache["v"]),
                                                (params["layers"], jnp.arange(_layers(params))))
    cache = {"k": constrain(k_cache, KV_CACHE_LOGICAL), "v": constrain(v_cache, KV_CACHE_LOGICAL)}
    return _last_logits(params, x_B1D, cfg), cache
