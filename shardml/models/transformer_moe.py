"""The transformer's mixture-of-experts feed-forward: top-k routing, dropless grouped products,
the load-balancing and router z-losses.

Each token picks ``top_k`` of ``experts`` SwiGLU experts by its router scores (softmax or sigmoid
gates, renormalised over the chosen k by default). The (token, choice) pairs are sorted by expert
and the experts run as three grouped products (``jax.lax.ragged_dot``) over the sorted rows: no
token is dropped and no capacity padding is computed, so the layer equals a dense loop over
experts exactly. With ``capacity_factor`` c > 0 each expert takes at most
C = ceil(c x S x top_k / N) of each sequence's (token, choice) pairs, the earliest positions first;
a dropped pair's gate is zeroed (the token keeps its other choices and its residual). The capacity
is per sequence, like the load-balancing loss, so which pairs are dropped does not depend on how
rows are split over devices or microbatches; the dropped pairs are still computed, then zeroed (the
capacity bounds what each expert contributes, not yet the FLOPs). Shape letters as in :mod:`~shardml.models.transformer_layers`, plus N experts,
A = T x top_k (token, choice) pairs and T = B x S tokens.

    out_BSD, (aux_sum, z_sum) = moe_ffn(h_BSD, layer, cfg, act=jax.nn.silu)

Expert parallelism: the expert weights' leading dimension is the logical axis ``experts``
(``expert`` in the default rules, which also split the batch over ``expert``), and the partitioner
(GSPMD) places the dispatch and the products. On XLA:CPU (JAX 0.10.2) it does so with
all-gathers and all-reduces over ``expert`` (``shardml plan`` lists them), not with the two
all-to-alls of a hand-written ``shard_map`` dispatch: exact on every layout, not yet the
communication-optimal form.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from shardml.core.errors import ModelError
from shardml.models.grouped_matmul import grouped_matmul

GATES = ("softmax", "sigmoid")


def check_moe(cfg) -> None:
    """What the settings' ranges cannot say about the experts.

    Raises:
      ModelError: ``top_k`` above ``experts`` (or 0 with experts), naming the setting to change.
    """
    if cfg.experts and not 1 <= cfg.top_k <= cfg.experts:
        raise ModelError(f"top_k={cfg.top_k} must be between 1 and experts={cfg.experts}: each token picks top_k "
                         "different experts", subject="top_k", value=cfg.top_k)
    if cfg.capacity_factor and not cfg.experts:
        raise ModelError(f"capacity_factor={cfg.capacity_factor} does nothing with experts={cfg.experts} (a dense MLP "
                         "drops no tokens); set experts > 0 or capacity_factor=0", subject="capacity_factor", value=cfg.capacity_factor)


def route(h_TD, router_DN, cfg):
    """Router logits f32 [T, N], each token's top-k experts [T, k] and gates [T, k]."""
    logits_TN = jnp.einsum("td,dn->tn", h_TD.astype(jnp.float32), router_DN.astype(jnp.float32))
    scores_TN = jax.nn.softmax(logits_TN, axis=-1) if cfg.moe_gate == "softmax" else jax.nn.sigmoid(logits_TN)
    top_TK, expert_TK = jax.lax.top_k(scores_TN, cfg.top_k)
    if cfg.norm_topk:
        top_TK = top_TK / jnp.sum(top_TK, axis=-1, keepdims=True)
    return logits_TN, scores_TN, expert_TK, top_TK


def capacity(seq_len: int, cfg) -> int:
    """Each expert's capacity in (token, choice) pairs per sequence: ceil(c x S x top_k / N).

        capacity(8, cfg)   # capacity_factor=1, top_k=2, experts=4: 4
    """
    return math.ceil(cfg.capacity_factor * seq_len * cfg.top_k / cfg.experts)


def within_capacity(expert_BSK, cfg):
    """Which (token, choice) pairs [B, S, K] fit their expert's capacity: a pair's place in its
    expert's queue is the number of earlier pairs of the sequence (earlier position; at one
    position earlier choice, though a token never picks an expert twice) sent to the same expert."""
    B, S, K = expert_BSK.shape
    onehot_BAN = jax.nn.one_hot(expert_BSK.reshape(B, S * K), cfg.experts, dtype=jnp.int32)
    place_BA = jnp.sum((jnp.cumsum(onehot_BAN, axis=1) - 1) * onehot_BAN, axis=-1)
    return (place_BA < capacity(S, cfg)).reshape(B, S, K)


def aux_sums(logits_BSN, scores_BSN, expert_BSK, experts: int):
    """Sums of the two auxiliary losses over the rows, each per token (divided by the token count
    they are the means): the load balance ``N * sum_n f_n * P_n`` of each sequence (Switch /
    GShard; f_n the share of the sequence's k x S choices that went to expert n, P_n its mean
    score; 1 when balanced) counted once per token, and the router z-loss ``logsumexp(logits)^2``.
    Per sequence, so the figures do not depend on how rows are split over devices or microbatches.
    """
    B, S, K = expert_BSK.shape
    counts_BN = jnp.sum(jax.nn.one_hot(expert_BSK, experts, dtype=jnp.float32), axis=(1, 2))
    share_BN = counts_BN / (S * K)
    mean_score_BN = jnp.mean(scores_BSN, axis=1)
    balance_B = experts * jnp.sum(share_BN * mean_score_BN, axis=-1)
    z_BS = jax.nn.logsumexp(logits_BSN, axis=-1) ** 2
    return S * jnp.sum(balance_B), jnp.sum(z_BS)


def grouped_experts(x_AD, sizes_N, w_gate, w_up, w_down, act):
    """The SwiGLU experts on rows sorted by expert (``sizes_N`` rows each, in order): [A, D].
    :func:`~shardml.models.grouped_matmul.grouped_matmul` batches under the accumulator's ``vmap``
    inside the members' one, where ``jax.lax.ragged_dot``'s own rule fails (JAX 0.10.2)."""
    dtype = x_AD.dtype
    w_gate, w_up, w_down = (w.astype(dtype) for w in (w_gate, w_up, w_down))
    gate_AF = grouped_matmul(x_AD, w_gate, sizes_N)
    up_AF = grouped_matmul(x_AD, w_up, sizes_N)
    return grouped_matmul(act(gate_AF) * up_AF, w_down, sizes_N)


def sorted_by_expert(expert_TK, experts: int):
    """The (token, choice) pairs in expert order: the permutation [A] of the flat pairs and the
    number of pairs per expert [N]."""
    flat_A = expert_TK.reshape(-1)
    order_A = jnp.argsort(flat_A, stable=True)
    sizes_N = jnp.bincount(flat_A, length=experts).astype(jnp.int32)
    return order_A, sizes_N


def local_moe(x_TD, expert_TK, gates_TK, w_gate, w_up, w_down, act):
    """Dispatch, experts and combine with every expert on this device: [T, D]."""
    T, D = x_TD.shape
    K = expert_TK.shape[1]
    order_A, sizes_N = sorted_by_expert(expert_TK, w_gate.shape[0])
    y_AD = grouped_experts(x_TD[order_A // K], sizes_N, w_gate, w_up, w_down, act)
    y_TKD = jnp.zeros_like(y_AD).at[order_A].set(y_AD).reshape(T, K, D)
    return jnp.einsum("tkd,tk->td", y_TKD, gates_TK.astype(y_TKD.dtype))


def moe_ffn(h_BSD, layer, cfg, act):
    """The experts' feed-forward of ``h`` [B, S, D] and the two auxiliary-loss sums (f32 scalars)."""
    B, S, D = h_BSD.shape
    h_TD = h_BSD.reshape(B * S, D)
    logits_TN, scores_TN, expert_TK, gates_TK = route(h_TD, layer["router"], cfg)
    if cfg.capacity_factor:
        gates_TK = gates_TK * within_capacity(expert_TK.reshape(B, S, -1), cfg).reshape(B * S, -1)
    out_TD = local_moe(h_TD, expert_TK, gates_TK, layer["we_gate"], layer["we_up"], layer["we_down"], act)
    sums = aux_sums(logits_TN.reshape(B, S, -1), scores_TN.reshape(B, S, -1),
                    expert_TK.reshape(B, S, -1), cfg.experts)
    return out_TD.reshape(B, S, D), sums
