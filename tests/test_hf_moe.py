"""Mixture-of-experts checkpoints (Mixtral, Qwen3-MoE) against Hugging Face ``transformers``.

Tiny random models (hidden 64, 2 layers, 4 experts of width 32, top 2) are built by
``transformers`` and ``save_pretrained`` once per module; transformers 5 holds the experts fused
in memory but writes each expert as tensors of its own (``experts.{e}.w1`` ...), the layout
real checkpoints have. Mixtral renormalises its top-k gates and has a sliding window shorter than the
prompts; Qwen3-MoE here does not renormalise (``norm_topk_prob=False``) and has QK-norm. Router
weights are scaled up so that the choices differ from token to token.
"""

import json
import re

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import shardml
from shardml.core.mesh import make_mesh
from shardml.models.transformer import TransformerConfig, transformer

RTOL = 1e-4
COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              initializer_range=0.2, num_experts_per_tok=2)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, intermediate_size=32,
                                                            sliding_window=4, head_dim=16)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, moe_intermediate_size=32,
                                                                intermediate_size=96, norm_topk_prob=False,
                                                                head_dim=32)),
}
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 12))
LAYOUT = {"expert": 2, "data": 2, "tensor": 2}


def hf_model(family, seed=0):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**COMMON, **extra, attn_implementation="eager")
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            if name.endswith("gate.weight"):  # the router: decisive choices, different per token
                p.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_moe")
    out = {}
    for family in FAMILIES:
        model = hf_model(family)
        model.save_pretrained(root / family)
        out[family] = (str(root / family), model)
    return out


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def assert_close(got, want, what):
    err = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
    assert err < RTOL, f"{what}: logits differ from transformers' by {err:.2e} of the largest (bound {RTOL})"


def one_device():
    return make_mesh({"data": 1}, jax.devices()[:1])


def hf_logits_and_aux(model, tokens):
    """Logits, and transformers' load-balancing loss of each (layer, sequence) alone [L, B]."""
    with torch.no_grad():
        out = model(torch.tensor(tokens), output_router_logits=True)
    B, S = tokens.shape
    aux = [[float(load_balancing_loss_func((layer[b * S:(b + 1) * S],), 4, 2)) for b in range(B)]
           for layer in out.router_logits]
    return out.logits.float().numpy(), np.array(aux)


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_logits_and_aux_equal_transformers_on_one_device_and_expert_data_tensor(checkpoints, family):
    """Logits 1e-4 on one device and on expert x data x tensor. The load-balancing loss:
    transformers' counts each of the k choices (k x shardml's) and pools every layer and row of a
    batch, shardml's ``moe_aux`` is per sequence and layer, summed over tokens, averaged over layers:
    so ``moe_aux`` = mean over layers of sum over sequences of S x transformers' (layer, sequence) / k."""
    directory, reference = checkpoints[family]
    want, hf_aux_LB = hf_logits_and_aux(reference, TOKENS)
    model, params = shardml.load_hf(directory, mesh=one_device())
    cfg = model.config
    assert (cfg.experts, cfg.top_k, cfg.expert_d_ff, cfg.norm_topk) == (4, 2, 32, family == "mixtral"), cfg
    logits, extra = jax.jit(model.outputs_and_sums)(params, TOKENS)
    assert_close(logits, want, f"{family} on one device")
    S = TOKENS.shape[1]
    np.testing.assert_allclose(float(extra["moe_aux"]), np.mean(np.sum(S * hf_aux_LB / 2, axis=1)), rtol=1e-5)
    assert cfg.aux_loss_weight == pytest.approx(2 * reference.config.router_aux_loss_coef)
    model, params = shardml.load_hf(directory, mesh=make_mesh(LAYOUT))
    assert params["layers"]["we_gate"].sharding.spec[1] == "expert"
    assert params["layers"]["we_gate"].addressable_shards[0].data.shape[:2] == (2, 2)  # 2 layers x 4/2 experts
    assert_close(jax.jit(model.apply)(params, TOKENS), want, f"{family} on {LAYOUT}")


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_export_loads_in_transformers_with_the_same_logits(checkpoints, family, tmp_path):
    model, params = shardml.load_hf(checkpoints[family][0], mesh=make_mesh(LAYOUT))
    noise = jax.tree.map(lambda p: 0.05 * np.random.default_rng(p.size).normal(size=p.shape).astype(np.float32), params)
    params = jax.tree.map(lambda p, n: p + n, params, noise)
    shardml.save_hf(model, params, str(tmp_path))
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert type(exported).__name__ == FAMILIES[family][1]
    assert_close(jax.jit(model.apply)(params, TOKENS), hf_logits(exported, TOKENS), f"{family} exported")
    again, _ = shardml.load_hf(str(tmp_path), mesh=one_device())
    assert again.config == model.config


def test_qwen2_moe_and_unwritable_experts_are_refused_with_the_reason(checkpoints, tmp_path):
    hf = json.loads(open(checkpoints["qwen3_moe"][0] + "/config.json").read())
    hf["architectures"] = ["Qwen2MoeForCausalLM"]
    with pytest.raises(shardml.ModelError, match=r"Qwen2MoeForCausalLM is not supported: .*shared_expert_gate"):
        shardml.models.hf_families.config_from_hf(hf)
    cfg = TransformerConfig(vocab=32, layers=1, d_model=16, heads=2, d_ff=32, experts=4, shared_experts=1)
    with pytest.raises(shardml.ModelError, match=r"shared_experts > 0 cannot be written"):
        shardml.save_hf(transformer(cfg, 8), None, str(tmp_path))  # refused before any tensor is read
    assert not list(tmp_path.iterdir())


def _as_checkpoint_names(family, torch_grads):
    """Torch's gradients under the checkpoint's names: transformers 5 holds each layer's experts
    fused (``experts.gate_up_proj`` [N, 2F, D], gate rows first; ``experts.down_proj`` [N, D, F])
    and Mixtral's block as ``mlp``, but writes each expert apart under the legacy names."""
    moe, (gate, up, down) = (("block_sparse_moe", ("w1", "w3", "w2")) if family == "mixtral"
                             else ("mlp", ("gate_proj", "up_proj", "down_proj")))
    out = {}
    for name, g in torch_grads.items():
        layer = re.match(r"model\.layers\.(\d+)\.mlp\.", name)
        if not layer:
            out[name] = g
            continue
        prefix = f"model.layers.{layer.group(1)}.{moe}."
        if name.endswith("gate.weight"):
            out[prefix + "gate.weight"] = g
        for e in range(g.shape[0]) if "experts" in name else []:
            if name.endswith("gate_up_proj"):
                half = g.shape[1] // 2
                out[f"{prefix}experts.{e}.{gate}.weight"], out[f"{prefix}experts.{e}.{up}.weight"] = g[e, :half], g[e, half:]
            else:
                out[f"{prefix}experts.{e}.{down}.weight"] = g[e]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_moe_gradients_equal_torch_on_one_device(checkpoints, family, tmp_path):
    """The next-token loss's gradient of every tensor, router and each expert included (written
    in the checkpoint's names by save_hf), equals PyTorch's."""
    directory, reference = checkpoints[family]
    model, params = shardml.load_hf(directory, mesh=one_device())

    def loss(p):
        logp = jax.nn.log_softmax(model.apply(p, TOKENS)[:, :-1])
        return -jax.numpy.take_along_axis(logp, TOKENS[:, 1:, None], -1).sum() / np.float32(TOKENS[:, 1:].size)

    grads = jax.jit(jax.grad(loss))(params)
    reference.zero_grad()
    logits = reference(torch.tensor(TOKENS)).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                      torch.tensor(TOKENS[:, 1:]).reshape(-1)).backward()
    want = _as_checkpoint_names(family, {n: p.grad.numpy() for n, p in reference.named_parameters()})
    shardml.save_hf(model, grads, str(tmp_path))
    got = load_file(str(tmp_path / "model.safetensors"))
    assert set(got) == set(want)
    for name, g in got.items():
        err = np.abs(g - want[name]).max() / np.abs(want[name]).max()
        assert err < 1e-4, f"{family} {name}: gradient differs from torch's by {err:.2e} of its largest"
