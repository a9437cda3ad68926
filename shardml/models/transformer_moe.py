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
(``expert`` in the default rules, which also split the batch over ``expert``). With that axis > 1
and ``moe_dispatch="all_to_all"`` (the default) the dispatch is written by hand
(:func:`all_to_all_moe`): a ``shard_map`` manual over the batch's, the sequence's and the expert
axes, in which each device routes its own tokens, sends each kept (token, choice) pair's row to
the shard owning its expert with one ``jax.lax.all_to_all`` (and the rows per local expert, int32,
with a second, tiny one), runs its N / N_e experts with ``ragged_dot`` on what it received and
sends the results back with a third; the gates combine them where the tokens live. The backward
is two more all-to-alls (the rows' and results' cotangents), and under remat the forward's three
are recomputed (:func:`~shardml.analysis.theory.layout_theory` counts them; ``shardml plan`` lists
them). Weights sharded over ``fsdp`` are gathered at the ``shard_map``'s boundary (as the
partitioner gathers them for any layer); ``tensor`` stays automatic inside.

The buffers are padded: ``jax.lax.ragged_all_to_all`` would send only the rows each shard needs,
but XLA:CPU cannot compile it (JAX 0.10.2: "HLO opcode ragged-all-to-all is not supported by
XLA:CPU ThunkEmitter"). Dropless with static shapes, a device's block for each destination must
hold the worst case, all its A_l = rows x S x top_k pairs: each row all-to-all carries
[N_e, A_l, D] in the compute dtype, N_e times what the pairs need when routing is balanced. A
capacity bounds the block by rows x (N / N_e) x C; pairs over capacity are not sent at all.

With the experts not split but the batch split (``fsdp`` alone, say) the same ``shard_map`` runs
without an exchange: each device sends its own tokens through every expert (:func:`own_tokens`);
left to the partitioner, the same step ran 2.7x slower on fsdp=8 (the global sort of the pairs is
the likely cost; its HLO was not read).

``moe_dispatch="gspmd"`` (or experts split over several axes, over an axis that does not split
the batch, rows that do not split evenly over the batch's axes, or inside a pipeline's stages)
leaves the placement to the partitioner: on XLA:CPU (JAX 0.10.2) all-gathers
and all-reduces over ``expert`` (about 4x the all-to-all's bytes per device on a small 8-expert
shape, expert=4 x data=2), kept as the A/B reference: ``model.moe_dispatch=gspmd``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from shardml.core.errors import ModelError
from shardml.core.sharding import manual_axes, split_axes, transform_owned_axes
from shardml.models.grouped_matmul import grouped_matmul

GATES = ("softmax", "sigmoid")
# How the (token, choice) pairs reach experts on other ``expert`` shards: "all_to_all" is the
# hand-written shard_map dispatch (:func:`all_to_all_moe`); "gspmd" leaves it to the partitioner.
MOE_DISPATCHES = ("all_to_all", "gspmd")


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
    keep_TK = jnp.ones(expert_TK.shape, bool)
    if cfg.capacity_factor:
        keep_TK = within_capacity(expert_TK.reshape(B, S, -1), cfg).reshape(B * S, -1)
        gates_TK = gates_TK * keep_TK
    weights = (layer["we_gate"], layer["we_up"], layer["we_down"])
    axes = dispatch_axes(cfg, B)
    if axes is None:
        out_TD = local_moe(h_TD, expert_TK, gates_TK, *weights, act)
    else:
        K = expert_TK.shape[-1]
        pairs = (expert_TK.reshape(B, S, K), gates_TK.reshape(B, S, K), keep_TK.reshape(B, S, K))
        out_TD = all_to_all_moe(h_BSD, *pairs, *weights, act, axes=axes, cfg=cfg).reshape(B * S, D)
    sums = aux_sums(logits_TN.reshape(B, S, -1), scores_TN.reshape(B, S, -1),
                    expert_TK.reshape(B, S, -1), cfg.experts)
    return out_TD.reshape(B, S, D), sums


def dispatch_axes(cfg, rows: int):
    """``(expert_axis, batch_axes, seq_axes)`` for the hand-written dispatch of ``rows`` rows here
    (``expert_axis`` None where the experts are not split: each device then runs every expert on its
    own tokens, no exchange), or None where the partitioner places the experts:
    ``moe_dispatch="gspmd"``, experts split over more than one axis or over an axis not splitting
    the batch (each shard must own its tokens), no axis splitting anything here, rows that do not
    split evenly over the batch's axes (a training batch always does, ``check_batch``; a decoding
    batch of one row need not), or inside a pipeline's stages (an enclosing ``shard_map``: the
    nested one's cotangents fail JAX 0.10.2's varying-axes check).

        dispatch_axes(cfg, 16)   # ('expert', ('fsdp', 'expert'), ()) inside the accumulator's vmap
    """
    expert = split_axes("experts")
    batch = split_axes("batch")
    if cfg.moe_dispatch != "all_to_all" or len(expert) > 1 or not batch or manual_axes():
        return None
    if expert and expert[0] not in batch:
        return None
    mesh = jax.sharding.get_abstract_mesh()
    if rows % math.prod(mesh.shape[a] for a in batch):
        return None
    return (expert[0] if expert else None), batch, split_axes("act_seq")


def all_to_all_moe(h_BSD, expert_BSK, gates_BSK, keep_BSK, w_gate, w_up, w_down, act, *, axes, cfg):
    """Dispatch, experts and combine with the experts split over mesh axis ``axes[0]``: [B, S, D].

    A ``shard_map`` manual over the batch's and sequence's mesh axes (each device owns its tokens,
    so nothing is resharded on the way in) and the expert axis; the weights' other dimensions (fsdp
    gathered at the boundary, tensor automatic inside) stay the partitioner's. Inside,
    :func:`exchange_local` sends each kept pair to the shard owning its expert and back.

        out_BSD = all_to_all_moe(h, expert, gates, keep, wg, wu, wd, jax.nn.silu, axes=dispatch_axes(cfg), cfg=cfg)
    """
    expert, batch, seq = axes
    mesh = jax.sharding.get_abstract_mesh()
    # Experts not split (e.g. fsdp alone): each device's own tokens through every expert. Left to
    # the partitioner, the step ran 2.7x slower on fsdp=8 (likely its sort of every device's pairs).
    shards = mesh.shape[expert] if expert else 1
    rows = math.prod(mesh.shape[a] for a in batch)
    B, S = h_BSD.shape[:2]
    # Dropless: a shard may send all its pairs to one shard. A capacity of C pairs per expert and
    # sequence bounds what one shard's rows send to the N / shards experts of another.
    local_pairs = (B // rows) * (S // math.prod(mesh.shape[a] for a in seq)) * expert_BSK.shape[-1]
    room = local_pairs
    if cfg.capacity_factor:
        room = min(room, (B // rows) * (cfg.experts // shards) * capacity(S, cfg))
    tokens = P(batch, seq or None)
    local = (functools.partial(exchange_local, act=act, axis=expert, room=room) if expert
             else functools.partial(own_tokens, act=act))
    # The enclosing vmap's axes (the accumulator's data shards, members) must be manual too.
    fn = jax.shard_map(local, mesh=mesh, in_specs=(tokens,) * 4 + (P(expert),) * 3, out_specs=tokens,
                       axis_names=set(batch) | set(seq) | {expert} - {None} | set(transform_owned_axes()),
                       check_vma=False)
    return fn(h_BSD, expert_BSK, gates_BSK, keep_BSK, w_gate, w_up, w_down)


def own_tokens(h_BSD, expert_BSK, gates_BSK, keep_BSK, w_gate, w_up, w_down, *, act):
    """One device's part (inside ``shard_map``) with every expert here: its own tokens through them
    (a dropped pair's gate is already zero, so ``keep`` is not needed): [B, S, D]."""
    B, S, D = h_BSD.shape
    K = expert_BSK.shape[-1]
    out_TD = local_moe(h_BSD.reshape(B * S, D), expert_BSK.reshape(B * S, K), gates_BSK.reshape(B * S, K),
                       w_gate, w_up, w_down, act)
    return out_TD.reshape(B, S, D)


def send_slots(dest_A, shards: int):
    """Each pair's slot in its destination's send buffer (pairs sorted by expert keep their order):
    the number of earlier pairs for the same destination; ``dest`` = ``shards`` marks a pair not
    sent (its one-hot row is zero).

        send_slots(jnp.array([0, 0, 1, 2, 1]), 2)   # [0, 1, 0, 0, 0]
    """
    onehot_AE = jax.nn.one_hot(dest_A, shards, dtype=jnp.int32)
    return jnp.sum((jnp.cumsum(onehot_AE, axis=0) - 1) * onehot_AE, axis=-1)


def exchange_local(h_BSD, expert_BSK, gates_BSK, keep_BSK, w_gate, w_up, w_down, *, act, axis, room):
    """One device's part (inside ``shard_map``): its kept (token, choice) pairs, sorted by expert,
    go into a [shards, room, D] buffer (block j for shard j, which owns experts j n .. j n + n - 1
    of n = N / shards), and the per-(shard, local expert) counts with them; the received rows run
    through this shard's n experts, go back by a second all-to-all, and the gates combine them."""
    B, S, D = h_BSD.shape
    K = expert_BSK.shape[-1]
    n = w_gate.shape[0]
    shards = jax.lax.axis_size(axis)
    x_TD = h_BSD.reshape(B * S, D)
    expert_A = expert_BSK.reshape(-1)
    order_A = jnp.argsort(expert_A, stable=True)
    sorted_A = expert_A[order_A]
    dest_A = jnp.where(keep_BSK.reshape(-1)[order_A], sorted_A // n, shards)
    slot_A = send_slots(dest_A, shards)
    send_ERD = jnp.zeros((shards, room, D), x_TD.dtype).at[dest_A, slot_A].set(x_TD[order_A // K], mode="drop")
    counts_EN = jnp.zeros((shards, n), jnp.int32).at[dest_A, sorted_A % n].add(1, mode="drop")
    got_ERD = jax.lax.all_to_all(send_ERD, axis, 0, 0, tiled=True)
    got_EN = jax.lax.all_to_all(counts_EN, axis, 0, 0, tiled=True)
    y_ERD = local_experts(got_ERD, got_EN, w_gate, w_up, w_down, act)
    back_ERD = jax.lax.all_to_all(y_ERD, axis, 0, 0, tiled=True)
    y_A = back_ERD.at[dest_A, slot_A].get(mode="fill", fill_value=0)  # a pair not sent: zeros
    y_TKD = jnp.zeros_like(y_A).at[order_A].set(y_A).reshape(B * S, K, D)
    out_TD = jnp.einsum("tkd,tk->td", y_TKD, gates_BSK.reshape(B * S, K).astype(y_TKD.dtype))
    return out_TD.reshape(B, S, D)


def local_experts(got_ERD, counts_EN, w_gate, w_up, w_down, act):
    """This shard's n experts on the rows received from each shard (block e: ``counts[e]`` rows of
    each local expert in order, then padding): [shards, room, D], padding rows zero."""
    E, R, D = got_ERD.shape
    n = counts_EN.shape[1]
    # Each received row's local expert (n for padding), from the counts: rows are grouped by expert.
    ends_EN = jnp.cumsum(counts_EN, axis=1)
    local_ER = jnp.sum(jnp.arange(R)[None, :, None] >= ends_EN[:, None, :], axis=-1)
    order = jnp.argsort(local_ER.reshape(-1), stable=True)
    sizes_N = jnp.sum(counts_EN, axis=0)
    # ragged_dot leaves rows past the groups' total zero, so the padding costs no expert's weights.
    y = grouped_experts(got_ERD.reshape(E * R, D)[order], sizes_N, w_gate, w_up, w_down, act)
    return jnp.zeros_like(y).at[order].set(y).reshape(E, R, D)
