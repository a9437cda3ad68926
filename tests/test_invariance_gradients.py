"""shardml.testing.assert_layouts_match compares gradients by default: a gradient scaled by a
constant on some layout fails it even under Adam, which trains such a gradient to the same
parameters and losses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import shardml
from shardml.testing import LayoutMismatch, assert_layouts_match

ROWS, FEATURES, CLASSES = 8, 6, 3


def batch():
    rng = np.random.default_rng(0)
    return {"inputs": rng.normal(size=(ROWS, FEATURES)).astype(np.float32),
            "targets": rng.integers(0, CLASSES, ROWS).astype(np.int32)}


def rows_scaled_gradient(logits, batch):
    """Cross-entropy whose value is right but whose gradient is multiplied by ROWS / the rows this
    call sees: 1 on the whole batch, 4 on data=2 with 2 microbatches of 2 rows (a divisor bug)."""
    sums = shardml.classification(logits, batch)
    scale = ROWS / logits.shape[0]
    loss = sums["loss"]
    return {**sums, "loss": loss + (scale - 1.0) * (loss - jax.lax.stop_gradient(loss))}


def test_a_scaled_gradient_fails_under_adam_and_names_the_gradient_norm():
    model = shardml.mlp_classifier(FEATURES, 8, CLASSES)
    args = (model, rows_scaled_gradient, batch(), ["data=2"])
    kwargs = dict(steps=2, microbatches=(2,), optimizer=optax.adam(1e-2))
    with pytest.raises(LayoutMismatch, match="gradient norm of step 1") as caught:
        assert_layouts_match(*args, **kwargs)
    assert caught.value.parameter is None and caught.value.step == 1
    assert caught.value.difference == pytest.approx(3.0, rel=1e-4), "the gradient is x4: a difference of 300%"
    # The parameters and losses alone do not see it: Adam normalises the scale away.
    assert_layouts_match(*args, **kwargs, gradients=False, rtol=1e-4)


def test_a_correct_model_passes_with_gradients_compared_under_adam():
    report = assert_layouts_match(shardml.mlp_classifier(FEATURES, 8, CLASSES), shardml.classification, batch(),
                                  ["data=2"], steps=2, microbatches=(1, 2), optimizer=optax.adam(1e-2))
    assert set(report) == {"data=2 with 1 microbatch", "data=2 with 2 microbatches"}


def test_a_gradient_norm_alone_is_a_difference():
    from shardml.testing.invariance import _first_difference, _Trajectory

    params = [{"w": np.ones(2)}, {"w": np.full(2, 0.5)}]
    want = _Trajectory([1.0], params, [2.0])
    assert _first_difference("L", 2, _Trajectory([1.0], params, [2.0]), want, 1e-5) is None
    err = _first_difference("L", 2, _Trajectory([1.0], params, [1.0]), want, 1e-5)
    assert (err.step, err.parameter, err.difference) == (1, None, 0.5), str(err)
    assert "the gradient's scale differs" in str(err) and "gradient norm of step 1: 1 here, 2 on one device" in str(err)
    assert _first_difference("L", 2, _Trajectory([1.0], params, [1.0]), want, 1e-5, gradients=False) is None
