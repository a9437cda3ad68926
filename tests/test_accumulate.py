"""The accumulator: k microbatches give the full-batch update, rows stay put, sums are f32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import lm_batch, max_rel_diff
from shardml.accumulate import accumulate_gradients, model_loss, split_microbatches
from shardml.mesh import make_mesh
from shardml.models import init_params, logical_axes
from shardml.sharding import Rules, tree_shardings, use_rules


def reference_grads(model, params, batch):
    """Plain jax.grad of the token-mean loss on one device: the independent reference."""
    def mean_loss(p):
        loss_sum, count = model_loss(model.apply)(p, batch)
        return loss_sum / count
    return jax.value_and_grad(mean_loss)(params)


@pytest.mark.parametrize("sizes,k", [({"data": 8}, 4), ({"data": 2, "fsdp": 2, "tensor": 2}, 2),
                                     ({"data": 2, "fsdp": 4}, 4)])
def test_microbatches_equal_full_batch_with_unequal_token_counts(tiny_model, sizes, k):
    batch = lm_batch(32, seed=3, ragged=True)
    params = init_params(tiny_model.specs, jax.random.key(0))
    ref_loss, ref_grads = reference_grads(tiny_model, params, jax.tree.map(jnp.asarray, batch))

    mesh = make_mesh(sizes)
    rules = Rules.default()
    logical = logical_axes(tiny_model.specs)
    grad_fn = accumulate_gradients(model_loss(tiny_model.apply), k, mesh, logical)

    @jax.jit
    def sharded(p, b):
        with use_rules(rules):
            return grad_fn(p, b)

    with jax.set_mesh(mesh):
        p = jax.device_put(params, tree_shardings(logical, rules, mesh))
        b = jax.device_put(batch, NamedSharding(mesh, P(("data", "fsdp"))))
        grads, loss, tokens = sharded(p, b)
    assert float(tokens) == batch["mask"].sum(), "token count is not the number of unmasked targets"
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5, err_msg="loss per token differs")
    diff = max_rel_diff(grads, ref_grads)
    assert diff < 1e-5, f"{k} microbatches on {sizes}: gradients differ from the full batch by {diff:.2e}"


def test_mean_of_means_would_differ(tiny_model):
    """Guards the test above: with these ragged masks, averaging per-microbatch means is wrong."""
    batch = jax.tree.map(jnp.asarray, lm_batch(32, seed=3, ragged=True))
    params = init_params(tiny_model.specs, jax.random.key(0))
    ref_loss, _ = reference_grads(tiny_model, params, batch)
    parts = split_microbatches(batch, 4)
    means = [model_loss(tiny_model.apply)(params, jax.tree.map(lambda x: x[j], parts)) for j in range(4)]
    mean_of_means = np.mean([float(s / c) for s, c in means])
    assert abs(mean_of_means - float(ref_loss)) > 1e-4, "fixture is not ragged enough to catch mean-of-means"


def test_microbatch_rows_stay_on_their_devices():
    """Strided split: each device's part of microbatch j holds only rows it already had."""
    mesh = make_mesh({"data": 2, "fsdp": 4})
    rows = 64
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    ids = jax.device_put(np.arange(rows, dtype=np.int32), sharding)
    before = {shard.device: set(np.asarray(shard.data).tolist()) for shard in ids.addressable_shards}

    @jax.jit
    def split(x):
        with use_rules(Rules.default()):
            return split_microbatches(x, 4)

    with jax.set_mesh(mesh):
        out = split(ids)
        hlo = split.lower(ids).compile().as_text()
    assert out.shape == (4, rows // 4)
    np.testing.assert_array_equal(np.asarray(out)[1], np.arange(1, rows, 4), err_msg="split is not strided")
    for shard in out.addressable_shards:
        held = set(np.asarray(shard.data).ravel().tolist())
        assert held <= before[shard.device], f"{shard.device} got rows {held - before[shard.device]} it did not hold"
    for op in ("all-to-all", "collective-permute", "all-gather"):
        assert op not in hlo, f"the microbatch split moved rows between devices ({op} in HLO)"


def test_bf16_compute_accumulates_and_reduces_in_f32(tiny_cfg):
    import dataclasses

    from shardml.audit import collectives
    from shardml.config import OptimConfig
    from shardml.models import transformer
    from shardml.step import build_trainer, default_optimizer

    model = transformer(dataclasses.replace(tiny_cfg, dtype="bfloat16"), 16)
    mesh = make_mesh({"data": 4, "tensor": 2})
    trainer = build_trainer(model, mesh, default_optimizer(OptimConfig(), 10), microbatches=4)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding)
             for k, v in lm_batch(32).items()}
    report = collectives(trainer.lower_step(trainer.abstract_state(), batch).compile().as_text(), mesh)
    data_reductions = report.select("all-reduce", axis="data")
    assert data_reductions, "no gradient all-reduce over data found"
    assert {op.dtype for op in data_reductions} == {"f32"}, f"data reduction dtypes: {data_reductions}"
