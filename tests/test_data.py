"""Data sources: the embedded corpus, a user's text files and token files, arrays; batches as pure
functions of (seed, step); a padded last evaluation batch."""

import json

import numpy as np
import pytest

from shardml.core.data import ArrayBatches, TextBatches, as_source, load_tokens, split_examples
from shardml.core.errors import DataError
from shardml.run.cli import main
from shardml.run.config import load_config
from shardml.run.errors import ConfigError, keyed


def test_text_file_and_directory_are_byte_level(tmp_path):
    (tmp_path / "a.txt").write_text("héllo wörld\n" * 50, encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second file\n" * 50)
    one = load_tokens(str(tmp_path / "a.txt"), val_fraction=0.1)
    assert one.vocab == 256 and one.train.dtype == np.uint8
    text = (tmp_path / "a.txt").read_bytes()
    assert bytes(np.concatenate([one.train, one.val])) == text
    assert len(one.val) == len(text) - int(len(text) * 0.9)
    folder = load_tokens(str(tmp_path), val_fraction=0.1)
    joined = bytes(np.concatenate([folder.train, folder.val]))
    assert joined == text + b"\n\n" + (tmp_path / "sub" / "b.md").read_bytes(), "files not read in sorted order"
    (tmp_path / "sub" / "c.bin.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(DataError, match=r"c.bin.txt is not UTF-8 text"):
        load_tokens(str(tmp_path))


def test_token_files_are_memory_mapped_with_their_vocabulary(tmp_path):
    ids = np.random.default_rng(0).integers(0, 1000, 5000)
    np.save(tmp_path / "ids.npy", ids.astype(np.int32))
    tokens = load_tokens(str(tmp_path / "ids.npy"))
    assert tokens.vocab == ids.max() + 1 and isinstance(tokens.train, np.memmap)
    np.testing.assert_array_equal(np.concatenate([tokens.train, tokens.val]), ids)
    assert load_tokens(str(tmp_path / "ids.npy"), vocab=2048).vocab == 2048
    with pytest.raises(DataError, match=r"holds token id 999, outside vocab=512; use vocab=1000 or more"):
        load_tokens(str(tmp_path / "ids.npy"), vocab=512)
    # From a config, the run layer names the keys: the model's vocabulary is too small.
    cfg = load_config("tiny", [f"data.corpus={tmp_path / 'ids.npy'}", "model.vocab=512"])
    with pytest.raises(ConfigError, match=r"data.corpus=.* outside model.vocab=512; use model.vocab=1000 or more"):
        with keyed(cfg):
            load_tokens(cfg.data.corpus, vocab=cfg.model.vocab)
    ids.astype(np.uint16).tofile(tmp_path / "ids.bin")
    raw = load_tokens(str(tmp_path / "ids.bin"), token_dtype="uint16")
    np.testing.assert_array_equal(np.concatenate([raw.train, raw.val]), ids)
    with pytest.raises(DataError, match=r"neither an embedded corpus"):
        load_tokens(str(tmp_path / "missing.npy"))


def test_text_batches_are_a_pure_function_of_seed_and_step():
    tokens = load_tokens("pydoc")
    a, b = TextBatches(tokens, 8, 32, seed=0), TextBatches(tokens, 8, 32, seed=0)
    np.testing.assert_array_equal(a.batch(5)["inputs"], b.batch(5)["inputs"])
    assert not np.array_equal(a.batch(5)["inputs"], a.batch(6)["inputs"])
    assert not np.array_equal(a.batch(5)["inputs"], TextBatches(tokens, 8, 32, seed=1).batch(5)["inputs"])
    batch = a.batch(0)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    with pytest.raises(DataError, match=r"^seq_len=600000 is longer than the training text"):
        TextBatches(tokens, 8, 600000)
    with pytest.raises(ConfigError, match=r"^data.seq_len=600000 is longer than the training text"):
        with keyed(load_config("tiny", ["data.seq_len=600000"])):
            TextBatches(tokens, 8, 600000)


def test_array_batches_deal_every_example_once_per_epoch_and_pad_the_last_eval_batch():
    x = np.arange(50, dtype=np.float32)[:, None]
    examples = split_examples("toy", x, np.arange(50) % 3, val_fraction=0.2)
    source = ArrayBatches(examples, batch_size=8)
    seen = np.concatenate([source.batch(s)["inputs"][:, 0] for s in range(5)])  # 40 = one epoch
    assert sorted(seen.tolist()) == sorted(examples.x_train[:, 0].tolist()), "an epoch is not a permutation"
    evals = source.eval_batches()
    assert [int(b["mask"].sum()) for b in evals] == [8, 2], [b["mask"] for b in evals]
    assert all(len(b["targets"]) == 8 for b in evals), "eval batches must keep a static shape"


def test_sequences_and_functions_are_sources():
    batches = [{"x": np.array([i])} for i in range(3)]
    assert as_source(batches).batch(4)["x"][0] == 1, "a sequence is read round and round"
    assert as_source(lambda step: {"x": step}).batch(7) == {"x": 7}
    with pytest.raises(TypeError, match="cannot read batches from int"):
        as_source(3)


@pytest.mark.slow
def test_command_line_trains_on_a_users_text_file_and_digits(tmp_path, capsys):
    corpus = tmp_path / "notes.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    code = main(["train", "tiny", f"data.corpus={corpus}", "train.steps=2", f"out_dir={tmp_path / 'text'}", "--quiet"])
    assert code == 0, capsys.readouterr().err[-2000:]
    run = json.loads((tmp_path / "text" / "run.json").read_text())
    assert run["data"]["corpus"] == str(corpus), run["data"]
    code = main(["train", "tiny", "model.kind=mlp", "data.corpus=digits", "train.steps=30", "train.log_every=10",
                 "optim.lr=1e-2", f"out_dir={tmp_path / 'digits'}", "--quiet"])
    assert code == 0, capsys.readouterr().err[-2000:]
    records = [json.loads(line) for line in (tmp_path / "digits" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val_accuracy"] > 0.5 and records[-1]["loss"] < records[0]["loss"], records[-1]
