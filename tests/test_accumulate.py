"""The accumulator: k microbatches give the full-batch gradients, rows stay put, sums are f32."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import lm_batch, max_rel_diff, tiny_transformer, trainer_for
from shardml.analysis.audit import collectives
from shardml.core.accumulate import accumulator, split_microbatches
from shardml.core.losses import token_cross_entropy
from shardml.core.mesh import make_mesh
from shardml.core.sharding import Rules, tree_shardings, use_rules


@functools.cache
def reference(seed=3):
    """Plain jax.grad of the token-mean loss on one device, written here: the independent reference."""
    model = tiny_transformer()
    params = jax.device_get(model.init(jax.random.key(0)))
    batch = lm_batch(32, seed=seed, ragged=True)

    @jax.jit
    def mean_loss_and_grads(p, b):
        def mean_loss(p):
            logits = model(p, b["inputs"])
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), b["targets"][..., None], -1)[..., 0]
            return jnp.sum(nll * b["mask"]) / jnp.sum(b["mask"])
        return jax.value_and_grad(mean_loss)(p)

    loss, grads = mean_loss_and_grads(params, batch)
    return model, params, batch, float(loss), jax.device_get(grads)


@pytest.mark.parametrize("sizes,k", [({"data": 8}, 4),
                                     pytest.param({"data": 2, "fsdp": 2, "tensor": 2}, 2, marks=pytest.mark.slow),
                                     ({"data": 2, "fsdp": 4}, 4)])
def test_microbatches_equal_full_batch_with_unequal_token_counts(sizes, k):
    model, params, batch, ref_loss, ref_grads = reference()
    mesh = make_mesh(sizes)
    rules = Rules.default()
    strategy = accumulator(model, token_cross_entropy, mesh, k)

    @jax.jit
    def sharded(p, b):
        with use_rules(rules):
            return strategy.gradient_sums(p, b)

    with jax.set_mesh(mesh):
        p = jax.device_put(params, tree_shardings(model.logical, rules, mesh))
        b = jax.device_put(batch, NamedSharding(mesh, P(("data", "fsdp"))))
        grad_sums, sums = sharded(p, b)
    count = float(sums["count"])
    assert count == batch["mask"].sum(), "token count is not the number of unmasked targets"
    np.testing.assert_allclose(float(sums["loss"]) / count, ref_loss, rtol=1e-5, err_msg="loss per token differs")
    grads = jax.tree.map(lambda g: np.asarray(g) / count, grad_sums)
    diff = max_rel_diff(grads, ref_grads)
    assert diff < 1e-5, f"{k} microbatches on {sizes}: gradients differ from the full batch by {diff:.2e}"


def test_mean_of_means_would_differ():
    """Guards the test above: with these ragged masks, averaging per-microbatch means is wrong."""
    model, params, batch, ref_loss, _ = reference()
    parts = split_microbatches(jax.tree.map(jnp.asarray, batch), 4)
    sums = [token_cross_entropy(model(params, parts["inputs"][j]), jax.tree.map(lambda x: x[j], parts))
            for j in range(4)]
    mean_of_means = np.mean([float(s["loss"] / s["count"]) for s in sums])
    assert abs(mean_of_means - ref_loss) > 1e-4, "fixture is not ragged enough to catch mean-of-means"


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


def _compiled_step(trainer, rows=32):
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding)
             for k, v in lm_batch(rows).items()}
    return trainer.lower_step(trainer.abstract_state(), batch).compile()


def test_bf16_compute_reduces_gradients_over_data_from_f32_sources():
    """XLA:CPU widens a bf16 all-reduce to f32 by itself, so the reduction's own dtype proves nothing;
    what is summed is the dtype the values had before any convert (the audit's source dtype). With
    ``grad_dtype=compute`` the weight-gradient products are bf16, so only the accumulator's f32 sums
    make the data reduction's sources f32."""
    trainer = trainer_for(tiny_transformer(dtype="bfloat16", grad_dtype="compute"), {"data": 4, "tensor": 2}, 4)
    report = collectives(_compiled_step(trainer).as_text(), trainer.mesh)
    data_reductions = report.select("all-reduce", axis="data")
    assert data_reductions, "no gradient all-reduce over data found"
    sources = {dtype for op in data_reductions for dtype in op.source_dtypes}
    assert sources == {"f32"}, f"the data reductions sum {sources}, not f32 sums"


@pytest.mark.slow
def test_fsdp_keeps_gradient_accumulators_at_one_fsdp_th(tiny_model):
    """With k microbatches the f32 gradient accumulator lives sharded over fsdp: the step's
    temporaries on fsdp=8 are smaller than on data=8 by most of a full f32 gradient."""
    full_grad_bytes = 4 * tiny_model.num_params
    temporaries = {}
    for sizes in ({"data": 8}, {"fsdp": 8}):
        compiled = _compiled_step(trainer_for(tiny_model, sizes, 4))
        temporaries[tuple(sizes)] = compiled.memory_analysis().temp_size_in_bytes
    saved = temporaries[("data",)] - temporaries[("fsdp",)]
    assert saved >= 0.5 * full_grad_bytes * (1 - 1 / 8), \
        f"fsdp=8 saves {saved} bytes of temporaries over data=8; a sharded accumulator saves ~{full_grad_bytes * 7 / 8:.0f}"
