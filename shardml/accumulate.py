"""The multi-batch accumulator: k microbatches inside one compiled step, one gradient reduction.

The global batch [B, ...] is viewed as [data, B/data, ...]: one slice per ``data`` shard, exactly the
rows that shard already holds. A ``vmap`` over that leading axis (``spmd_axis_name="data"``) gives
every data shard its own f32 gradient sum, so nothing crosses the ``data`` axis inside the loop.
Within a shard, the rows are split into k strided microbatches (``optax.microbatching``'s
column-major reshape: microbatch j holds rows j, j+k, ...), and the unnormalised loss, the token
count and the f32 gradients are summed over them with ``lax.scan``. After the loop a single f32
sum over the data slices is the one all-reduce of the step, whatever k is; dividing by the summed
token count gives exactly the full-batch update (never a mean of means), also when microbatches
hold different numbers of real tokens.

Policy under ``fsdp`` (a documented choice): parameters are sharded over ``fsdp``, and each
microbatch gradient is pinned to that layout, so it is reduce-scattered into the fsdp-sharded f32
accumulator inside the loop. Memory stays at 1/fsdp of the parameters; the cost is k
reduce-scatters (k x the gradient bytes over fsdp) per step instead of one.

Why not ``shard_map`` manual over ``data`` with a ``psum`` after the loop: it is the textbook
shape, but on jax/jaxlib 0.10.2 XLA's partitioner aborts on partially-manual programs that keep
``fsdp`` and ``tensor`` automatic inside (seen with this transformer). The vmap form is plain GSPMD
and the audit (``shardml.audit``) proves the same property on the compiled program.

    grad_fn = accumulate_gradients(loss_fn, microbatches=4, mesh=mesh,
                                   param_logical=logical_axes(model.specs))
    grads, loss, tokens = grad_fn(params, batch)   # grads and loss per real token
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jax.sharding import NamedSharding, PartitionSpec as P

from shardml.sharding import _is_axes, axes_owned_by_transform, constrain, current_rules

# The axis over which gradient partial sums are kept per shard and reduced once after the loop.
REDUCE_ONCE_AXIS = "data"

LossFn = Callable[[Any, Any], tuple[jax.Array, jax.Array]]


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None):
    """Summed next-token (or class) cross-entropy and the number of counted targets.

    The target logit is picked with a one-hot product, not a gather, so a vocabulary sharded over
    ``tensor`` needs only small reductions.
    """
    logits = logits.astype(jnp.float32)
    onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.sum(logits * onehot, axis=-1)
    weights = jnp.ones_like(nll) if mask is None else mask.astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights)


def model_loss(apply: Callable[[Any, jax.Array], jax.Array]) -> LossFn:
    """``loss(params, batch) -> (summed loss, token count)`` for batches of inputs/targets[/mask]."""

    def loss(params, batch):
        logits = apply(params, batch["inputs"])
        return token_cross_entropy(logits, batch["targets"], batch.get("mask"))

    return loss


def split_microbatches(batch: Any, microbatches: int) -> Any:
    """[n, ...] -> [k, n/k, ...], microbatch j = rows j, j+k, j+2k, ... (stays where its rows are)."""
    rows = jax.tree.leaves(batch)[0].shape[0]
    if rows % microbatches:
        raise ValueError(f"{rows} rows do not split into {microbatches} microbatches")
    stacked = optax.microbatching.reshape_batch_axis(batch, rows // microbatches)
    return jax.tree.map(lambda x: constrain(x, (None, "batch") + (None,) * (x.ndim - 2)), stacked)


def local_gradient_sums(loss_fn: LossFn, microbatches: int, param_logical: Any | None = None):
    """``f(params, batch) -> (loss_sum, count, grad_sum)`` over k strided microbatches, in f32.

    ``param_logical`` (a tree of logical-axes tuples) pins each microbatch gradient to its parameter
    layout, which is what turns the fsdp reduction into a reduce-scatter into a sharded accumulator.
    """

    def sums(params, batch):
        (loss_sum, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        if param_logical is not None:
            grads = jax.tree.map(lambda axes, g: constrain(g, axes), param_logical, grads, is_leaf=_is_axes)
        return loss_sum.astype(jnp.float32), count.astype(jnp.float32), grads

    if microbatches == 1:
        return sums

    def accumulated(params, batch):
        def body(carry, microbatch):
            return jax.tree.map(jnp.add, carry, sums(params, microbatch)), None

        # optax.microbatching.microbatch is this loop too; it is written out so the f32 carry and its
        # layout are explicit (and so the loop also runs inside shard_map for the pipeline).
        zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                 jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
        totals, _ = jax.lax.scan(body, zeros, split_microbatches(batch, microbatches))
        return totals

    return accumulated


def accumulate_gradients(loss_fn: LossFn, microbatches: int, mesh, param_logical: Any | None = None):
    """``f(params, batch) -> (grads, loss, tokens)``: gradients and loss per real token of the step.

    Must be traced under :func:`shardml.sharding.use_rules` (the trainer does this).
    """
    n_data = mesh.shape.get(REDUCE_ONCE_AXIS, 1)
    sums = local_gradient_sums(loss_fn, microbatches, param_logical)

    def grad_fn(params, batch):
        # [B, ...] -> [data, B/data, ...]: slice i is the block of rows data shard i already holds.
        sliced = jax.tree.map(lambda x: x.reshape(n_data, x.shape[0] // n_data, *x.shape[1:]), batch)
        rules = current_rules()
        if rules is not None:
            inner = tuple(a for a in rules.mesh_axes("batch") if a != REDUCE_ONCE_AXIS) or None
            sliced = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
                x, NamedSharding(mesh, P(REDUCE_ONCE_AXIS, inner))), sliced)
        with axes_owned_by_transform(REDUCE_ONCE_AXIS):
            loss_sum, count, grads = jax.vmap(sums, in_axes=(None, 0), spmd_axis_name=REDUCE_ONCE_AXIS)(
                params, sliced)
        # The one cross-data reduction of the step, in f32.
        loss_sum, count = jnp.sum(loss_sum), jnp.sum(count)
        grads = jax.tree.map(lambda g: jnp.sum(g, axis=0), grads)
        denom = jnp.maximum(count, 1.0)
        return jax.tree.map(lambda g: g / denom, grads), loss_sum / denom, count

    return grad_fn

