"""One public face: benchmarks, notebooks, the docs and the README use only public names.

Public: the ``shardml`` facade and the documented public submodules (``PUBLIC``), each through
its ``__all__``. Everything else (``shardml.core``, ``shardml.models``, ``shardml.parallel``,
``shardml.run`` and the modules under ``shardml.analysis`` and ``shardml.testing``) is internal and
may change without notice.
"""

import ast
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PUBLIC = ("shardml", "shardml.analysis", "shardml.testing", "shardml.flower")
FENCE = re.compile(r"```python\n(.*?)```", re.S)


def sources() -> dict[str, str]:
    """Python text by file: benchmarks and notebooks whole, the Python blocks of the docs and README."""
    found = {str(p.relative_to(ROOT)): p.read_text() for folder in ("benchmarks", "colab")
             for p in sorted((ROOT / folder).glob("*.py")) if p.name != "sync.py"}
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        blocks = FENCE.findall(page.read_text())
        if blocks:
            found[str(page.relative_to(ROOT))] = "\n".join(blocks)
    return found


def used_names(text: str) -> set[tuple[str, str]]:
    """(module, name) for every ``from shardml... import name``, ``import shardml.x`` and
    ``shardml.name`` attribute read."""
    used, aliases = set(), {}
    tree = ast.parse(text)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "shardml":
            used |= {(node.module, alias.name) for alias in node.names}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "shardml":
                    parent, _, child = alias.name.rpartition(".")
                    if parent:
                        used.add((parent, child))
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else "shardml"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            used.add((aliases[node.value.id], node.attr))
    return used


@pytest.mark.parametrize("where", sorted(sources()))
def test_only_public_names(where):
    bad = []
    for module, name in sorted(used_names(sources()[where])):
        if module not in PUBLIC:
            bad.append(f"{module}.{name} (internal module {module})")
        elif name not in getattr(importlib.import_module(module), "__all__", ()) and name != "__version__":
            if f"{module}.{name}" not in PUBLIC:
                bad.append(f"{module}.{name} (not in {module}.__all__)")
    assert not bad, f"{where} uses internal names: {bad}"


@pytest.mark.parametrize("module", PUBLIC)
def test_public_names_exist_and_are_documented(module):
    mod = importlib.import_module(module)
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    undocumented = [name for name in mod.__all__ if callable(getattr(mod, name, None))
                    and not (getattr(mod, name).__doc__ or "").strip()]
    assert not missing and not undocumented, (missing, undocumented)
