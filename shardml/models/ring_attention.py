"""Ring attention over the ``context`` mesh axis, with causal load balancing.

With the sequence split over C context devices, each device keeps its queries and passes its key/value
block round the ring (``jax.lax.ppermute``) C - 1 times; every block met is folded into a running
(online, flash-style) softmax: the running maximum ``m``, the denominator ``l`` and the weighted sum
``acc`` are rescaled by ``exp(m_old - m_new)`` whenever the maximum grows. No device holds more
than its own and one visiting block, and the result equals softmax attention over the whole sequence.

Causal load balancing: with contiguous blocks device 0 would see one block and device C - 1 all C.
:func:`balanced_order` cuts the sequence into 2C chunks and gives device i chunks i and 2C-1-i (one
early, one late), so each device does the same work. The model permutes its tokens (and positions,
segments) by that order before the first layer and un-permutes the logits after the last; everything
but attention works position by position, and attention masks by the *global* index each token
carries, so the permutation changes nothing but which device computes what.

Shape letters: B batch, S (local) queries, T (local) keys, H query heads, K key/value heads,
G = H / K, E head dim, C context devices.

    order_S = balanced_order(16, 2)   # [0..3, 12..15, 4..7, 8..11]
    o_BSHE = ring_attention(q, k, v, index_S, segments_BS=None, axis="context")  # inside the mesh
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from shardml.core.errors import ModelError
from shardml.core.sharding import transform_owned_axes

NEG = -1e30  # a masked score: finite, so a fully masked block gives exp(NEG - m) = 0, not NaN


def balanced_order(seq_len: int, shards: int) -> np.ndarray:
    """The permutation that gives context shard i chunks i and 2C-1-i of 2C equal chunks:
    ``tokens[:, order]`` split contiguously over C shards. ``np.argsort(order)`` undoes it.

    Raises:
      ModelError: ``seq_len`` not divisible by ``2 * shards``.

    Example:
      >>> balanced_order(8, 2).tolist()
      [0, 1, 6, 7, 2, 3, 4, 5]
    """
    if seq_len % (2 * shards):
        raise ModelError(f"a sequence of {seq_len} tokens does not split into 2 x context = {2 * shards} equal "
                         f"chunks (ring attention balances the causal work by giving each of the {shards} context "
                         f"shards one early and one late chunk); use a length divisible by {2 * shards}",
                         subject="seq_len", value=seq_len)
    chunks = np.arange(seq_len).reshape(2 * shards, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * shards - 1 - i]]) for i in range(shards)])


def block_scores(q_BSKGE, k_BTKE, q_idx_S, k_idx_T, q_seg_BS, k_seg_BT, scale, softcap, window):
    """Scores of local queries against one key block, f32 [B, K, G, S, T], and which are visible:
    earlier or equal global index, within ``window`` (0: no window) and in the same segment."""
    scores = jnp.einsum("bskge,btke->bkgst", q_BSKGE, k_BTKE, preferred_element_type=jnp.float32) * scale
    if softcap:
        scores = softcap * jnp.tanh(scores / softcap)
    visible_ST = k_idx_T[None, :] <= q_idx_S[:, None]
    if window:
        visible_ST &= q_idx_S[:, None] - k_idx_T[None, :] < window
    visible = visible_ST[None, None, None]
    if q_seg_BS is not None:
        visible = visible & (q_seg_BS[:, :, None] == k_seg_BT[:, None, :])[:, None, None]
    return scores, visible


def online_update(carry, scores, visible, v_BTKE):
    """Folds one block into the running softmax ``(m, l, acc)`` ([B,K,G,S], [B,K,G,S], [B,K,G,S,E])."""
    m, l, acc = carry
    m_new = jnp.maximum(m, jnp.max(jnp.where(visible, scores, NEG), axis=-1))
    p = jnp.where(visible, jnp.exp(scores - m_new[..., None]), 0.0)
    rescale = jnp.exp(m - m_new)  # the old sums were weighted by exp(-m_old): bring them to exp(-m_new)
    l = l * rescale + jnp.sum(p, axis=-1)
    acc = acc * rescale[..., None] + jnp.einsum("bkgst,btke->bkgse", p, v_BTKE.astype(jnp.float32))
    return m_new, l, acc


def ring_local(q_BSHE, k_BTKE, v_BTKE, idx_S, seg_BS, *, axis, shards, scale, softcap, window):
    """One context shard's part (inside ``shard_map``): its queries against every block of the ring."""
    B, S, H, E = q_BSHE.shape
    K = k_BTKE.shape[2]
    q_BSKGE = q_BSHE.reshape(B, S, K, H // K, E)
    carry = (jnp.full((B, K, H // K, S), NEG, jnp.float32), jnp.zeros((B, K, H // K, S), jnp.float32),
             jnp.zeros((B, K, H // K, S, E), jnp.float32))
    block = (k_BTKE, v_BTKE, idx_S, seg_BS)
    # Shard i sends to i + 1, so in step s it holds the block of shard i - s.
    ring = [(i, (i + 1) % shards) for i in range(shards)]

    # Rematerialised: the backward keeps only each step's carry and block, and recomputes the block's
    # S x T scores, so no device stores more than O(S x E) per step (without it, C blocks of scores).
    @jax.checkpoint
    def fold(carry, k, v, k_idx, k_seg):
        scores, visible = block_scores(q_BSKGE, k, idx_S, k_idx, seg_BS, k_seg, scale, softcap, window)
        return online_update(carry, scores, visible, v)

    def fold_and_pass(state, _):
        carry, block = state
        return (fold(carry, *block), jax.tree.map(lambda x: jax.lax.ppermute(x, axis, ring), block)), None

    # A loop, not unrolled steps: its backward runs the steps one after another, so one block's
    # recomputed scores are live at a time (unrolled, XLA:CPU scheduled every block's at once).
    (carry, block), _ = jax.lax.scan(fold_and_pass, (carry, block), None, length=shards - 1)
    _, l, acc = fold(carry, *block)
    o_BKGSE = acc / l[..., None]  # every query sees at least itself: l > 0
    return jnp.einsum("bkgse->bskge", o_BKGSE).reshape(B, S, H, E).astype(q_BSHE.dtype)


def ring_attention(q_BSHE, k_BSKE, v_BSKE, index_S, segments_BS=None, *, axis: str = "context",
                   scale: float | None = None, softcap: float = 0.0, window: int = 0):
    """Causal softmax attention, the sequence split over mesh axis ``axis``: [B, S, H, E].

    Args:
      q_BSHE, k_BSKE, v_BSKE: queries and keys/values (K divides H: grouped-query attention), in
        the order the sequence is laid out (e.g. :func:`balanced_order`'s), dimension 1 split over
        ``axis``; the other dimensions may be sharded over other axes (they stay automatic).
      index_S: each position's global index (int [S]): query i sees key j iff index j <= index i.
      segments_BS: packed rows' segment ids (a query sees its own segment only), or None.
      scale: of the scores (default 1/sqrt(E)); softcap: c tanh(s / c) (0: none); window: a query
        sees only the last ``window`` indices (0: all earlier).

    Must run under a mesh (``jax.set_mesh``) that has ``axis``; with the axis of size 1 it is plain
    (online-softmax) attention.

        o = ring_attention(q, k, v, jnp.asarray(balanced_order(S, 4)))
    """
    mesh = jax.sharding.get_abstract_mesh()
    shards = mesh.shape[axis]
    S = q_BSHE.shape[1]
    if S % shards:
        raise ModelError(f"a sequence of {S} tokens does not split over {axis}={shards}; use a length divisible "
                         f"by {shards}", subject="seq_len", value=S)
    scale = 1.0 / math.sqrt(q_BSHE.shape[-1]) if scale is None else scale
    if segments_BS is None:
        segments_BS = jnp.zeros(q_BSHE.shape[:2], jnp.int32)
        use_segments = False
    else:
        use_segments = True
    local = functools.partial(_local_masked, use_segments=use_segments, axis=axis, shards=shards, scale=scale,
                              softcap=softcap, window=window)
    seq = P(None, axis)
    # Manual over the ring's axis only (the batch and heads stay automatic); axes an enclosing vmap
    # places (the accumulator's per-data-shard loop) must be manual too: the vmap adds them to the specs.
    # check_vma=False: under that vmap, the rematerialised fold's backward trips JAX's varying-axes
    # check (JAX 0.10.2); nothing here reduces over a manual axis, so the check guards nothing.
    fn = jax.shard_map(local, mesh=mesh, in_specs=(seq, seq, seq, P(axis), seq), out_specs=seq,
                       axis_names={axis} | set(transform_owned_axes()), check_vma=False)
    return fn(q_BSHE, k_BSKE, v_BSKE, jnp.asarray(index_S, jnp.int32), segments_BS)


def _local_masked(q, k, v, idx_S, seg_BS, *, use_segments, **kw):
    return ring_local(q, k, v, idx_S, seg_BS if use_segments else None, **kw)
