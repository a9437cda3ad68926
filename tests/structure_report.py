"""Figures on shardml's structure, the ones the redesign (issue 25) reports before → after.

    python tests/structure_report.py

Uses the same walk as tests/test_layers.py (which asserts the rules; this only counts): modules,
functions, the longest function, imports inside functions, upward imports, cycles, where
``ConfigError`` is raised and where config keys appear in error messages, who compiles a step,
who touches checkpoint metadata, and the public names.
"""

from __future__ import annotations

import ast
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import test_layers as layers  # noqa: E402


def functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def imports_inside_functions(tree: ast.AST) -> int:
    return sum(isinstance(n, (ast.Import, ast.ImportFrom)) for f in functions(tree) for n in ast.walk(f))


def raises_of(tree: ast.AST, name: str) -> int:
    def raised(node):
        exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        return getattr(exc, "id", getattr(exc, "attr", None))
    return sum(isinstance(n, ast.Raise) and n.exc is not None and raised(n) == name for n in ast.walk(tree))


def keyed_messages(tree: ast.AST) -> int:
    return sum(bool(layers.CONFIG_KEY.search(text)) for _, text in layers.error_strings(tree))


def main() -> None:
    trees = {name: ast.parse(path.read_text()) for name, path in layers.MODULES.items()}
    fns = [(name, f) for name, tree in trees.items() for f in functions(tree)]
    longest = max(fns, key=lambda nf: layers.code_lines(nf[1]))
    upward = [(s, d) for s, ds in layers.GRAPH.items() for d in ds
              if layers.layer_of(s) in layers.LAYERS and layers.layer_of(d)
              and layers.layer_of(d) not in layers.LAYERS[layers.layer_of(s)]]
    config_raises = {n: raises_of(t, "ConfigError") for n, t in trees.items() if raises_of(t, "ConfigError")}
    keyed = {n: keyed_messages(t) for n, t in trees.items() if keyed_messages(t)}
    jit_sites = {n: src.count("jax.jit(") for n, p in layers.MODULES.items()
                 if (src := p.read_text()).count("jax.jit(") and "step" in src}
    meta = [n for n, p in layers.MODULES.items() if "JsonSave(" in p.read_text() or "JsonRestore(" in p.read_text()]
    import shardml

    print(f"modules {len(trees)}, functions {len(fns)}")
    print(f"longest function: {longest[0]}.{longest[1].name}, {layers.code_lines(longest[1])} lines of code")
    print(f"imports inside functions: {sum(imports_inside_functions(t) for t in trees.values())}")
    print(f"upward imports: {len(upward)} {upward or ''}")
    print(f"raise ConfigError: {sum(config_raises.values())} in {len(config_raises)} modules {sorted(config_raises)}")
    print(f"error messages naming config keys: {sum(keyed.values())} in {sorted(keyed)}")
    print(f"modules calling jax.jit on a step: {jit_sites}")
    print(f"modules saving/restoring checkpoint metadata items: {meta}")
    print(f"public names: {len(shardml.__all__)}")


if __name__ == "__main__":
    main()
