"""Sweeps of LoRA adapters over ``lora.alpha`` and ``lora.dropout`` (issue 27): the settings are
held per member (``lora(..., per_member=...)``), so one compiled step serves every value.

Independent references: each member against a plain LoRA model built with that member's alpha and
dropout as Python constants (the path every plain run takes) and trained alone from the member's
seed; its dropout keys are the plain run's (both draw them from the member's seed, step and row).
"""

import json

import jax
import numpy as np
import optax
import pytest

import shardml
from shardml.core.mesh import make_mesh
from shardml.models.lora import lora, lora_optimizer, merge_lora, merged_params, save_peft
from shardml.run.cli import main
from shardml.run.config import load_config
from shardml.run.recipe import build
from shardml.run.search import member_overrides
from shardml.run.train import train

TINY = shardml.TransformerConfig(vocab=64, layers=1, d_model=32, heads=4, kv_heads=2, d_ff=64, dtype="float32")
TOKENS = np.random.default_rng(1).integers(0, 64, (8, 9))
BATCH = {"inputs": TOKENS[:, :-1], "targets": TOKENS[:, 1:]}
ALPHAS, DROPOUTS = [8.0, 32.0], [0.0, 0.25]  # member 0 drops nothing: the same as a plain run without keys


@pytest.fixture(scope="module")
def base():
    model = shardml.transformer(TINY, 8)
    return model, jax.device_get(model.init(jax.random.key(9)))


def test_each_member_of_an_alpha_and_dropout_sweep_equals_its_plain_lora_model(base):
    """2 steps of SGD (scale-sensitive) of 2 members, alpha 8 / 32 and dropout 0 / 0.25, against each
    plain model (static alpha and dropout, own compile) from the member's seed: adapters within 1e-5."""
    model, params = base
    swept = lora(model, params, rank=4, targets=("q", "v"), per_member=("lora_alpha", "lora_dropout"))
    pop = shardml.build_population(swept, make_mesh({"members": 2, "data": 4}), lora_optimizer(optax.sgd(1.0), swept),
                                   2, hyperparams={"lora_alpha": ALPHAS, "lora_dropout": DROPOUTS})
    state = pop.init(seed=5)
    for _ in range(2):
        state, _ = pop.step(state, pop.put(BATCH))
    np.testing.assert_array_equal(np.asarray(state.params["settings"]["lora_alpha"]), ALPHAS, "settings trained")
    ends = []
    for i in range(2):
        plain = lora(model, params, rank=4, alpha=ALPHAS[i], dropout=DROPOUTS[i], targets=("q", "v"))
        alone = shardml.build_trainer(plain, make_mesh({"data": 8}), lora_optimizer(optax.sgd(1.0)))
        one = alone.init(seed=5 + i)
        for _ in range(2):
            one, _ = alone.step(one, alone.put(BATCH))
        for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(one.params["adapters"]),
                                     jax.tree.leaves(state.params["adapters"])):
            np.testing.assert_allclose(np.asarray(want)[i], np.asarray(got), rtol=1e-5, atol=1e-6,
                                       err_msg=f"member {i} (alpha {ALPHAS[i]}, dropout {DROPOUTS[i]}): "
                                               f"{jax.tree_util.keystr(path)}")
        ends.append(np.asarray(one.params["adapters"]["layers"]["wq"]["b"]))
    assert np.abs(ends[1]).max() > 1e-3, "the adapters did not train"


def test_exports_use_the_model_s_own_alpha(base):
    """merge_lora, merged_params and save_peft of a per-member model read its alpha from its
    parameters: the same as a plain model built with that alpha."""
    model, params = base
    swept = lora(model, params, rank=4, alpha=16, targets=("q", "v"), per_member=("lora_alpha", "lora_dropout"))
    plain = lora(model, params, rank=4, alpha=32, dropout=0.1, targets=("q", "v"))
    mine = jax.device_get(plain.init(jax.random.key(0)))
    mine["adapters"] = jax.tree.map(lambda x: x + 0.1, mine["adapters"])  # b non-zero: a delta to merge
    own = {**mine, "settings": {"lora_alpha": np.float32(32), "lora_dropout": np.float32(0.1)}}
    for got, want in zip(jax.tree.leaves(merge_lora(swept, own)[1]), jax.tree.leaves(merge_lora(plain, mine)[1])):
        np.testing.assert_array_equal(got, want, "merge_lora ignored the model's own alpha")
    for got, want in zip(jax.tree.leaves(merged_params(swept, own)), jax.tree.leaves(merged_params(plain, mine))):
        np.testing.assert_array_equal(got, want, "merged_params ignored the model's own alpha")


def test_peft_config_records_the_own_alpha_and_dropout(base, tmp_path):
    model, params = base
    swept = lora(model, params, rank=4, alpha=16, targets=("q", "v"), per_member=("lora_alpha", "lora_dropout"))
    own = {**jax.device_get(swept.init(jax.random.key(0))),
           "settings": {"lora_alpha": np.float32(32), "lora_dropout": np.float32(0.25)}}
    save_peft(swept, own, str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["lora_alpha"], config["lora_dropout"]) == (32.0, 0.25), config


SMALL = ("model.layers=1", "model.d_model=32", "model.d_ff=64", "data.seq_len=16", "train.batch_size=8",
         "lora.rank=4", "population.kind=sweep")


def test_a_member_s_overrides_give_its_own_alpha_and_dropout(no_compile):
    parts = build(load_config("tiny", [*SMALL, "population.size=4", "lora.alpha=[8,32]", "lora.dropout=[0,0.25]"]))
    got = [[o for o in member_overrides(m, parts.sizes) if o.startswith("lora.")] for m in parts.members]
    assert got == [["lora.alpha=8.0", "lora.dropout=0.0"], ["lora.alpha=8.0", "lora.dropout=0.25"],
                   ["lora.alpha=32.0", "lora.dropout=0.0"], ["lora.alpha=32.0", "lora.dropout=0.25"]], got
    assert parts.model.config.per_member == ("lora_alpha", "lora_dropout") and parts.model.uses_rng


BAD = [
    ("lora.alpha=[8,0]", "lora.alpha=0.0 must be > 0"),
    ("lora.alpha=uniform(-1,8)", "lora.alpha=-1.0 must be > 0"),
    ("lora.dropout=[0.1,1.0]", "lora.dropout=1.0 must be < 1.0"),
    ("lora.rank=[4,8]", "members can differ by"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[b[0] for b in BAD])
def test_bad_swept_lora_values_exit_2_before_compiling(override, message, no_compile, tmp_path, capsys):
    code = main(["train", "tiny", *SMALL, "population.size=2", override, f"out_dir={tmp_path}", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


@pytest.mark.slow
def test_each_member_of_a_cli_sweep_equals_its_plain_run(tmp_path):
    """`population.kind=sweep 'lora.alpha=[8,32]' 'lora.dropout=uniform(0.1,0.3)'`: each member's
    overrides from population.json train it alone (static alpha and dropout, no members axis) to the
    same adapters."""
    common = [*SMALL, "model.dtype=float32", "train.steps=3", "train.eval_batches=1", "optim.warmup=1",
              "checkpoint.every=0", "checkpoint.async_save=false", "optim.lr=3e-2"]
    out = tmp_path / "sweep"
    summary = train(load_config("tiny", [*common, "population.size=2", "mesh.members=2", "lora.alpha=[8,32]",
                                         "lora.dropout=uniform(0.1,0.3)", f"out_dir={out}"]), verbose=False)
    report = json.loads((out / "population.json").read_text())
    stacked = jax.device_get(summary.state.params)
    for member, entry in enumerate(report["members"]):
        assert entry["hyperparams"]["lora_alpha"] == [8.0, 32.0][member], entry["hyperparams"]
        alone = train(load_config("tiny", [*common, *entry["overrides"], f"out_dir={tmp_path / str(member)}"]),
                      verbose=False)
        assert "settings" not in alone.state.params, "the plain run must take the plain path"
        for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(alone.state.params["adapters"])),
                                     jax.tree.leaves(stacked["adapters"])):
            np.testing.assert_allclose(got, want[member], rtol=1e-5, atol=1e-6,
                                       err_msg=f"member {member} ({entry['overrides']}): {jax.tree_util.keystr(path)}")
