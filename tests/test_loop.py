"""The loop for any model: a user's NNX classifier on scikit-learn's digits through ``shardml.fit``
on a 2x2x2 mesh, crashed and resumed; iterator sources; evaluation against an independent count."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import assert_bitwise_equal, host
from shardml.core.data import ArrayBatches, IteratorSource, load_digits
from shardml.core.errors import ConfigError
from shardml.core.losses import classification
from shardml.models import from_nnx
from shardml.run.checkpoint import steps as checkpoint_steps
from shardml.run.loop import evaluate, fit

MESH = {"data": 2, "fsdp": 2, "tensor": 2}
STEPS, EVERY, CRASH = 160, 20, 57


class DigitsMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.hidden = nnx.Linear(64, 128, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs)
        self.out = nnx.Linear(128, 10, kernel_init=nnx.with_partitioning(init, ("mlp", "classes")), rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


class Crash(Exception):
    pass


class CrashingSource:
    """The digits batches, but the process 'dies' (an exception) when asked for step ``at``."""

    def __init__(self, source, at):
        self.source, self.at = source, at

    @property
    def fingerprint(self):
        return self.source.fingerprint

    def batch(self, step):
        if step == self.at:
            raise Crash(f"killed at step {step}")
        return self.source.batch(step)


@pytest.fixture(scope="module")
def digits():
    examples = load_digits()
    return examples, ArrayBatches(examples, batch_size=64, seed=0)


def run(out_dir, data, eval_data):
    return fit(from_nnx(DigitsMLP), data, optax.adam(3e-3), loss=classification, mesh=MESH, steps=STEPS,
               eval_data=eval_data, out_dir=str(out_dir), checkpoint_every=EVERY, log_every=10, verbose=False)


def test_user_nnx_classifier_on_digits_crashes_resumes_and_learns(digits, tmp_path):
    examples, source = digits
    eval_data = source.eval_batches()
    whole = run(tmp_path / "whole", source, eval_data)
    with pytest.raises(Crash):
        run(tmp_path / "crashed", CrashingSource(source, CRASH), eval_data)
    assert checkpoint_steps(str(tmp_path / "crashed" / "checkpoints"))[-1] == 40, "no checkpoint before the crash"
    resumed = run(tmp_path / "crashed", source, eval_data)
    assert resumed.resumed_from == 40, resumed.resumed_from
    assert_bitwise_equal(host(resumed.state.params), host(whole.state.params), "resumed vs uninterrupted parameters")
    assert [r["loss"] for r in resumed.records] == [r["loss"] for r in whole.records], "metrics differ after resume"
    assert resumed.val["accuracy"] >= 0.95, f"held-out accuracy {resumed.val['accuracy']:.3f} < 0.95"
    assert resumed.val == whole.val

    # The evaluation against an independent count: the whole held-out set at once, on the host.
    params = host(resumed.state.params)
    logits = np.asarray(from_nnx(DigitsMLP)(jax.tree.map(jnp.asarray, params), jnp.asarray(examples.x_val)))
    correct = float(np.mean(np.argmax(logits, -1) == examples.y_val))
    log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -float(np.mean(log_probs[np.arange(len(examples.y_val)), examples.y_val]))
    assert len(examples.y_val) % 64, "the held-out set must end in a partial (padded) batch for this test"
    assert abs(resumed.val["accuracy"] - correct) < 1e-9, (resumed.val["accuracy"], correct)
    assert abs(resumed.val["loss"] - nll) <= 1e-5 * nll, (resumed.val["loss"], nll)


class StatefulIterator:
    """An iterator with get_state / set_state (as grain's are)."""

    def __init__(self, source, crash_at=None):
        self.source, self.position, self.crash_at = source, 0, crash_at

    def __iter__(self):
        return self

    def __next__(self):
        if self.position == self.crash_at:
            raise Crash(f"killed at batch {self.position}")
        batch = self.source.batch(self.position)
        self.position += 1
        return batch

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def test_iterators_record_their_position_and_plain_ones_refuse_to_resume(digits, tmp_path):
    _, source = digits
    kwargs = dict(loss=classification, mesh={"data": 8}, steps=12, checkpoint_every=4, verbose=False)
    model = from_nnx(DigitsMLP)
    whole = fit(model, iter(StatefulIterator(source)), optax.adam(3e-3), **kwargs, out_dir=str(tmp_path / "a"))
    with pytest.raises(Crash):
        fit(model, StatefulIterator(source, crash_at=6), optax.adam(3e-3), **kwargs, out_dir=str(tmp_path / "b"))
    resumed = fit(model, StatefulIterator(source), optax.adam(3e-3), **kwargs, out_dir=str(tmp_path / "b"))
    assert resumed.resumed_from == 4
    assert_bitwise_equal(host(resumed.state.params), host(whole.state.params), "iterator resumed at its position")

    plain = (source.batch(step) for step in range(100))
    with pytest.raises(ConfigError, match=r"cannot resume at batch 12: the data is a plain iterator"):
        fit(model, plain, optax.adam(3e-3), **{**kwargs, "steps": 20}, out_dir=str(tmp_path / "b"))


def test_iterator_source_is_read_in_order():
    source = IteratorSource(iter([{"x": 1}, {"x": 2}]))
    assert source.batch(0) == {"x": 1}
    with pytest.raises(RuntimeError, match="read in order"):
        source.batch(5)


def test_fit_without_out_dir_keeps_records_in_memory(digits, tmp_path, monkeypatch):
    _, source = digits
    monkeypatch.chdir(tmp_path)
    summary = fit(from_nnx(DigitsMLP), source, optax.adam(3e-3), loss=classification, mesh={"data": 8}, steps=3,
                  log_every=1, verbose=False)
    assert [r["step"] for r in summary.records] == [1, 2, 3] and summary.checkpoint is None
    assert os.listdir(tmp_path) == [], "a run without out_dir wrote files"
    assert summary.val is None


def test_evaluate_sums_before_dividing(digits):
    """Two batches with different numbers of real rows: the mean is over rows, not over batches."""
    examples, source = digits
    from shardml.core.mesh import make_mesh
    from shardml.core.step import build_trainer

    trainer = build_trainer(from_nnx(DigitsMLP), make_mesh({"data": 8}), optax.adam(1e-3), loss=classification)
    params = trainer.init(0).params
    batches = source.eval_batches()[-2:]
    result = evaluate(trainer, params, batches)
    per_batch = [evaluate(trainer, params, [b]) for b in batches]
    rows = [b["mask"].sum() for b in batches]
    assert rows[0] != rows[1], rows
    expected = sum(r["loss"] * n for r, n in zip(per_batch, rows)) / sum(rows)
    assert abs(result["loss"] - expected) < 1e-6 * expected, (result, expected)
    assert abs(result["loss"] - np.mean([r["loss"] for r in per_batch])) > 1e-6, "test cannot tell the two apart"
