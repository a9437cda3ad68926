"""The layers stay layers: the core and the models import nothing of the run harness or the analysis
tools, and the analysis tools and the testing kit nothing of the run harness; only the run harness
words errors in config keys; the example configs load and validate."""

import ast
import pathlib
import re

import pytest

from shardml.run.config import load_config, validate

ROOT = pathlib.Path(__file__).resolve().parent.parent
FORBIDDEN = {"core": ("shardml.run", "shardml.analysis"), "models": ("shardml.run", "shardml.analysis"),
             "analysis": ("shardml.run",), "testing": ("shardml.run",)}


def imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_do_not_import_higher_ones(layer):
    offenders = [f"{path.relative_to(ROOT)} imports {name}" for path in sorted((ROOT / "shardml" / layer).glob("*.py"))
                 for name in imports(path) if name.startswith(FORBIDDEN[layer])]
    assert not offenders, offenders


# A config key as an error message would write it: a section, a field, then "=" (model.d_ff=65).
SECTIONS = ("model", "data", "train", "mesh", "optim", "population", "federated", "checkpoint", "pipeline", "lora")
CONFIG_KEY = re.compile(rf"\b(?:{'|'.join(SECTIONS)})\.[a-z_]+\s*=")
BELOW_RUN = ("core", "models", "parallel", "analysis", "testing")


def error_strings(tree: ast.AST):
    """(line, text) of every string constant in a ``raise`` or in a call of a name ending in ``Error``
    (an error built first and raised later), f-string pieces included."""
    seen = set()
    for node in ast.walk(tree):
        called = getattr(getattr(node, "func", None), "id", None) or getattr(getattr(node, "func", None), "attr", "")
        if isinstance(node, ast.Raise) or isinstance(node, ast.Call) and called.endswith("Error"):
            for part in ast.walk(node):
                if isinstance(part, ast.Constant) and isinstance(part.value, str) and id(part) not in seen:
                    seen.add(id(part))
                    yield part.lineno, part.value


@pytest.mark.parametrize("layer", BELOW_RUN)
def test_only_the_run_layer_words_errors_in_config_keys(layer):
    """Below shardml/run/, errors name the argument (``d_ff=65``); the run layer rewords them."""
    offenders = [f"{path.relative_to(ROOT)}:{line}: {text!r}"
                 for path in sorted((ROOT / "shardml" / layer).rglob("*.py"))
                 for line, text in error_strings(ast.parse(path.read_text())) if CONFIG_KEY.search(text)]
    assert not offenders, "config keys in error messages below the run layer:\n" + "\n".join(offenders)


def test_the_config_key_check_sees_f_strings_and_errors_built_before_raising():
    code = ('raise LayoutError(f"model.d_ff={d} is not divisible")\n'
            'err = SettingError("use train.microbatches=2")\nraise ValueError("d_ff=65 is fine")\n')
    found = [text for _, text in error_strings(ast.parse(code)) if CONFIG_KEY.search(text)]
    assert found == ["model.d_ff=", "use train.microbatches=2"], found


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load_and_validate(path):
    validate(load_config(str(path)), n_devices=8)
