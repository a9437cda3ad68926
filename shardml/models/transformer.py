"""The reference transformer as a :class:`shardml.Model`: checked, cut for pipelining and costed.

One job: :func:`transformer` assembles a ``Model`` from three modules, each with its own job —
:mod:`~shardml.models.transformer_layers` (config, parameter specs, the forward pass),
:mod:`~shardml.models.transformer_cost` (FLOPs per token, memory, the remat / layer-loop choice)
and, for inference, :mod:`~shardml.models.transformer_decode` (KV-cache prefill and decode). Their
names stay importable from here, as before the split.

    model = transformer(TransformerConfig(layers=2, d_model=64, heads=4, d_ff=256), seq_len=64)
    logits_BSV = model.apply(params, tokens_BS)
"""

from __future__ import annotations

import functools

from shardml.core.errors import SettingError
from shardml.core.model import Model, Stages, from_specs
from shardml.models.transformer_cost import (
    AUTO_MEMORY_SHARE,
    AUTO_UNROLL_MAX_LAYERS,
    no_remat_bytes,
    resolve_execution,
    transformer_flops_per_token,
    unrolled_fits,
)
from shardml.models.transformer_decode import (  # noqa: F401  (private helpers: importable here as before)
    KV_CACHE_LOGICAL,
    _last_logits,
    _masked_attention,
    _qkv_at,
    decode_step,
    prefill,
    rotary_at,
)
from shardml.models.transformer_layers import (  # noqa: F401
    ACT_LOGICAL,
    AUTO,
    COMPUTE_DTYPES,
    GRAD_DTYPES,
    LAYER_LOOPS,
    REMAT_POLICIES,
    TransformerConfig,
    _project_bwd,
    _project_fwd,
    attention,
    check_transformer,
    embed_tokens,
    mlp,
    output_logits,
    project,
    rms_norm,
    rotary,
    run_layers,
    stage_sums,
    transformer_apply,
    transformer_apply_sums,
    transformer_specs,
)

_ACT = ACT_LOGICAL  # its name before the split


def transformer(cfg: TransformerConfig, seq_len: int) -> Model:
    """The reference language model for ``cfg``; inputs are int token ids [B, S], outputs f32
    logits [B, S, V]. ``remat`` / ``layer_loop`` left at ``"auto"`` take the choice that always
    fits (:func:`resolve_execution` with ``fits=False``).

    Raises:
      SettingError: a setting out of its range (``d_ff=0``), or ``seq_len`` < 1.
      ModelError: heads that do not divide ``d_model`` (see :func:`check_transformer`).
    """
    check_transformer(cfg)
    if seq_len < 1:
        raise SettingError(f"seq_len={seq_len} must be >= 1", subject="seq_len", value=seq_len)
    cfg = resolve_execution(cfg, fits=False)  # a no-op where build() has resolved "auto" already
    return from_specs(
        transformer_specs(cfg),
        apply=functools.partial(transformer_apply, cfg=cfg),
        flops_per_example=transformer_flops_per_token(cfg, seq_len) * seq_len,
        tokens_per_example=seq_len,
        stages=Stages(
            embed=functools.partial(embed_tokens, cfg=cfg),
            layers=functools.partial(run_layers, cfg=cfg),
            head=functools.partial(output_logits, cfg=cfg),
            # local and global layers: a pipeline stage says where its layers sit in the model
            layers_from=(lambda stack, x_BSD, first: run_layers(stack, x_BSD, cfg, first)) if cfg.global_every
            else None,
            # the experts' auxiliary losses: each stage adds its layers' share
            layers_sums=functools.partial(stage_sums, cfg=cfg) if cfg.experts else None,
        ),
        name="transformer",
        compute_dtype=cfg.dtype,
        config=cfg,
        apply_sums=functools.partial(transformer_apply_sums, cfg=cfg) if cfg.experts else None,
    )


__all__ = [
    "AUTO", "AUTO_MEMORY_SHARE", "AUTO_UNROLL_MAX_LAYERS", "COMPUTE_DTYPES", "GRAD_DTYPES", "KV_CACHE_LOGICAL",
    "LAYER_LOOPS", "REMAT_POLICIES", "TransformerConfig", "attention", "check_transformer", "decode_step",
    "embed_tokens", "mlp", "no_remat_bytes", "output_logits", "prefill", "project", "resolve_execution", "rms_norm",
    "rotary", "rotary_at", "run_layers", "transformer", "transformer_apply", "transformer_flops_per_token",
    "transformer_specs", "unrolled_fits",
]
