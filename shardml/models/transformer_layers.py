"""The reference transformer's layers: its config, parameter specs and forward pass.

A decoder-only transformer: RMSNorm, rotary positions, SwiGLU MLP, optional grouped-query attention.
Layers are stacked on a leading ``layers`` axis and run with ``lax.scan``, so compile time does not
grow with depth. Every weight and the activations that need it are named by logical axes only.
:func:`shardml.models.transformer.transformer` assembles these into a ``Model``; its cost lives in
:mod:`shardml.models.transformer_cost`, decoding with a KV cache in
:mod:`shardml.models.transformer_decode`.

Shape letters: B batch, S sequence, D model, H query heads, K key/value heads, G = H / K query heads
per key/value head, E head dim, F MLP hidden, V vocabulary, L layers.

    cfg = TransformerConfig(layers=2, d_model=64, heads=4, d_ff=256)
    check_transformer(cfg)
    params = init_params(transformer_specs(cfg), jax.random.key(0))
    logits_BSV = transformer_apply(params, tokens_BS, cfg)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from shardml.core.errors import ModelError
from shardml.core.model import ParamSpec
from shardml.core.settings import check_settings, setting
from shardml.core.sharding import constrain, relayout, split_axes
from shardml.models.ring_attention import balanced_order, ring_attention
from shardml.models.transformer_moe import GATES, MOE_DISPATCHES, check_moe, moe_ffn

# none: keep every activation; full: recompute the whole layer in the backward; dots: keep matmul
# outputs, recompute the rest. On XLA:CPU which is faster depends on the layout (benchmarks/README.md).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# scan: one compiled loop body (compile time independent of depth); unroll: the layers one after another.
LAYER_LOOPS = ("scan", "unroll")
# "auto" (remat and layer_loop) picks remat=none with unrolled layers where that fits, else dots with
# the layers scanned: see transformer_cost.resolve_execution.
AUTO = "auto"
# Weight-gradient products of bf16/f16 compute: "compute" (the default) returns them in the compute
# dtype, as autodiff of a plain cast does (plain Flax, MaxText); "float32" accumulates and returns
# them in f32. On XLA:CPU the partial sums are reduced across devices in f32 either way (the
# compiled steps' gradient all-reduces are f32 with "compute" too, JAX 0.10.2 and 0.12), so there
# "float32" only spares each device's own product one rounding, and an f32-output product of bf16
# operands costs 5-11 % of the step (benchmarks/README.md, bench_step.py).
GRAD_DTYPES = ("compute", "float32")
COMPUTE_DTYPES = ("bfloat16", "float32", "float16")
# With the sequence split over the ``context`` mesh axis: "allgather" lets the partitioner gather each
# layer's keys and values whole on every device (simple; K/V memory is the whole sequence's);
# "ring" passes K/V blocks round the context devices with ppermute and accumulates an online
# softmax (shardml.models.ring_attention), so no device ever holds more than two blocks.
CONTEXT_ATTENTIONS = ("allgather", "ring")
# The MLP's gate: SwiGLU (silu) or Gemma's GeGLU (gelu, tanh approximation).
MLP_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """The reference transformer. ``dtype`` is the compute dtype; parameters are always float32.

    ``remat`` and ``layer_loop`` at ``"auto"`` are chosen by
    :func:`~shardml.models.transformer_cost.resolve_execution` from the memory a run's devices have
    (``shardml.run.recipe.build`` does it); :func:`~shardml.models.transformer.transformer` given
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
    context_attention: str = setting("allgather", choices=CONTEXT_ATTENTIONS,
                                     hint="how attention reaches the keys of other context shards")
    rope_base: float = setting(10000.0, above=0.0)
    # What open-weights families need (shardml.models.hf_families); each default keeps the reference model.
    head_dim: int = setting(0, minimum=0, hint="0 means d_model / heads")
    qkv_bias: bool = False  # Qwen2.5: biases on the q, k and v projections
    qk_norm: bool = False  # Qwen3: RMSNorm of each query and key head before the rotation
    norm_eps: float = setting(1e-6, above=0.0)
    tie_embed: bool = False  # the unembedding is the embedding's transpose (no `unembed` parameter)
    rope_scaling_factor: float = setting(0.0, minimum=0.0, hint="0: no scaling; > 0: Llama 3's RoPE scaling")
    rope_low_freq_factor: float = setting(1.0, above=0.0)
    rope_high_freq_factor: float = setting(4.0, above=0.0)
    rope_original_len: int = setting(8192, minimum=1, hint="the context length before Llama 3's RoPE scaling")
    sliding_window: int = setting(0, minimum=0, hint="0: every earlier token is visible (Mistral: 4096)")
    # Gemma 2 / 3
    global_every: int = setting(0, minimum=0, hint="0: the window (if any) in every layer; n: layer i is global "
                                "(no window) when (i + 1) % n == 0, the others local")
    rope_local_base: float = setting(0.0, minimum=0.0, hint="0: local layers rotate as global ones (rope_base)")
    mlp_act: str = setting("silu", choices=MLP_ACTIVATIONS)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w)
    embed_scale: bool = False  # embeddings multiplied by sqrt(d_model)
    post_norms: bool = False  # a norm after attention and after the MLP too (before each residual add)
    query_scale: float = setting(0.0, minimum=0.0, hint="0: scores scaled by 1/sqrt(head_dim); s: by 1/sqrt(s)")
    attn_softcap: float = setting(0.0, minimum=0.0, hint="0: none; c: scores = c tanh(scores / c)")
    final_softcap: float = setting(0.0, minimum=0.0, hint="0: none; c: logits = c tanh(logits / c)")
    # Mixture of experts (shardml.models.transformer_moe): experts > 0 replaces each layer's MLP.
    experts: int = setting(0, minimum=0, hint="0: a dense MLP; n: n experts per layer")
    top_k: int = setting(2, minimum=1, hint="experts each token is sent to")
    moe_gate: str = setting("softmax", choices=GATES)
    norm_topk: bool = True  # the top-k gates renormalised to sum to 1 (Mixtral; Qwen1.5-MoE does not)
    expert_d_ff: int = setting(0, minimum=0, hint="0 means d_ff")
    shared_experts: int = setting(0, minimum=0, hint="experts every token also passes through (DeepSeek, Qwen-MoE)")
    aux_loss_weight: float = setting(0.01, minimum=0.0, hint="weight of the load-balancing loss in the loss")
    z_loss_weight: float = setting(0.001, minimum=0.0, hint="weight of the router z-loss in the loss")
    capacity_factor: float = setting(0.0, minimum=0.0, hint="0: dropless; c: each expert takes at most "
                                     "ceil(c x seq_len x top_k / experts) tokens of a sequence, earliest first")
    moe_dispatch: str = setting("all_to_all", choices=MOE_DISPATCHES, hint="all_to_all: each device routes its own "
                                "tokens (over an expert axis by a hand-written all-to-all); gspmd: the partitioner's choice")
    # What a loaded checkpoint declares and save_hf writes back; the model itself does not use them.
    max_positions: int = setting(0, minimum=0, hint="the checkpoint's max_position_embeddings; 0: unknown "
                                 "(save_hf writes 4096)")
    export_dtype: str = setting("float32", choices=COMPUTE_DTYPES, hint="the dtype save_hf writes the weights in "
                                "(a loaded checkpoint's own)")


def check_transformer(cfg: TransformerConfig) -> None:
    """Every setting in its range, and the head arithmetic (what the rules and the mesh cannot check:
    they see each weight alone).

    Raises:
      SettingError: a setting out of its range (``d_ff=0 must be >= 1``).
      ModelError: heads that do not divide ``d_model``, key/value heads that do not divide
        ``heads``, or an odd head dimension; ``subject`` is the setting to change.
    """
    check_settings(cfg)
    check_moe(cfg)
    kv = cfg.kv_heads or cfg.heads
    if cfg.d_model % cfg.heads and not cfg.head_dim:
        raise ModelError(f"d_model={cfg.d_model} is not divisible by heads={cfg.heads}; "
                         "choose d_model = heads x head_dim", subject="d_model", value=cfg.d_model)
    if cfg.heads % kv:
        raise ModelError(f"heads={cfg.heads} is not divisible by kv_heads={kv}; "
                         "each key/value head must serve a whole group of query heads",
                         subject="kv_heads", value=cfg.kv_heads)
    if cfg.head_dim % 2:
        raise ModelError(f"head_dim={cfg.head_dim} is odd; rotary positions rotate channel pairs, so the head "
                         "dimension must be even", subject="head_dim", value=cfg.head_dim)
    if not cfg.head_dim and (cfg.d_model // cfg.heads) % 2:
        raise ModelError(f"d_model / heads = {cfg.d_model} / {cfg.heads} = {cfg.d_model // cfg.heads} is odd; "
                         "rotary positions rotate channel pairs, so the head dimension must be even",
                         subject="d_model", value=cfg.d_model)


def head_dim_of(cfg: TransformerConfig) -> int:
    """E: ``head_dim`` where given (Gemma, Qwen3 set it apart from d_model), else ``d_model / heads``."""
    return cfg.head_dim or cfg.d_model // cfg.heads


def transformer_specs(cfg: TransformerConfig) -> dict:
    L, D, H, F, V = cfg.layers, cfg.d_model, cfg.heads, cfg.d_ff, cfg.vocab
    K = cfg.kv_heads or H
    E = head_dim_of(cfg)
    out_scale = 1.0 / math.sqrt(2 * L)  # residual branches summed over 2L blocks keep unit scale
    layers = {
        "attn_norm": ParamSpec((L, D), ("layers", "norm"), "ones"),
        "wq": ParamSpec((L, D, H, E), ("layers", "embed", "heads", "head_dim"), fan_in_dims=(1,)),
        "wk": ParamSpec((L, D, K, E), ("layers", "embed", "kv_heads", "head_dim"), fan_in_dims=(1,)),
        "wv": ParamSpec((L, D, K, E), ("layers", "embed", "kv_heads", "head_dim"), fan_in_dims=(1,)),
        "wo": ParamSpec((L, H, E, D), ("layers", "heads", "head_dim", "embed"), fan_in_dims=(1, 2),
                        scale=out_scale),
        "mlp_norm": ParamSpec((L, D), ("layers", "norm"), "ones"),
    }
    layers |= mlp_specs(cfg, out_scale)
    if cfg.qkv_bias:
        layers |= {"bq": ParamSpec((L, H, E), ("layers", "heads", "head_dim"), "zeros"),
                   "bk": ParamSpec((L, K, E), ("layers", "kv_heads", "head_dim"), "zeros"),
                   "bv": ParamSpec((L, K, E), ("layers", "kv_heads", "head_dim"), "zeros")}
    if cfg.post_norms:
        layers |= {"attn_post_norm": ParamSpec((L, D), ("layers", "norm"), "ones"),
                   "mlp_post_norm": ParamSpec((L, D), ("layers", "norm"), "ones")}
    if cfg.qk_norm:
        layers |= {"q_norm": ParamSpec((L, E), ("layers", "norm"), "ones"),
                   "k_norm": ParamSpec((L, E), ("layers", "norm"), "ones")}
    specs = {"embed": ParamSpec((V, D), ("vocab", "embed"), fan_in_dims=()), "layers": layers,
             "final_norm": ParamSpec((D,), ("norm",), "ones")}
    if not cfg.tie_embed:
        specs["unembed"] = ParamSpec((D, V), ("embed", "vocab"), fan_in_dims=(0,))
    return specs


def mlp_specs(cfg: TransformerConfig, out_scale: float) -> dict:
    """The feed-forward's weights: the dense MLP's, or the router, the experts' (stacked on an
    ``experts`` axis) and the shared experts' (a dense MLP of shared_experts x expert_d_ff)."""
    L, D, F, N = cfg.layers, cfg.d_model, cfg.d_ff, cfg.experts

    def mlp(prefix, width):
        return {f"{prefix}gate": ParamSpec((L, D, width), ("layers", "embed", "mlp"), fan_in_dims=(1,)),
                f"{prefix}up": ParamSpec((L, D, width), ("layers", "embed", "mlp"), fan_in_dims=(1,)),
                f"{prefix}down": ParamSpec((L, width, D), ("layers", "mlp", "embed"), fan_in_dims=(1,),
                                           scale=out_scale)}

    if not N:
        return mlp("w_", F)
    Fe = cfg.expert_d_ff or F
    specs = {"router": ParamSpec((L, D, N), ("layers", "embed", None), fan_in_dims=(1,)),
             "we_gate": ParamSpec((L, N, D, Fe), ("layers", "experts", "embed", "mlp"), fan_in_dims=(2,)),
             "we_up": ParamSpec((L, N, D, Fe), ("layers", "experts", "embed", "mlp"), fan_in_dims=(2,)),
             "we_down": ParamSpec((L, N, Fe, D), ("layers", "experts", "mlp", "embed"), fan_in_dims=(2,),
                                  scale=out_scale)}
    if cfg.shared_experts:
        specs |= mlp("ws_", cfg.shared_experts * Fe)
    return specs


def project(spec: str, x, w, out_dtype=None, x_grad: bool = True, grad_dtype: str = "compute"):
    """``dense(spec, x, w, ...)``, or where ``w`` carries its own product (a weight with a low-rank
    adapter, :class:`shardml.models.lora.Adapted`) that product: the one hook adapters need, so the
    model's layers stay as they are.

        y_BSF = project("bsd,df->bsf", x_BSD, w_DF)
    """
    own = getattr(w, "project", None)
    if own is not None:
        return own(spec, x, out_dtype, x_grad, grad_dtype)
    return dense(spec, x, w, out_dtype, x_grad, grad_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4, 5))
def dense(spec: str, x, w, out_dtype=None, x_grad: bool = True, grad_dtype: str = "compute"):
    """``einsum(spec, x, w)`` in x's (compute) dtype, weights f32 and cast here.

    The gradient is what autodiff of the plain cast gives, except for two choices: ``out_dtype``
    (e.g. f32 logits) is the product's accumulation and result type, and ``x_grad=False`` skips the
    input gradient, for inputs that are constants (the embedding's one-hot tokens).
    ``grad_dtype="float32"`` (``TransformerConfig.grad_dtype``) makes the weight-gradient product
    accumulate and return f32 instead of x's dtype, so each device's partial sum is not rounded
    before the partitioner reduces it over the batch-sharded axes.

        y_BSF = dense("bsd,df->bsf", x_BSD, w_DF)
    """
    return jnp.einsum(spec, x, cast_weight(spec, w, x.dtype), preferred_element_type=out_dtype)


# The weights' einsum letters (the module docstring's shape letters) -> the logical names of that
# dimension in the parameter and as a product uses it (its activation twin). Moving the cast weight
# from one to the other gathers an FSDP-sharded weight once, in the compute dtype, and the backward
# reuses that copy (the residual) instead of the partitioner gathering the f32 shards again.
WEIGHT_AXES = {"d": ("embed", "act_embed"), "h": ("heads", "act_heads"), "k": ("kv_heads", "act_kv_heads"),
               "e": ("head_dim", None), "f": ("mlp", "act_mlp"), "v": ("vocab", "act_vocab")}


def cast_weight(spec: str, w, dtype):
    """``w`` cast to the compute ``dtype`` and laid out as ``spec``'s product uses it
    (``WEIGHT_AXES``): an FSDP-sharded weight is gathered here, once. An operand with another
    letter (a LoRA factor's rank) is only cast.

        w_DF = cast_weight("bsd,df->bsf", w_DF, jnp.bfloat16)   # under use_rules: gathered over fsdp
    """
    w_idx = spec.replace(" ", "").split("->")[0].split(",")[1]
    w_cast = w.astype(dtype)
    if not set(w_idx) <= WEIGHT_AXES.keys():
        return w_cast
    return relayout(w_cast, *zip(*(WEIGHT_AXES[c] for c in w_idx)))


def _project_fwd(spec, x, w, out_dtype, x_grad, grad_dtype):
    w_cast = cast_weight(spec, w, x.dtype)
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


dense.defvjp(_project_fwd, _project_bwd)


def rms_norm(x, scale, eps: float = 1e-6):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def norm(x, scale, cfg: TransformerConfig):
    """The model's RMSNorm: ``cfg.norm_eps``, and Gemma's (1 + w) scale with ``norm_plus_one``."""
    return rms_norm(x, scale + 1.0 if cfg.norm_plus_one else scale, cfg.norm_eps)


def rotary_angles(positions_BS, head_dim: int, base: float, scaling: tuple[float, ...] = ()):
    """The rotation angle of each channel pair at each position: f32 [B, S, E/2] (B may be 1).
    ``scaling``: Llama 3's (factor, low_freq_factor, high_freq_factor, original length), or ()."""
    inv_freq = base ** (-jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2 / head_dim)
    if scaling:
        inv_freq = llama3_frequencies(inv_freq, *scaling)
    return positions_BS.astype(jnp.float32)[:, :, None] * inv_freq


def llama3_frequencies(inv_freq, factor: float, low: float, high: float, original_len: int):
    """Llama 3.1's RoPE scaling: wavelengths longer than ``original_len / low`` slowed by ``factor``,
    shorter than ``original_len / high`` kept, and a smooth blend between."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = jnp.where(wavelen > original_len / low, inv_freq / factor, inv_freq)
    return jnp.where((wavelen >= original_len / high) & (wavelen <= original_len / low), blended, scaled)


def rope_scaling_of(cfg: TransformerConfig) -> tuple[float, ...]:
    if not cfg.rope_scaling_factor:
        return ()
    return (cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_len)


def rotate(x_BSHE, angle_BSE):
    """Rotates channel pairs (i, i + E/2) of every head by ``angle`` (one per row, position, pair)."""
    cos, sin = jnp.cos(angle_BSE)[:, :, None, :], jnp.sin(angle_BSE)[:, :, None, :]
    x1, x2 = jnp.split(x_BSHE.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BSHE.dtype)


def rotary(x_BSHE, base: float):
    """Rotary positions 0 .. S-1, the same for every row."""
    S, E = x_BSHE.shape[1], x_BSHE.shape[-1]
    return rotate(x_BSHE, rotary_angles(jnp.arange(S)[None, :], E, base))


def visible_keys(query_BS1, key_B1T, cfg: TransformerConfig, local=True):
    """Which keys each query sees, by position (or cache slot): the earlier ones, and with
    ``sliding_window`` W in a local layer only the last W of them (the query's own included)."""
    seen = key_B1T <= query_BS1
    if cfg.sliding_window:
        seen &= (query_BS1 - key_B1T < cfg.sliding_window) | jnp.logical_not(local)
    return seen


def is_local(layer_index, cfg: TransformerConfig):
    """Whether layer ``layer_index`` (traced) is local: every layer unless ``global_every`` n makes
    each n-th one global (Gemma 2: n = 2, Gemma 3: 6)."""
    return (layer_index + 1) % cfg.global_every != 0 if cfg.global_every else True


def qkv(h_BSD, layer, positions_BS, cfg: TransformerConfig, local=True):
    """Queries and keys (biased, normed per head and rotated at ``positions`` as ``cfg`` says) and
    values of ``h``: [B, S, H, E], [B, S, K, E], [B, S, K, E]. The training path and decoding share it.
    ``local``: the layer is a local one (a traced bool where ``cfg.global_every`` mixes them)."""
    g = cfg.grad_dtype
    # One product per weight, also under tensor parallelism. Megatron's fused QKV (and gate/up) would
    # stack the weights so the backward sums their input gradients before one all-reduce, but the
    # stacking and the stacked cotangent cost more than the all-reduces they save: on fsdp=2 x
    # tensor=4 separate products make the step 13 % (JAX 0.10.2) to 19 % (0.12) faster.
    q_BSHE = project("bsd,dhe->bshe", h_BSD, layer["wq"], grad_dtype=g)
    k_BSKE = project("bsd,dke->bske", h_BSD, layer["wk"], grad_dtype=g)
    v_BSKE = project("bsd,dke->bske", h_BSD, layer["wv"], grad_dtype=g)
    if cfg.qkv_bias:
        q_BSHE, k_BSKE, v_BSKE = (x + layer[b].astype(x.dtype) for x, b in
                                  ((q_BSHE, "bq"), (k_BSKE, "bk"), (v_BSKE, "bv")))
    if cfg.qk_norm:
        q_BSHE, k_BSKE = norm(q_BSHE, layer["q_norm"], cfg), norm(k_BSKE, layer["k_norm"], cfg)
    angle_BSE = rotary_angles(positions_BS, q_BSHE.shape[-1], cfg.rope_base, rope_scaling_of(cfg))
    if cfg.rope_local_base:  # Gemma 3: local layers rotate with their own base
        angle_BSE = jnp.where(local, rotary_angles(positions_BS, q_BSHE.shape[-1], cfg.rope_local_base), angle_BSE)
    q_BSHE = constrain(rotate(q_BSHE, angle_BSE), ("batch", "act_seq", "act_heads", None))
    k_BSKE = constrain(rotate(k_BSKE, angle_BSE), ("batch", "act_seq", "act_kv_heads", None))
    return q_BSHE, k_BSKE, v_BSKE


def attend(q_BSHE, k_BTKE, v_BTKE, visible, layer, cfg: TransformerConfig):
    """Softmax attention of S queries over T keys where ``visible`` (broadcast to [B, K, G, S, T]),
    then the output projection: [B, S, D]. Scores and softmax in f32, the rest in q's dtype."""
    B, S, H, E = q_BSHE.shape
    K = k_BTKE.shape[2]
    q_BSKGE = q_BSHE.reshape(B, S, K, H // K, E)
    scores = jnp.einsum("bskge,btke->bkgst", q_BSKGE, k_BTKE, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(cfg.query_scale or E)
    if cfg.attn_softcap:
        scores = cfg.attn_softcap * jnp.tanh(scores / cfg.attn_softcap)
    scores = jnp.where(visible, scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_BSHE.dtype)
    o_BSKGE = jnp.einsum("bkgst,btke->bskge", probs, v_BTKE)
    o_BSHE = constrain(o_BSKGE.reshape(B, S, H, E), ("batch", "act_seq", "act_heads", None))
    return project("bshe,hed->bsd", o_BSHE, layer["wo"], grad_dtype=cfg.grad_dtype)


def attention(h_BSD, layer, cfg: TransformerConfig, local=True, packing=None, order=None):
    """Causal self-attention of a whole sequence (the training path). ``packing``: None, or
    ``(segments_BS, positions_BS)`` of packed rows (:func:`split_inputs`): a query sees only the
    keys of its own segment, and each token is rotated at its position within its example.
    ``order``: None, or the global index of each place of a sequence laid out for ring attention
    (:func:`sequence_order`; ``packing`` already in that order), which then runs it."""
    S = h_BSD.shape[1]
    index_S = jnp.arange(S) if order is None else jnp.asarray(order)
    positions_BS = index_S[None, :] if packing is None else packing[1]
    q_BSHE, k_BSKE, v_BSKE = qkv(h_BSD, layer, positions_BS, cfg, local)
    if order is not None:
        return ring_block(q_BSHE, k_BSKE, v_BSKE, index_S, packing, layer, cfg, local)
    # Where the sequence is split (context_attention=allgather), gather the whole K and V to every
    # shard: said here, the partitioner does just that (forward all-gathers, backward reduce-scatters
    # of dK and dV); left to itself it splits the scores over keys and all-reduces softmax sums instead.
    k_BSKE, v_BSKE = (constrain(x, ("batch", None, "act_kv_heads", None)) for x in (k_BSKE, v_BSKE))
    # Causality (and the window) by index: within one segment the positions rise with the index.
    visible = visible_keys(index_S[:, None], index_S[None, :], cfg, local)
    if packing is not None:
        # RoPE scores depend on position differences only, so the positions restarting per example matter
        # for what reads absolute positions (decoding an example alone), not for these scores.
        segments_BS = packing[0]
        same_BST = segments_BS[:, :, None] == segments_BS[:, None, :]
        visible = (visible[None] & same_BST)[:, None, None]  # [B, 1, 1, S, T] against [B, K, G, S, T]
    return attend(q_BSHE, k_BSKE, v_BSKE, visible, layer, cfg)


def ring_block(q_BSHE, k_BSKE, v_BSKE, index_S, packing, layer, cfg: TransformerConfig, local=True):
    """:func:`~shardml.models.ring_attention.ring_attention` over the context axis, then the output
    projection: [B, S, D]. A traced ``local`` (``global_every``) runs both masks and picks one."""
    (axis,) = split_axes("act_seq")
    segments_BS = None if packing is None else packing[0]
    scale = 1.0 / math.sqrt(cfg.query_scale or q_BSHE.shape[-1])

    def ring(window):
        return ring_attention(q_BSHE, k_BSKE, v_BSKE, index_S, segments_BS, axis=axis, scale=scale,
                              softcap=cfg.attn_softcap, window=window)

    if not cfg.sliding_window or local is True:
        o_BSHE = ring(cfg.sliding_window)
    else:
        o_BSHE = jnp.where(local, ring(cfg.sliding_window), ring(0))
    o_BSHE = constrain(o_BSHE, ("batch", "act_seq", "act_heads", None))
    return project("bshe,hed->bsd", o_BSHE, layer["wo"], grad_dtype=cfg.grad_dtype)


def sequence_order(seq_len: int, cfg: TransformerConfig):
    """The layout of the sequence for ring attention: :func:`~shardml.models.ring_attention.balanced_order`
    over the context shards here, or None (the natural order, attention as usual) without
    ``context_attention="ring"`` or where the sequence is not split.

    Raises:
      ModelError: the sequence split over several mesh axes (ring attention passes blocks over one).
    """
    if cfg.context_attention != "ring":
        return None
    axes = split_axes("act_seq")
    if len(axes) > 1:
        raise ModelError(f"context_attention=ring passes key/value blocks round one mesh axis, but the rules split "
                         f"'act_seq' over {axes}; map act_seq to one axis", subject="context_attention",
                         value="ring")
    if not axes:
        return None
    return balanced_order(seq_len, jax.sharding.get_abstract_mesh().shape[axes[0]])


# A packed batch's inputs: several examples per row (shardml.core.sft.pack_examples).
PACKED_KEYS = ("tokens", "segments", "positions")


def split_inputs(inputs):
    """``(tokens_BS, packing)``: plain token ids give ``packing=None``; a packed row's dict
    ``{"tokens", "segments", "positions"}`` (segment ids per example, positions restarting at 0
    in each) gives ``(segments_BS, positions_BS)``.

        tokens_BS, packing = split_inputs({"tokens": t, "segments": s, "positions": p})
    """
    if not isinstance(inputs, dict):
        return inputs, None
    missing = [k for k in PACKED_KEYS if k not in inputs]
    if missing:
        raise ModelError(f"packed inputs lack {missing}; give a dict with {list(PACKED_KEYS)} "
                         "(shardml.core.sft.pack_examples builds one)", subject="inputs", value=sorted(inputs))
    return inputs["tokens"], (inputs["segments"], inputs["positions"])


def residual_block(x_BSD, layer, cfg: TransformerConfig, attend_fn):
    """One layer around its attention ``attend_fn(normed x) -> (out, aux)``: the residual adds of
    attention and MLP after their pre-norms (and with ``post_norms`` Gemma's norms of each output).
    Returns ``(x, aux)``; decoding uses it (training: :func:`residual_block_sums`)."""
    x_BSD, aux, _ = residual_block_sums(x_BSD, layer, cfg, attend_fn)
    return x_BSD, aux


def residual_block_sums(x_BSD, layer, cfg: TransformerConfig, attend_fn):
    """:func:`residual_block` that also returns the feed-forward's auxiliary-loss sums
    (:func:`feed_forward`): ``(x, aux, sums)``."""
    attended_BSD, aux = attend_fn(norm(x_BSD, layer["attn_norm"], cfg))
    if cfg.post_norms:
        attended_BSD = norm(attended_BSD, layer["attn_post_norm"], cfg)
    x_BSD = x_BSD + attended_BSD
    mlp_BSD, sums = feed_forward(norm(x_BSD, layer["mlp_norm"], cfg), layer, cfg)
    if cfg.post_norms:
        mlp_BSD = norm(mlp_BSD, layer["mlp_post_norm"], cfg)
    return constrain(x_BSD + mlp_BSD, ACT_LOGICAL), aux, sums


def feed_forward(h_BSD, layer, cfg: TransformerConfig):
    """The MLP, or with ``experts`` the experts (plus the shared ones): ``(out, (aux_sum, z_sum))``,
    the two f32 sums of :func:`~shardml.models.transformer_moe.aux_sums` (zeros for the MLP)."""
    if not cfg.experts:
        return mlp(h_BSD, layer, cfg), (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    out_BSD, sums = moe_ffn(h_BSD, layer, cfg, MLP_ACTIVATIONS[cfg.mlp_act])
    if cfg.shared_experts:
        shared = {"w_gate": layer["ws_gate"], "w_up": layer["ws_up"], "w_down": layer["ws_down"]}
        out_BSD = out_BSD + mlp(h_BSD, shared, cfg)
    return out_BSD, sums


def mlp(h_BSD, layer, cfg: TransformerConfig):
    g = cfg.grad_dtype
    gate_BSF = project("bsd,df->bsf", h_BSD, layer["w_gate"], grad_dtype=g)
    gate_BSF = constrain(gate_BSF, ("batch", "act_seq", "act_mlp"))
    up_BSF = project("bsd,df->bsf", h_BSD, layer["w_up"], grad_dtype=g)
    return project("bsf,fd->bsd", MLP_ACTIVATIONS[cfg.mlp_act](gate_BSF) * up_BSF, layer["w_down"], grad_dtype=g)


# The residual stream [B, S, D] between blocks.
ACT_LOGICAL = ("batch", "act_seq", "act_embed")


def embed_tokens(params, tokens_BS, cfg: TransformerConfig):
    """Token ids [B, S] -> activations [B, S, D] in the compute dtype."""
    dtype = jnp.dtype(cfg.dtype)
    # Vocab-parallel lookup as a one-hot product: each tensor shard contributes its slice of the
    # vocabulary and one all-reduce combines them (a gather from a sharded table is replicated whole).
    onehot_BSV = constrain(jax.nn.one_hot(tokens_BS, cfg.vocab, dtype=dtype), ("batch", "act_seq", "act_vocab"))
    embedded_BSD = project("bsv,vd->bsd", onehot_BSV, params["embed"], x_grad=False, grad_dtype=cfg.grad_dtype)
    if cfg.embed_scale:  # Gemma: by sqrt(d_model) rounded to the compute dtype, as Gemma's own code does
        embedded_BSD = embedded_BSD * jnp.asarray(math.sqrt(cfg.d_model), dtype)
    return constrain(embedded_BSD, ACT_LOGICAL)


def run_layers(layers, x_BSD, cfg: TransformerConfig, first=None, packing=None, order=None):
    """Applies a stack of layers (every leaf has a leading layer axis, of any length) with ``lax.scan``;
    ``first``: the model-wide index of the stack's first layer (a pipeline stage's), where layers
    differ by it (``global_every``); ``packing`` and ``order``: see :func:`attention`."""
    return run_layers_sums(layers, x_BSD, cfg, first, packing, order)[0]


def run_layers_sums(layers, x_BSD, cfg: TransformerConfig, first=None, packing=None, order=None):
    """:func:`run_layers` that also returns the auxiliary-loss sums of every layer: ``(x, (aux_L, z_L))``."""
    dtype = jnp.dtype(cfg.dtype)

    def block(x_BSD, layer_i):
        layer, i = layer_i
        # Weights stay f32 here: `project` casts them (norm scales are cast by rms_norm).
        local = is_local(i, cfg)
        x_BSD, _, sums = residual_block_sums(x_BSD, layer, cfg,
                                             lambda h: (attention(h, layer, cfg, local, packing, order), None))
        return x_BSD, sums

    if cfg.remat != "none":
        block = jax.checkpoint(block, policy=REMAT_POLICIES[cfg.remat])
    # Unrolled, XLA:CPU stacks no per-layer residuals and slices no stacked weights: with remat=none
    # a small model's step is 10-28 % faster (benchmarks/README.md). With remat=none (either loop)
    # each FSDP-gathered weight is kept from the forward for the backward (`dense`), so the whole
    # model's weights can be resident at once, which FSDP is there to avoid: resolve_execution
    # picks it only where that fits.
    return jax.lax.scan(block, x_BSD.astype(dtype), (layers, layer_indices(layers, cfg, first)),
                        unroll=cfg.layer_loop == "unroll")


def layer_indices(layers, cfg: TransformerConfig, first=None):
    """Each layer's model-wide index (``first`` + its place in the stack), for the layers that
    differ by it (``global_every``), else None (one compiled body serves every layer alike).

    Raises:
      ModelError: local and global layers in a part of the stack whose ``first`` layer is not given
        (a pipeline stage passes it through ``Stages.layers_from``).
    """
    if not cfg.global_every:
        return None
    n = jax.tree.leaves(layers)[0].shape[0]
    if first is None and n != cfg.layers:
        raise ModelError(f"global_every={cfg.global_every} (local and global layers) in a stack of {n} of "
                         f"layers={cfg.layers} needs the index of its first layer: run_layers(..., first=)",
                         subject="global_every", value=cfg.global_every)
    return (0 if first is None else first) + jnp.arange(n)


def output_logits(params, x_BSD, cfg: TransformerConfig):
    """Final norm and unembedding: [B, S, D] -> f32 logits [B, S, V]."""
    x_BSD = norm(x_BSD, params["final_norm"], cfg)
    if cfg.tie_embed:
        logits_BSV = project("bsd,vd->bsv", x_BSD, params["embed"], jnp.float32, grad_dtype=cfg.grad_dtype)
    else:
        logits_BSV = project("bsd,dv->bsv", x_BSD, params["unembed"], jnp.float32, grad_dtype=cfg.grad_dtype)
    if cfg.final_softcap:
        logits_BSV = cfg.final_softcap * jnp.tanh(logits_BSV / cfg.final_softcap)
    return constrain(logits_BSV, ("batch", "act_seq", "act_vocab"))


def transformer_apply(params, inputs, cfg: TransformerConfig):
    """Logits [B, S, V] of token ids [B, S], or of packed rows (a dict, see :func:`split_inputs`)."""
    return transformer_apply_sums(params, inputs, cfg)[0]


def transformer_apply_sums(params, inputs, cfg: TransformerConfig):
    """Logits and the sums the experts add to the loss sums (``{}`` without experts): ``loss``
    (the two auxiliary losses by their weights), ``moe_aux`` and ``moe_z`` (each the mean over
    the layers; divided by the token count, the means the step reports)."""
    tokens_BS, packing = split_inputs(inputs)
    order = sequence_order(tokens_BS.shape[1], cfg)
    if order is not None:  # ring attention's balanced layout: everything but attention works per position
        tokens_BS = tokens_BS[:, order]
        packing = None if packing is None else tuple(a[:, order] for a in packing)
    x_BSD = embed_tokens(params, tokens_BS, cfg)
    x_BSD, (aux_L, z_L) = run_layers_sums(params["layers"], x_BSD, cfg, packing=packing, order=order)
    if order is not None:  # back to the natural order the targets are in; before the unembedding, as
        # the partitioner moves the whole sequence for this gather: D values per position, not V logits
        x_BSD = constrain(x_BSD[:, np.argsort(order)], ACT_LOGICAL)
    logits_BSV = output_logits(params, x_BSD, cfg)
    return logits_BSV, expert_sums(aux_L, z_L, cfg) if cfg.experts else {}


def expert_sums(aux_L, z_L, cfg: TransformerConfig) -> dict:
    """The experts' additions to the loss sums from some of the layers' auxiliary-loss sums: each
    layer's share of the mean over all ``cfg.layers`` (the shares of a pipeline's stages add up)."""
    aux, z = jnp.sum(aux_L) / cfg.layers, jnp.sum(z_L) / cfg.layers
    return {"loss": cfg.aux_loss_weight * aux + cfg.z_loss_weight * z, "moe_aux": aux, "moe_z": z}


def stage_sums(layers, x_BSD, first, cfg: TransformerConfig):
    """A pipeline stage's layers (model-wide index of the first: ``first``) and their expert sums:
    ``(x, sums)``, see :func:`expert_sums`.

        x_BSD, sums = stage_sums(stage_layers, x_BSD, first, cfg)
    """
    x_BSD, (aux_L, z_L) = run_layers_sums(layers, x_BSD, cfg, first)
    return x_BSD, expert_sums(aux_L, z_L, cfg)
