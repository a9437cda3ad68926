"""The README's Python blocks run as written (shorter loops, files in a temporary directory)."""

import pathlib
import re

import numpy as np
import pytest

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()


def block(after: str) -> str:
    """The first ```python block after the text ``after``."""
    return re.search(re.escape(after) + r".*?```python\n(.*?)```", README, re.S).group(1)


def run(code: str) -> dict:
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    return scope


def test_readme_flax_nnx_example_trains_on_digits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # out_dir="runs/digits" lands here
    scope = run(block("## Your own Flax model"))
    summary = scope["summary"]
    assert summary.val["accuracy"] >= 0.9, summary.val
    assert (tmp_path / "runs" / "digits" / "checkpoints" / "300").is_dir()


@pytest.mark.slow
def test_readme_population_example_trains_an_ensemble_and_a_sweep():
    code = block("From Python, a population of your own Flax model")
    assert code.count("steps=200") == 3
    scope = run(code.replace("steps=200", "steps=20"))
    sweep = scope["sweep"]
    assert len(sweep.val["loss"]) == 4 and scope["run"].state.params["hidden"]["kernel"].shape[0] == 8


@pytest.mark.slow
def test_readme_api_example_trains():
    code = block("## Python API")
    assert "range(100)" in code
    scope = run(code.replace("range(100)", "range(3)"))
    assert int(scope["state"].step) == 3
    assert np.isfinite(float(scope["metrics"]["loss"]))


@pytest.mark.slow
def test_readme_orbax_flax_snippet_loads_checkpoint_params(tmp_path, tiny_model):
    import jax

    from conftest import trainer_for
    from shardml.run.checkpoint import Checkpointer

    trainer = trainer_for(tiny_model, {"data": 8})
    state = trainer.init(seed=1)
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    checkpointer.save(10, state, meta={})
    checkpointer.close()

    code = block("load with plain Orbax and Flax")
    assert '"runs/tiny/checkpoints/10/params"' in code
    scope = run(code.replace('"runs/tiny/checkpoints/10/params"', repr(str(tmp_path / "checkpoints" / "10" / "params"))))
    saved = {"/".join(str(k.key) for k in path): leaf
             for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    assert scope["flat"].keys() == saved.keys()
    for name, leaf in saved.items():
        assert isinstance(scope["flat"][name], np.ndarray), type(scope["flat"][name])
        np.testing.assert_array_equal(scope["flat"][name], np.asarray(leaf), err_msg=f"README snippet: {name}")


def test_every_shardml_train_command_in_the_readme_is_a_valid_config(tmp_path, monkeypatch):
    """Parsed and validated as the command line does (nothing trained)."""
    import shlex

    from shardml.run.cli import _arguments
    from shardml.run.config import load_config, validate

    monkeypatch.chdir(pathlib.Path(__file__).parent.parent)  # configs/digits.yaml is relative to the repository
    commands = [line.strip() for line in re.findall(r"```bash\n(.*?)```", README, re.S) for line in line.splitlines()
                if line.strip().startswith("shardml train ") and "[" not in line.split("train", 1)[1][:3]]
    assert len(commands) >= 10, commands
    for command in commands:
        args = [a for a in shlex.split(command.split("#")[0])[1:] if a not in ("\\",)]
        parsed, preset, overrides = _arguments(args)
        validate(load_config(preset, overrides), n_devices=8)
