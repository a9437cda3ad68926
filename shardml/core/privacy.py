"""Differential privacy that composes with the accumulator: DP-SGD's per-example clipping happens
*before* the microbatch sums, and its Gaussian noise is added once per logical batch, after the
one reduction; privacy is accounted by Google's ``dp-accounting`` library.

``optax.contrib.dpsgd`` clips per-example gradients handed to it on axis 0 and warns that it does
not compose with ``optax.MultiSteps``: accumulating clipped means of microbatches and adding noise
per microbatch would clip the wrong thing and add k times the noise. Here the gradient strategy
itself (:func:`private_accumulator`) clips every example's gradient inside each microbatch, sums
the clipped gradients over microbatches and ``data`` shards, and adds ``N(0, (noise · clip)² I)``
to that sum once; the train step then divides by the real example count as usual (Abadi et al.
2016, arXiv 1607.00133)::

    strategy = private_accumulator(model, classification, mesh, microbatches=4, clip_norm=1.0,
                                   noise_multiplier=1.1)
    epsilon = dp_sgd_epsilon(noise_multiplier=1.1, sample_rate=64 / 60000, steps=10000, delta=1e-5)

The noise key is a function of the step's first row key (the state's RNG and the step number), so
every layout and microbatch count draws the same noise. A train step with this strategy needs row
keys: build it with ``uses_rng=True`` (the federated round does).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp

from shardml.core.accumulate import reduced_once, summed_over_microbatches
from shardml.core.errors import SettingError
from shardml.core.losses import Loss
from shardml.core.sharding import constrain, is_axes, per_example
from shardml.core.strategy import GradientStrategy, model_sums

NOISE_TAG = 0x0D9  # folded into the first row key: the noise draws from a stream of its own


def tree_norms(tree: Any) -> jax.Array:
    """The global L2 norm of a tree of f32 arrays (a scalar)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def clip_tree(tree: Any, max_norm: float) -> tuple[Any, jax.Array]:
    """``tree · min(1, max_norm / ‖tree‖)`` and ``‖tree‖`` (global L2 norm over every leaf)."""
    norm = tree_norms(tree)
    factor = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
    return jax.tree.map(lambda x: (x * factor).astype(x.dtype), tree), norm


def gaussian_noise(key: jax.Array, like: Any, std: float | jax.Array, logical: Any | None = None) -> Any:
    """Independent ``N(0, std²)`` for every entry of ``like`` (one key per leaf), laid out like the
    parameters when ``logical`` (their logical axes) is given."""
    leaves, treedef = jax.tree.flatten(like)
    axes = jax.tree.leaves(logical, is_leaf=is_axes) if logical is not None else [None] * len(leaves)
    out = []
    for i, (leaf, ax) in enumerate(zip(leaves, axes)):
        noise = std * jax.random.normal(jax.random.fold_in(key, i), leaf.shape, jnp.float32)
        out.append(constrain(noise, ax) if ax is not None else noise)
    return jax.tree.unflatten(treedef, out)


def _clipped_example_grad(sums_fn, clip_norm: float):
    """``(params, example_1, key) -> (grads, sums)`` of one example, its gradient clipped to
    ``clip_norm`` (f32), ``sums["clipped"]`` 1 when it was larger; both with a leading axis of 1."""

    def example_grad(params, example_1, key):
        keys = None if key is None else key[None]

        def loss_and_sums(p):
            sums = sums_fn(p, example_1, keys)
            return sums["loss"], sums

        grads, sums = jax.grad(loss_and_sums, has_aux=True)(params)
        grads, norm = clip_tree(jax.tree.map(lambda g: g.astype(jnp.float32), grads), clip_norm)
        sums = {**sums, "clipped": (norm > clip_norm).astype(jnp.float32)}
        return jax.tree.map(lambda x: x[None], (grads, sums))

    return example_grad


def private_accumulator(model, loss: Loss, mesh, microbatches: int = 1, *, clip_norm: float,
                        noise_multiplier: float) -> GradientStrategy:
    """The accumulator with DP-SGD inside: per-example gradients clipped to ``clip_norm`` inside
    every microbatch, summed over microbatches and ``data`` shards, then ``N(0, (noise_multiplier ·
    clip_norm)²)`` added once to the sum. ``gradient_sums`` also reports ``clipped`` (how many
    examples had a larger norm) in its sums.

    A padded row (``mask`` 0) has a zero loss, so a zero gradient: it adds nothing.
    """
    if clip_norm <= 0:
        raise SettingError(f"DP-SGD needs a positive per-example clip norm, got clip_norm={clip_norm}",
                           subject="clip_norm", value=clip_norm)
    if noise_multiplier < 0:
        raise SettingError(f"DP-SGD noise_multiplier={noise_multiplier} must be >= 0", subject="noise_multiplier",
                           value=noise_multiplier)
    sums_fn = model_sums(model, loss)
    example_grad = _clipped_example_grad(sums_fn, clip_norm)

    def microbatch(params, rows):
        batch, rng = rows
        # One example at a time (vmapped, the rows staying on their batch shards), clipped, then summed.
        grads, sums = per_example(lambda example_1, key: example_grad(params, example_1, key))(batch, rng)
        grads = jax.tree.map(lambda axes, g: constrain(jnp.sum(g, axis=0), axes), model.logical, grads,
                             is_leaf=is_axes)
        return grads, jax.tree.map(lambda s: jnp.sum(s, axis=0), sums)

    clipped_sums = reduced_once(summed_over_microbatches(microbatch, microbatches), mesh)

    def gradient_sums(params, batch, rng_rows=None):
        if rng_rows is None:
            raise ValueError("private_accumulator needs row keys for its noise: build the step with uses_rng=True")
        grads, sums = clipped_sums(params, batch, rng_rows)
        if noise_multiplier > 0:
            key = jax.random.fold_in(jax.random.wrap_key_data(rng_rows[0]), NOISE_TAG)
            noise = gaussian_noise(key, grads, noise_multiplier * clip_norm, model.logical)
            grads = jax.tree.map(jnp.add, grads, noise)
        return grads, sums

    return GradientStrategy(gradient_sums=gradient_sums, loss_sums=lambda params, batch: sums_fn(params, batch),
                            param_logical=model.logical)


# ----------------------------------------------------------------------------- accounting


def _accounting():
    try:
        import dp_accounting
    except ImportError:
        raise SettingError("privacy accounting needs Google's dp-accounting library: "
                           "pip install 'shardml[privacy]'") from None
    return dp_accounting


def gaussian_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε of ``steps`` compositions of the Poisson-subsampled Gaussian mechanism (noise std
    ``noise_multiplier`` × sensitivity, sampling probability ``sample_rate``) at ``delta``, from
    ``dp_accounting``'s RDP accountant. ``inf`` without noise."""
    if noise_multiplier <= 0:
        return float("inf")
    dp = _accounting()
    event = dp.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1.0:
        event = dp.PoissonSampledDpEvent(sample_rate, event)
    # For large sampling rates the accountant skips the fractional orders whose series does not
    # converge, logging an absl warning for each; the orders it keeps give a valid epsilon.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        accountant = dp.rdp.RdpAccountant()
        accountant.compose(dp.SelfComposedDpEvent(event, int(steps)))
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def dp_sgd_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Example-level ε of DP-SGD: ``steps`` noisy steps, each on a batch that holds an example with
    probability ``sample_rate`` (batch size / examples)."""
    return gaussian_epsilon(noise_multiplier, sample_rate, steps, delta)


def dp_fedavg_epsilon(noise_multiplier: float, clients: int, cohort: int, rounds: int, delta: float) -> float:
    """Client-level ε of DP-FedAvg: ``rounds`` rounds, each adding noise ``noise_multiplier`` × the
    update clip to the sum of ``cohort`` clipped client updates drawn from ``clients``. The fixed-size
    cohort is accounted as Poisson sampling with rate cohort / clients (the usual approximation)."""
    return gaussian_epsilon(noise_multiplier, min(1.0, cohort / clients), rounds, delta)
