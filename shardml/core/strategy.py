"""The gradient strategy: how one global batch becomes gradient sums, reduced once per step.

The multi-batch accumulator (:mod:`shardml.core.accumulate`) and every pipeline schedule
(:mod:`shardml.core.pipeline`) implement it; the train step does not know which one it got::

    grad_sums, sums = strategy.gradient_sums(params, batch, rng_rows)   # sums: loss, count, ...
    grads = grad_sums / sums["count"]                                      # the step divides once
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from shardml.core.losses import Loss, Sums, check_sums


def _identity(params: Any) -> Any:
    return params


class GradientStrategy(NamedTuple):
    """Attributes:
      gradient_sums: ``(params, batch, rng_rows) -> (f32 gradient sums, sums)``, reduced over every
        batch-parallel axis; ``rng_rows`` is uint32 key data [B, ...], one key per row of the global
        batch (None for models that draw no random numbers).
      loss_sums: ``(params, batch) -> sums``: the deterministic forward pass, for evaluation.
      param_logical: the logical axes of the parameters in the layout the strategy works in.
      layout: model parameters -> that layout (identity unless a circular pipeline regroups layers).
      natural: the inverse of ``layout``.
    """

    gradient_sums: Callable[[Any, dict, jax.Array | None], tuple[Any, Sums]]
    loss_sums: Callable[[Any, dict], Sums]
    param_logical: Any
    layout: Callable[[Any], Any] = _identity
    natural: Callable[[Any], Any] = _identity


def model_sums(model, loss: Loss) -> Callable[..., Sums]:
    """``sums(params, batch, rng_rows=None)``: ``loss(model(params, batch["inputs"]), batch)``.

    ``rng_rows`` (key data, one row per example) becomes the model's per-example keys.
    """

    def sums(params, batch, rng_rows=None):
        keys = None if rng_rows is None else jax.random.wrap_key_data(rng_rows)
        outputs, extra = model.outputs_and_sums(params, batch["inputs"], rng=keys)
        sums = check_sums(loss(outputs, batch))
        return sums | {k: sums.get(k, 0.0) + jnp.asarray(v, jnp.float32) for k, v in extra.items()}

    return sums
