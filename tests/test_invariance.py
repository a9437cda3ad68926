"""Sharding invariance: every layout and microbatch count trains exactly like one device."""

import jax
import numpy as np
import pytest

from conftest import lm_batch, max_rel_diff
from shardml.config import OptimConfig
from shardml.mesh import make_mesh
from shardml.step import build_trainer, default_optimizer, put_batch

STEPS = 3
BATCH = 32
LAYOUTS = [
    ("data=8", {"data": 8}, 1),
    ("fsdp=8", {"fsdp": 8}, 1),
    ("data=2 x tensor=4", {"data": 2, "tensor": 4}, 1),
    ("data=2 x fsdp=2 x tensor=2", {"data": 2, "fsdp": 2, "tensor": 2}, 1),
    ("data=8, 4 microbatches", {"data": 8}, 4),
    ("data=2 x fsdp=2 x tensor=2, 2 microbatches", {"data": 2, "fsdp": 2, "tensor": 2}, 2),
]


def run(model, sizes, microbatches, devices):
    mesh = make_mesh(sizes, devices=devices)
    trainer = build_trainer(model, mesh, default_optimizer(OptimConfig(lr=3e-3, warmup=1), 10), microbatches)
    state = trainer.init(seed=0)
    losses = []
    for step in range(STEPS):
        state, metrics = trainer.step(state, put_batch(lm_batch(BATCH, seed=0, ragged=True),
                                                       trainer.batch_sharding))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.tree.map(np.asarray, state.params)


@pytest.fixture(scope="module")
def reference(tiny_model):
    return run(tiny_model, {"data": 1}, 1, jax.devices()[:1])


@pytest.mark.parametrize("name,sizes,microbatches", LAYOUTS, ids=[l[0] for l in LAYOUTS])
def test_layout_matches_one_device(tiny_model, reference, name, sizes, microbatches):
    ref_losses, ref_params = reference
    losses, params = run(tiny_model, sizes, microbatches, jax.devices())
    assert ref_losses[-1] < ref_losses[0], f"reference did not learn: {ref_losses}"
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5,
                               err_msg=f"{name}: per-step losses differ from one device")
    diff = max_rel_diff(params, ref_params)
    assert diff < 1e-5, f"{name}: final parameters differ from one device by {diff:.2e} (relative)"
