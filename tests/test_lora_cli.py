"""LoRA from the config and the command line (``lora.*``), against ``transformers`` and ``peft``: a tiny
random Llama is saved once; one session-scoped run trains adapters from it for 3 steps on
data x fsdp x tensor and is exported merged (``--format hf --merge``) and as adapters
(``--format peft``).

Independent references: the checkpoint's own weights (the base must come back unchanged), the
merged export's logits in ``transformers``, the adapters' logits in ``peft`` over the base (both
against the LoRA model's logits in shardml), and for a sweep of adapters each member trained alone.
"""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from conftest import host
from shardml.core.errors import ConfigError
from shardml.models.hf_io import load_hf
from shardml.run import inference
from shardml.run.cli import main
from shardml.run.config import load_config
from shardml.run.recipe import build
from shardml.run.train import train

TOL = 1e-4
TEXT = "Adapters learn a low-rank change of a frozen model; the base is stored once. " * 60
LAYOUT = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
LORA = ("lora.rank=4", "lora.alpha=8", "lora.targets=q,v,down")


def shardml(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory of a tiny random Llama, byte-level corpus path)."""
    root = tmp_path_factory.mktemp("loracli")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "llama")
    # token ids, not text: a run on token ids writes no samples at its end (one compile less)
    np.save(root / "corpus.npy", np.frombuffer(TEXT.encode(), np.uint8).astype(np.uint16))
    return str(root / "llama"), str(root / "corpus.npy")


def train_args(checkpoint_dir, corpus, out_dir, *extra):
    return ("train", f"model.from={checkpoint_dir}", f"data.corpus={corpus}", "model.dtype=float32", *LAYOUT,
            "data.seq_len=16", "train.batch_size=8", "train.steps=3", "train.eval_batches=1", "optim.lr=3e-2",
            "optim.warmup=1", "checkpoint.async_save=false", f"out_dir={out_dir}", "--quiet", *extra)


@pytest.fixture(scope="module")
def lora_run(checkpoint, tmp_path_factory, capsys_module):
    """(run directory, merged export, peft export) of 3 LoRA steps from the checkpoint."""
    directory, corpus = checkpoint
    root = tmp_path_factory.mktemp("lorarun")
    run, merged, peft_dir = str(root / "run"), str(root / "merged"), str(root / "peft")
    assert main(list(train_args(directory, corpus, run, *LORA))) == 0
    assert main(["export", run, "--format", "hf", merged, "--merge"]) == 0
    assert main(["export", run, "--format", "peft", peft_dir]) == 0
    return run, merged, peft_dir


@pytest.fixture(scope="module")
def capsys_module():
    yield  # the module fixtures call main without capturing; pytest's own capture takes the output


def shardml_logits(run_dir, tokens):
    """The LoRA model's logits in shardml (its apply on the restored checkpoint), [B, S, V]."""
    run = inference.load_run(run_dir)
    params = run.trainer.natural(run.params)
    return np.asarray(jax.jit(run.parts.model.apply)(params, tokens)), params


def tokens_of():
    return np.asarray([list(TEXT.encode()[:12]), list(TEXT.encode()[20:32])], np.int32)


def test_only_adapters_train_and_the_base_is_the_checkpoint(lora_run, checkpoint):
    run, _, _ = lora_run
    loaded = inference.load_run(run)
    params = host(loaded.trainer.natural(loaded.params))
    _, base = load_hf(checkpoint[0])
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params["base"]), jax.tree.leaves(host(base))):
        np.testing.assert_array_equal(got, want, err_msg=f"the frozen base moved: {jax.tree_util.keystr(path)}")
    assert sorted(params["adapters"]["layers"]) == ["w_down", "wq", "wv"], sorted(params["adapters"]["layers"])
    for name, ad in params["adapters"]["layers"].items():
        assert np.abs(ad["b"]).max() > 1e-3, f"{name}'s adapter did not train (b is still zero)"
    opt_leaves = jax.tree.leaves(loaded.trainer.abstract_state().opt_state)
    n_opt = sum(int(np.prod(x.shape)) for x in opt_leaves)
    n_adapters = sum(x.size for x in jax.tree.leaves(params["adapters"]))
    assert n_opt < 2 * n_adapters + 100, f"optimizer state of {n_opt} values for {n_adapters} adapter values: the " \
                                         "base has optimizer state"


def test_merged_export_matches_the_lora_model_in_transformers(lora_run):
    run, merged, _ = lora_run
    tokens = tokens_of()
    want, _ = shardml_logits(run, tokens)
    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, want[..., :got.shape[-1]], rtol=TOL, atol=TOL,
                               err_msg="the merged export's logits in transformers differ from the LoRA model's")


def test_peft_export_loads_over_the_base_in_peft(lora_run, checkpoint):
    import peft

    run, _, peft_dir = lora_run
    config = json.load(open(os.path.join(peft_dir, "adapter_config.json")))
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == checkpoint[0]
    tokens = tokens_of()
    want, _ = shardml_logits(run, tokens)
    base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint[0], dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(base, peft_dir).eval()
    with torch.no_grad():
        got = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, want[..., :got.shape[-1]], rtol=TOL, atol=TOL,
                               err_msg="the peft export over the base differs from the LoRA model")


def test_generate_decodes_the_merged_weights(lora_run):
    """eval/generate/samples decode a LoRA run with its adapters merged on the devices; the same
    weights as the merged export (whose logits transformers checks above)."""
    from shardml.models.lora import merge_lora

    run = inference.load_run(lora_run[0])
    decoded = host(inference.decoded_params(run.parts, run.params))
    _, want = merge_lora(run.parts.model, run.trainer.natural(run.params))
    for (path, got), expected in zip(jax.tree_util.tree_leaves_with_path(decoded), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def recorded_as(run: str, where, section: str, values: dict) -> str:
    """A copy of ``run`` whose checkpoints record other ``section`` values: what export reads of such
    a run (its config), without training one (a compile of ~8 s)."""
    import shutil

    shutil.copytree(run, where)
    for meta in where.glob("checkpoints/*/meta/metadata"):
        record = json.loads(meta.read_text())
        record["run"]["config"][section].update(values)
        meta.write_text(json.dumps(record))
    return str(where)


def test_export_refuses_what_does_not_fit(lora_run, tmp_path, capsys):
    run, merged, _ = lora_run
    code, _, err = shardml(capsys, "export", run, "--format", "peft", merged)
    assert code == 2 and "not an empty directory" in err, err
    code, _, err = shardml(capsys, "export", run, "--format", "hf", str(tmp_path / "a"))
    assert code == 2 and "--merge" in err and "--format peft" in err, err
    import dataclasses

    from shardml.run.schema import LoRAConfig

    population = recorded_as(run, tmp_path / "population", "population", {"size": 2})
    code, _, err = shardml(capsys, "export", population, "--format", "peft", str(tmp_path / "b"))
    assert code == 2 and "population of 2 members" in err, err
    plain = recorded_as(run, tmp_path / "plain", "lora", dataclasses.asdict(LoRAConfig()))  # no adapters
    for extra in (["--format", "hf", "--merge"], ["--format", "peft"]):
        code, _, err = shardml(capsys, "export", plain, *extra[:2], str(tmp_path / "b"), *extra[2:])
        assert code == 2 and "not a LoRA run" in err, (extra, err)
        assert not os.path.exists(tmp_path / "b"), "a refused export wrote its directory"


def test_a_resume_from_another_base_is_refused(lora_run, checkpoint, tmp_path, capsys):
    import shutil

    run, _, _ = lora_run
    other = str(tmp_path / "other")
    shutil.copytree(checkpoint[0], other)
    code, _, err = shardml(capsys, *train_args(other, checkpoint[1], run, *LORA))
    assert code == 2 and "model.from" in err, err


# ------------------------------------------------------------------------- adapter-only checkpoints
def last_step_dir(run):
    steps = sorted(int(n) for n in os.listdir(os.path.join(run, "checkpoints")) if n.isdigit())
    return os.path.join(run, "checkpoints", str(steps[-1]))


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path) for f in names)


def test_checkpoints_hold_the_adapters_and_name_the_base(lora_run, checkpoint):
    """No base array in the checkpoint (its record, its files); model.from recorded by path and by the
    exact checksums of its weights, computed here from the checkpoint files independently."""
    from shardml.run.run_dir import read_meta
    from shardml.run.store import checksums

    step_dir = last_step_dir(lora_run[0])
    meta = read_meta(step_dir)
    assert not [n for n in meta.arrays if n.startswith("params/base")], "the checkpoint still holds the base"
    assert sorted({n.split("/")[1] for n in meta.arrays if n.startswith("params/")}) == ["adapters"], meta.arrays
    assert meta.frozen["source"] == {"model.from": os.path.abspath(checkpoint[0])}, meta.frozen["source"]
    _, base = load_hf(checkpoint[0])
    assert meta.frozen["checksums"] == checksums({"base": base}), "the recorded fingerprint is not the base's weights'"
    assert len(meta.frozen["fingerprint"]) == 64
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(host(base)))
    held = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in meta.arrays.values())
    assert held < base_bytes / 4, f"the checkpoint's arrays take {held:,} bytes; the base alone {base_bytes:,}"
    on_disk = dir_bytes(os.path.join(step_dir, "params"))  # the adapters with Orbax's own files
    assert on_disk < base_bytes / 2, f"the params item takes {on_disk:,} bytes on disk; the base {base_bytes:,}"


def test_only_a_lora_run_from_model_from_leaves_its_base_out(checkpoint, no_compile):
    """A random base (no model.from) and a full fine-tune are saved whole."""
    corpus = f"data.corpus={checkpoint[1]}"
    adapters = build(load_config("tiny", [f"model.from={checkpoint[0]}", corpus, *LORA]))
    assert adapters.frozen.entries == ("base",)
    assert build(load_config("tiny", [*SMALL, *LORA])).frozen is None, "a random base must be saved"
    assert build(load_config("tiny", [f"model.from={checkpoint[0]}", corpus])).frozen is None


def test_killed_and_resumed_it_ends_bitwise_equal_to_the_uninterrupted_run(lora_run, checkpoint, tmp_path,
                                                                           monkeypatch):
    """Killed after saving step 2 (adapters only), the same command reads the base from model.from
    again: its step 3 equals the uninterrupted run's (lora_run) array for array, the base included."""
    from shardml.run import recipe
    from shardml.run.run_dir import read_meta

    out = str(tmp_path / "run")
    original = recipe.data_source

    class Killed:
        def __init__(self, data):
            self.data = data

        def __getattr__(self, name):
            return getattr(self.data, name)

        def batch(self, step):
            if step == 2:
                raise KeyboardInterrupt("killed")
            return self.data.batch(step)

    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(recipe, "data_source", lambda cfg: Killed(original(cfg)))
        main(list(train_args(*checkpoint, out, *LORA, "checkpoint.every=1")))
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["1", "2"]
    overrides = [a for a in train_args(*checkpoint, out, *LORA, "checkpoint.every=1") if "=" in a]
    summary = train(load_config(None, overrides), verbose=False)  # the same command again
    assert summary.resumed_from == 2
    want, got = read_meta(last_step_dir(lora_run[0])), read_meta(last_step_dir(out))
    assert got.step == want.step == 3
    differ = sorted(n for n in want.checksums if got.checksums.get(n) != want.checksums[n])
    assert not differ and got.checksums.keys() == want.checksums.keys(), f"the resumed run differs: {differ}"
    _, base = load_hf(checkpoint[0])
    for got_b, want_b in zip(jax.tree.leaves(host(summary.state.params["base"])), jax.tree.leaves(host(base))):
        np.testing.assert_array_equal(got_b, want_b, err_msg="the resumed run's base is not model.from's")


def test_a_changed_or_missing_base_is_refused_naming_it(lora_run, checkpoint, tmp_path, capsys):
    """eval / export of a run whose model.from changed (other weights of the same shapes) or is gone
    exit 2 naming the path and the fix, before anything is evaluated."""
    import shutil

    changed, run = tmp_path / "changed", tmp_path / "run"
    torch.manual_seed(1)
    config = transformers.AutoConfig.from_pretrained(checkpoint[0])
    transformers.LlamaForCausalLM(config).save_pretrained(changed)
    shutil.copytree(lora_run[0], run)

    def based_on(path):
        for meta in run.glob("checkpoints/*/meta/metadata"):
            record = json.loads(meta.read_text())
            record["frozen"]["source"]["model.from"] = str(path)
            meta.write_text(json.dumps(record))

    based_on(changed)
    code, _, err = shardml(capsys, "eval", str(run))
    assert code == 2 and f"model.from={changed} has changed" in err and "original files back" in err, err
    based_on(tmp_path / "gone")
    code, _, err = shardml(capsys, "export", str(run), "--format", "peft", str(tmp_path / "out"))
    assert code == 2 and f"model.from={tmp_path / 'gone'}" in err and "put the base model back" in err, err


BAD = [
    (("lora.rank=4", "model.kind=mlp", "data.corpus=digits"), "model.kind=mlp"),
    (("lora.rank=4", "lora.targets=q,x"), "lora.targets=q,x"),
    (("lora.rank=33",), "lora.rank=33"),  # the tiny model's widths are 32 (d_model) and 64 (d_ff)
    (("lora.rank=4", "mesh.pipeline=2", "mesh.data=4"), "mesh.pipeline=2"),
    (("lora.rank=4", "lora.dropout=1.0"), "lora.dropout"),
    (("lora.alpha=8",), "lora.rank=0"),
    (("lora.rank=-1",), "lora.rank"),
    (("lora.rank=4", "population.kind=pbt", "population.size=2", "population.ready_every=2"), "population.kind=pbt"),
    (("lora.rank=4", "optim.lr=[1e-3,1e-2]", "population.size=2", "population.kind=sweep", "lora.rank=[4,8]"),
     "members can differ by optim.lr"),
]
SMALL = ("model.layers=2", "model.d_model=32", "model.d_ff=64", "data.seq_len=16", "train.batch_size=8")


@pytest.mark.parametrize("overrides,names", BAD, ids=[b[1] for b in BAD])
def test_bad_lora_settings_exit_2_before_compiling(overrides, names, no_compile, tmp_path, capsys):
    code, _, err = shardml(capsys, "train", "tiny", *SMALL, *overrides, f"out_dir={tmp_path / 'x'}", "--quiet")
    assert code == 2 and names in err, err
    assert "Traceback" not in err, err


def test_the_widest_rank_builds(no_compile):
    """The rank may equal the narrowest targeted width (32 here), not exceed it; d_ff=64 allows 64."""
    parts = build(load_config("tiny", [*SMALL, "lora.rank=32", "lora.targets=q,k,v,o,gate,up,down"]))
    assert parts.model.config.rank == 32 and parts.model.config.targets == ("q", "k", "v", "o", "gate", "up", "down")
    with pytest.raises(ConfigError, match="lora.rank=33"):
        build(load_config("tiny", [*SMALL, "lora.rank=33", "lora.targets=q"]))


# ------------------------------------------------------------------------- populations of adapters
POP = ("model.dtype=float32", "data.seq_len=16",
       "train.batch_size=8", "train.steps=20", "train.log_every=1", "train.eval_batches=1", "optim.warmup=2",
       "checkpoint.every=0", "checkpoint.async_save=false", "lora.rank=4", "lora.targets=q,v")


def test_a_population_of_adapters_stores_the_base_once():
    parts = build(load_config("tiny", [*POP, *SMALL[:3], "population.kind=sweep", "population.size=2", "optim.lr=[1e-3,1e-2]",
                                       "mesh.members=2"]))
    shapes = parts.trainer.abstract_state().params
    alone = build(load_config("tiny", [*POP, *SMALL[:3]])).trainer.abstract_state().params
    for got, want in zip(jax.tree.leaves(shapes["base"]), jax.tree.leaves(alone["base"])):
        assert got.shape == want.shape, f"the base is stacked per member: {got.shape} vs {want.shape}"
    for got, want in zip(jax.tree.leaves(shapes["adapters"]), jax.tree.leaves(alone["adapters"])):
        assert got.shape == (2, *want.shape), f"adapters not stacked per member: {got.shape}"


@pytest.mark.slow
def test_each_member_of_a_sweep_of_adapters_equals_it_trained_alone(checkpoint, tmp_path):
    """20 steps of a sweep of 8 adapters (optim.lr x lora.alpha) on the imported checkpoint, on the
    members axis; each member's overrides from population.json train it alone (no members axis) to
    the same adapters, and the population's base is the checkpoint's, stored once."""
    corpus = (f"model.from={checkpoint[0]}", f"data.corpus={checkpoint[1]}")  # token ids: no samples at the end
    out = tmp_path / "sweep"
    summary = train(load_config("tiny", [*POP, *corpus, "population.kind=sweep", "population.size=8",
                                         "optim.lr=[1e-3,3e-3,1e-2,3e-2]", "lora.alpha=[8,32]", "mesh.members=8",
                                         "mesh.data=1", f"out_dir={out}"]), verbose=False)
    report = json.loads((out / "population.json").read_text())
    from shardml.run.run_dir import read_meta

    saved = read_meta(last_step_dir(str(out))).arrays
    assert not [n for n in saved if n.startswith("params/base")], "the population's checkpoint holds the base"
    stacked = host(summary.state.params)
    _, base = load_hf(checkpoint[0])
    for got, want in zip(jax.tree.leaves(stacked["base"]), jax.tree.leaves(host(base))):
        np.testing.assert_array_equal(got, want, err_msg="the population's base is not the checkpoint, once")
    for member, entry in enumerate(report["members"]):
        alone = train(load_config("tiny", [*POP, *corpus, *entry["overrides"], f"out_dir={tmp_path / str(member)}"]),
                      verbose=False)
        mine = host(alone.state.params)
        for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(mine["adapters"]),
                                     jax.tree.leaves(stacked["adapters"])):
            # 1e-5 absolute: the member computes on one device, its plain run on data=8 (another reduction
            # order), and 20 Adam steps carry the last-bit differences into the 6th decimal
            np.testing.assert_allclose(got, want[member], rtol=1e-5, atol=1e-5,
                                       err_msg=f"member {member} ({entry['overrides']}): {jax.tree_util.keystr(path)}")
        assert np.abs(mine["adapters"]["layers"]["wq"]["b"]).max() > 1e-3, "the adapters did not train"
