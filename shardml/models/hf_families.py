"""Open-weights families: a Hugging Face ``config.json`` as a :class:`TransformerConfig`, and where
each of its parameters lives in the checkpoint's tensors.

Llama (3.x, with its RoPE scaling), Qwen2 / Qwen2.5 (q/k/v biases), Qwen3 (QK-norm), Mistral
(sliding-window attention), and the mixtures of experts Mixtral and Qwen3-MoE
(:mod:`shardml.models.transformer_moe`; each expert a tensor of its own in the checkpoint) are the reference transformer with a few settings on
(:mod:`shardml.models.transformer_layers`), so every layout, microbatch count and the KV-cache
decoder serve them as they serve the built-in model. Reading and writing the tensors is
:mod:`shardml.models.hf_io`'s job; this module only knows names, shapes and settings.

    cfg = config_from_hf(json.load(open("config.json")), dtype="bfloat16")
    for source in weight_sources(cfg):
        source.hf_name(0), source.hf_shape(per_layer_shape)   # "model.layers.0.self_attn.q_proj.weight", ...
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from shardml.core.errors import ModelError
from shardml.models.transformer_layers import COMPUTE_DTYPES, TransformerConfig, check_transformer, head_dim_of

# The `architectures` entry of config.json -> the family (its `model_type`).
FAMILIES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
MOES = ("mixtral", "qwen3_moe")
# Architectures refused with the reason (rather than the plain "not supported").
REFUSED = {"Qwen2MoeForCausalLM": "its shared expert is scaled by a learned sigmoid gate (shared_expert_gate), "
                                  "which shardml's shared experts do not have"}
GEMMAS = ("gemma2", "gemma3_text")
# The context save_hf declares for a model that came from no checkpoint (TransformerConfig.max_positions=0).
DEFAULT_MAX_POSITIONS = 4096
_ARCHITECTURE = {family: arch for arch, family in FAMILIES.items()}


def family_of(hf: dict[str, Any]) -> str:
    """The family of a config.json's ``architectures``.

    Raises:
      ModelError: no ``architectures`` entry, or none that shardml supports (the message names them).
    """
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
        if arch in REFUSED:
            raise ModelError(f"{arch} is not supported: {REFUSED[arch]}; shardml loads {', '.join(FAMILIES)}",
                             subject="architectures", value=archs)
    raise ModelError(f"architectures={archs} is not supported; shardml loads {', '.join(FAMILIES)}",
                     subject="architectures", value=archs)


def _unsupported(hf: dict[str, Any], family: str) -> str | None:
    """What a config asks for that the family's settings cannot express, or None."""
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    want = "gelu_pytorch_tanh" if family in GEMMAS else "silu"
    if act != want:
        return f"hidden activation {act!r} (only {want!r} is supported)"
    if family in GEMMAS and hf.get("attention_bias"):
        return "attention_bias=true"
    if hf.get("mlp_bias"):
        return "mlp_bias=true"
    if family == "llama" and hf.get("attention_bias"):
        return "attention_bias=true (a Llama output-projection bias)"
    if family in ("qwen2", "qwen3", "qwen3_moe") and hf.get("use_sliding_window"):
        return "use_sliding_window=true (Qwen's per-layer windows)"
    if family == "qwen3_moe" and (hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1):
        return "dense layers among the sparse ones (mlp_only_layers / decoder_sparse_step != 1)"
    for rope in _ropes(hf).values():
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            return f"rope_type={rope_type!r} (supported: default, llama3)"
    return None


def _ropes(hf: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rotary settings of global ("full_attention") and local ("sliding_attention") layers.
    transformers >= 5 writes `rope_parameters` (theta inside, one per layer type for Gemma 3);
    older files `rope_theta`, `rope_scaling` and Gemma 3's `rope_local_base_freq`."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if "full_attention" in rope:
        return rope
    ropes = {"full_attention": {"rope_theta": hf.get("rope_theta", 10000.0), **rope}}
    if "rope_local_base_freq" in hf:
        ropes["sliding_attention"] = {"rope_theta": hf["rope_local_base_freq"]}
    return ropes


def _rope_settings(hf: dict[str, Any]) -> dict[str, Any]:
    ropes = _ropes(hf)
    rope, local = ropes["full_attention"], ropes.get("sliding_attention", {})
    scaling = rope if rope.get("rope_type", rope.get("type")) == "llama3" else {}
    return dict(rope_base=float(rope.get("rope_theta", 10000.0)), rope_local_base=float(local.get("rope_theta", 0.0)),
                rope_scaling_factor=float(scaling.get("factor", 0.0)),
                rope_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                rope_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                rope_original_len=int(scaling.get("original_max_position_embeddings", 8192)))


def _global_every(hf: dict[str, Any], family: str) -> int:
    """``global_every`` of a config's ``layer_types`` (Gemma 2: every second layer global, Gemma 3:
    every sixth); 0 when every layer is alike.

    Raises:
      ModelError: local and global layers in a pattern other than every n-th global.
    """
    types = hf.get("layer_types") or (["sliding_attention", "full_attention"] * hf["num_hidden_layers"]
                                      if family == "gemma2" else [])
    local = [t == "sliding_attention" for t in types[:hf["num_hidden_layers"]]]
    if all(local) or not any(local):
        return 0
    n = local.index(False) + 1
    if any(is_local != bool((i + 1) % n) for i, is_local in enumerate(local)):
        raise ModelError(f"layer_types={types} is not every {n}-th layer global; shardml supports that pattern only",
                         subject="config.json", value=types)
    return n


def _gemma_settings(hf: dict[str, Any], family: str) -> dict[str, Any]:
    if family not in GEMMAS:
        return {}
    return dict(mlp_act="gelu_tanh", norm_plus_one=True, embed_scale=True, post_norms=True,
                query_scale=float(hf.get("query_pre_attn_scalar") or 0.0),
                attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
                final_softcap=float(hf.get("final_logit_softcapping") or 0.0),
                global_every=_global_every(hf, family))


def _moe_settings(hf: dict[str, Any], family: str) -> dict[str, Any]:
    """The experts of Mixtral (``intermediate_size`` is each expert's width, gates always
    renormalised) and Qwen3-MoE (``moe_intermediate_size``, ``norm_topk_prob``). Transformers'
    load-balancing loss is ``top_k`` times shardml's ``moe_aux`` (for one sequence and one layer;
    transformers pools every layer and row of the batch, shardml averages sequences and layers),
    hence the weight's factor; neither family has a z-loss."""
    if family not in MOES:
        return {}
    top_k = hf.get("num_experts_per_tok", 2)
    # Qwen3-MoE files name it num_experts; transformers >= 5 writes num_local_experts for both families
    experts = hf.get("num_local_experts") or hf["num_experts"]
    return dict(experts=experts, top_k=top_k, norm_topk=family == "mixtral" or bool(hf.get("norm_topk_prob")),
                expert_d_ff=hf["intermediate_size"] if family == "mixtral" else hf["moe_intermediate_size"],
                aux_loss_weight=float(hf.get("router_aux_loss_coef", 0.0)) * top_k, z_loss_weight=0.0)


def _window(hf: dict[str, Any], family: str) -> int:
    if family in ("mistral", "mixtral") or family in GEMMAS and any(t == "sliding_attention" for t in hf.get("layer_types") or
                                                       ["sliding_attention"]):
        return hf.get("sliding_window") or 0
    return 0


def _checkpoint_dtype(hf: dict[str, Any]) -> str:
    """The weights' dtype a config.json declares (transformers >= 5 writes ``dtype``, older
    versions ``torch_dtype``); float32 where it names none shardml writes."""
    declared = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").removeprefix("torch.")
    return declared if declared in COMPUTE_DTYPES else "float32"


def config_from_hf(hf: dict[str, Any], dtype: str = "float32") -> TransformerConfig:
    """The :class:`TransformerConfig` of a Hugging Face ``config.json`` (a dict); ``dtype`` is the
    compute dtype.

        config_from_hf({"architectures": ["Qwen3ForCausalLM"], "vocab_size": 128, ...}).qk_norm  # True

    Raises:
      ModelError: an unsupported architecture or option (named, with the supported ones), or sizes
        the transformer cannot take.
    """
    family = family_of(hf)
    problem = _unsupported(hf, family)
    if problem:
        raise ModelError(f"{_ARCHITECTURE[family]} with {problem} is not supported by shardml", subject="config.json",
                         value=problem)
    heads = hf["num_attention_heads"]
    cfg = TransformerConfig(
        vocab=hf["vocab_size"], layers=hf["num_hidden_layers"], d_model=hf["hidden_size"], heads=heads,
        kv_heads=hf.get("num_key_value_heads") or heads, d_ff=hf["intermediate_size"], dtype=dtype,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        qkv_bias=family == "qwen2" or (family in ("qwen3", "qwen3_moe") and bool(hf.get("attention_bias"))),
        qk_norm=family in ("qwen3", "qwen3_moe", "gemma3_text"), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embed=bool(hf.get("tie_word_embeddings", family in GEMMAS)), sliding_window=_window(hf, family),
        max_positions=int(hf.get("max_position_embeddings") or 0), export_dtype=_checkpoint_dtype(hf),
        **_rope_settings(hf), **_gemma_settings(hf, family), **_moe_settings(hf, family))
    check_transformer(cfg)
    return cfg


def family_for(cfg: TransformerConfig) -> str:
    """The family that writes ``cfg`` back to Hugging Face (the plainest that holds every setting).

    Raises:
      ModelError: experts no family here holds (shared experts, sigmoid gates, Mixtral's gates
        not renormalised).
    """
    if cfg.experts:
        return _moe_family(cfg)
    if cfg.post_norms:
        return "gemma3_text" if cfg.qk_norm else "gemma2"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window else "llama"


def _moe_family(cfg: TransformerConfig) -> str:
    family = "qwen3_moe" if cfg.qk_norm else "mixtral"
    problem = ("shared_experts > 0" if cfg.shared_experts else "capacity_factor > 0" if cfg.capacity_factor else "moe_gate='sigmoid'" if cfg.moe_gate != "softmax"
               else "norm_topk=False without qk_norm (Mixtral always renormalises)" if not (cfg.norm_topk or cfg.qk_norm)
               else "qkv_bias without qk_norm" if cfg.qkv_bias and not cfg.qk_norm
               else "sliding_window with qk_norm" if cfg.sliding_window and cfg.qk_norm
               else "post_norms" if cfg.post_norms else None)
    if problem:
        raise ModelError(f"experts with {problem} cannot be written as a Hugging Face checkpoint: Mixtral and "
                         "Qwen3-MoE (the MoE families shardml writes) have no such setting", subject="model",
                         value=problem)
    return family


def _moe_config(cfg: TransformerConfig, family: str) -> dict[str, Any]:
    if family not in MOES:
        return {}
    out = {"num_experts_per_tok": cfg.top_k, "router_aux_loss_coef": cfg.aux_loss_weight / cfg.top_k,
           "intermediate_size": cfg.expert_d_ff or cfg.d_ff}
    if family == "mixtral":
        return out | {"num_local_experts": cfg.experts, "sliding_window": cfg.sliding_window or None}
    return out | {"num_experts": cfg.experts, "num_local_experts": cfg.experts, "norm_topk_prob": cfg.norm_topk, "moe_intermediate_size":
                  cfg.expert_d_ff or cfg.d_ff, "intermediate_size": cfg.d_ff, "decoder_sparse_step": 1,
                  "mlp_only_layers": []}


def hf_config(cfg: TransformerConfig) -> dict[str, Any]:
    """The ``config.json`` of ``cfg`` (what :func:`config_from_hf` reads back as ``cfg``): the
    loaded checkpoint's own context length and weights dtype (``cfg.max_positions``,
    ``cfg.export_dtype``), ``DEFAULT_MAX_POSITIONS`` for a model born in shardml.

        hf_config(TransformerConfig(layers=2, d_model=64, heads=4, d_ff=256))["architectures"]  # ["LlamaForCausalLM"]
    """
    family = family_for(cfg)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_base}
    if cfg.rope_scaling_factor:
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_base, "factor": cfg.rope_scaling_factor,
                "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                "original_max_position_embeddings": cfg.rope_original_len}
    out = {
        "architectures": [_ARCHITECTURE[family]], "model_type": family, "vocab_size": cfg.vocab,
        "num_hidden_layers": cfg.layers, "hidden_size": cfg.d_model, "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads or cfg.heads, "intermediate_size": cfg.d_ff,
        "head_dim": head_dim_of(cfg), "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embed, "max_position_embeddings": cfg.max_positions or DEFAULT_MAX_POSITIONS,
        # both spellings: transformers >= 5 reads rope_parameters, older versions rope_theta / rope_scaling
        "rope_parameters": rope, "rope_theta": cfg.rope_base, "torch_dtype": cfg.export_dtype, "dtype": cfg.export_dtype,
        "attention_bias": cfg.qkv_bias if family in ("qwen3", "qwen3_moe") else False, "mlp_bias": False,
    }
    if cfg.rope_scaling_factor:
        out["rope_scaling"] = rope
    if family == "mistral":
        out["sliding_window"] = cfg.sliding_window
    return out | _gemma_config(cfg, family, rope) | _moe_config(cfg, family)


def _gemma_config(cfg: TransformerConfig, family: str, rope: dict[str, Any]) -> dict[str, Any]:
    if family not in GEMMAS:
        return {}
    local = [bool(cfg.sliding_window) and (not cfg.global_every or bool((i + 1) % cfg.global_every))
             for i in range(cfg.layers)]
    if not cfg.query_scale:
        cfg = dataclasses.replace(cfg, query_scale=head_dim_of(cfg))
    out = {"hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
           # transformers insists on an int where the value is one
           "query_pre_attn_scalar": int(cfg.query_scale) if float(cfg.query_scale).is_integer() else cfg.query_scale,
           "attn_logit_softcapping": cfg.attn_softcap or None, "final_logit_softcapping": cfg.final_softcap or None,
           "sliding_window": cfg.sliding_window or None,
           "layer_types": ["sliding_attention" if x else "full_attention" for x in local]}
    if family == "gemma3_text":
        local_rope = {"rope_type": "default", "rope_theta": cfg.rope_local_base or cfg.rope_base}
        out |= {"rope_parameters": {"full_attention": rope, "sliding_attention": local_rope},
                "rope_local_base_freq": local_rope["rope_theta"]}
    return out


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one shardml parameter comes from in a checkpoint.

    Attributes:
      path: the parameter's path in shardml's tree (``("layers", "wq")``).
      name: the tensor's name; ``{i}`` stands for the layer of a stacked parameter.
      groups: how many consecutive dimensions of shardml's (per-layer) shape make each of the
        tensor's dimensions (``wq`` [D, H, E] from q_proj [H*E, D]: ``(1, 2)``, transposed).
      transpose: the tensor is the transpose of those groups (a torch Linear stores [out, in]).
      experts: the (per-layer) parameter's leading dimension is the experts, one tensor each;
        ``{e}`` in ``name`` stands for the expert and ``groups`` describe one expert's shape.
    """

    path: tuple[str, ...]
    name: str
    groups: tuple[int, ...]
    transpose: bool = False
    experts: bool = False

    @property
    def stacked(self) -> bool:
        return self.path[0] == "layers"

    def hf_name(self, layer: int | None = None, expert: int | None = None) -> str:
        return self.name.format(i=layer, e=expert)

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The tensor's shape for a shardml (per-layer) shape."""
        dims, start = [], 0
        for n in self.groups:
            dims.append(math.prod(shape[start:start + n]))
            start += n
        return tuple(reversed(dims)) if self.transpose else tuple(dims)


_LAYER = "model.layers.{i}."


def weight_sources(cfg: TransformerConfig) -> list[Source]:
    """Every parameter of ``cfg``'s transformer and the tensor it is read from (and written to)."""
    linear = {"wq": ("self_attn.q_proj", (1, 2)), "wk": ("self_attn.k_proj", (1, 2)),
              "wv": ("self_attn.v_proj", (1, 2)), "wo": ("self_attn.o_proj", (2, 1)),
              "w_gate": ("mlp.gate_proj", (1, 1)), "w_up": ("mlp.up_proj", (1, 1)), "w_down": ("mlp.down_proj", (1, 1))}
    out = [Source(("embed",), "model.embed_tokens.weight", (1, 1)), Source(("final_norm",), "model.norm.weight", (1,)),
           Source(("layers", "attn_norm"), _LAYER + "input_layernorm.weight", (1,))]
    if cfg.post_norms:  # Gemma: post_attention_layernorm is the attention output's norm, not the MLP's input's
        out += [Source(("layers", "attn_post_norm"), _LAYER + "post_attention_layernorm.weight", (1,)),
                Source(("layers", "mlp_norm"), _LAYER + "pre_feedforward_layernorm.weight", (1,)),
                Source(("layers", "mlp_post_norm"), _LAYER + "post_feedforward_layernorm.weight", (1,))]
    else:
        out.append(Source(("layers", "mlp_norm"), _LAYER + "post_attention_layernorm.weight", (1,)))
    if cfg.experts:
        linear = {key: value for key, value in linear.items() if not key.startswith("w_")}
    out += [Source(("layers", key), f"{_LAYER}{module}.weight", groups, True) for key, (module, groups) in linear.items()]
    out += _expert_sources(cfg)
    if cfg.qkv_bias:
        out += [Source(("layers", f"b{x}"), f"{_LAYER}self_attn.{x}_proj.bias", (2,)) for x in "qkv"]
    if cfg.qk_norm:
        out += [Source(("layers", f"{x}_norm"), f"{_LAYER}self_attn.{x}_norm.weight", (1,)) for x in "qk"]
    if not cfg.tie_embed:
        out.append(Source(("unembed",), "lm_head.weight", (1, 1), True))
    return out


def _expert_sources(cfg: TransformerConfig) -> list[Source]:
    """The router and each expert's three linears: Mixtral's ``block_sparse_moe.gate`` and
    ``experts.{e}.w1/w3/w2`` (gate, up, down), Qwen3-MoE's ``mlp.gate`` and
    ``mlp.experts.{e}.gate_proj/up_proj/down_proj``."""
    if not cfg.experts:
        return []
    if not cfg.qk_norm:  # Mixtral (as family_for names it, without its checks: LoRA reads these too)
        moe, names = _LAYER + "block_sparse_moe.", {"we_gate": "w1", "we_up": "w3", "we_down": "w2"}
    else:
        moe, names = _LAYER + "mlp.", {"we_gate": "gate_proj", "we_up": "up_proj", "we_down": "down_proj"}
    return [Source(("layers", "router"), moe + "gate.weight", (1, 1), True),
            *(Source(("layers", key), moe + "experts.{e}." + name + ".weight", (1, 1), True, experts=True)
              for key, name in names.items())]
