"""The default optimizer: AdamW with linear warmup, cosine decay and global-norm clipping, all its
hyperparameters injected (``optax.inject_hyperparams``) so that they are arrays in the optimizer
state: a population gives each member its own values, and runs that differ only in them (another
learning rate, another number of steps) share one compiled step.

Any optax ``GradientTransformation`` works with the trainer; this one is what the presets use::

    optimizer = default_optimizer(OptimConfig(lr=1e-3), steps=1000)
    state = optimizer.init(params)
    state.hyperparams["lr"]             # Array(0.001)
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax

from shardml.core.settings import setting

# The hyperparameters that live in the optimizer state (one value per population member).
INJECTED = ("lr", "b1", "b2", "weight_decay", "clip_norm", "warmup", "min_lr_ratio")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup, cosine decay and global-norm clipping."""

    lr: float = setting(3e-3, above=0.0, hint="the peak learning rate is a positive number, e.g. 3e-3")
    warmup: int = setting(10, minimum=0)
    min_lr_ratio: float = setting(0.1, minimum=0.0, maximum=1.0)
    b1: float = setting(0.9, minimum=0.0, below=1.0)
    b2: float = setting(0.95, minimum=0.0, below=1.0)
    weight_decay: float = setting(0.1, minimum=0.0)
    clip_norm: float = setting(1.0, above=0.0)


def lr_shape(count, warmup, min_lr_ratio, steps):
    """The learning rate relative to its peak at step ``count``: linear warmup from 1/(warmup+1) to 1,
    then cosine decay to ``min_lr_ratio`` at ``steps`` — ``optax.warmup_cosine_decay_schedule``'s
    values (to 6e-8), written with array arguments so they can live in the optimizer state."""
    warmup = jnp.minimum(warmup, jnp.maximum(steps - 1, 0))
    decay_steps = jnp.maximum(steps, warmup + 1)
    count = jnp.asarray(count, jnp.float32)
    start = 1.0 / (warmup + 1)
    warm = start + (1.0 - start) * count / jnp.maximum(warmup, 1)
    done = jnp.clip(count - warmup, 0, decay_steps - warmup)
    cosine = 0.5 * (1 + jnp.cos(jnp.pi * done / (decay_steps - warmup)))
    return jnp.where(count < warmup, warm, (1 - min_lr_ratio) * cosine + min_lr_ratio)


def adamw_cosine(lr, b1, b2, weight_decay, clip_norm, warmup, min_lr_ratio, steps) -> optax.GradientTransformation:
    """Clipping, then AdamW (``optax.adamw``'s chain) on ``lr`` x :func:`lr_shape`."""
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.scale_by_adam(b1=b1, b2=b2),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(lambda count: lr * lr_shape(count, warmup, min_lr_ratio, steps)),
    )


def default_optimizer(cfg: OptimConfig, steps: int) -> optax.GradientTransformation:
    """:func:`adamw_cosine` with ``cfg``'s values and ``steps`` injected into its state."""
    return optax.inject_hyperparams(adamw_cosine)(**{name: float(getattr(cfg, name)) for name in INJECTED},
                                                  steps=float(steps))
