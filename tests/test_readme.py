"""The README's Python examples run as written (with fewer steps, or a checkpoint made here)."""

import pathlib
import re

import numpy as np


def test_readme_api_example_trains():
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"## Python API\n\n```python\n(.*?)```", text, re.S).group(1)
    code = code.replace("range(100)", "range(3)")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert int(scope["state"].step) == 3
    assert np.isfinite(float(scope["metrics"]["loss"]))


def test_readme_orbax_flax_snippet_loads_checkpoint_params(tmp_path):
    import jax

    import shardml
    from shardml.config import ModelConfig, OptimConfig

    model = shardml.transformer(ModelConfig(layers=2, d_model=32, heads=4, d_ff=64, dtype="float32"), 16)
    trainer = shardml.build_trainer(model, shardml.make_mesh({"data": 8}),
                                    shardml.default_optimizer(OptimConfig(), 10))
    state = trainer.init(seed=1)
    checkpointer = shardml.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    checkpointer.save(10, state, meta={})
    checkpointer.close()

    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"load with plain Orbax and Flax.*?```python\n(.*?)```", text, re.DOTALL).group(1)
    assert '"runs/tiny/checkpoints/10/params"' in code
    code = code.replace('"runs/tiny/checkpoints/10/params"', repr(str(tmp_path / "checkpoints" / "10" / "params")))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    saved = {"/".join(str(k.key) for k in path): leaf
             for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    assert scope["flat"].keys() == saved.keys()
    for name, leaf in saved.items():
        assert isinstance(scope["flat"][name], np.ndarray), type(scope["flat"][name])
        np.testing.assert_array_equal(scope["flat"][name], np.asarray(leaf), err_msg=f"README snippet: {name}")
