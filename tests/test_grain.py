"""The grain input pipeline in one process: which rows a process reads, the placement check, worker
processes delivering exactly the batches of ``source.batch(step)`` (BPE tokenisation inside the
workers), and a run resumed from grain's checkpointed iterator state, bitwise."""

import json
import os
import signal

import jax
import numpy as np
import optax
import pytest

from conftest import assert_bitwise_equal, host
from shardml.core.data import ArrayBatches, TextBatches, load_digits, load_tokens
from shardml.core.errors import LayoutError, SettingError
from shardml.core.input import Feeder, PlacementError, check_placement, contiguous_rows, process_rows
from shardml.core.losses import classification
from shardml.core.mesh import make_mesh
from shardml.core.sharding import Rules, batch_sharding
from shardml.core.step import build_trainer
from shardml.core.tokenizer import train_bpe
from shardml.models import mlp_classifier
from shardml.run.loop import LoopSettings, Policy, run_loop

B = 16


def sharding(sizes):
    return batch_sharding(make_mesh(sizes), Rules.default())


@pytest.mark.parametrize("sizes, expected", [
    ({"data": 2, "fsdp": 4}, [(0, 8), (8, 16)]),
    ({"data": 2, "tensor": 4}, [(0, 8), (8, 16)]),
    ({"data": 4, "tensor": 2}, [(0, 8), (8, 16)]),
    ({"fsdp": 2, "tensor": 4}, [(0, 8), (8, 16)]),
    ({"data": 8}, [(0, 8), (8, 16)]),
    ({"tensor": 8}, [(0, 16), (0, 16)]),  # the batch is replicated: both processes read all of it
])
def test_each_group_of_four_devices_holds_one_block_of_rows(sizes, expected):
    """Devices 0-3 and 4-7 stand for two processes of 4 devices (their order in a 2-process run):
    each group's rows of a 16-row batch are one block, the blocks written out here."""
    index = sharding(sizes).devices_indices_map((B,))
    found = []
    for group in (range(4), range(4, 8)):
        spans = [(index[d][0].start or 0, B if index[d][0].stop is None else index[d][0].stop)
                 for d in jax.devices() if d.id in group]
        rows = contiguous_rows(spans)
        found.append((rows.start, rows.stop))
    assert found == expected, f"{sizes}: rows per group of devices {found}, expected {expected}"
    assert process_rows(sharding(sizes), B) == slice(0, B), "one process holds every row"
    with pytest.raises(LayoutError, match=r"not one contiguous block"):
        contiguous_rows([(0, 4), (8, 12)])


def test_the_placement_check_catches_rows_on_the_wrong_devices():
    shard = sharding({"data": 8})
    local = {"inputs": np.arange(B * 3, dtype=np.int32).reshape(B, 3)}
    right = {"inputs": jax.make_array_from_callback((B, 3), shard, lambda idx: local["inputs"][idx])}
    check_placement(right, local, 0)
    # The rows of each pair of devices swapped: what a wrong process -> device order would give.
    swapped = np.concatenate([local["inputs"][8:], local["inputs"][:8]])
    wrong = {"inputs": jax.make_array_from_callback((B, 3), shard, lambda idx: swapped[idx])}
    with pytest.raises(PlacementError, match=r"holds other data for rows 0:2"):
        check_placement(wrong, local, 0)
    with pytest.raises(PlacementError, match=r"holds rows 0:2 of the global batch, but this process read rows 8:24"):
        check_placement(right, local, 8)


def test_a_process_reads_only_its_rows_and_they_equal_the_global_batch():
    text = TextBatches(load_tokens("pydoc"), B, 32, seed=3)
    digits = ArrayBatches(load_digits(), B, seed=3, noise=0.2)
    for source in (text, digits):
        ids = source.steps()[5]
        whole = source.batch(5)
        part = source.load(5, ids[4:12], 4)
        for key in whole:
            np.testing.assert_array_equal(part[key], whole[key][4:12], err_msg=f"{type(source).__name__} {key}")
    # The noise is drawn per (seed, step, global row): independent of how rows are split, never zero.
    clean = ArrayBatches(load_digits(), B, seed=3).batch(5)["inputs"]
    assert np.abs(digits.batch(5)["inputs"] - clean).mean() > 0.1, "noise=0.2 changed nothing"
    # Windows start every seq_len tokens and an epoch deals each once, in a new order each epoch.
    small = TextBatches(load_tokens("pydoc"), 50, 4096, seed=0)
    epoch = np.concatenate([small.steps()[s] for s in range(small.windows // 50)])
    assert len(set(epoch.tolist())) == len(epoch), "an epoch repeats a window"
    nxt = small.steps()[small.windows // 50 + 1]
    assert not np.array_equal(nxt, small.steps()[1]), "the second epoch repeats the first one's order"


@pytest.fixture(scope="module")
def bpe_text():
    tokens = load_tokens("pydoc")
    bpe = train_bpe(tokens.train, 384)
    assert bpe.vocab == 384 and train_bpe(tokens.train, 384).json == bpe.json, "BPE training is not deterministic"
    return TextBatches(tokens, B, 32, seed=1, tokenizer=bpe)


def test_workers_tokenise_bpe_and_deliver_the_batches_of_the_source(bpe_text, monkeypatch):
    expected = [bpe_text.batch(s) for s in range(5)]
    assert max(int(b["inputs"].max()) for b in expected) > 255, "no token beyond the bytes: BPE did not merge"
    assert min(float(b["mask"].mean()) for b in expected) > 0.9, "BPE windows too short for seq_len"
    # Workers are fresh (spawned) processes: this patch reaches only the training process, so
    # batches that arrive were cut and tokenised in the workers.
    def not_here(*args, **kwargs):
        raise AssertionError("a training batch was tokenised in the training process")

    monkeypatch.setattr(TextBatches, "load", not_here)
    feeder = Feeder(bpe_text, sharding({"data": 2, "fsdp": 4}), workers=2)
    try:
        feeder.start(2)
        for step in range(2, 5):
            batch = feeder.get(step)
            assert isinstance(batch["inputs"], jax.Array) and batch["inputs"].sharding.spec[0] == Rules.default().spec(("batch",))[0]
            assert_bitwise_equal(host(batch), expected[step], f"step {step} from 2 workers vs source.batch")
    finally:
        feeder.close()
    with pytest.raises(SettingError, match=r"^workers=2: FunctionSource is not a grain pipeline.*use workers=0"):
        from shardml.core.data import as_source

        Feeder(as_source(lambda step: expected[0]), sharding({"data": 8}), workers=2)


class StopAt(Policy):
    """Sends this process SIGTERM while step ``at`` is trained (a preemption)."""

    def __init__(self, at):
        self.at = at

    def on_metrics(self, step, metrics, state, saved):
        if step + 1 == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().on_metrics(step, metrics, state, saved)


def test_a_run_resumed_from_grains_iterator_state_is_bitwise_the_uninterrupted_one(tmp_path, capsys):
    examples = load_digits()
    source = ArrayBatches(examples, batch_size=64, seed=0, noise=0.05)
    trainer = build_trainer(mlp_classifier(64, 32, 10, "float32"), make_mesh({"data": 8}), optax.adam(3e-3),
                            loss=classification)

    def settings(out, workers=1, resume="auto"):
        return LoopSettings(steps=14, out_dir=str(out), checkpoint_every=5, log_every=1, verbose=False,
                            workers=workers, resume=resume)

    def curve(summary):
        return [(r["step"], r["loss"], r["grad_norm"]) for r in summary.records]

    whole = run_loop(trainer, source, settings(tmp_path / "whole"))
    stopped = run_loop(trainer, source, settings(tmp_path / "run"), policy=StopAt(7))
    saved = int(stopped.state.step)
    assert stopped.preempted == "SIGTERM" and 5 < saved < 14, (stopped.preempted, saved)
    step_dir = tmp_path / "run" / "checkpoints" / str(saved)
    state = json.loads((step_dir / "data" / "process_0-of-1.json").read_text())  # written by grain's handler
    meta = json.loads((step_dir / "meta" / "metadata").read_text())
    assert meta["data"]["state"] == {"grain": {"origin": 0, "workers": 1, "processes": 1}}, meta["data"]
    assert state, "grain's handler saved an empty iterator state"
    capsys.readouterr()
    resumed = run_loop(trainer, source, settings(tmp_path / "run"))
    assert resumed.resumed_from == saved
    assert "input position" not in capsys.readouterr().err, "the saved grain state was not used"
    assert_bitwise_equal(host(resumed.state), host(whole.state), "resumed from grain's state vs uninterrupted")
    assert curve(resumed) == curve(whole), "metrics records differ from the uninterrupted run's"
    # Another worker count cannot take that state: the iterator restarts at the step, same batches.
    again = run_loop(trainer, source, settings(tmp_path / "again", workers=2, resume=str(step_dir)))
    assert "saved by 1 process(es) x 1 worker(s)" in capsys.readouterr().err
    assert_bitwise_equal(host(again.state), host(whole.state), "resumed with 2 workers vs uninterrupted")


@pytest.mark.slow
def test_shardml_train_with_a_bpe_tokenizer_saves_it_with_the_run(tmp_path, capsys, monkeypatch):
    from tokenizers import Tokenizer

    from shardml.run.cli import main

    def not_here(*args, **kwargs):
        raise AssertionError("a training batch was tokenised in the training process")

    monkeypatch.setattr(TextBatches, "load", not_here)  # the 2 workers are spawned: unaffected
    out = tmp_path / "bpe"
    code = main(["train", "tiny", "data.tokenizer=bpe", "data.vocab=400", "model.vocab=512", "data.workers=2",
                 "train.steps=3", "model.layers=1", "train.eval_batches=1", f"out_dir={out}", "--quiet"])
    assert code == 0, capsys.readouterr().err[-3000:]
    saved = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert saved.get_vocab_size() == 400
    text = "Return the hash value of the object."
    assert saved.decode(saved.encode(text).ids) == text and len(saved.encode(text).ids) < len(text) / 2
    run = json.loads((out / "run.json").read_text())
    assert run["data"]["tokenizer"].startswith("bpe-400-"), run["data"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(records[-1]["val_loss"]) and records[0]["loss"] < np.log(512) + 0.5, records
