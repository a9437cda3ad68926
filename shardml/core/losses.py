"""Losses as sums: ``loss(outputs, batch) -> {"loss": sum, "count": n, **other sums}``.

Every figure a loss returns is a *sum* over the examples (or tokens) it saw, with ``count`` the
number that counted. The step adds the sums of all microbatches and devices and divides once by
the total count, so k microbatches, any layout and padded rows give exactly the full-batch mean,
never a mean of means. Extra sums (``correct`` for accuracy) are reported the same way, divided
by ``count``.

    sums = token_cross_entropy(logits_BSV, {"targets": targets_BS, "mask": mask_BS})
    sums["loss"] / sums["count"]          # mean loss per real token

A user's loss has the same shape::

    def squared_error(outputs, batch):
        err = jnp.sum((outputs - batch["targets"]) ** 2, axis=-1)
        return {"loss": jnp.sum(err), "count": jnp.asarray(err.shape[0], jnp.float32)}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Sums = dict[str, jax.Array]
Loss = Callable[[Any, dict], Sums]


def _cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    # The target logit is picked with a one-hot product, not a gather, so a vocabulary sharded over
    # ``tensor`` needs only small reductions.
    logits = logits.astype(jnp.float32)
    onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(logits * onehot, axis=-1)


def _weights(batch: dict, like: jax.Array) -> jax.Array:
    mask = batch.get("mask")
    return jnp.ones_like(like) if mask is None else mask.astype(jnp.float32)


def token_cross_entropy(logits: jax.Array, batch: dict) -> Sums:
    """Next-token cross-entropy summed over the real tokens (``batch["mask"]`` > 0, if given).

    ``logits`` [..., V], ``batch["targets"]`` int [...]. The default loss of language models.
    """
    nll = _cross_entropy(logits, batch["targets"])
    weights = _weights(batch, nll)
    return {"loss": jnp.sum(nll * weights), "count": jnp.sum(weights)}


def classification(logits: jax.Array, batch: dict) -> Sums:
    """Cross-entropy of class logits [B, C] against ``batch["targets"]`` [B], plus ``correct`` (so
    the step reports ``accuracy``). ``batch["mask"]`` [B] marks real rows (padding counts 0)."""
    nll = _cross_entropy(logits, batch["targets"])
    weights = _weights(batch, nll)
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    return {"loss": jnp.sum(nll * weights), "count": jnp.sum(weights), "correct": jnp.sum(correct * weights)}


LOSSES: dict[str, Loss] = {"token_cross_entropy": token_cross_entropy, "classification": classification}


def check_sums(sums: Any, where: str = "the loss") -> Sums:
    """``sums`` as a dict of f32 scalars with ``loss`` and ``count``; a clear error otherwise."""
    if not isinstance(sums, dict) or "loss" not in sums or "count" not in sums:
        raise TypeError(f"{where} must return a dict of sums with 'loss' and 'count' (see shardml.core.losses); "
                        f"got {type(sums).__name__}")
    bad = [k for k, v in sums.items() if jnp.ndim(v) != 0]
    if bad:
        raise TypeError(f"{where} returned non-scalar sums for {bad}; sum over the batch (the step divides by count)")
    return {k: jnp.asarray(v, jnp.float32) for k, v in sums.items()}


def mean_name(name: str) -> str:
    """What the mean of a sum is called: ``correct`` becomes ``accuracy``, the rest keep their name."""
    return "accuracy" if name == "correct" else name


def means(sums: Sums) -> Sums:
    """``{name: sum / count}`` for every sum but ``count`` (kept as is)."""
    count = jnp.maximum(sums["count"], 1.0)
    out = {mean_name(k): v / count for k, v in sums.items() if k != "count"}
    out["count"] = sums["count"]
    return out
