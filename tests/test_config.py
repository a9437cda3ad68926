"""Configuration: presets, overrides, and bad input that fails early with a clear message."""

import pytest

from shardml.config import ConfigError, load_config, validate


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


@pytest.mark.parametrize("overrides,message", [
    (["mesh.data=3"], r"multiply to 3 but 8 devices"),
    (["mesh.data=2", "mesh.tensor=3"], r"multiply to 6 but 8 devices"),
    (["mesh.data=-1", "mesh.tensor=3"], r"cannot fill 8 devices"),
    (["mesh.data=2", "mesh.tensor=4", "model.heads=2", "model.d_model=32"],
     r"model.heads=2 is not divisible by mesh.tensor=4"),
    (["mesh.data=2", "mesh.tensor=4", "model.d_ff=66"], r"model.d_ff=66 is not divisible by mesh.tensor=4"),
    (["mesh.data=1", "mesh.tensor=8", "model.heads=8", "model.vocab=260"],
     r"model.vocab=260 is not divisible by mesh.tensor=8"),
    (["mesh.data=8", "train.batch_size=12"], r"train.batch_size=12 is not divisible by .* = 8"),
    (["mesh.data=4", "mesh.fsdp=2", "train.batch_size=16", "train.microbatches=4"],
     r"4 x 2 x 4 = 32"),
    (["model.layers=0"], r"model.layers=0 must be positive"),
    (["model.grad_dtype=bf16"], r"model.grad_dtype='bf16' is not supported; use float32 or compute"),
    (["train.batch_size=-4"], r"train.batch_size=-4 must be positive"),
    (["mesh.data=0"], r"mesh.data=0 must be a positive size"),
    (["mesh.pipeline=4", "mesh.data=2", "model.layers=6"],
     r"model.layers=6 is not divisible by mesh.pipeline x pipeline.repeats = 4 x 1 = 4"),
    (["mesh.pipeline=2", "mesh.data=4", "pipeline.schedule=circular", "pipeline.repeats=4"],
     r"model.layers=4 is not divisible by .* = 2 x 4 = 8"),
    (["mesh.pipeline=2", "mesh.data=4", "pipeline.schedule=1f1b", "pipeline.repeats=2"],
     r"pipeline.repeats=2 needs pipeline.schedule=circular"),
    (["mesh.pipeline=2", "mesh.data=4", "pipeline.schedule=circular", "pipeline.repeats=2",
      "pipeline.microbatches=3"], r"pipeline.microbatches=3 is not a multiple of mesh.pipeline=2"),
    (["mesh.pipeline=2", "mesh.data=4", "pipeline.schedule=zb"], r"pipeline.schedule='zb' is not a schedule"),
    (["mesh.pipeline=2", "mesh.data=4", "pipeline.microbatches=8"],
     r"train.batch_size=16 is not divisible by .* x pipeline.microbatches = 4 x 1 x 1 x 8 = 32"),
    (["mesh.pipeline=2", "mesh.data=4", "model.kind=mlp"], r"model.kind='mlp' cannot be cut into stages"),
])
def test_bad_input_fails_with_named_values(overrides, message):
    cfg = load_config("tiny", overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, n_devices=8)


def test_good_layouts_validate():
    for overrides in (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], ["mesh.data=1", "mesh.fsdp=-1"], ["mesh.data=-1"],
                      ["mesh.pipeline=4", "pipeline.schedule=1f1b", "train.microbatches=2"],
                      ["mesh.pipeline=2", "pipeline.schedule=circular", "pipeline.repeats=2"]):
        sizes = validate(load_config("tiny", overrides), n_devices=8)
        assert sizes["pipeline"] * sizes["data"] * sizes["fsdp"] * sizes["tensor"] == 8, sizes
