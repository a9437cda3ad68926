"""Reference models: causality, remat and GQA equivalence, weight-gradient products, the MLP classifier."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import lm_batch, max_rel_diff, tiny_transformer, trainer_for
from shardml.core.errors import ModelError, SettingError, ShardmlError
from shardml.core.losses import token_cross_entropy
from shardml.run.config import load_config


def test_transformer_is_causal(tiny_model):
    params = tiny_model.init(jax.random.key(0))
    tokens = jnp.asarray(lm_batch(2)["inputs"])
    changed = tokens.at[:, 10:].set((tokens[:, 10:] + 1) % 256)
    a, b = tiny_model(params, tokens), tiny_model(params, changed)
    np.testing.assert_allclose(a[:, :10], b[:, :10], rtol=1e-6, err_msg="future tokens changed past logits")
    assert not np.allclose(a[:, 10:], b[:, 10:]), "changed tokens did not change their own logits"


@pytest.mark.slow
def test_remat_policies_and_unrolled_layers_give_same_loss_and_grads():
    batch = jax.tree.map(jnp.asarray, lm_batch(4))
    variants = [("none", "scan"), ("full", "scan"), ("dots", "scan"), ("none", "unroll"), ("dots", "unroll"),
                ("auto", "auto")]
    results = []
    for remat, loop in variants:
        model = tiny_transformer(remat=remat, layer_loop=loop)
        params = model.init(jax.random.key(0))
        results.append(jax.value_and_grad(lambda p: token_cross_entropy(model(p, batch["inputs"]), batch)["loss"])(params))
    for (remat, loop), (loss, grads) in zip(variants[1:], results[1:]):
        np.testing.assert_allclose(loss, results[0][0], rtol=1e-6, err_msg=f"remat={remat} {loop}: loss differs")
        assert max_rel_diff(grads, results[0][1]) < 1e-5, f"remat={remat} {loop}: grads differ"


def test_weight_gradient_products_in_f32_or_in_the_compute_dtype():
    """`project`'s weight gradient: grad_dtype=compute (the default) equals autodiff of a plain cast
    (the bf16 product, widened); grad_dtype=float32 is the f32-accumulated product of the bf16
    operands."""
    from shardml.models.transformer import project

    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (64, 32), jnp.bfloat16)
    w = jax.random.normal(kw, (32, 16), jnp.float32)
    g = jax.random.normal(kg, (64, 16), jnp.float32)

    def grads(f):
        return jax.grad(lambda w: jnp.sum(f(w).astype(jnp.float32) * g))(w)

    f32 = grads(lambda w: project("bd,df->bf", x, w, grad_dtype="float32"))
    compute = grads(lambda w: project("bd,df->bf", x, w))  # the default
    plain = grads(lambda w: jnp.einsum("bd,df->bf", x, w.astype(jnp.bfloat16)))
    exact = jnp.einsum("bd,bf->df", x.astype(jnp.float32), g.astype(jnp.bfloat16).astype(jnp.float32))
    assert f32.dtype == compute.dtype == jnp.float32
    np.testing.assert_array_equal(compute, plain, err_msg="grad_dtype=compute differs from a plain cast's gradient")
    assert jnp.max(jnp.abs(f32 - exact)) < 1e-4 * jnp.max(jnp.abs(exact)), "f32 product is not the f32 sum"
    assert jnp.max(jnp.abs(compute - exact)) > jnp.max(jnp.abs(f32 - exact)), "compute product was not rounded"


def test_grouped_query_attention_trains_the_same_under_tensor_parallelism():
    model = tiny_transformer(kv_heads=2)
    assert model.abstract_params["layers"]["wk"].shape == (2, 32, 2, 8)
    runs = []
    for sizes in ({"data": 1}, {"data": 4, "tensor": 2}):
        trainer = trainer_for(model, sizes)
        state, metrics_per_step = trainer.init(0), []
        for step in range(3):  # after updates too: a wrong gradient shows from the second step on
            state, metrics = trainer.step(state, trainer.put(lm_batch(16, seed=step)))
            metrics_per_step.append((float(metrics["loss"]), float(metrics["grad_norm"])))
        runs.append(np.asarray(metrics_per_step))
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-5, err_msg="GQA under tensor=2 differs (loss, grad_norm)")


def test_mlp_classifier_learns_and_matches_one_device():
    from shardml.core.losses import classification
    from shardml.models import mlp_classifier

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 16)).astype(np.float32) * 3
    labels = rng.integers(0, 10, 64)
    batch = {"inputs": centers[labels] + rng.normal(size=(64, 16)).astype(np.float32),
             "targets": labels.astype(np.int32)}
    model = mlp_classifier(features=16, hidden=32, classes=10)
    runs = []
    for sizes, k in (({"data": 1}, 1), ({"data": 2, "fsdp": 2, "tensor": 2}, 2)):
        trainer = trainer_for(model, sizes, k, steps=20, loss=classification)
        state, losses = trainer.init(0), []
        for _ in range(15):
            state, metrics = trainer.step(state, trainer.put(batch))
            losses.append(float(metrics["loss"]))
        runs.append(losses)
    assert runs[0][-1] < 0.5 * runs[0][0], f"MLP did not learn: {runs[0][0]:.3f} -> {runs[0][-1]:.3f}"
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-5, err_msg="MLP on data x fsdp x tensor differs")


def test_parameters_drawn_in_fewer_dimensions_keep_their_numbers_and_their_sharded_dimensions():
    from shardml import make_mesh
    from shardml.core.sharding import Rules, use_rules
    from shardml.core.model import draw_shape

    key = jax.random.key(3)
    for shape, flat in (((2, 32, 4, 8), (2, 32, 32)), ((2, 4, 8, 32), (2048,))):
        np.testing.assert_array_equal(jax.random.truncated_normal(key, -2.0, 2.0, flat).reshape(shape),
                                      jax.random.truncated_normal(key, -2.0, 2.0, shape))
    wq, wo = ((2, 32, 4, 8), ("layers", "embed", "heads", "head_dim")), ((2, 4, 8, 32), ("layers", "heads", "head_dim",
                                                                                        "embed"))
    assert draw_shape(*wq) == draw_shape(*wo) == (2048,), "outside rules and a mesh a draw is flat"
    with jax.set_mesh(make_mesh({"data": 2, "fsdp": 2, "tensor": 2})), use_rules(Rules.default()):
        # head_dim is whole and merges into heads; embed (fsdp) and heads (tensor) are split and stay apart
        assert draw_shape(*wq) == (2, 32, 32) and draw_shape(*wo) == (2, 32, 32)
    with jax.set_mesh(make_mesh({"data": 8})), use_rules(Rules.default()):
        assert draw_shape(*wq) == (2048,)


def test_auto_execution_unrolls_without_remat_only_where_it_fits():
    from shardml.models.transformer import no_remat_bytes, resolve_execution, unrolled_fits
    from shardml.run.recipe import build

    parts = build(load_config("tiny"))  # a few MB on a host of GBs
    assert (parts.cfg.model.remat, parts.cfg.model.layer_loop) == ("none", "unroll"), parts.cfg.model
    m, sizes = parts.cfg.model, parts.sizes
    need = no_remat_bytes(m, 32, rows=2, tensor=1)
    assert need > 4 * m.layers * 32 * 2 * m.d_model, need  # at least the block inputs and norms
    assert unrolled_fits(m, 32, 2, sizes, device_bytes=10 * need)
    assert not unrolled_fits(m, 32, 2, sizes, device_bytes=need)  # over half of the device
    assert not unrolled_fits(m, 32, 2, {**sizes, "pipeline": 2}, device_bytes=10 * need)
    assert not unrolled_fits(dataclasses.replace(m, layers=17), 32, 2, sizes, device_bytes=10 ** 12)
    auto = load_config("tiny").model
    small = resolve_execution(auto, fits=False)
    assert (small.remat, small.layer_loop) == ("dots", "scan"), "a model that does not fit keeps FSDP's memory"
    full = resolve_execution(dataclasses.replace(auto, remat="full"), fits=True)
    assert (full.remat, full.layer_loop) == ("full", "scan"), "an explicit remat keeps the layers scanned"
    pinned = build(load_config("tiny", ["model.remat=dots", "model.layer_loop=unroll"])).cfg.model
    assert (pinned.remat, pinned.layer_loop) == ("dots", "unroll"), "explicit choices are kept"


@pytest.mark.parametrize("settings,error,subject,message", [
    ({"d_model": 66}, ModelError, "d_model", "d_model=66 is not divisible by heads=4"),
    ({"kv_heads": 3}, ModelError, "kv_heads", "heads=4 is not divisible by kv_heads=3"),
    ({"d_model": 20}, ModelError, "d_model", "d_model / heads = 20 / 4 = 5 is odd"),
    ({"d_ff": 0}, ShardmlError, None, "d_ff=0 must be >= 1"),
    ({"dtype": "int8"}, ShardmlError, None, "dtype='int8' is not one of"),
])
def test_the_transformer_names_its_own_arguments_in_errors(settings, error, subject, message):
    """Below the run layer an error names the argument (``d_ff=0``), never a config key
    (``model.d_ff``), and carries it as ``subject`` / ``value`` for the run layer to reword."""
    from shardml.models import TransformerConfig, transformer

    with pytest.raises(error, match=message.replace("(", r"\(")) as caught:
        transformer(TransformerConfig(**settings), seq_len=16)
    assert "model." not in str(caught.value), caught.value
    if subject is not None:
        assert (caught.value.subject, caught.value.value) == (subject, settings[subject]), caught.value
    with pytest.raises(SettingError, match="seq_len=0 must be >= 1"):
        transformer(TransformerConfig(), seq_len=0)


def test_the_mlp_and_the_parameter_specs_name_their_arguments_in_errors():
    from shardml.core.model import ParamSpec
    from shardml.models import mlp_classifier

    with pytest.raises(SettingError, match="classes=0 must be >= 1") as caught:
        mlp_classifier(features=4, hidden=8, classes=0)
    assert (caught.value.subject, caught.value.value) == ("classes", 0)
    with pytest.raises(ModelError, match=r"shape=\(4, 2\) and logical=\('embed',\) differ in rank") as caught:
        ParamSpec((4, 2), ("embed",))
    assert caught.value.subject == "logical"


def test_every_name_of_the_transformer_module_before_the_split_is_still_importable_there():
    import importlib

    module = importlib.import_module("shardml.models.transformer")
    before = ("REMAT_POLICIES LAYER_LOOPS AUTO AUTO_UNROLL_MAX_LAYERS AUTO_MEMORY_SHARE GRAD_DTYPES COMPUTE_DTYPES "
              "TransformerConfig check_transformer transformer_specs project rms_norm rotary attention mlp _ACT "
              "embed_tokens run_layers output_logits transformer_apply transformer_flops_per_token no_remat_bytes "
              "unrolled_fits resolve_execution transformer KV_CACHE_LOGICAL rotary_at _qkv_at _masked_attention "
              "_last_logits prefill decode_step").split()
    assert [name for name in before if not hasattr(module, name)] == []
