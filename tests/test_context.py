"""Context parallelism: the ``context`` mesh axis splits the sequence. Ring attention against plain
masked attention over the whole sequence written here (values and gradients), the training step on
context layouts (all-gathered keys/values and ring) against plain ``jax.grad`` on one device, and
bad input refused before compiling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from shardml.analysis.audit import memory
from shardml.analysis.plan import compiled_step
from shardml.core.losses import token_cross_entropy
from shardml.core.mesh import make_mesh
from shardml.core.step import build_trainer
from shardml.models.ring_attention import balanced_order, ring_attention
from shardml.models.transformer import TransformerConfig, transformer
from shardml.models.transformer_layers import transformer_apply

CFG = TransformerConfig(vocab=32, layers=2, d_model=32, heads=4, kv_heads=2, d_ff=64, dtype="float32",
                        remat="none", layer_loop="scan")
S = 16


def plain_attention(q_BSHE, k_BSKE, v_BSKE, segments_BS=None, window=0):
    """Softmax over every earlier key (of the same segment, within ``window``), the whole sequence at once."""
    B, S_, H, E = q_BSHE.shape
    G = H // k_BSKE.shape[2]
    k, v = jnp.repeat(k_BSKE, G, axis=2), jnp.repeat(v_BSKE, G, axis=2)
    scores = jnp.einsum("bshe,bthe->bhst", q_BSHE, k) / np.sqrt(E)
    i, j = np.arange(S_)[:, None], np.arange(S_)[None, :]
    mask = jnp.asarray((j <= i) & ((i - j < window) if window else True))[None, None]
    if segments_BS is not None:
        mask = mask & (segments_BS[:, None, :, None] == segments_BS[:, None, None, :])
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bhst,bthe->bshe", probs, v)


def _qkv(B=2, H=4, K=2, E=8):
    r = np.random.default_rng(0)
    return tuple(jnp.asarray(r.normal(size=s), jnp.float32) for s in ((B, S, H, E), (B, S, K, E), (B, S, K, E)))


def _ring_in_natural_order(sizes, segments=None, window=0):
    """Ring attention on ``sizes``, fed the balanced layout and its output put back in order."""
    order = balanced_order(S, sizes["context"])
    undo = np.argsort(order)

    def f(q, k, v):
        seg = None if segments is None else segments[:, order]
        return ring_attention(q[:, order], k[:, order], v[:, order], order, seg, window=window)[:, undo]

    return f


@pytest.mark.parametrize("sizes,segmented,window", [
    ({"context": 4, "tensor": 2}, True, 6),
    pytest.param({"context": 2, "data": 4}, False, 0, marks=pytest.mark.slow),
])
def test_ring_attention_equals_plain_masked_attention_values_and_gradients(sizes, segmented, window):
    q, k, v = _qkv()
    segments = jnp.asarray(np.repeat([[0] * 5 + [1] * 7 + [2] * 4], 2, axis=0)) if segmented else None
    ring = _ring_in_natural_order(sizes, segments, window)
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent)

    with jax.set_mesh(make_mesh(sizes)):
        got = jax.jit(ring)(q, k, v)
        got_grads = jax.jit(jax.grad(loss(ring), argnums=(0, 1, 2)))(q, k, v)
    want = plain_attention(q, k, v, segments, window)
    want_grads = jax.grad(loss(lambda q, k, v: plain_attention(q, k, v, segments, window)), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"values on {sizes}")
    for name, g, w in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"d{name} on {sizes}")


def test_balanced_order_gives_each_shard_an_early_and_a_late_chunk():
    assert balanced_order(16, 2).tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]
    order = balanced_order(32, 4).reshape(4, 2, 4)  # shard, its two chunks, chunk length
    assert [row[:, 0].tolist() for row in order] == [[0, 28], [4, 24], [8, 20], [12, 16]]


# ----------------------------------------------------------------------------- the training step


@pytest.fixture(scope="module")
def reference():
    """One SGD(1) step by plain ``jax.grad`` of the mean next-token loss, one device, no mesh."""
    tokens = np.random.default_rng(0).integers(0, CFG.vocab, (8, S + 1))
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
    # The parameters a trainer's init(0) draws (its seed's key folded with 0); the step below is plain JAX.
    params = jax.jit(transformer(CFG, S).init)(jax.random.fold_in(jax.random.key(0), 0))
    return batch, params, *_reference_step(batch, params)


def _context_step(sizes, batch, attention, microbatches=1):
    cfg = dataclasses.replace(CFG, context_attention=attention)
    devices = jax.devices()[:int(np.prod(list(sizes.values())))]
    trainer = build_trainer(transformer(cfg, S), make_mesh(sizes, devices), optax.sgd(1.0),
                            loss=token_cross_entropy, microbatches=microbatches)
    state, metrics = trainer.step(trainer.init(0), trainer.put(batch))
    return jax.device_get(state.params), float(metrics["loss"])


def _reference_step(batch, params):
    """Loss and one SGD(1) step of plain ``jax.grad`` (mean over the mask's tokens), one device."""
    def loss(p):
        logits = transformer_apply(p, batch["inputs"], CFG)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), batch["targets"][..., None], axis=-1)[..., 0]
        mask = batch.get("mask", jnp.ones_like(nll))
        return jnp.sum(nll * mask) / jnp.sum(mask)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)  # jitted: one compile beats eager op by op
    return float(value), jax.tree.map(lambda p, g: p - g, params, grads)


def _assert_equal_step(reference, sizes, attention, microbatches=1):
    batch, _, want_loss, want_params = reference
    params, loss = _context_step(sizes, batch, attention, microbatches)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, err_msg=f"loss on {sizes}, {attention}")
    for path, g in jax.tree_util.tree_leaves_with_path(params):  # sgd(1): params - gradients
        w = want_params
        for key in path:
            w = w[key.key]
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5,
                                   err_msg=f"{jax.tree_util.keystr(path)} on {sizes}, {attention}")


@pytest.mark.parametrize("sizes,attention,microbatches", [
    ({"context": 2, "data": 2, "tensor": 2}, "allgather", 2),
    ({"context": 2}, "ring", 1),
])
def test_context_step_equals_one_device_jax_grad(reference, sizes, attention, microbatches):
    _assert_equal_step(reference, sizes, attention, microbatches)


@pytest.mark.slow
@pytest.mark.parametrize("sizes,attention,microbatches", [
    ({"context": 4, "data": 2}, "ring", 2),
    ({"context": 4, "fsdp": 2}, "allgather", 1),
    ({"context": 8}, "ring", 1),
])  # ring on context=2 x data=2 x tensor=2: the packed rows' test below
def test_more_context_layouts_equal_one_device_jax_grad(reference, sizes, attention, microbatches):
    _assert_equal_step(reference, sizes, attention, microbatches)


@pytest.mark.parametrize("args,message", [
    (["mesh.context=4", "data.seq_len=30"], "data.seq_len=30 is not divisible by mesh.context=4"),
    (["mesh.context=2", "model.context_attention=ring", "data.seq_len=30"],
     "data.seq_len=30 is not divisible by model.context_attention=ring gives each of the 2 context shards one early"),
    (["mesh.context=2", "mesh.pipeline=2", "model.context_attention=ring"],
     "mesh.context=2 with mesh.pipeline=2 and model.context_attention=ring: the pipeline's stages run the sequence in"),
    (["mesh.context=2", "mesh.pipeline=2", "mesh.expert=2", "model.experts=4"],
     "model.experts=4 with pipeline.schedule=1f1b on mesh.expert=2: "),
])
def test_bad_context_input_exits_2_before_compiling(capsys, no_compile, args, message):
    from shardml.run.cli import main

    code = main(["train", "tiny", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err, err


def test_the_kv_cache_is_split_over_context():
    """Generation's cache [L, B, T, K, E] has its slots T over ``context`` (decoding equals the plain
    decode on a context layout: tests/test_inference.py's LAYOUTS)."""
    from shardml.core.sharding import Rules
    from shardml.parallel.inference import decoder

    mesh = make_mesh({"context": 2, "data": 2, "tensor": 2})
    spec = decoder(CFG, mesh, Rules.default()).cache_sharding().spec
    assert tuple(spec)[2] == "context" and "data" in tuple(spec)[1], spec


@pytest.mark.slow
def test_packed_rows_on_ring_attention_equal_one_device_jax_grad(reference):
    """Packed SFT rows (segments, positions restarting per example, a loss mask) through ring attention."""
    _, params, _, _ = reference
    rng = np.random.default_rng(3)
    segments = np.repeat([[1] * 5 + [2] * 8 + [3] * 3, [1] * 11 + [2] * 5], 4, axis=0)
    positions = np.concatenate([np.arange(n) for n in (5, 8, 3)] * 4 + [np.arange(n) for n in (11, 5)] * 4)
    inputs = {"tokens": jnp.asarray(rng.integers(0, CFG.vocab, (8, S))), "segments": jnp.asarray(segments),
              "positions": jnp.asarray(positions.reshape(8, S))}
    batch = {"inputs": inputs, "targets": jnp.asarray(rng.integers(0, CFG.vocab, (8, S))),
             "mask": jnp.asarray(rng.random((8, S)) < 0.7, jnp.float32)}
    want_loss, want_params = _reference_step(batch, params)
    _assert_equal_step((batch, params, want_loss, want_params), {"context": 2, "data": 2, "tensor": 2}, "ring")


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["allgather", "ring"])
def test_activation_memory_per_device_falls_with_context(attention):
    """XLA's compiled temporaries per device (activations, their gradients) at context=4 are well under
    half of one device's, at a sequence long enough for activations to dominate."""
    cfg = dataclasses.replace(CFG, context_attention=attention)
    seq = 256
    tokens = jnp.zeros((2, seq), jnp.int32)
    batch = {"inputs": tokens, "targets": tokens}

    def temporaries(context):
        mesh = make_mesh({"context": context, "data": 1}, jax.devices()[:context])
        trainer = build_trainer(transformer(cfg, seq), mesh, optax.sgd(1.0), loss=token_cross_entropy)
        return memory(compiled_step(trainer, batch).compiled).temporaries

    one, four = temporaries(1), temporaries(4)
    assert four < one / 2.5, f"{attention}: temporaries per device {four} at context=4 vs {one} on one device"
