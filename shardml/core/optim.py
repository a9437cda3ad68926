"""The default optimizer: AdamW with linear warmup, cosine decay and global-norm clipping, its numeric
hyperparameters injected (``optax.inject_hyperparams``) so that they are arrays in the optimizer
state: a population gives each member its own values with one compiled step.

Any optax ``GradientTransformation`` works with the trainer; this one is what the presets use::

    optimizer = default_optimizer(OptimConfig(lr=1e-3), steps=1000)
    state = optimizer.init(params)
    state.hyperparams["lr"]             # Array(0.001)
"""

from __future__ import annotations

import dataclasses

import optax

from shardml.core.settings import setting

# The hyperparameters that live in the optimizer state (one value per population member); warmup
# and min_lr_ratio shape the schedule and are static.
INJECTED = ("lr", "b1", "b2", "weight_decay", "clip_norm")


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


def lr_shape(warmup: int, min_lr_ratio: float, steps: int) -> optax.Schedule:
    """The learning rate relative to its peak: linear warmup from 1/(warmup+1) to 1, then cosine
    decay to ``min_lr_ratio`` at ``steps``."""
    warmup = min(warmup, max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(init_value=1.0 / (warmup + 1), peak_value=1.0, warmup_steps=warmup,
                                              decay_steps=max(steps, warmup + 1), end_value=min_lr_ratio)


def adamw_cosine(lr, b1, b2, weight_decay, clip_norm, *, warmup: int, min_lr_ratio: float,
                 steps: int) -> optax.GradientTransformation:
    """Clipping, then AdamW (``optax.adamw``'s chain) on ``lr`` x :func:`lr_shape`."""
    shape = lr_shape(warmup, min_lr_ratio, steps)
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.scale_by_adam(b1=b1, b2=b2),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(lambda count: lr * shape(count)),
    )


def default_optimizer(cfg: OptimConfig, steps: int) -> optax.GradientTransformation:
    """:func:`adamw_cosine` with the numeric hyperparameters of ``cfg`` injected into its state."""
    return optax.inject_hyperparams(adamw_cosine, static_args=("warmup", "min_lr_ratio", "steps"))(
        **{name: getattr(cfg, name) for name in INJECTED}, warmup=cfg.warmup, min_lr_ratio=cfg.min_lr_ratio,
        steps=steps)
