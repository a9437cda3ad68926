"""The multi-batch accumulator: k microbatches inside one compiled step, one gradient reduction.

The global batch [B, ...] is viewed as [data, B/data, ...]: one slice per ``data`` shard, exactly the
rows that shard already holds. A ``vmap`` over that leading axis (``spmd_axis_name="data"``) gives
every data shard its own f32 gradient sum, so nothing crosses the ``data`` axis inside the loop.
Within a shard, the rows are split into k strided microbatches (``optax.microbatching``'s
column-major reshape: microbatch j holds rows j, j+k, ...), and the loss sums (loss, count, ...)
and the f32 gradients are summed over them with ``lax.scan``. After the loop a single f32 sum over
the data slices is the one all-reduce of the step, whatever k is; the step divides by the summed
count once, which gives exactly the full-batch update (never a mean of means), also when
microbatches hold different numbers of real tokens.

Policy under ``fsdp`` (a documented choice): parameters are sharded over ``fsdp``, and each
microbatch gradient is pinned to that layout, so it is reduce-scattered into the fsdp-sharded f32
accumulator inside the loop. Memory stays at 1/fsdp of the parameters; the cost is k
reduce-scatters (k x the gradient bytes over fsdp) per step instead of one.

Why not ``shard_map`` manual over ``data`` with a ``psum`` after the loop: it is the textbook
shape, but on jax/jaxlib 0.10.2 XLA's partitioner aborts on partially-manual programs that keep
``fsdp`` and ``tensor`` automatic inside (seen with this transformer). The vmap form is plain GSPMD
and the audit (``shardml.analysis.audit``) proves the same property on the compiled program.

    strategy = accumulator(model, token_cross_entropy, mesh, microbatches=4)
    grad_sums, sums = strategy.gradient_sums(params, batch, None)   # under use_rules(rules)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from shardml.core.errors import LayoutError
from shardml.core.losses import Loss
from shardml.core.sharding import axes_owned_by_transform, constrain, current_rules, is_axes
from shardml.core.strategy import GradientStrategy, model_sums

# The axis over which gradient partial sums are kept per shard and reduced once after the loop.
REDUCE_ONCE_AXIS = "data"


def split_microbatches(batch: Any, microbatches: int) -> Any:
    """[n, ...] -> [k, n/k, ...], microbatch j = rows j, j+k, j+2k, ... (stays where its rows are)."""
    rows = jax.tree.leaves(batch)[0].shape[0]
    if rows % microbatches:
        raise LayoutError(f"{rows} rows do not split into microbatches={microbatches}", subject="microbatches",
                          value=microbatches)
    stacked = optax.microbatching.reshape_batch_axis(batch, rows // microbatches)
    return jax.tree.map(lambda x: constrain(x, (None, "batch") + (None,) * (x.ndim - 2)), stacked)


def local_gradient_sums(sums_fn, microbatches: int, param_logical: Any | None = None):
    """``f(params, (batch, rng_rows)) -> (f32 grad sums, sums)`` over k strided microbatches.

    ``param_logical`` pins each microbatch gradient to its parameter layout, which is what turns
    the fsdp reduction into a reduce-scatter into a sharded accumulator.
    """

    def one(params, rows):
        batch, rng = rows

        def loss_and_sums(p):
            sums = sums_fn(p, batch, rng)
            return sums["loss"], sums

        grads, sums = jax.grad(loss_and_sums, has_aux=True)(params)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        if param_logical is not None:
            grads = jax.tree.map(lambda axes, g: constrain(g, axes), param_logical, grads, is_leaf=is_axes)
        return grads, sums

    return summed_over_microbatches(one, microbatches)


def summed_over_microbatches(one, microbatches: int):
    """``f(params, rows)``: the sum of ``one(params, microbatch)`` over k strided microbatches of
    ``rows`` (a ``lax.scan`` with an f32 carry); ``one`` itself when k is 1."""
    if microbatches == 1:
        return one

    def accumulated(params, rows):
        def body(carry, microbatch):
            return jax.tree.map(jnp.add, carry, one(params, microbatch)), None

        # optax.microbatching.microbatch is this loop too; it is written out so the f32 carry and its
        # layout are explicit (and so the loop also runs inside shard_map for the pipeline).
        split = split_microbatches(rows, microbatches)
        shapes = jax.eval_shape(one, params, jax.tree.map(lambda x: x[0], split))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        totals, _ = jax.lax.scan(body, zeros, split)
        return totals

    return accumulated


def accumulator(model, loss: Loss, mesh, microbatches: int = 1) -> GradientStrategy:
    """The accumulator as a :class:`GradientStrategy` for ``model`` and ``loss`` on ``mesh``.

    Its functions must be traced under :func:`shardml.core.sharding.use_rules` (the step does this).
    """
    sums_fn = model_sums(model, loss)
    local = local_gradient_sums(sums_fn, microbatches, model.logical)

    def loss_sums(params, batch):
        return sums_fn(params, batch)

    return GradientStrategy(gradient_sums=reduced_once(local, mesh), loss_sums=loss_sums,
                            param_logical=model.logical)


def reduced_once(local, mesh):
    """``gradient_sums(params, batch, rng_rows)`` of a per-shard ``local(params, (rows, rng_rows))``:
    every ``data`` shard sums its own rows, then one f32 sum over the shards (the step's only
    cross-data reduction)."""
    n_data = mesh.shape.get(REDUCE_ONCE_AXIS, 1)

    def gradient_sums(params, batch, rng_rows=None):
        # [B, ...] -> [data, B/data, ...]: slice i is the block of rows data shard i already holds.
        rows = jax.tree.map(lambda x: x.reshape(n_data, x.shape[0] // n_data, *x.shape[1:]), (batch, rng_rows))
        rules = current_rules()
        if rules is not None:
            inner = tuple(a for a in rules.mesh_axes("batch") if a != REDUCE_ONCE_AXIS) or None
            rows = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
                x, NamedSharding(mesh, P(REDUCE_ONCE_AXIS, inner))), rows)
        with axes_owned_by_transform(REDUCE_ONCE_AXIS):
            grads, sums = jax.vmap(local, in_axes=(None, 0), spmd_axis_name=REDUCE_ONCE_AXIS)(params, rows)
        # The one cross-data reduction of the step, in f32.
        return jax.tree.map(lambda x: jnp.sum(x, axis=0), (grads, sums))

    return gradient_sums
