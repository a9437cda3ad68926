"""Configuration: presets, overrides, and bad input that fails early (before any compile) with a
message naming the value and the fix."""

import dataclasses

import pytest

import shardml
from shardml.core.errors import LayoutError, SettingError, ShardmlError
from shardml.run.config import Config, all_keys, flat_dict, load_config, to_dict, validate
from shardml.run.errors import ConfigError, keyed, subject_keys
from shardml.run.recipe import build


def test_presets_load_and_overrides_apply():
    cfg = load_config("tiny", ["mesh.tensor=2", "train.steps=7", "optim.lr=1e-3", "model.dtype=float32"])
    assert (cfg.mesh.tensor, cfg.train.steps, cfg.optim.lr, cfg.model.dtype) == (2, 7, 1e-3, "float32")
    assert load_config("default").model.layers >= 2


def test_unknown_key_names_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.setps'.*train\.steps"):
        load_config("tiny", ["train.setps=3"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"'train.steps' expects int, got str 'many'"):
        load_config("tiny", ["train.steps=many"])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="no preset named 'tinny'.*did you mean tiny"):
        load_config("tinny")


def test_yaml_that_does_not_parse_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  steps: 10\n  batch_size: [32\nmodel: {layers: 2}\n")
    with pytest.raises(ConfigError, match=r"broken.yaml is not valid YAML at line \d+, column \d+"):
        load_config(str(path))
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match=r"must hold a mapping of sections"):
        load_config(str(path))


# Layouts decided by the config alone: checked by validate().
@pytest.mark.parametrize("overrides,message", [
    (["mesh.data=3"], r"multiply to 3 but 8 devices"),
    (["mesh.data=2", "mesh.tensor=3"], r"multiply to 6 but 8 devices"),
    (["mesh.data=-1", "mesh.tensor=3"], r"cannot fill 8 devices"),
    (["mesh.data=0"], r"mesh.data=0 must be a positive size"),
    (["model.layers=0"], r"model.layers=0 must be >= 1"),
    (["model.grad_dtype=bf16"], r"model.grad_dtype='bf16' is not one of compute, float32"),
    (["model.remat=some"], r"model.remat='some' is not one of auto, none, full, dots"),
    (["train.batch_size=-4"], r"train.batch_size=-4 must be >= 1"),
    (["optim.lr=-1"], r"optim.lr=-1.0 must be > 0.0; the peak learning rate is a positive number"),
    (["optim.b2=1.5"], r"optim.b2=1.5 must be < 1.0"),
    (["optim.min_lr_ratio=2"], r"optim.min_lr_ratio=2.0 must be <= 1.0"),
    (["checkpoint.keep=0"], r"checkpoint.keep=0 must be >= 1"),
    (["checkpoint.every=-1"], r"checkpoint.every=-1 must be >= 0"),
    (["train.max_bad_steps=0"], r"train.max_bad_steps=0 must be >= 1"),
    (["train.resume="], r"train.resume is empty"),
    (["out_dir="], r"out_dir is empty"),
    (["data.val_fraction=0.7"], r"data.val_fraction=0.7 must be < 0.5"),
    (["mesh.pipeline=2", "mesh.data=4", "pipeline.schedule=1f1b", "pipeline.repeats=2"],
     r"pipeline.repeats=2 needs pipeline.schedule=circular"),
    (["mesh.pipeline=2", "mesh.data=4", "pipeline.schedule=zb"], r"pipeline.schedule='zb' is not one of"),
    (["mesh.pipeline=2", "mesh.data=4", "model.kind=mlp", "data.corpus=digits"],
     r"model.kind=mlp has no layers to cut into stages"),
])
def test_bad_config_fails_with_named_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config("tiny", overrides), n_devices=8)


# Layouts that depend on the model's shapes: checked when the trainer is built, before compiling.
@pytest.mark.parametrize("overrides,message", [
    (["mesh.data=2", "mesh.tensor=4", "model.heads=2", "model.d_model=32"],
     r"parameter 'layers/wk' has size 2 along 'kv_heads' .* mesh.tensor=4 does not divide"),
    (["mesh.data=2", "mesh.tensor=4", "model.d_ff=66"],
     r"parameter 'layers/w_down' has size 66 along 'mlp' .* mesh.tensor=4 does not divide"),
    (["mesh.data=1", "mesh.tensor=8", "model.heads=8", "model.vocab=260"],
     r"parameter 'embed' has size 260 along 'vocab'"),
    (["mesh.data=1", "mesh.fsdp=8", "model.d_model=36", "model.heads=3"], r"size 36 along 'embed'"),
    (["mesh.data=8", "train.batch_size=12"], r"train.batch_size=12 is not divisible by mesh.data=8 x "
                                             r"train.microbatches=1 = 8; use a batch size that is a multiple of 8"),
    (["mesh.data=4", "mesh.fsdp=2", "train.batch_size=16", "train.microbatches=4"],
     r"mesh.data=4 x mesh.fsdp=2 x train.microbatches=4 = 32"),
    (["mesh.pipeline=4", "mesh.data=2", "model.layers=6"],
     r"model.layers=6 is not divisible by mesh.pipeline x pipeline.repeats = 4 x 1 = 4"),
    (["mesh.pipeline=2", "mesh.data=4", "pipeline.schedule=circular", "pipeline.repeats=4"],
     r"model.layers=4 is not divisible by .* = 2 x 4 = 8"),
    (["mesh.pipeline=2", "mesh.data=4", "pipeline.schedule=circular", "pipeline.repeats=2",
      "pipeline.microbatches=3"], r"pipeline.microbatches=3 is not a multiple of mesh.pipeline=2"),
    (["mesh.pipeline=2", "mesh.data=4", "pipeline.microbatches=8"],
     r"train.batch_size=16 is not divisible by mesh.data=4 x train.microbatches=1 x pipeline.microbatches=8 "
     r"= 32"),
    (["model.heads=3"], r"model.d_model=32 is not divisible by model.heads=3"),
    (["data.corpus=digits"], r"data.corpus=digits holds labelled examples, not text; use model.kind=mlp"),
    (["model.kind=mlp"], r"model.kind=mlp trains on array data; data.corpus='pydoc' is not one of digits"),
    (["data.corpus=/no/such/file.txt"], r"data.corpus='/no/such/file.txt' is neither an embedded corpus"),
])
def test_layouts_the_model_cannot_take_fail_before_compiling(overrides, message, no_compile):
    with pytest.raises(ConfigError, match=message):
        build(load_config("tiny", overrides))


def test_every_numeric_key_has_a_checked_range():
    """A negative value of every int/float key (but the mesh sizes, where -1 means fill) is refused."""
    cfg = Config()
    unchecked = []
    for key in all_keys():
        section, _, name = key.partition(".")
        if not name or section == "mesh":
            continue
        value = flat_dict(to_dict(cfg)).get(key)  # a dict-valued key (population.search) has none
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        try:
            validate(load_config(None, [f"{key}={-10 * abs(value) - 1}"]), n_devices=8)
        except ConfigError as err:
            assert key in str(err), f"{key}: the error does not name the key: {err}"
            continue
        unchecked.append(key)
    assert not unchecked, f"negative values accepted for {unchecked}"


def test_good_layouts_validate():
    for overrides in (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], ["mesh.data=1", "mesh.fsdp=-1"], ["mesh.data=-1"],
                      ["mesh.pipeline=4", "pipeline.schedule=1f1b", "train.microbatches=2"],
                      ["mesh.pipeline=2", "pipeline.schedule=circular", "pipeline.repeats=2"]):
        sizes = validate(load_config("tiny", overrides), n_devices=8)
        assert sizes["pipeline"] * sizes["data"] * sizes["fsdp"] * sizes["tensor"] == 8, sizes


def test_config_sections_are_the_parts_own_settings():
    """One source per fact: the run config nests the core's and the transformer's typed settings."""
    from shardml.core.mesh import MeshConfig
    from shardml.core.optim import OptimConfig
    from shardml.models.transformer import TransformerConfig

    cfg = Config()
    assert isinstance(cfg.mesh, MeshConfig) and isinstance(cfg.optim, OptimConfig)
    assert isinstance(cfg.model, TransformerConfig)
    assert {f.name for f in dataclasses.fields(TransformerConfig)} < {f.name for f in dataclasses.fields(cfg.model)}


def test_library_errors_are_reworded_in_config_keys_by_the_run_layer():
    """Below run/, errors name arguments; keyed() names the keys and keeps the error's kind."""
    with pytest.raises(LayoutError, match=r"^d_ff=65 is not divisible by tensor=2") as plain:
        raise LayoutError("d_ff=65 is not divisible by tensor=2", subject="d_ff", value=65)
    assert not isinstance(plain.value, ConfigError)
    with pytest.raises(ConfigError, match=r"^model.d_ff=65 is not divisible by mesh.tensor=2$") as keyed_err:
        with keyed():
            raise plain.value
    assert isinstance(keyed_err.value, LayoutError) and isinstance(keyed_err.value, ShardmlError)
    assert (keyed_err.value.subject, keyed_err.value.value) == ("model.d_ff", 65)
    assert shardml.ConfigError is ConfigError and issubclass(ConfigError, shardml.ShardmlError)


def test_keyed_tells_apart_fields_of_one_name_by_the_configs_values():
    cfg = load_config("tiny", ["pipeline.microbatches=3", "train.microbatches=2"])
    for value, key in ((3, "pipeline.microbatches"), (2, "train.microbatches")):
        with pytest.raises(ConfigError, match=rf"^{key}={value} is odd$"):
            with keyed(cfg):
                raise SettingError(f"microbatches={value} is odd", subject="microbatches", value=value)
    with pytest.raises(ConfigError, match=r"^x: pipeline.microbatches=3 and train.microbatches=2$"):
        with keyed(cfg):
            raise LayoutError("x: microbatches=3 and microbatches=2")
    with pytest.raises(ConfigError, match=r"^data.vocab=200: .*\(e.g. data.vocab=1024\)"):
        with keyed(cfg, {"vocab": "data.vocab"}):
            raise SettingError("vocab=200: give more than 256 (e.g. vocab=1024)", subject="vocab", value=200)
    # Products of names and code in a message: names become keys, keyword arguments stay.
    with pytest.raises(ConfigError, match=r"mesh.data x train.microbatches = 8 x 2 = 16; .*replace\(heads='tensor'\)"):
        with keyed(cfg):
            raise LayoutError("batch_size=12 is not divisible by data x microbatches = 8 x 2 = 16; "
                              "or rules.replace(heads='tensor')", subject="batch_size", value=12)
    assert subject_keys()["stages"] == ("mesh.pipeline",) and subject_keys()["kind"][0] == "model.kind"
