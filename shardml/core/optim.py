"""The default optimizer: AdamW with linear warmup, cosine decay and global-norm clipping.

Any optax ``GradientTransformation`` works with the trainer; this one is what the presets use::

    optimizer = default_optimizer(OptimConfig(lr=1e-3), steps=1000)
"""

from __future__ import annotations

import dataclasses

import optax

from shardml.core.settings import setting


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


def lr_schedule(cfg: OptimConfig, steps: int) -> optax.Schedule:
    """Linear warmup to ``cfg.lr`` then cosine decay to ``cfg.lr * cfg.min_lr_ratio`` at ``steps``."""
    warmup = min(cfg.warmup, max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=cfg.lr / (warmup + 1), peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def default_optimizer(cfg: OptimConfig, steps: int) -> optax.GradientTransformation:
    """AdamW on the :func:`lr_schedule`, after global-norm clipping."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(lr_schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay),
    )
