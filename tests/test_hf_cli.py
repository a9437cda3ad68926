"""``model.from=PATH`` on the command line, against Hugging Face ``transformers``: a tiny random Llama
(hidden 32, 2 layers) and a byte-level BPE tokenizer trained here with ``tokenizers`` are saved
once; one session-scoped run trains 3 steps from them on data x fsdp x tensor and is exported, and
the cheap tests read that run and its export.

Independent references: transformers' loss of the checkpoint on the run's first batch (the first
step's loss), transformers' logits and greedy ``generate`` of the export.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from shardml.run import inference
from shardml.run.cli import main
from shardml.run.config import load_config
from shardml.run.hf import from_checkpoint
from shardml.run.recipe import data_source

RTOL = 1e-4
TEXT = ("The quick brown fox jumps over the lazy dog. A sharded model trains on many devices at once. "
        "Open weights start the run; the run exports them back. ") * 40
VOCAB = 300  # the embedding's rows; the tokenizer holds fewer
LAYOUT = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
STEPS = 3


def shardml(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def byte_bpe(vocab: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TEXT], trainer=trainer)
    return tokenizer


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """(directory, the transformers model it holds, corpus path)."""
    root = tmp_path_factory.mktemp("hfcli")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # greedy runs for all its tokens
    model.generation_config.pad_token_id = 0
    model.save_pretrained(root / "llama")
    tokenizer = byte_bpe(280)
    assert tokenizer.get_vocab_size() <= VOCAB
    tokenizer.save(str(root / "llama" / "tokenizer.json"))
    (root / "corpus.txt").write_text(TEXT)
    return str(root / "llama"), model, str(root / "corpus.txt")


def train_args(checkpoint_dir, corpus, out_dir, *extra):
    return ("train", f"model.from={checkpoint_dir}", f"data.corpus={corpus}", "model.dtype=float32", *LAYOUT,
            "data.seq_len=16", "train.batch_size=8", f"train.steps={STEPS}", "train.log_every=1",
            "train.eval_batches=1", "optim.warmup=1", "checkpoint.async_save=false", f"out_dir={out_dir}", "--quiet",
            *extra)


@pytest.fixture(scope="session")
def trained(checkpoint, tmp_path_factory):
    """(run directory, export directory) of 3 steps from the checkpoint, exported."""
    directory, _, corpus = checkpoint
    root = tmp_path_factory.mktemp("hfcli-run")
    run_dir, export = str(root / "run"), str(root / "export")
    assert main(list(train_args(directory, corpus, run_dir))) == 0
    assert main(["export", run_dir, "--format", "hf", export]) == 0
    return run_dir, export


def test_the_run_records_model_from_and_the_checkpoints_shape(checkpoint, trained):
    directory, _, _ = checkpoint
    run_dir, _ = trained
    with open(os.path.join(run_dir, "config.yaml")) as f:
        model = yaml.safe_load(f)["model"]
    assert model["from"] == directory and (model["layers"], model["d_model"], model["vocab"]) == (2, 32, VOCAB)
    assert sorted(os.listdir(os.path.join(run_dir, "hf"))) == ["config.json", "generation_config.json", "tokenizer.json"]


def test_first_step_loss_equals_transformers_loss_of_the_checkpoint(checkpoint, trained):
    directory, reference, corpus = checkpoint
    run_dir, _ = trained
    cfg = from_checkpoint(load_config(None, list(train_args(directory, corpus, run_dir)[1:-1])))
    batch = data_source(cfg).batch(0)  # tokenised by the checkpoint's tokenizer.json
    with torch.no_grad():
        logits = reference(torch.tensor(batch["inputs"])).logits
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.tensor(batch["targets"]).long().flatten(),
                                                reduction="none").numpy()
    mask = np.asarray(batch["mask"], np.float64).reshape(-1)
    want = float(np.sum(nll * mask) / np.sum(mask))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        first = next(r for r in map(json.loads, f) if r.get("step") == 1)
    assert abs(first["loss"] - want) < RTOL * want, (first["loss"], want)


def test_export_loads_in_transformers_with_the_trained_logits(trained):
    run_dir, export = trained
    loaded = inference.load_run(run_dir)  # the trained parameters, as shardml computes with them
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 12))
    ours = np.asarray(jax.jit(loaded.parts.model.apply)(loaded.trainer.natural(loaded.params), tokens))
    model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(ours - theirs).max() < RTOL * np.abs(theirs).max()
    assert os.path.isfile(os.path.join(export, "tokenizer.json"))
    assert not np.allclose(theirs, _checkpoint_logits(tokens, run_dir), atol=1e-3), "the export is untrained"


def _checkpoint_logits(tokens, run_dir):
    with open(os.path.join(run_dir, "config.yaml")) as f:
        source = yaml.safe_load(f)["model"]["from"]
    with torch.no_grad():
        return transformers.AutoModelForCausalLM.from_pretrained(source)(torch.tensor(tokens)).logits.numpy()


@pytest.mark.slow
def test_generate_greedy_equals_transformers_on_the_export(capsys, trained):
    run_dir, export = trained
    texts, gen = inference.generate_run(run_dir, ["The quick", "Open"], max_tokens=6)
    model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    tokenizer = Tokenizer.from_file(os.path.join(export, "tokenizer.json"))
    for prompt, got in zip(["The quick", "Open"], gen.tokens):
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        with torch.no_grad():
            want = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
        assert got.tolist() == want, prompt
    code, out, err = shardml(capsys, "generate", run_dir, "--prompt", "The quick", "--max-tokens", "4")
    assert code == 0 and "The quick" in out, err


@pytest.mark.slow
def test_eval_and_resume_work_on_the_run(capsys, checkpoint, trained, tmp_path):
    directory, _, corpus = checkpoint
    run_dir, _ = trained
    code, out, err = shardml(capsys, "eval", run_dir)
    assert code == 0 and "loss" in out, err
    copy = str(tmp_path / "run")
    shutil.copytree(run_dir, copy)
    code, out, err = shardml(capsys, *train_args(directory, corpus, copy, f"train.steps={STEPS + 1}"))
    assert code == 0 and f"resum" in err, err  # from its own step-3 checkpoint, not the imported weights


@pytest.mark.parametrize("extra,message", [
    pytest.param(("model.from=/no/such/checkpoint",),
                 "model.from=/no/such/checkpoint: /no/such/checkpoint is not a checkpoint", id="missing"),
    pytest.param(("model.layers=3",), "model.layers=3 conflicts with", id="conflict"),
])
def test_bad_model_from_exits_2_before_compiling(capsys, no_compile, checkpoint, tmp_path, extra, message):
    directory, _, corpus = checkpoint
    code, _, err = shardml(capsys, *train_args(directory, corpus, str(tmp_path / "run"), *extra))
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_a_tokenizer_larger_than_the_embedding_exits_2_before_compiling(capsys, no_compile, checkpoint, tmp_path):
    directory, _, corpus = checkpoint
    small = tmp_path / "small"
    shutil.copytree(directory, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps(config | {"vocab_size": 200}))
    code, _, err = shardml(capsys, *train_args(str(small), corpus, str(tmp_path / "run")))
    assert code == 2 and "has 280 tokens but the model of model.from" in err and "vocab_size=200" in err, err
    assert "Traceback" not in err


def test_export_onto_a_non_empty_directory_exits_2_before_compiling(capsys, trained, no_compile, tmp_path):
    run_dir, _ = trained
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = shardml(capsys, "export", run_dir, "--format", "hf", str(tmp_path))
    assert code == 2 and "is not an empty directory" in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == ["notes.txt"]
