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


# ----------------------------------------------------------------------------- the import graph
# Layers from the top down; a module may import its own layer and the layers listed after it.
# Imports inside functions count: a deferred import is still a dependency.
LAYERS = {"run": ("run", "parallel", "models", "core", "analysis", "testing"),
          "testing": ("testing", "parallel", "models", "core", "analysis"),
          "analysis": ("analysis", "parallel", "models", "core"),
          "parallel": ("parallel", "models", "core"),
          "models": ("models", "core"),
          "core": ("core",)}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def shardml_imports(path: pathlib.Path) -> set[str]:
    """Every shardml module ``path`` imports, at module level or inside functions; ``from shardml.x
    import y`` counts as ``shardml.x.y`` when that is a module."""
    found = set()
    for name in imports(path):
        if name.startswith("shardml"):
            found.add(name)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("shardml"):
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:
                    found.add(f"{node.module}.{alias.name}")
    return {name for name in found if name in MODULES}


MODULES = {module_name(p): p for p in sorted((ROOT / "shardml").rglob("*.py"))}
GRAPH = {name: shardml_imports(path) - {name} for name, path in MODULES.items()}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def test_no_module_imports_a_higher_layer_even_inside_functions():
    offenders = [f"{src} imports {dst}" for src, dsts in GRAPH.items() for dst in sorted(dsts)
                 if layer_of(src) in LAYERS and layer_of(dst) and layer_of(dst) not in LAYERS[layer_of(src)]]
    assert not offenders, offenders


def test_no_import_cycles_even_through_imports_inside_functions():
    # A package's __init__ re-exporting its modules is not a cycle of modules: leave the facades out.
    graph = {m: {d for d in ds if MODULES[d].name != "__init__.py"} for m, ds in GRAPH.items()
             if MODULES[m].name != "__init__.py"}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def code_lines(node: ast.FunctionDef) -> int:
    """A function's lines from its ``def`` to its end, less its docstring (the user's documentation
    of a public function may run long; its code may not)."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def test_no_function_over_50_lines():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({code_lines(node)} lines)"
            for path in MODULES.values() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and code_lines(node) > 50]
    assert not long, long
