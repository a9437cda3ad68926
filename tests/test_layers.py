"""The layers stay layers: the core and the models import nothing of the run harness or the analysis
tools, and the analysis tools and the testing kit nothing of the run harness; the example configs
load and validate."""

import ast
import pathlib

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


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load_and_validate(path):
    validate(load_config(str(path)), n_devices=8)
