"""LoRA: low-rank adapters on a frozen transformer, wrapping the model rather than rebuilding it.

:func:`lora` turns a transformer (e.g. from :func:`shardml.load_hf`) and its parameters into a
:class:`~shardml.Model` whose parameters are ``{"base": ..., "adapters": ...}``: the base in the
compute dtype, sharded by the model's own logical axes and never differentiated; per targeted
projection an ``a`` (f32, kaiming-uniform as peft) and ``b`` (f32, zeros), so training starts at the
base model. The layers are untouched: each targeted weight becomes an :class:`Adapted`, which
``project`` (the layers' one matmul entry) asks for its own product ``x W + scale B(A(dropout x))``
with ``scale = alpha / rank``, as peft. :func:`lora_optimizer` freezes the base the optax way
(``multi_transform`` with ``set_to_zero``: no update, no optimizer state). A population keeps the
base once (:func:`shared_params`, read by :func:`shardml.over_population`).

Populations of adapters may also differ by ``alpha`` and ``dropout`` (a sweep over them): built with
``per_member=("lora_alpha", "lora_dropout")`` (peft's names; either or both), the parameters carry a
third entry ``"settings"`` of f32 scalars, initialised to ``alpha`` / ``dropout``. It is stored beside
the adapters, so a population stacks it on the members axis with them and one compiled step reads
each member's own values; it gets no gradient and no update (:func:`lora_optimizer` freezes every
entry but the adapters). Without ``per_member`` nothing changes: the scale and rate stay Python
constants of the compiled step, so a plain run computes exactly what it always did. The exports
(:func:`merge_lora`, :func:`save_peft`, :func:`merged_params`) read a single model's own values.

    model = lora(base_model, base_params, rank=8, alpha=16, targets=("q", "v"))
    trainer = build_trainer(model, mesh, lora_optimizer(optax.adamw(1e-3)))
    save_hf(*merge_lora(model, trainer.natural(state.params)), "merged/")   # merged HF weights
    save_peft(model, state.params, "adapter/")                             # PeftModel.from_pretrained
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from shardml.core.errors import ModelError
from shardml.core.model import Model, ParamSpec, init_params, logical_axes
from shardml.models.hf_families import Source, weight_sources
from shardml.models.hf_io import _safetensors
from shardml.models.transformer_layers import TransformerConfig, dense, transformer_specs

BASE, ADAPTERS, SETTINGS = "base", "adapters", "settings"
MEMBER_SETTINGS = ("lora_alpha", "lora_dropout")  # what members of a population may differ by (peft's names)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapted:
    """A frozen weight with its adapter: ``a`` [*in, r], ``b`` [r, *out] (a leading layer axis
    while stacked); ``keys`` (key data, [B, ...]) drive the dropout, or None. ``member``: a
    population member's own ``{"scale", "dropout"}`` (arrays with the layer axis, or some of them),
    which replace the static ``scale`` / ``dropout``; None in a plain model."""

    base: Any
    a: Any
    b: Any
    keys: Any
    scale: float = dataclasses.field(metadata=dict(static=True))
    dropout: float = dataclasses.field(metadata=dict(static=True))
    member: Any = None

    def project(self, spec: str, x, out_dtype=None, x_grad: bool = True, grad_dtype: str = "compute"):
        """``x W`` plus the low-rank path, each product through ``dense`` (f32 weight gradients)."""
        inputs, out = spec.replace(" ", "").split("->")
        x_idx, w_idx = inputs.split(",")
        n_in = self.a.ndim - 1
        in_idx, out_idx = w_idx[:n_in], w_idx[n_in:]
        rows = "".join(c for c in x_idx if c not in in_idx)
        y = dense(spec, x, self.base, out_dtype, x_grad, grad_dtype)
        xa = dense(f"{x_idx},{in_idx}z->{rows}z", self._dropped(x), self.a, None, True, grad_dtype)
        yb = dense(f"{rows}z,z{out_idx}->{out}", xa, self.b, out_dtype, True, grad_dtype)
        scale = self.scale if "scale" not in (self.member or {}) else self.member["scale"].astype(yb.dtype)
        return y + (yb * scale).astype(y.dtype)

    def _dropped(self, x):
        per_member = "dropout" in (self.member or {})
        if self.keys is None or not (per_member or self.dropout):
            return x
        # a member's rate is an array: cast like the Python constant is (weak typing), so a
        # member with rate 0 keeps every value exactly, as a plain run without dropout does
        keep = 1.0 - self.member["dropout"] if per_member else 1.0 - self.dropout
        divisor = keep.astype(x.dtype) if per_member else keep

        def row(key, x_row):
            mask = jax.random.bernoulli(jax.random.wrap_key_data(key), keep, x_row.shape)
            return jnp.where(mask, x_row / divisor, 0).astype(x_row.dtype)

        return jax.vmap(row)(self.keys, x)


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """What :func:`lora` built: the wrapped model and the adapters' settings (``Model.config``)."""

    base: Model
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    per_member: tuple[str, ...] = ()  # of MEMBER_SETTINGS: held in params["settings"]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def linear_sources(cfg: TransformerConfig) -> dict[str, Source]:
    """Role (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``) -> its stacked linear weight's
    source; the role is the Hugging Face module's name (``q_proj``) less ``_proj``."""
    return {s.name.split(".")[-2].removesuffix("_proj"): s for s in weight_sources(cfg)
            if s.stacked and s.transpose and not s.experts and s.name.endswith("_proj.weight")}


def _check(model: Model, rank: int, dropout: float, targets: Sequence[str]) -> dict[str, Source]:
    """The sources of ``targets``, after checking every setting.

    Raises:
      ModelError: a model that is not a transformer, no targets or an unknown one (naming the valid
        roles), ``rank`` <= 0 or above a targeted layer's width, ``dropout`` outside [0, 1).
    """
    if not isinstance(model.config, TransformerConfig):
        raise ModelError(f"{model.name} is not a transformer; LoRA wraps shardml.transformer and load_hf models",
                         subject="model", value=model.name)
    sources = linear_sources(model.config)
    unknown = [t for t in targets if t not in sources]
    if unknown or not targets:
        raise ModelError(f"LoRA targets={list(targets)}: {unknown or 'none given'}; the {model.name} model's "
                         f"roles are {', '.join(sources)}", subject="targets", value=list(targets))
    specs = transformer_specs(model.config)["layers"]
    width = min(min(_widths(specs[sources[t].path[1]], sources[t])) for t in targets)
    if not 0 < rank <= width:
        raise ModelError(f"LoRA rank={rank} must be in 1..{width} (the narrowest targeted layer's width)",
                         subject="rank", value=rank)
    if not 0.0 <= dropout < 1.0:
        raise ModelError(f"LoRA dropout={dropout} must be in [0, 1)", subject="dropout", value=dropout)
    return {t: sources[t] for t in targets}


def _widths(spec: ParamSpec, source: Source) -> tuple[int, int]:
    """A stacked linear weight's input and output widths (its Hugging Face [out, in] less the layers)."""
    n_in = source.groups[0]
    return math.prod(spec.shape[1:1 + n_in]), math.prod(spec.shape[1 + n_in:])


def kaiming_uniform(fan_in: int):
    """peft's ``lora_A`` init, torch's ``kaiming_uniform_(a=sqrt(5))``: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def adapter_specs(model: Model, sources: dict[str, Source], rank: int) -> dict:
    """``{"layers": {weight: {"a": spec, "b": spec}}}``: ``a`` sharded as the weight's input axes, ``b``
    as its output axes, the rank axis whole."""
    specs = transformer_specs(model.config)["layers"]
    out = {}
    for source in sources.values():
        spec, n_in = specs[source.path[1]], source.groups[0]
        shape, logical = spec.shape, spec.logical
        fan_in = math.prod(shape[1:1 + n_in])
        out[source.path[1]] = {
            "a": ParamSpec((shape[0], *shape[1:1 + n_in], rank), (logical[0], *logical[1:1 + n_in], None),
                           kaiming_uniform(fan_in)),
            "b": ParamSpec((shape[0], rank, *shape[1 + n_in:]), (logical[0], None, *logical[1 + n_in:]), "zeros")}
    return {"layers": out}


def lora(model: Model, base_params: Any = None, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
         targets: Sequence[str] = ("q", "v"), per_member: Sequence[str] = ()) -> Model:
    """``model`` with low-rank adapters on the ``targets`` projections; ``base_params`` (None: the
    model's own init, for trying things out) frozen in the compute dtype. ``per_member`` (of
    ``"lora_alpha"``, ``"lora_dropout"``): held as parameters, so members of a population may differ
    by them (see the module docstring; ``lora_dropout`` makes the model draw dropout keys).

        model = lora(*load_hf("ckpt/"), rank=8, alpha=16, targets=("q", "k", "v", "o"))
        sweep = lora(model, rank=8, per_member=("lora_alpha",))  # then hyperparams={"lora_alpha": [8, 32]}

    Raises:
      ModelError: before anything is traced (see :func:`_check`): an unknown target, a rank out of
        range, a bad dropout, a model that is not a transformer, an unknown ``per_member`` name.
    """
    targets = tuple(targets)
    sources = _check(model, rank, dropout, targets)
    unknown = sorted(set(per_member) - set(MEMBER_SETTINGS))
    if unknown:
        raise ModelError(f"LoRA per_member={list(per_member)}: {unknown} cannot differ between members; "
                         f"{', '.join(MEMBER_SETTINGS)} can", subject="per_member", value=list(per_member))
    per_member = tuple(n for n in MEMBER_SETTINGS if n in per_member)
    settings = LoRASettings(model, rank, float(alpha), float(dropout), targets, per_member)
    specs = adapter_specs(model, sources, rank)
    dtype = jnp.dtype(model.compute_dtype)
    defaults = {"lora_alpha": settings.alpha, "lora_dropout": settings.dropout}
    logical = {BASE: model.logical, ADAPTERS: logical_axes(specs)}

    def init(key):
        base = model.init(key) if base_params is None else base_params
        params = {BASE: jax.tree.map(lambda p: jnp.asarray(p, dtype), base), ADAPTERS: init_params(specs, key)}
        return {**params, SETTINGS: {n: jnp.float32(defaults[n]) for n in per_member}} if per_member else params

    return dataclasses.replace(
        model, init=init, logical={**logical, SETTINGS: {n: () for n in per_member}} if per_member else logical,
        apply=functools.partial(_apply, settings=settings), uses_rng=dropout > 0 or "lora_dropout" in per_member,
        stages=None, name=f"{model.name}+lora", config=settings)


def _apply(params, inputs, rng=None, *, settings: LoRASettings):
    """The wrapped model's apply on the base with every targeted weight :class:`Adapted`."""
    base = jax.lax.stop_gradient(params[BASE])  # frozen: no gradient flows into the base
    own = _member(params, settings)
    layers = dict(base["layers"])
    for i, (name, ad) in enumerate(sorted(params[ADAPTERS]["layers"].items())):
        L = ad["a"].shape[0]
        keys = None if rng is None else _layer_keys(rng, i, L)
        member = jax.tree.map(lambda v: jnp.broadcast_to(v, (L,)), own) if own else None  # scanned with the layers
        layers[name] = Adapted(layers[name], ad["a"], ad["b"], keys, settings.scale, settings.dropout, member)
    return settings.base.apply({**base, "layers": layers}, inputs)


def _member(params, settings: LoRASettings) -> dict:
    """The model's own ``{"scale", "dropout"}`` arrays from ``params["settings"]`` (frozen); {} when
    the scale and rate are the static ones."""
    own = jax.lax.stop_gradient(params.get(SETTINGS, {}))
    out = {}
    if "lora_alpha" in own:
        out["scale"] = own["lora_alpha"] / settings.rank
    if "lora_dropout" in own:
        out["dropout"] = own["lora_dropout"]
    return out


def _layer_keys(rng, target: int, layers: int):
    """Key data [L, B, ...]: each example's key folded with the target and the layer, so the masks
    are the same on every layout."""
    def per_layer(layer):
        return jax.vmap(lambda k: jax.random.key_data(jax.random.fold_in(jax.random.fold_in(k, target), layer)))(rng)

    return jax.vmap(per_layer)(jnp.arange(layers, dtype=jnp.uint32))


def settings_of(model: Model) -> LoRASettings:
    """The LoRA settings of a :func:`lora` model.

    Raises:
      ModelError: a model :func:`lora` did not build.
    """
    if not isinstance(model.config, LoRASettings):
        raise ModelError(f"{model.name} has no LoRA adapters; wrap it with shardml.lora first", subject="model",
                         value=model.name)
    return model.config


def shared_params(model: Model) -> tuple[str, ...]:
    """Top-level parameter entries that are frozen and the same for every member of a population
    (stored once, not per member): the base of a LoRA model; none otherwise."""
    return (BASE,) if isinstance(model.config, LoRASettings) else ()


def member_settings(model: Model) -> tuple[str, ...]:
    """The settings each member of a population may hold its own value of (``params["settings"]``):
    :func:`lora`'s ``per_member``; none for any other model."""
    return model.config.per_member if isinstance(model.config, LoRASettings) else ()


def check_member_settings(model: Model, values: dict[str, Any]) -> None:
    """``values`` (name -> one value per member) fit ``model``: names it holds per member, each
    value valid as the same setting of one model (alpha > 0, dropout in [0, 1)).

    Raises:
      ModelError: naming the setting, the bad value and the fix.
    """
    for name, value in values.items():
        if name not in member_settings(model):
            raise ModelError(f"{name} per member: {model.name} holds {list(member_settings(model)) or 'no settings'} "
                             f"per member; build it with shardml.lora(..., per_member=({name!r},))", subject=name,
                             value=np.asarray(value).tolist())
        bad = [float(v) for v in np.ravel(value) if not (v > 0 if name == "lora_alpha" else 0 <= v < 1)]
        if bad:
            want = "must be > 0" if name == "lora_alpha" else "must be in [0, 1)"
            raise ModelError(f"LoRA {name.removeprefix('lora_')}={bad[0]:g} {want}", subject=name, value=bad[0])


def with_member_settings(params: Any, values: dict[str, Any]) -> Any:
    """``params`` with ``params["settings"]`` entries replaced by ``values`` (f32; a population's
    with the member axis), as :func:`shardml.over_population` gives each member its own."""
    if not values:
        return params
    return {**params, SETTINGS: {**params[SETTINGS], **{k: jnp.asarray(v, jnp.float32) for k, v in values.items()}}}


def member_settings_of(params: Any) -> dict[str, Any]:
    """The per-member settings ``params`` hold (``{"lora_alpha": ..., ...}``; {} for most models)."""
    return dict(params.get(SETTINGS, {})) if isinstance(params, dict) else {}


def _own(model: Model, params: Any) -> tuple[float, float]:
    """(alpha, dropout) of one model's ``params``: its per-member values where it holds them."""
    settings, own = settings_of(model), params.get(SETTINGS, {})
    alpha = float(jax.device_get(own["lora_alpha"])) if "lora_alpha" in own else settings.alpha
    return alpha, float(jax.device_get(own["lora_dropout"])) if "lora_dropout" in own else settings.dropout


def lora_optimizer(optimizer: optax.GradientTransformation, model: Model | None = None) -> optax.GradientTransformation:
    """``optimizer`` on the adapters; the base gets no update and no optimizer state (optax's
    ``multi_transform`` with ``set_to_zero``), nor do the per-member settings of ``model`` (pass the
    model when it was built with :func:`lora`'s ``per_member``).

        lora_optimizer(optax.adamw(1e-3), model)
    """
    labels = {BASE: "frozen", ADAPTERS: "train"}  # a prefix of the parameters
    if model is not None and member_settings(model):
        labels[SETTINGS] = "frozen"
    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


def deltas(model: Model, params: Any) -> dict[str, np.ndarray]:
    """Each targeted weight's update ``scale * A B`` (f32, gathered, shardml's [L, *in, *out] shape)."""
    scale = _own(model, params)[0] / settings_of(model).rank
    out = {}
    for name, ad in params[ADAPTERS]["layers"].items():
        a, b = (np.asarray(jax.device_get(ad[k]), np.float32) for k in ("a", "b"))
        L, r = a.shape[0], a.shape[-1]
        product = np.einsum("lir,lro->lio", a.reshape(L, -1, r), b.reshape(L, r, -1))
        out[name] = scale * product.reshape(a.shape[:-1] + b.shape[2:])
    return out


def merged_params(model: Model, params: Any) -> Any:
    """The base parameters with every adapter merged in (``W + scale A B``, summed in f32, in the
    base's dtype), as arrays: jit it to merge on the devices where the parameters live (what
    decoding a LoRA model reads), without gathering anything to the host.

        base_params = jax.jit(merged_params, static_argnums=0)(model, params)
    """
    settings = settings_of(model)
    scale = _member(params, settings).get("scale", settings.scale)
    layers = dict(params[BASE]["layers"])
    for name, ad in params[ADAPTERS]["layers"].items():
        a, b, w = ad["a"], ad["b"], layers[name]
        L, r = a.shape[0], a.shape[-1]
        product = jnp.einsum("lir,lro->lio", a.reshape(L, -1, r), b.reshape(L, r, -1),
                             preferred_element_type=jnp.float32)
        layers[name] = (w.astype(jnp.float32) + scale * product.reshape(w.shape)).astype(w.dtype)
    return {**params[BASE], "layers": layers}


def merge_lora(model: Model, params: Any) -> tuple[Model, Any]:
    """The wrapped model and its f32 parameters with every adapter merged in (``W + scale A B``), for
    :func:`shardml.save_hf`: ``save_hf(*merge_lora(model, params), "merged/")``."""
    base = jax.tree.map(lambda p: np.asarray(jax.device_get(p), np.float32), params[BASE])
    layers = dict(base["layers"])
    for name, delta in deltas(model, params).items():
        layers[name] = layers[name] + delta
    return settings_of(model).base, {**base, "layers": layers}


def save_peft(model: Model, params: Any, out_dir: str, *, base_model: str = "") -> None:
    """The adapters alone in PEFT's format: ``adapter_config.json`` and ``adapter_model.safetensors``
    (``lora_A`` [r, in], ``lora_B`` [out, r] per layer, peft's names), which
    ``peft.PeftModel.from_pretrained(base, out_dir)`` loads; ``base_model`` is recorded as its
    ``base_model_name_or_path``."""
    settings = settings_of(model)
    sources = linear_sources(settings.base.config)
    by_weight = {s.path[1]: (role, s) for role, s in sources.items()}
    tensors = {}
    for name, ad in params[ADAPTERS]["layers"].items():
        source = by_weight[name][1]
        a, b = (np.asarray(jax.device_get(ad[k]), np.float32) for k in ("a", "b"))
        for layer in range(a.shape[0]):
            prefix = "base_model.model." + source.hf_name(layer).removesuffix(".weight")
            tensors[prefix + ".lora_A.weight"] = np.ascontiguousarray(a[layer].reshape(-1, a.shape[-1]).T)
            tensors[prefix + ".lora_B.weight"] = np.ascontiguousarray(b[layer].reshape(b.shape[1], -1).T)
    os.makedirs(out_dir, exist_ok=True)
    _safetensors().numpy.save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"),
                                   metadata={"format": "pt"})
    modules = sorted(sources[t].name.split(".")[-2] for t in settings.targets)
    alpha, dropout = _own(model, params)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.rank, "lora_alpha": alpha,
              "lora_dropout": dropout, "target_modules": modules, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None, "base_model_name_or_path": base_model or None}
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
