"""LoRA against Hugging Face ``peft`` + PyTorch autograd (an implementation nobody here wrote), its
exports (merged weights in ``transformers``, the adapter in ``peft``) and populations of adapters
over one base against each adapter trained alone in a plain loop.

One tiny random Llama (hidden 32, 2 layers) built by ``transformers`` once per session; the adapters
are set to random values (B too, so A's gradient is not zero) before they are compared.
"""

import copy
import dataclasses

import jax
import numpy as np
import optax
import peft
import pytest
import torch
import transformers

import shardml
from shardml.core.mesh import make_mesh
from shardml.models.lora import lora, lora_optimizer, merge_lora, save_peft

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
RANK, ALPHA = 4, 8.0
TOKENS = np.random.default_rng(1).integers(0, 64, (8, 9))
MASK = (np.random.default_rng(2).random((8, 8)) > 0.2).astype(np.float32)
BATCH = {"inputs": TOKENS[:, :-1], "targets": TOKENS[:, 1:], "mask": MASK}
LAYOUT = {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """(checkpoint directory, the transformers model it holds)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                                      attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("llama")
    model.save_pretrained(directory)
    return str(directory), model


def random_adapters(model):
    """The adapters of ``model`` set to random f32 values (numpy), a and b alike."""
    rng = np.random.default_rng(3)
    shapes = jax.eval_shape(model.init, jax.random.key(0))["adapters"]
    return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


@pytest.fixture(scope="session")
def stepped(llama):
    """One SGD(1) step of a LoRA model on data x fsdp x tensor from random adapters: the model, the
    parameters before, after, and the step's metrics."""
    directory, _ = llama
    mesh = make_mesh(LAYOUT)
    base_model, base = shardml.load_hf(directory, mesh=mesh)
    model = lora(base_model, base, rank=RANK, alpha=ALPHA, targets=ROLES)
    trainer = shardml.build_trainer(model, mesh, lora_optimizer(optax.sgd(1.0)))
    state = trainer.init(0)
    adapters = jax.tree.map(lambda v, old: jax.device_put(v, old.sharding), random_adapters(model),
                            state.params["adapters"])
    state = dataclasses.replace(state, params={**state.params, "adapters": adapters})
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = trainer.step(state, trainer.put(BATCH))
    return model, before, jax.tree.map(np.asarray, state.params), jax.device_get(metrics)


def peft_model(reference, adapters):
    """peft's LoRA on a copy of ``reference`` with the same adapter values (lora_A [r, in], lora_B [out, r])."""
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                             target_modules=[f"{r}_proj" for r in ROLES])
    model = peft.get_peft_model(copy.deepcopy(reference), config)
    names = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
             "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, module in names.items():
            a, b = adapters["layers"][key]["a"], adapters["layers"][key]["b"]
            for layer in range(a.shape[0]):
                lin = modules[f"base_model.model.model.layers.{layer}.{module}"]
                lin.lora_A["default"].weight.copy_(torch.tensor(a[layer].reshape(-1, RANK).T))
                lin.lora_B["default"].weight.copy_(torch.tensor(b[layer].reshape(RANK, -1).T))
    return model, names, modules


def test_one_step_adapter_gradients_equal_peft_autograd_on_data_fsdp_tensor(llama, stepped):
    model, before, after, metrics = stepped
    reference, names, modules = peft_model(llama[1], before["adapters"])
    logits = reference(torch.tensor(BATCH["inputs"])).logits
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), torch.tensor(BATCH["targets"]).reshape(-1),
                                            reduction="none")
    mask = torch.tensor(MASK).reshape(-1)
    ((nll * mask).sum() / mask.sum()).backward()
    squares = 0.0
    for key, module in names.items():
        for which, part in (("a", "lora_A"), ("b", "lora_B")):
            got = before["adapters"]["layers"][key][which] - after["adapters"]["layers"][key][which]  # SGD(1)
            for layer in range(got.shape[0]):
                grad = getattr(modules[f"base_model.model.model.layers.{layer}.{module}"], part)["default"]
                grad = grad.weight.grad.numpy().T
                squares += float((grad ** 2).sum())
                np.testing.assert_allclose(got[layer].reshape(grad.shape), grad, atol=1e-4, rtol=1e-4,
                                           err_msg=f"{key}.{which} layer {layer}")
    for (path, b), a in zip(jax.tree_util.tree_flatten_with_path(before["base"])[0], jax.tree.leaves(after["base"])):
        np.testing.assert_array_equal(a, b, err_msg=f"the base changed at {jax.tree_util.keystr(path)}")
    # the gradient norm is the adapters' alone: the base gets no gradient at all
    np.testing.assert_allclose(metrics["grad_norm"], np.sqrt(squares), rtol=1e-4)


def _logits(model, params):
    return np.asarray(jax.jit(model.apply)(jax.device_put(params, jax.devices()[0]), TOKENS))


def test_merged_and_peft_exports_give_the_lora_model_s_logits(llama, stepped, tmp_path):
    directory, reference = llama
    model, _, params, _ = stepped
    want = _logits(model, params)
    assert np.abs(want - _logits(*shardml.load_hf(directory))).max() > 1e-2  # the adapters change the logits
    shardml.save_hf(*merge_lora(model, params), str(tmp_path / "merged"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    save_peft(model, params, str(tmp_path / "adapter"))
    adapter = peft.PeftModel.from_pretrained(copy.deepcopy(reference), str(tmp_path / "adapter")).eval()
    for name, hf in (("merged", merged), ("peft", adapter)):
        with torch.no_grad():
            got = hf(torch.tensor(TOKENS)).logits.numpy()
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 1e-4, f"{name} export: logits differ from shardml's LoRA model by {err:.2e}"


@pytest.mark.parametrize("setting, message", [
    (dict(targets=("q", "qkv")), "roles are q, k, v, o, gate, up, down"),
    (dict(targets=()), "none given"),
    (dict(rank=0), "rank=0 must be in 1..16"),
    (dict(rank=17), "rank=17 must be in 1..16"),
    (dict(dropout=1.0), "dropout=1.0"),
])
def test_bad_lora_settings_are_refused_before_anything_is_traced(setting, message):
    model = shardml.transformer(shardml.TransformerConfig(vocab=64, d_model=32, heads=4, kv_heads=2, d_ff=16), 8)
    with pytest.raises(shardml.ModelError, match=message):
        lora(model, **{"rank": 4, **setting})


TINY = shardml.TransformerConfig(vocab=64, layers=2, d_model=32, heads=4, kv_heads=2, d_ff=64, dtype="float32")


def adapter_population(members: int, mesh_sizes: dict):
    base = shardml.transformer(TINY, 8)
    model = lora(base, jax.device_get(base.init(jax.random.key(9))), rank=RANK, alpha=ALPHA, targets=("q", "v", "down"))
    optimizer = optax.inject_hyperparams(lambda learning_rate: lora_optimizer(optax.adam(learning_rate)))(
        learning_rate=1e-2)
    rates = [1e-2, 3e-2, 1e-3, 5e-2, 2e-2, 4e-3, 7e-3, 9e-2][:members]
    mesh = make_mesh(mesh_sizes)
    return model, mesh, optimizer, rates, shardml.build_population(model, mesh, optimizer, members,
                                                                   hyperparams={"learning_rate": rates})


def test_a_population_of_adapters_stores_the_base_once_and_stacks_the_adapters():
    """Traced only: the base has no members axis and is laid out by the model's rules, not over members."""
    model, _, _, _, pop = adapter_population(8, {"members": 4, "fsdp": 2})
    state = pop.abstract_state()
    assert all(leaf.shape[0] == 8 and leaf.sharding.spec[0] == "members"
               for leaf in jax.tree.leaves(state.params["adapters"]))
    for got, want in zip(jax.tree.leaves(state.params["base"]), jax.tree.leaves(model.abstract_params["base"])):
        assert got.shape == want.shape and "members" not in got.sharding.spec, "the base is stored once"
    single = shardml.build_trainer(model, make_mesh({"members": 4, "fsdp": 2}), lora_optimizer(optax.sgd(1.0)))
    assert jax.tree.map(lambda x: x.sharding.spec, state.params["base"]) == \
        jax.tree.map(lambda x: x.spec, single.state_shardings.params["base"]), "laid out as one model's base"


@pytest.mark.slow
def test_population_of_adapters_keeps_one_base_and_each_member_trains_as_alone():
    """4 adapters (own seed and learning rate) over one base equal each adapter trained alone."""
    model, mesh, optimizer, rates, pop = adapter_population(4, {"data": 8})
    state = pop.init(seed=5)
    batch = pop.put(BATCH)
    for _ in range(3):
        state, _ = pop.step(state, batch)
    alone = shardml.build_trainer(model, mesh, optimizer)
    for i, rate in enumerate(rates):
        one = shardml.with_hyperparams(alone.init(seed=5 + i), {"learning_rate": rate})
        for _ in range(3):
            one, _ = alone.step(one, alone.put(BATCH))
        for got, want in zip(jax.tree.leaves(state.params["adapters"]), jax.tree.leaves(one.params["adapters"])):
            np.testing.assert_allclose(np.asarray(got)[i], np.asarray(want), atol=1e-5, err_msg=f"member {i}")


@pytest.mark.slow
def test_eight_adapters_take_at_most_one_and_a_half_times_one_lora_run_s_memory_per_device():
    """Compiled per-device memory of one step: 8 adapters (one per device group) over a base stored
    once against one LoRA run on the same 8 devices, on a model whose base dominates (as an LLM's)."""
    cfg = shardml.TransformerConfig(vocab=64, layers=2, d_model=256, heads=4, d_ff=512, dtype="float32", remat="full")
    model = lora(shardml.transformer(cfg, 8), rank=RANK, alpha=ALPHA, targets=ROLES)
    optimizer = lora_optimizer(optax.adam(1e-3))
    batch = {"inputs": TOKENS[:, :-1], "targets": TOKENS[:, 1:]}

    def per_device(trainer):
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=trainer.batch_sharding),
                                batch)
        return shardml.memory(trainer.lower_step(trainer.abstract_state(), abstract).compile()).peak_estimate

    one = per_device(shardml.build_trainer(model, make_mesh({"data": 8}), optimizer))
    eight = per_device(shardml.build_population(model, make_mesh({"members": 8}), optimizer, 8))
    print(f"per device: 8 adapters {eight} B, one LoRA run {one} B, ratio {eight / one:.2f}")
    assert eight <= 1.5 * one, f"8 adapters: {eight} bytes per device against one LoRA run's {one}"
