"""A decoder-only transformer: RMSNorm, rotary positions, SwiGLU MLP, optional grouped-query attention.

Layers are stacked on a leading ``layers`` axis and run with ``lax.scan``, so compile time does not
grow with depth. Every weight and the activations that need it are named by logical axes only.

Shape letters: B batch, S sequence, D model, H query heads, K key/value heads, G = H / K query heads
per key/value head, E head dim, F MLP hidden, V vocabulary, L layers.

    model = transformer(TransformerConfig(layers=2, d_model=64, heads=4, d_ff=256), seq_len=64)
    logits_BSV = model.apply(params, tokens_BS)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from shardml.core.errors import ConfigError
from shardml.core.settings import check_settings, setting
from shardml.core.sharding import constrain
from shardml.core.model import Model, ParamSpec, Stages, from_specs

# none: keep every activation; full: recompute the whole layer in the backward; dots: keep matmul
# outputs, recompute the rest. On XLA:CPU which is faster depends on the layout (benchmarks/README.md).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# scan: one compiled loop body (compile time independent of depth; each FSDP weight is gathered again
# for its backward); unroll: the layers one after another.
LAYER_LOOPS = ("scan", "unroll")
# "auto" (remat and layer_loop) picks remat=none with unrolled layers where that fits, else dots with
# the layers scanned: see resolve_execution.
AUTO = "auto"
# auto unrolls at most this many layers (compile time grows with depth) and only when the estimate of
# no_remat_bytes plus the training state is at most this share of a device's memory.
AUTO_UNROLL_MAX_LAYERS = 16
AUTO_MEMORY_SHARE = 0.5
# Weight-gradient products of bf16/f16 compute: "compute" (the default) returns them in the compute
# dtype, as autodiff of a plain cast does (plain Flax, MaxText); "float32" accumulates and returns
# them in f32. On XLA:CPU the partial sums are reduced across devices in f32 either way (the
# compiled steps' gradient all-reduces are f32 with "compute" too, JAX 0.10.2 and 0.12), so there
# "float32" only spares each device's own product one rounding, and an f32-output product of bf16
# operands costs 5-11 % of the step (benchmarks/README.md, bench_step.py).
GRAD_DTYPES = ("compute", "float32")
COMPUTE_DTYPES = ("bfloat16", "float32", "float16")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """The reference transformer. ``dtype`` is the compute dtype; parameters are always float32.

    ``remat`` and ``layer_loop`` at ``"auto"`` are chosen by :func:`resolve_execution` from the
    memory a run's devices have (``shardml.run.recipe.build`` does it); :func:`transformer` given
    them unresolved takes the choice that always fits, ``dots`` with the layers scanned.
    """

    vocab: int = setting(256, minimum=2)
    layers: int = setting(2, minimum=1)
    d_model: int = setting(64, minimum=1)
    heads: int = setting(4, minimum=1)
    kv_heads: int = setting(0, minimum=0, hint="0 means 'same as heads' (no grouped-query attention)")
    d_ff: int = setting(256, minimum=1)
    dtype: str = setting("bfloat16", choices=COMPUTE_DTYPES)
    remat: str = setting(AUTO, choices=(AUTO, *REMAT_POLICIES))
    layer_loop: str = setting(AUTO, choices=(AUTO, *LAYER_LOOPS))
    grad_dtype: str = setting("compute", choices=GRAD_DTYPES)
    rope_base: float = setting(10000.0, above=0.0)


def check_transformer(cfg: TransformerConfig) -> None:
    """The head arithmetic (what the rules and mesh cannot check: they see each weight alone)."""
    kv = cfg.kv_heads or cfg.heads
    if cfg.d_model % cfg.heads:
        raise ConfigError(f"model.d_model={cfg.d_model} is not divisible by model.heads={cfg.heads}; "
                          "choose d_model = heads x head_dim")
    if cfg.heads % kv:
        raise ConfigError(f"model.heads={cfg.heads} is not divisible by model.kv_heads={kv}; "
                          "each key/value head must serve a whole group of query heads")
    if (cfg.d_model // cfg.heads) % 2:
        raise ConfigError(f"model.d_model / model.heads = {cfg.d_model // cfg.heads} is odd; rotary positions "
                          "rotate channel pairs, so the head dimension must be even")


def transformer_specs(cfg: TransformerConfig) -> dict:
    L, D, H, F, V = cfg.layers, cfg.d_model, cfg.heads, cfg.d_ff, cfg.vocab
    K = cfg.kv_heads or H
    E = D // H
    out_scale = 1.0 / math.sqrt(2 * L)  # residual branches summed over 2L blocks keep unit scale
    return {
        "embed": ParamSpec((V, D), ("vocab", "embed"), fan_in_dims=()),
        "layers": {
            "attn_norm": ParamSpec((L, D), ("layers", "norm"), "ones"),
            "wq": ParamSpec((L, D, H, E), ("layers", "embed", "heads", "head_dim"), fan_in_dims=(1,)),
            "wk": ParamSpec((L, D, K, E), ("layers", "embed", "kv_heads", "head_dim"), fan_in_dims=(1,)),
            "wv": ParamSpec((L, D, K, E), ("layers", "embed", "kv_heads", "head_dim"), fan_in_dims=(1,)),
            "wo": ParamSpec((L, H, E, D), ("layers", "heads", "head_dim", "embed"), fan_in_dims=(1, 2),
                            scale=out_scale),
            "mlp_norm": ParamSpec((L, D), ("layers", "norm"), "ones"),
            "w_gate": ParamSpec((L, D, F), ("layers", "embed", "mlp"), fan_in_dims=(1,)),
            "w_up": ParamSpec((L, D, F), ("layers", "embed", "mlp"), fan_in_dims=(1,)),
            "w_down": ParamSpec((L, F, D), ("layers", "mlp", "embed"), fan_in_dims=(1,), scale=out_scale),
        },
        "final_norm": ParamSpec((D,), ("norm",), "ones"),
        "unembed": ParamSpec((D, V), ("embed", "vocab"), fan_in_dims=(0,)),
    }


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4, 5))
def project(spec: str, x, w, out_dtype=None, x_grad: bool = True, grad_dtype: str = "compute"):
    """``einsum(spec, x, w)`` in x's (compute) dtype, weights f32 and cast here.

    The gradient is what autodiff of the plain cast gives, except for two choices: ``out_dtype``
    (e.g. f32 logits) is the product's accumulation and result type, and ``x_grad=False`` skips the
    input gradient, for inputs that are constants (the embedding's one-hot tokens).
    ``grad_dtype="float32"`` (``TransformerConfig.grad_dtype``) makes the weight-gradient product
    accumulate and return f32 instead of x's dtype, so each device's partial sum is not rounded
    before the partitioner reduces it over the batch-sharded axes.

        y_BSF = project("bsd,df->bsf", x_BSD, w_DF)
    """
    return jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=out_dtype)


def _project_fwd(spec, x, w, out_dtype, x_grad, grad_dtype):
    w_cast = w.astype(x.dtype)
    return jnp.einsum(spec, x, w_cast, preferred_element_type=out_dtype), (x, w_cast)


def _project_bwd(spec, out_dtype, x_grad, grad_dtype, res, g):
    x, w_cast = res
    inputs, out = spec.replace(" ", "").split("->")
    x_idx, w_idx = inputs.split(",")
    g = g.astype(x.dtype)
    dx = jnp.einsum(f"{out},{w_idx}->{x_idx}", g, w_cast) if x_grad else None  # None: a zero cotangent
    product_dtype = jnp.float32 if grad_dtype == "float32" else None
    dw = jnp.einsum(f"{x_idx},{out}->{w_idx}", x, g, preferred_element_type=product_dtype)
    return dx, dw.astype(jnp.float32)


project.defvjp(_project_fwd, _project_bwd)


def rms_norm(x, scale, eps: float = 1e-6):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rotary(x_BSHE, base: float):
    """Rotates channel pairs (i, i + E/2) by position-dependent angles."""
    S, E = x_BSHE.shape[1], x_BSHE.shape[-1]
    inv_freq = base ** (-jnp.arange(0, E // 2, dtype=jnp.float32) * 2 / E)
    angle_SE = jnp.arange(S, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    cos, sin = jnp.cos(angle_SE)[None, :, None, :], jnp.sin(angle_SE)[None, :, None, :]
    x1, x2 = jnp.split(x_BSHE.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BSHE.dtype)


def attention(h_BSD, layer, cfg: TransformerConfig):
    H = cfg.heads
    K = cfg.kv_heads or H
    g = cfg.grad_dtype
    # One product per weight, also under tensor parallelism. Megatron's fused QKV (and gate/up) would
    # stack the weights so the backward sums their input gradients before one all-reduce, but the
    # stacking and the stacked cotangent cost more than the all-reduces they save: on fsdp=2 x
    # tensor=4 separate products make the step 13 % (JAX 0.10.2) to 19 % (0.12) faster.
    q_BSHE = project("bsd,dhe->bshe", h_BSD, layer["wq"], grad_dtype=g)
    k_BSKE = project("bsd,dke->bske", h_BSD, layer["wk"], grad_dtype=g)
    v_BSKE = project("bsd,dke->bske", h_BSD, layer["wv"], grad_dtype=g)
    q_BSHE = constrain(rotary(q_BSHE, cfg.rope_base), ("batch", "act_seq", "act_heads", None))
    k_BSKE = constrain(rotary(k_BSKE, cfg.rope_base), ("batch", "act_seq", "act_kv_heads", None))
    B, S, _, E = q_BSHE.shape
    q_BSKGE = q_BSHE.reshape(B, S, K, H // K, E)
    scores = jnp.einsum("bskge,btke->bkgst", q_BSKGE, k_BSKE, preferred_element_type=jnp.float32)
    causal_ST = jnp.tril(jnp.ones((S, S), dtype=bool))
    scores = jnp.where(causal_ST, scores / math.sqrt(E), -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(h_BSD.dtype)
    o_BSKGE = jnp.einsum("bkgst,btke->bskge", probs, v_BSKE)
    o_BSHE = constrain(o_BSKGE.reshape(B, S, H, E), ("batch", "act_seq", "act_heads", None))
    return project("bshe,hed->bsd", o_BSHE, layer["wo"], grad_dtype=g)


def mlp(h_BSD, layer, cfg: TransformerConfig):
    g = cfg.grad_dtype
    gate_BSF = project("bsd,df->bsf", h_BSD, layer["w_gate"], grad_dtype=g)
    gate_BSF = constrain(gate_BSF, ("batch", "act_seq", "act_mlp"))
    up_BSF = project("bsd,df->bsf", h_BSD, layer["w_up"], grad_dtype=g)
    return project("bsf,fd->bsd", jax.nn.silu(gate_BSF) * up_BSF, layer["w_down"], grad_dtype=g)


_ACT = ("batch", "act_seq", "act_embed")


def embed_tokens(params, tokens_BS, cfg: TransformerConfig):
    """Token ids [B, S] -> activations [B, S, D] in the compute dtype."""
    dtype = jnp.dtype(cfg.dtype)
    # Vocab-parallel lookup as a one-hot product: each tensor shard contributes its slice of the
    # vocabulary and one all-reduce combines them (a gather from a sharded table is replicated whole).
    onehot_BSV = constrain(jax.nn.one_hot(tokens_BS, cfg.vocab, dtype=dtype), ("batch", "act_seq", "act_vocab"))
    embedded_BSD = project("bsv,vd->bsd", onehot_BSV, params["embed"], x_grad=False, grad_dtype=cfg.grad_dtype)
    return constrain(embedded_BSD, _ACT)


def run_layers(layers, x_BSD, cfg: TransformerConfig):
    """Applies a stack of layers (every leaf has a leading layer axis, of any length) with ``lax.scan``."""
    dtype = jnp.dtype(cfg.dtype)

    def block(x_BSD, layer):
        # Weights stay f32 here: `project` casts them (norm scales are cast by rms_norm).
        x_BSD = x_BSD + attention(rms_norm(x_BSD, layer["attn_norm"]), layer, cfg)
        x_BSD = x_BSD + mlp(rms_norm(x_BSD, layer["mlp_norm"]), layer, cfg)
        return constrain(x_BSD, _ACT), None

    if cfg.remat != "none":
        block = jax.checkpoint(block, policy=REMAT_POLICIES[cfg.remat])
    # Unrolled, XLA:CPU stacks no per-layer residuals and slices no stacked weights: with remat=none
    # a small model's step is 10-28 % faster (benchmarks/README.md). But XLA then keeps each
    # FSDP-gathered weight from the forward for the backward instead of gathering it again, so the
    # whole model's weights can be resident at once, which FSDP is there to avoid: resolve_execution.
    x_BSD, _ = jax.lax.scan(block, x_BSD.astype(dtype), layers, unroll=cfg.layer_loop == "unroll")
    return x_BSD


def output_logits(params, x_BSD, cfg: TransformerConfig):
    """Final norm and unembedding: [B, S, D] -> f32 logits [B, S, V]."""
    x_BSD = rms_norm(x_BSD, params["final_norm"])
    logits_BSV = project("bsd,dv->bsv", x_BSD, params["unembed"], jnp.float32, grad_dtype=cfg.grad_dtype)
    return constrain(logits_BSV, ("batch", "act_seq", "act_vocab"))


def transformer_apply(params, tokens_BS, cfg: TransformerConfig):
    x_BSD = embed_tokens(params, tokens_BS, cfg)
    x_BSD = run_layers(params["layers"], x_BSD, cfg)
    return output_logits(params, x_BSD, cfg)


def transformer_flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters + causal-free attention 12 x L x D x S (PaLM, app. B)."""
    D, F, L, H = cfg.d_model, cfg.d_ff, cfg.layers, cfg.heads
    K = cfg.kv_heads or H
    E = D // H
    matmul_params = L * (D * H * E + 2 * D * K * E + H * E * D + 3 * D * F) + D * cfg.vocab
    return 6.0 * matmul_params + 12.0 * L * D * seq_len


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
    K, E = cfg.kv_heads or H, D // H
    layer_weights = (D * H * E + 2 * D * K * E + H * E * D + 3 * D * F) // tensor
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
    params = transformer(cfg, seq_len).num_params  # abstract: nothing is allocated
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


def transformer(cfg: TransformerConfig, seq_len: int) -> Model:
    """The reference language model for ``cfg``; inputs are int token ids [B, S], outputs f32
    logits [B, S, V].

    Raises:
      ConfigError: a setting out of range, or heads that do not divide d_model.
    """
    check_settings(cfg, "model")
    check_transformer(cfg)
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
        ),
        name="transformer",
        compute_dtype=cfg.dtype,
    )


# ----------------------------------------------------------------------------- decoding with a KV cache
#
# Inference only; the training path above is untouched. Prompts are right-aligned in a [B, P]
# buffer (row b's real tokens start at slot ``starts[b]``), so every row writes its next key and
# value at the same cache slot and one ``dynamic_update_slice`` serves the batch (as jax-llm-examples
# does). Rotary positions count from each row's own start, so a token sees exactly the positions a
# plain forward pass over its unpadded sequence gives it. T is the cache length (static).

KV_CACHE_LOGICAL = ("layers", "batch", "act_seq", "act_kv_heads", "head_dim")  # of k and v [L, B, T, K, E]


def rotary_at(x_BSHE, positions_BS, base: float):
    """:func:`rotary` at explicit positions per row (the same arithmetic for the same position)."""
    E = x_BSHE.shape[-1]
    inv_freq = base ** (-jnp.arange(0, E // 2, dtype=jnp.float32) * 2 / E)
    angle_BSE = positions_BS.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    cos, sin = jnp.cos(angle_BSE)[:, :, None, :], jnp.sin(angle_BSE)[:, :, None, :]
    x1, x2 = jnp.split(x_BSHE.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BSHE.dtype)


def _qkv_at(h_BSD, layer, positions_BS, cfg: TransformerConfig):
    """Rotated queries and keys and the values of ``h`` at the given positions."""
    q_BSHE = project("bsd,dhe->bshe", h_BSD, layer["wq"])
    k_BSKE = project("bsd,dke->bske", h_BSD, layer["wk"])
    v_BSKE = project("bsd,dke->bske", h_BSD, layer["wv"])
    q_BSHE = constrain(rotary_at(q_BSHE, positions_BS, cfg.rope_base), ("batch", "act_seq", "act_heads", None))
    k_BSKE = constrain(rotary_at(k_BSKE, positions_BS, cfg.rope_base), ("batch", "act_seq", "act_kv_heads", None))
    v_BSKE = constrain(v_BSKE, ("batch", "act_seq", "act_kv_heads", None))
    return q_BSHE, k_BSKE, v_BSKE


def _masked_attention(q_BSHE, k_BTKE, v_BTKE, visible_BST, layer, cfg: TransformerConfig):
    """Attention of S queries over T keys where ``visible`` (the training path's arithmetic)."""
    H = cfg.heads
    K = cfg.kv_heads or H
    B, S, _, E = q_BSHE.shape
    q_BSKGE = q_BSHE.reshape(B, S, K, H // K, E)
    scores = jnp.einsum("bskge,btke->bkgst", q_BSKGE, k_BTKE, preferred_element_type=jnp.float32)
    scores = jnp.where(visible_BST[:, None, None, :, :], scores / math.sqrt(E), -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_BSHE.dtype)
    o_BSKGE = jnp.einsum("bkgst,btke->bskge", probs, v_BTKE)
    o_BSHE = constrain(o_BSKGE.reshape(B, S, H, E), ("batch", "act_seq", "act_heads", None))
    return project("bshe,hed->bsd", o_BSHE, layer["wo"])


def _last_logits(params, x_B1D, cfg: TransformerConfig):
    return output_logits(params, x_B1D, cfg)[:, 0, :]


def prefill(params, tokens_BP, starts_B, cfg: TransformerConfig, length: int):
    """Runs right-aligned prompts through the model and fills a KV cache of ``length`` slots.

    Args:
      tokens_BP: int prompts, row b's real tokens in slots ``starts[b]:P`` (the rest is padding).
      starts_B: where each row's prompt starts.
      length: T >= P, the cache length (prompt + new tokens).

    Returns:
      ``(logits_BV, cache)``: f32 logits of each row's last prompt token (the next token's
      distribution) and ``{"k", "v"}`` [L, B, T, K, E] in the compute dtype, slots P.. empty.
    """
    P = tokens_BP.shape[1]
    slots_P = jnp.arange(P)
    positions_BP = jnp.maximum(slots_P[None, :] - starts_B[:, None], 0)
    key_P, query_P = slots_P[None, None, :], slots_P[None, :, None]
    visible_BPP = (key_P <= query_P) & (key_P >= starts_B[:, None, None])  # causal, and not left padding

    def block(x_BPD, layer):
        q_BPHE, k_BPKE, v_BPKE = _qkv_at(rms_norm(x_BPD, layer["attn_norm"]), layer, positions_BP, cfg)
        x_BPD = x_BPD + _masked_attention(q_BPHE, k_BPKE, v_BPKE, visible_BPP, layer, cfg)
        x_BPD = x_BPD + mlp(rms_norm(x_BPD, layer["mlp_norm"]), layer, cfg)
        return constrain(x_BPD, _ACT), (k_BPKE, v_BPKE)

    x_BPD = embed_tokens(params, tokens_BP, cfg).astype(jnp.dtype(cfg.dtype))
    x_BPD, (k_LBPKE, v_LBPKE) = jax.lax.scan(block, x_BPD, params["layers"])
    pad = ((0, 0), (0, 0), (0, length - P), (0, 0), (0, 0))
    cache = {name: constrain(jnp.pad(kv, pad), KV_CACHE_LOGICAL) for name, kv in (("k", k_LBPKE), ("v", v_LBPKE))}
    return _last_logits(params, x_BPD[:, -1:, :], cfg), cache


def decode_step(params, cache, tokens_B, slot, starts_B, cfg: TransformerConfig):
    """One new token per row at cache slot ``slot`` (the same for every row): writes its key and
    value there and attends over slots ``starts[b]..slot``.

    Returns:
      ``(logits_BV, cache)``: the next token's f32 logits and the updated cache.
    """
    T = cache["k"].shape[2]
    positions_B1 = (slot - starts_B)[:, None]
    slots_T = jnp.arange(T)
    visible_B1T = ((slots_T[None, :] <= slot) & (slots_T[None, :] >= starts_B[:, None]))[:, None, :]

    def block(carry, layer_l):
        x_B1D, k_cache, v_cache = carry
        layer, l = layer_l
        q_B1HE, k_B1KE, v_B1KE = _qkv_at(rms_norm(x_B1D, layer["attn_norm"]), layer, positions_B1, cfg)
        at = (l, 0, slot, 0, 0)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k_B1KE[None].astype(k_cache.dtype), at)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v_B1KE[None].astype(v_cache.dtype), at)
        x_B1D = x_B1D + _masked_attention(q_B1HE, k_cache[l], v_cache[l], visible_B1T, layer, cfg)
        x_B1D = x_B1D + mlp(rms_norm(x_B1D, layer["mlp_norm"]), layer, cfg)
        return (constrain(x_B1D, _ACT), k_cache, v_cache), None

    x_B1D = embed_tokens(params, tokens_B[:, None], cfg).astype(jnp.dtype(cfg.dtype))
    layers = jax.tree.leaves(params["layers"])[0].shape[0]
    (x_B1D, k_cache, v_cache), _ = jax.lax.scan(block, (x_B1D, cache["k"], cache["v"]),
                                                (params["layers"], jnp.arange(layers)))
    cache = {"k": constrain(k_cache, KV_CACHE_LOGICAL), "v": constrain(v_cache, KV_CACHE_LOGICAL)}
    return _last_logits(params, x_B1D, cfg), cache
