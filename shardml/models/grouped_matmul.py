"""Grouped products (``jax.lax.ragged_dot``) that run under any number of ``vmap``\\s.

JAX 0.10.2's own batching rule for ``ragged_dot_general`` turns one ``vmap`` into a batch dimension
but fails on a product that already has one, so a mixture of experts inside the accumulator's
``vmap`` (over data shards) inside the members' ``vmap`` (stacked populations) did not trace. Here
each product is a ``jax.custom_batching.custom_vmap`` whose rule folds the new mapped axis into the
one batch dimension ([L, M, ...] -> [L x M, ...]), so every depth of ``vmap`` becomes one batched
``ragged_dot_general``; a ``jax.custom_vjp`` outside gives the gradients (``custom_vmap`` has no
reverse mode) as the same products JAX's transpose rule emits. Unbatched, the forward is the plain
``ragged_dot`` of before. Shape letters: M mapped (batch), A rows sorted by group, N groups, D
contracted features, F output features.

    y_AF = grouped_matmul(x_AD, w_NDF, sizes_N)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.lax import RaggedDotDimensionNumbers

# (lhs contracting, rhs contracting, lhs ragged, rhs group) per kind, before the batch dimension:
# "rows" y_AF = x_AD . w_NDF; "rows_t" dx_AD = g_AF . w_NDF^T; "contract" dw_NDF = x_AD^T . g_AF per group.
_DIMS = {"rows": (1, 1, 0, (0,)), "rows_t": (1, 2, 0, (0,)), "contract": (0, 0, 0, ())}


def _product(kind: str, lhs, rhs, sizes):
    """One ``ragged_dot_general`` of ``kind``; a leading batch dimension where ``sizes`` has one."""
    lc, rc, lr, rg = _DIMS[kind]
    if sizes.ndim == 1:
        if kind == "rows":
            return jax.lax.ragged_dot(lhs, rhs, sizes)
        dims = RaggedDotDimensionNumbers((((lc,), (rc,)), ((), ())), (lr,), rg)
        return jax.lax.ragged_dot_general(lhs, rhs, sizes, dims)
    dims = RaggedDotDimensionNumbers((((lc + 1,), (rc + 1,)), ((0,), (0,))), (lr + 1,), tuple(g + 1 for g in rg))
    out = jax.lax.ragged_dot_general(lhs, rhs, sizes, dims)
    # The ragged-contracting product puts its groups before the batch: [N, M, D, F] -> [M, N, D, F].
    return jnp.swapaxes(out, 0, 1) if kind == "contract" else out


def _batchable(kind: str):
    """``_product(kind, ...)`` as a ``custom_vmap``: a new mapped axis joins the batch dimension."""

    @jax.custom_batching.custom_vmap
    def product(lhs, rhs, sizes):
        return _product(kind, lhs, rhs, sizes)

    @product.def_vmap
    def rule(axis_size, in_batched, lhs, rhs, sizes):
        # The sizes of one example are [N], or [M, N] where an inner vmap has batched the product already.
        has_batch = (sizes.ndim - 1 if in_batched[2] else sizes.ndim) == 2
        args = [x if b else jnp.broadcast_to(x, (axis_size, *x.shape)) for x, b in zip((lhs, rhs, sizes), in_batched)]
        if has_batch:  # fold [L, M, ...] into [L x M, ...], then split the result again
            args = [x.reshape(axis_size * x.shape[1], *x.shape[2:]) for x in args]
        out = product(*args)  # itself a custom_vmap: an enclosing vmap folds its axis in the same way
        return (out.reshape(axis_size, -1, *out.shape[1:]) if has_batch else out), True

    return product


_ROWS, _ROWS_T, _CONTRACT = (_batchable(kind) for kind in ("rows", "rows_t", "contract"))


@jax.custom_vjp
def grouped_matmul(x_AD, w_NDF, sizes_N):
    """Rows of ``x`` times their group's matrix: rows ``sum(sizes[:n])`` up to ``sum(sizes[:n+1])``
    use ``w[n]`` (``jax.lax.ragged_dot``), differentiable and batchable under nested ``vmap``.

    Args:
      x_AD: [A, D] rows sorted by group. w_NDF: [N, D, F]. sizes_N: int32 [N] rows per group.

    Returns:
      [A, F]; rows past ``sum(sizes)`` are zero.

        y = jax.vmap(jax.vmap(grouped_matmul, (0, None, 0)))(x_LMAD, w_NDF, sizes_LMN)
    """
    return _ROWS(x_AD, w_NDF, sizes_N)


def _forward(x_AD, w_NDF, sizes_N):
    return _ROWS(x_AD, w_NDF, sizes_N), (x_AD, w_NDF, sizes_N)


def _backward(saved, g_AF):
    x_AD, w_NDF, sizes_N = saved
    # The group sizes are integers: no cotangent.
    return _ROWS_T(g_AF, w_NDF, sizes_N), _CONTRACT(x_AD, g_AF, sizes_N).astype(w_NDF.dtype), None


grouped_matmul.defvjp(_forward, _backward)
