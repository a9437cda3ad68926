"""What the reference transformer costs: training FLOPs per token, the memory of its fastest
execution, and the remat / layer-loop choice that follows from a device's memory.

Pure arithmetic on a :class:`~shardml.models.transformer_layers.TransformerConfig`: nothing is
compiled or allocated.

    cfg = TransformerConfig(layers=4, d_model=256, d_ff=1024)
    transformer_flops_per_token(cfg, seq_len=128)                          # MFU's numerator
    fits = unrolled_fits(cfg, 128, rows=4, sizes={"fsdp": 8}, device_bytes=16 * 2**30)
    resolve_execution(cfg, fits).remat                                     # "none" where it fits
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from shardml.core.model import from_specs
from shardml.models.transformer_layers import AUTO, TransformerConfig, head_dim_of, transformer_apply, transformer_specs

# auto unrolls at most this many layers (compile time grows with depth) and only when the estimate of
# no_remat_bytes plus the training state is at most this share of a device's memory.
AUTO_UNROLL_MAX_LAYERS = 16
AUTO_MEMORY_SHARE = 0.5


def _layer_matmul_params(cfg: TransformerConfig) -> int:
    """Weights one layer multiplies by: q, k, v, output projections and the three MLP matrices."""
    D, F, H = cfg.d_model, cfg.d_ff, cfg.heads
    K, E = cfg.kv_heads or H, head_dim_of(cfg)
    return D * H * E + 2 * D * K * E + H * E * D + 3 * D * F


def transformer_flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters + causal-free attention 12 x L x H x E x S
    (PaLM, app. B; H x E is D unless ``head_dim`` sets it apart)."""
    matmul_params = cfg.layers * _layer_matmul_params(cfg) + cfg.d_model * cfg.vocab
    return 6.0 * matmul_params + 12.0 * cfg.layers * cfg.heads * head_dim_of(cfg) * seq_len


def no_remat_bytes(cfg: TransformerConfig, seq_len: int, rows: int, tensor: int = 1) -> int:
    """Bytes per device that remat=none with unrolled layers adds over the f32 training state, a
    generous estimate: every layer's weights gathered in the compute dtype, and for ``rows``
    sequences every activation the backward reads (per layer and token: the block input, norms,
    q, k, v, attention output and scores in f32 and compute dtype, gate, up and their product, the
    two projections' outputs; then f32 logits).

        no_remat_bytes(TransformerConfig(layers=4, d_model=256, d_ff=1024), 128, rows=4)
    """
    item = jnp.dtype(cfg.dtype).itemsize
    D, H, F, S = cfg.d_model, cfg.heads, cfg.d_ff, seq_len
    K, E = cfg.kv_heads or H, head_dim_of(cfg)
    layer_weights = _layer_matmul_params(cfg) // tensor
    per_token = item * (6 * D + (H + 2 * K) * E // tensor + 3 * F // tensor) + (4 + item) * (H // tensor) * S
    return cfg.layers * (layer_weights * item + rows * S * per_token) + 4 * rows * S * cfg.vocab // tensor


def unrolled_fits(cfg: TransformerConfig, seq_len: int, rows: int, sizes: dict[str, int], device_bytes: int) -> bool:
    """Whether remat=none with unrolled layers fits one device of a run: at most
    ``AUTO_UNROLL_MAX_LAYERS`` layers, no pipeline (its schedules hold several microbatches), and the
    f32 parameters, gradients and two AdamW moments (split over fsdp and tensor) plus
    :func:`no_remat_bytes` for ``rows`` sequences within ``AUTO_MEMORY_SHARE`` of ``device_bytes``.
    """
    if cfg.layers > AUTO_UNROLL_MAX_LAYERS or sizes.get("pipeline", 1) > 1:
        return False
    params = from_specs(transformer_specs(cfg), transformer_apply).num_params  # abstract: nothing is allocated
    state = 16 * params // (sizes.get("fsdp", 1) * sizes.get("tensor", 1))
    return state + no_remat_bytes(cfg, seq_len, rows, sizes.get("tensor", 1)) <= AUTO_MEMORY_SHARE * device_bytes


def resolve_execution(cfg: TransformerConfig, fits: bool) -> TransformerConfig:
    """``cfg`` with ``remat`` and ``layer_loop`` chosen where they are ``"auto"``: no remat with the
    layers unrolled when ``fits`` (the fastest on XLA:CPU for the models that fit), else ``dots``
    with the layers scanned (the least memory short of recomputing everything).

        resolve_execution(TransformerConfig(), fits=False).remat    # "dots"
    """
    remat = cfg.remat if cfg.remat != AUTO else ("none" if fits else "dots")
    loop = cfg.layer_loop if cfg.layer_loop != AUTO else ("unroll" if fits and remat == "none" else "scan")
    return dataclasses.replace(cfg, remat=remat, layer_loop=loop)
