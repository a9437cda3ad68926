"""Matmul FLOPs counted from a traced function: every ``dot_general`` of its jaxpr.

Model FLOPs for MFU come from a formula when the model has one (the transformer: PaLM's appendix
B) and are counted here otherwise: 3 x the forward pass's matmul FLOPs (backward = 2 x forward)::

    flops = training_flops_per_example(model, example_batch)
"""

from __future__ import annotations

import collections
import math

import jax


def dot_inventory(jaxpr, times: int = 1, found: collections.Counter | None = None) -> collections.Counter:
    """Every ``dot_general`` of a jaxpr and its sub-jaxprs as (lhs, rhs, dimension numbers, result
    dtype) -> executions per call, scan bodies x their length.

    Global shapes: right for an unpipelined function (no ``shard_map``); a ``cond`` counts every branch.
    """
    found = collections.Counter() if found is None else found
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
            found[(jax.ShapeDtypeStruct(lhs.shape, lhs.dtype), jax.ShapeDtypeStruct(rhs.shape, rhs.dtype),
                   eqn.params["dimension_numbers"], eqn.params.get("preferred_element_type"))] += times
        inner = times * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    dot_inventory(sub.jaxpr, inner, found)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    dot_inventory(sub, inner, found)
    return found


def dot_flops(key) -> int:
    """FLOPs of one ``dot_general`` of :func:`dot_inventory`: 2 x lhs elements x rhs free elements."""
    lhs, rhs, ((_, rhs_contract), (_, rhs_batch)), _ = key
    free_rhs = [d for i, d in enumerate(rhs.shape) if i not in rhs_contract and i not in rhs_batch]
    return 2 * math.prod(lhs.shape) * math.prod(free_rhs)


def inventory_flops(found: collections.Counter) -> int:
    """Matmul FLOPs of a :func:`dot_inventory`: each ``dot_general``'s FLOPs times its count."""
    return sum(dot_flops(key) * count for key, count in found.items())


def training_flops_per_example(model, inputs) -> float:
    """3 x the matmul FLOPs of ``model``'s forward pass on ``inputs``, per example (traced, not run)."""
    closed = jax.make_jaxpr(lambda params, x: model(params, x))(model.abstract_params, inputs)
    return 3.0 * inventory_flops(dot_inventory(closed.jaxpr)) / max(int(inputs.shape[0]), 1)
