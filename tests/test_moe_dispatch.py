"""The all-to-all expert dispatch (shardml.models.transformer_moe.all_to_all_moe): the layer on an
expert x fsdp x tensor mesh against the dense loop and the NumPy capacity loop of tests/test_moe.py,
training steps on expert layouts against one device (slow), and the compiled step's all-to-alls
against the closed-form theory (count and bytes) written out again here."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_moe import CFG, _step, capacity_reference, dense_reference
from test_plan import compiled_layout

from shardml.analysis.audit import collectives
from shardml.analysis.plan import plan_of
from shardml.core.mesh import make_mesh
from shardml.core.model import init_params
from shardml.core.sharding import Rules, use_rules
from shardml.models.transformer import TransformerConfig
from shardml.models.transformer_layers import feed_forward, transformer_specs
from shardml.models.transformer_moe import dispatch_axes
from shardml.run.planning import config_theory

# Two experts per shard on expert=2, so a shard's local expert index matters; 1 row per device.
MESH = {"expert": 2, "fsdp": 2, "tensor": 2}


def _on_mesh(cfg, fn, mesh=None, path=("expert", ("fsdp", "expert"), ())):
    """``fn`` jitted and run under ``mesh`` (MESH) and the default rules, asserting the dispatch path."""

    def run(*args):
        with jax.set_mesh(make_mesh(mesh or MESH)), use_rules(Rules.default()):
            assert dispatch_axes(cfg, 4) == path, "not the hand-written dispatch"
            assert dispatch_axes(cfg, 2) is None, "2 rows do not split over 4 shards"
            return jax.jit(fn)(*args)

    return run


@pytest.fixture(scope="module")
def layer_and_h():
    params = jax.jit(lambda key: init_params(transformer_specs(CFG), key))(jax.random.key(0))
    layer = jax.tree.map(lambda w: w[0], params["layers"])
    h = jax.random.normal(jax.random.key(1), (4, 6, CFG.d_model))
    return layer, h


@pytest.mark.parametrize("mesh,path", [(MESH, ("expert", ("fsdp", "expert"), ())),
                                       ({"fsdp": 4, "tensor": 2}, (None, ("fsdp",), ()))],
                         ids=["expert=2xfsdp=2xtensor=2", "fsdp=4xtensor=2-experts-not-split"])
def test_all_to_all_layer_equals_dense_loop_values_and_gradients(layer_and_h, mesh, path):
    """Over an expert axis, the pairs travel by all-to-all; with the experts not split, each device
    sends its own tokens through every expert (no exchange, nothing sorted across devices)."""
    layer, h = layer_and_h
    cotangent = jax.random.normal(jax.random.key(2), h.shape)

    def loss(fn):
        return lambda layer, h: jnp.sum(fn(layer, h) * cotangent)

    ours = lambda layer, h: feed_forward(h, layer, CFG)[0]  # noqa: E731
    got, grads = _on_mesh(CFG, lambda *a: (ours(*a), jax.grad(loss(ours), argnums=(0, 1))(*a)), mesh, path)(layer, h)
    np.testing.assert_allclose(got, jax.jit(dense_reference, static_argnums=2)(h, layer, CFG), atol=1e-5, rtol=1e-5)
    want = jax.jit(jax.grad(loss(lambda layer, h: dense_reference(h, layer, CFG)), argnums=(0, 1)))(layer, h)
    for path, g, w in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads),
                          jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=str(path[0]))
    assert (np.abs(np.asarray(grads[0]["we_down"])).sum(axis=(1, 2)) > 0).all(), "an expert got no rows"


def test_all_to_all_layer_with_capacity_equals_the_loop_in_order(layer_and_h):
    """capacity_factor=0.5: C = ceil(0.5 x 6 x 2 / 4) = 2 pairs per expert and sequence, so each
    shard's send block holds 1 row x 2 experts x 2 = 4 of its 12 pairs: the bounded buffer."""
    layer, h = layer_and_h
    cfg = TransformerConfig(**{**CFG.__dict__, "capacity_factor": 0.5})
    got = _on_mesh(cfg, lambda layer, h: feed_forward(h, layer, cfg)[0])(layer, h)
    want = capacity_reference(h, layer, cfg)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    dropless = jax.jit(dense_reference, static_argnums=2)(h, layer, CFG)
    assert np.abs(np.asarray(dropless) - want).max() > 1e-3, "capacity 0.5 dropped nothing"


# ----------------------------------------------------------------------------- theory and audit

# The tiny preset's model made a mixture of experts (f32: no collective widened by XLA:CPU).
EXPERT_LAYOUT = "mesh.expert=4,mesh.data=2,model.experts=4,model.layers=2,train.microbatches=2"


def _expected_all_to_alls(cfg, sizes):
    """Written out again: per layer and microbatch 2 row all-to-alls forward (rows out, results
    back), 2 backward (their cotangents), the forward's 2 again under remat; the int32 counts
    [X] forward (and again). A row block is every pair of the device's microbatch, [N_e, pairs, D]."""
    m, t = cfg.model, cfg.train
    e = sizes["expert"]
    rows = t.batch_size // (sizes["data"] * sizes["fsdp"] * e * t.microbatches)
    pairs = rows * cfg.data.seq_len * m.top_k
    again = m.remat != "none"
    count = (4 + 2 * again + 1 + again) * m.layers * t.microbatches
    sent = m.layers * t.microbatches * ((4 + 2 * again) * e * pairs * m.d_model * 4 + (1 + again) * m.experts * 4)
    return count, sent * (e - 1) / e


@pytest.fixture(scope="module")
def expert_step():
    return compiled_layout(EXPERT_LAYOUT)


def test_compiled_all_to_alls_are_the_theory(expert_step):
    parts, step = expert_step
    sizes, cfg = parts.sizes, parts.cfg
    report = collectives(step.compiled.as_text(), step.mesh)
    ops = report.select("all-to-all")
    assert all(op.axes(step.mesh) == ("expert",) and op.in_loop for op in ops), report.table()
    count, sent = _expected_all_to_alls(cfg, sizes)
    assert sum(op.trips for op in ops) == count, f"expected {count} all-to-all executions\n{report.table()}"
    theory = config_theory(cfg, sizes)
    assert math.isclose(theory.comm_bytes("all-to-all", ("expert",)), sent), (theory.traffic, sent)
    planned = sum(r.sent_bytes for r in plan_of(step).comm if r.kind == "all-to-all")
    assert math.isclose(planned, sent, rel_tol=1e-6), f"shardml plan lists {planned} B sent, theory {sent}"


def test_theory_bounds_the_buffer_by_the_capacity():
    """capacity_factor=0.5 on the tiny shape: C = ceil(0.5 x 32 x 2 / 4) = 8 per expert and sequence,
    1 row per device and microbatch, 1 expert per shard: a block of 8 rows instead of 64 pairs."""
    from shardml.run.config import load_config

    cfg = load_config("tiny", ["model.experts=4", "model.remat=none", "model.layer_loop=scan",
                               "model.capacity_factor=0.5", "mesh.expert=4", "mesh.data=2", "train.microbatches=2"])
    sizes = {"members": 1, "pipeline": 1, "data": 2, "fsdp": 1, "expert": 4, "context": 1, "tensor": 1}
    per_pass = 4 * (4 * 8 * 32 * 4) + 1 * (4 * 4)  # 4 row all-to-alls of [4 blocks, 8 rows, D=32] f32; counts [X=4]
    passes = 4 * 2  # layers x microbatches
    assert math.isclose(config_theory(cfg, sizes).comm_bytes("all-to-all"), passes * per_pass * 3 / 4)


# ----------------------------------------------------------------------------- training steps (slow)

@pytest.mark.slow
def test_all_to_all_step_equals_the_gspmd_dispatch_and_one_device():
    """One SGD(1) step on expert=4 x data=2 (2 microbatches: the accumulator's vmap over data
    shards around the shard_map) equals one device's and the partitioner's dispatch's. (With a
    capacity, and on expert=2 x data=2 x tensor=2 and expert=4 x fsdp=2, the all-to-all path is
    held against one device by tests/test_moe.py's slow tests.)"""
    cfg = CFG
    tokens = np.random.default_rng(0).integers(0, CFG.vocab, (16, 9))
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
    want_params, want = _step({"data": 1}, batch, cfg=cfg)
    for dispatch in ("all_to_all", "gspmd"):
        params, got = _step({"expert": 4, "data": 2}, batch, 2,
                            cfg=TransformerConfig(**{**cfg.__dict__, "moe_dispatch": dispatch}))
        for name in ("loss", "moe_aux", "moe_z", "grad_norm"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=f"{dispatch} {name}")
        for g, w in zip(jax.tree.leaves(params), jax.tree.leaves(want_params)):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=dispatch)
