"""Open-weights checkpoints against Hugging Face ``transformers``, an implementation nobody here wrote.

Tiny random models of each family (hidden 64, 2 layers, vocabulary 128) are built by
``transformers`` on PyTorch's CPU build and ``save_pretrained`` once per session; each exercises the
settings of its family: Llama 3 RoPE scaling (an original context of 16, so the prompts here reach
the scaled frequencies), Qwen2 q/k/v biases with tied embeddings, Qwen3 QK-norm with a head
dimension apart from hidden / heads, Mistral a sliding window of 4 (shorter than the prompts).
Norm scales and biases are drawn at random too, so a swapped or skipped one shows.
"""

import copy
import dataclasses
import json
import os
import shutil
import sys
import tracemalloc

import jax
import numpy as np
import optax
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file

import shardml
from shardml.core.mesh import make_mesh

RTOL = 1e-4  # f32, relative to the largest logit
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.2)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}, rope_theta=500000.0, rms_norm_eps=1e-5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4, head_dim=16)),
    # softcaps small enough to bite; every second layer global; query_pre_attn_scalar apart from head_dim
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=16, sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=3.0,
        final_logit_softcapping=4.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, sliding_window=4, query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"])),
}
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 12))
LAYOUT = {"data": 2, "fsdp": 2, "tensor": 2}


def hf_model(family: str, seed: int = 0, **changes):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    # eager attention: the only one of transformers' that soft-caps Gemma 2's scores
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **changes}, attn_implementation="eager")
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.3 * torch.randn_like(p))
        if family.startswith("gemma"):  # Gemma scales embeddings by sqrt(hidden): unscaled they drown every layer
            model.model.embed_tokens.weight.mul_(COMMON["hidden_size"] ** -0.5)
    model.generation_config.eos_token_id = None  # greedy runs for all its tokens
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> (checkpoint directory, the transformers model it holds)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family in FAMILIES:
        model = hf_model(family)
        model.save_pretrained(root / family)
        out[family] = (str(root / family), model)
    return out


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def assert_close(got, want, what):
    err = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
    assert err < RTOL, f"{what}: logits differ from transformers' by {err:.2e} of the largest (bound {RTOL})"


def one_device():
    return make_mesh({"data": 1}, jax.devices()[:1])


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers_on_data_fsdp_tensor(checkpoints, family):
    """Read straight into data x fsdp x tensor shardings (each device's block of each tensor)."""
    directory, reference = checkpoints[family]
    model, params = shardml.load_hf(directory, mesh=make_mesh(LAYOUT))
    assert params["layers"]["wq"].sharding.spec[1:3] == ("fsdp", "tensor")
    assert params["layers"]["wq"].addressable_shards[0].data.shape[:3] == (2, 32, 2)
    assert_close(jax.jit(model.apply)(params, TOKENS), hf_logits(reference, TOKENS), f"{family} on {LAYOUT}")


def _greedy_hf(model, prompt, new_tokens):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_greedy_generation_equals_transformers_token_for_token(checkpoints, family):
    directory, reference = checkpoints[family]
    prompts = [TOKENS[0, :7].tolist(), TOKENS[1, :3].tolist()]  # different lengths: right-aligned, past the window
    model, params = shardml.load_hf(directory, mesh=make_mesh(LAYOUT))
    got = shardml.generate(model, params, prompts, mesh=make_mesh(LAYOUT), max_new_tokens=8)
    want = [_greedy_hf(reference, p, 8) for p in prompts]
    assert len(set(want[0])) > 2, f"uninformative reference: {want}"
    assert [g.tolist() for g in got.tokens] == want, f"{family}: shardml greedy vs transformers greedy"


def test_a_sharded_bf16_checkpoint_loads_as_its_weights(tmp_path):
    reference = hf_model("qwen3", seed=1)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # the f32 model of the bf16 weights
    # a copy cast (the reference's rotary frequencies stay f32: .to(bfloat16) rounds buffers too)
    copy.deepcopy(reference).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json") and len(list(tmp_path.glob("*.safetensors"))) > 2
    model, params = shardml.load_hf(str(tmp_path), mesh=make_mesh(LAYOUT))
    assert_close(jax.jit(model.apply)(params, TOKENS), hf_logits(reference, TOKENS), "bf16 sharded qwen3")
    # exported as it came: bf16 weights, the checkpoint's own context length (Qwen3's 32768, not a default)
    shardml.save_hf(model, params, str(tmp_path / "out"))
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    want = reference.config.max_position_embeddings
    assert (hf["dtype"], hf["torch_dtype"], hf["max_position_embeddings"]) == ("bfloat16", "bfloat16", want), hf
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "numpy") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    assert_close(hf_logits(exported.eval(), TOKENS), hf_logits(reference, TOKENS), "bf16 qwen3 exported")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gemma3"])
def test_save_hf_loads_in_transformers_with_the_same_logits(checkpoints, family, tmp_path):
    directory, _ = checkpoints[family]
    model, params = shardml.load_hf(directory, mesh=make_mesh(LAYOUT))
    # new weights (what training would give), so the export is not the files it was read from
    noise = jax.tree.map(lambda p: 0.05 * np.random.default_rng(p.size).normal(size=p.shape).astype(np.float32), params)
    params = jax.tree.map(lambda p, n: p + n, params, noise)
    shardml.save_hf(model, params, str(tmp_path), max_shard_bytes=60_000)  # several files and their index
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert type(exported).__name__ == FAMILIES[family][1]
    assert_close(jax.jit(model.apply)(params, TOKENS), hf_logits(exported, TOKENS), f"{family} exported")
    again, params_again = shardml.load_hf(str(tmp_path), mesh=one_device())
    assert again.config == model.config


def _copy(directory, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(directory, target)
    return target


def _edit_config(target, **changes):
    hf = json.loads((target / "config.json").read_text())
    hf.update(changes)
    (target / "config.json").write_text(json.dumps(hf))


def test_an_unsupported_architecture_names_the_supported_ones(checkpoints, tmp_path):
    target = _copy(checkpoints["llama"][0], tmp_path)
    _edit_config(target, architectures=["GPT2LMHeadModel"])
    with pytest.raises(shardml.ModelError, match=r"GPT2LMHeadModel.*not supported.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        shardml.load_hf(str(target), mesh=one_device())


def test_a_tensor_that_disagrees_with_config_json_is_named(checkpoints, tmp_path):
    target = _copy(checkpoints["llama"][0], tmp_path)
    _edit_config(target, intermediate_size=96)
    with pytest.raises(shardml.ModelError, match=r"gate_proj.weight has shape \(128, 64\) but config.json.*\(96, 64\)"):
        shardml.load_hf(str(target), mesh=one_device())


def test_a_missing_shard_file_is_named(tmp_path):
    hf_model("llama").save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[-1]
    os.remove(tmp_path / missing)
    with pytest.raises(shardml.DataError, match=f"shard {missing} named by .*index.json is missing"):
        shardml.load_hf(str(tmp_path), mesh=one_device())


def test_heads_the_layout_cannot_divide_are_an_error_before_reading(checkpoints):
    with pytest.raises(shardml.LayoutError, match=r"wk.*size 2 along 'kv_heads'.*tensor=4"):
        shardml.load_hf(checkpoints["llama"][0], mesh=make_mesh({"data": 2, "tensor": 4}))


def test_a_missing_directory_and_a_missing_safetensors_package_are_named(checkpoints, tmp_path, monkeypatch):
    with pytest.raises(shardml.DataError, match="not a checkpoint directory"):
        shardml.load_hf(str(tmp_path / "nowhere"), mesh=one_device())
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(shardml.ModelError, match=r"pip install 'shardml\[hf\]'"):
        shardml.load_hf(checkpoints["llama"][0], mesh=one_device())


def _torch_loss_grads(reference, tokens):
    reference.zero_grad()
    logits = reference(torch.tensor(tokens)).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             torch.tensor(tokens[:, 1:]).reshape(-1))
    loss.backward()
    return logits.detach().numpy(), {name: p.grad.numpy() for name, p in reference.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_gradients_equal_transformers_on_one_device(checkpoints, family, tmp_path):
    """The logits and the next-token loss's gradient of every tensor (written back in Hugging
    Face's names by save_hf) equal PyTorch's: the training path honours each family's settings
    (layouts are held equal to one device by the rest of the suite)."""
    directory, reference = checkpoints[family]
    model, params = shardml.load_hf(directory, mesh=one_device())

    def loss(p):
        logits = model.apply(p, TOKENS)
        logp = jax.nn.log_softmax(logits[:, :-1])
        picked = jax.numpy.take_along_axis(logp, TOKENS[:, 1:, None], -1)
        return -picked.sum() / np.float32(TOKENS[:, 1:].size), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    want_logits, want = _torch_loss_grads(reference, TOKENS)
    assert_close(logits, want_logits, f"{family} on one device")
    shardml.save_hf(model, grads, str(tmp_path))
    got = load_file(str(tmp_path / "model.safetensors"))
    assert set(got) == set(want) - ({"lm_head.weight"} if model.config.tie_embed else set())
    for name, g in got.items():
        err = np.abs(g - want[name]).max() / np.abs(want[name]).max()
        assert err < 1e-4, f"{family} {name}: gradient differs from torch's by {err:.2e} of its largest"


def _torch_sgd(reference, batches, lr):
    opt = torch.optim.SGD(reference.parameters(), lr=lr)
    for tokens in batches:
        opt.zero_grad()
        logits = reference(torch.tensor(tokens[:, :-1])).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                          torch.tensor(tokens[:, 1:]).reshape(-1)).backward()
        opt.step()
    return reference


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [LAYOUT, {"pipeline": 2, "data": 2, "fsdp": 2}], ids=["data-fsdp-tensor", "pipeline"])
def test_train_three_steps_export_and_transformers_agrees(checkpoints, sizes, tmp_path):
    """Continued training of a loaded Qwen2 (tied embeddings, biases) on a layout: three SGD steps
    equal three steps of torch.optim.SGD on the same batches, and the export loads in transformers
    with shardml's logits."""
    directory, _ = checkpoints["qwen2"]
    mesh = make_mesh(sizes)
    model, params = shardml.load_hf(directory, mesh=mesh)
    trainer = shardml.build_trainer(model, mesh, optax.sgd(0.5), microbatches=2)
    state = dataclasses.replace(trainer.init(), params=params)
    batches = [np.random.default_rng(10 + i).integers(0, 128, (8, 9)) for i in range(3)]
    for tokens in batches:
        state, _ = trainer.step(state, trainer.put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}))
    trained = trainer.natural(state.params)
    shardml.save_hf(model, trained, str(tmp_path))
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    want = hf_logits(_torch_sgd(copy.deepcopy(checkpoints["qwen2"][1]), batches, 0.5), TOKENS)
    moved = np.abs(hf_logits(checkpoints["qwen2"][1], TOKENS) - want).max() / np.abs(want).max()
    assert moved > 100 * RTOL, f"three steps barely moved the logits ({moved:.1e}): an uninformative check"
    assert_close(hf_logits(exported, TOKENS), want, f"exported after 3 steps on {sizes} vs torch SGD")
    assert_close(jax.jit(model.apply)(jax.device_put(trained, jax.devices()[0]), TOKENS), want, "shardml's own")


@pytest.mark.parametrize("changes, message", [
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}), "rope_type='yarn'"),
    (dict(hidden_act="gelu"), "hidden activation 'gelu'"),
    (dict(mlp_bias=True), "mlp_bias=true"),
], ids=["yarn", "gelu", "mlp-bias"])
def test_an_option_shardml_cannot_express_is_named(checkpoints, tmp_path, changes, message):
    target = _copy(checkpoints["llama"][0], tmp_path)
    _edit_config(target, **changes)
    with pytest.raises(shardml.ModelError, match=f"LlamaForCausalLM with {message}.* not supported"):
        shardml.load_hf(str(target), mesh=one_device())


def test_local_and_global_layers_out_of_pattern_are_named(checkpoints, tmp_path):
    target = _copy(checkpoints["gemma2"][0], tmp_path)
    _edit_config(target, num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "full_attention"])
    with pytest.raises(shardml.ModelError, match="is not every 2-th layer global"):
        shardml.load_hf(str(target), mesh=one_device())


def test_generate_names_a_model_that_is_not_a_transformer():
    model = shardml.mlp_classifier(4, 8, 2)
    with pytest.raises(shardml.ModelError, match="generate decodes transformers"):
        shardml.generate(model, {}, [[1, 2]], mesh=one_device())


def test_loading_onto_fsdp8_stages_at_most_the_largest_tensor_plus_one_share(tmp_path):
    """Host memory: a sharded checkpoint loaded onto fsdp=8 stages (NumPy allocations, traced)
    at most the largest tensor plus one device's share of the model, plus 20 %."""
    cfg = shardml.TransformerConfig(vocab=8192, layers=2, d_model=256, heads=4, kv_heads=2, d_ff=512, dtype="float32")
    model = shardml.transformer(cfg, seq_len=16)
    shardml.save_hf(model, jax.jit(model.init)(jax.random.key(0)), str(tmp_path), max_shard_bytes=4_000_000)
    files = list(tmp_path.glob("*.safetensors"))
    total, largest = sum(f.stat().st_size for f in files), cfg.vocab * cfg.d_model * 4
    assert len(files) > 2 and total > 2 * largest
    tracemalloc.start()
    try:
        _, params = shardml.load_hf(str(tmp_path), mesh={"fsdp": 8})
        jax.block_until_ready(params)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    bound = 1.2 * (largest + total / 8)
    assert peak <= bound, f"loading staged {peak / 2**20:.1f} MiB on the host, over {bound / 2**20:.1f} MiB"


@pytest.mark.parametrize("family, schedule", [("gemma2", None), pytest.param("gemma3", None, marks=pytest.mark.slow),
                                              pytest.param("gemma3-4", "circular", marks=pytest.mark.slow)])
def test_local_and_global_layers_train_on_a_pipeline_as_torch(checkpoints, family, schedule, tmp_path):
    """Gemma's alternating local (windowed) and global layers cut into pipeline stages: stage 1
    holds the global layer and must know it (circular: 4 layers dealt round-robin, 2 chunks per
    stage, the last layer global: chunk 1 of stage 1). One SGD step on pipeline=2 x data=4 equals torch.optim.SGD's step (its loss, and the
    logits of the updated weights)."""
    if family == "gemma3-4":  # four layers, every fourth global
        reference = hf_model("gemma3", num_hidden_layers=4, layer_types=["sliding_attention"] * 3 + ["full_attention"])
        reference.save_pretrained(tmp_path)
        directory = str(tmp_path)
    else:
        directory, reference = checkpoints[family]
    mesh = make_mesh({"pipeline": 2, "data": 4})
    model, params = shardml.load_hf(directory, mesh=mesh)
    pipe = schedule and shardml.Schedule(schedule, stages=2, microbatches=2, repeats=2)
    trainer = shardml.build_trainer(model, mesh, optax.sgd(0.5), schedule=pipe)
    # a circular pipeline stores the layers regrouped [repeats, layers / repeats, ...]
    params = jax.device_put(trainer.strategy.layout(params), trainer.state_shardings.params)
    state = dataclasses.replace(trainer.init(), params=params)
    # no token 0: Gemma's pad_token_id, whose embedding row torch's padding_idx leaves untrained
    tokens = np.random.default_rng(7).integers(1, 128, (8, 9))
    state, metrics = trainer.step(state, trainer.put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}))
    logits = hf_logits(reference, tokens[:, :-1])
    want = torch.nn.functional.cross_entropy(torch.tensor(logits).reshape(-1, 128),
                                             torch.tensor(tokens[:, 1:]).reshape(-1)).item()
    assert abs(float(metrics["loss"]) - want) < 1e-4 * want, f"{family} pipelined loss {metrics['loss']} vs {want}"
    moved = _torch_sgd(copy.deepcopy(reference), [tokens], 0.5)
    trained = jax.device_put(trainer.natural(state.params), jax.devices()[0])
    assert_close(jax.jit(model.apply)(trained, TOKENS), hf_logits(moved, TOKENS), f"{family} after a pipelined step")
