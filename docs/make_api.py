"""Writes ``docs/api.md``: the reference of shardml's public API, every name of ``shardml.__all__``
with its signature and docstring, grouped by the module that defines it, then the public
submodules (``PUBLIC_MODULES``), each through its ``__all__``.

    python docs/make_api.py           # rewrite docs/api.md
    python docs/make_api.py --check   # change nothing; exit 1 if docs/api.md is out of date

``tests/test_docs.py`` runs the check, so a changed signature or docstring, or a name added to
an ``__all__``, fails the tests until the reference is written again. Nothing else is documented
here: the other modules are internal.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import pathlib
import re
import sys

DOCS = pathlib.Path(__file__).resolve().parent
OUT = DOCS / "api.md"
# Sections in the order of the layers, top-down as a user meets them.
SECTIONS = (
    ("shardml.run", "Runs: configs, the training loop, checkpoints"),
    ("shardml.models", "Models"),
    ("shardml.core", "The sharded core: meshes, rules, data, the train step"),
    ("shardml.parallel", "Parallel learning: populations, federated learning, inference"),
    ("shardml.analysis", "Analysis: plans and the HLO audit"),
)
# The public submodules, after the facade: (module, title).
PUBLIC_MODULES = (
    ("shardml.analysis", "`shardml.analysis`: the audit, FLOPs, plans and theory"),
    ("shardml.testing", "`shardml.testing`: sharding tests for your own CI"),
    ("shardml.flower", "`shardml.flower`: federated clients on Flower"),
)
SECTION_HEADERS = ("Args", "Arguments", "Returns", "Raises", "Attributes", "Example", "Examples", "Yields", "Note")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _default(value) -> str:
    if inspect.isfunction(value) or inspect.isclass(value) or inspect.isbuiltin(value):
        return value.__name__
    return _ADDRESS.sub("", repr(value))


def _annotation(annotation) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    return re.sub(r"ForwardRef\('([^']*)'\)", r"\1", text)


def signature(obj, name: str, method: bool = False) -> str:
    """``name(arg: type = default, *, ...) -> type``, one parameter per line when long."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    parts, star_done = [], False
    params = [p for p in sig.parameters.values() if not (method and p.name in ("self", "cls"))]
    for i, p in enumerate(params):
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
        star_done = star_done or p.kind in (p.KEYWORD_ONLY, p.VAR_POSITIONAL)
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if _annotation(p.annotation):
            text += f": {_annotation(p.annotation)}"
        if p.default is not inspect.Parameter.empty:
            text += f" = {_default(p.default)}" if _annotation(p.annotation) else f"={_default(p.default)}"
        parts.append(text)
        if p.kind is p.POSITIONAL_ONLY and (i + 1 == len(params) or params[i + 1].kind is not p.POSITIONAL_ONLY):
            parts.append("/")
    returns = _annotation(sig.return_annotation)
    tail = f" -> {returns}" if returns else ""
    one_line = f"{name}({', '.join(parts)}){tail}"
    if len(one_line) <= 100:
        return one_line
    return f"{name}(\n" + "".join(f"    {part},\n" for part in parts) + f"){tail}"


def markdown(doc: str) -> str:
    """A Google-style docstring as Markdown: inline roles as code, ``Args:``-style sections as bold
    headings with bullet lists, examples as indented code."""
    doc = re.sub(r":(?:class|func|meth|mod|attr|data|obj|exc):`~?([^`]+)`", r"`\1`", doc)
    doc = re.sub(r"``([^`]+)``", r"`\1`", doc)
    out: list[str] = []
    lines = doc.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        header = line.strip().rstrip(":")
        if line.strip().endswith(":") and header in SECTION_HEADERS and not line.startswith(" "):
            out += ["", f"**{header}:**", ""]
            i += 1
            first = next((l for l in lines[i:] if l.strip()), "")
            base = len(first) - len(first.lstrip())
            body = []
            while i < len(lines) and (lines[i].strip() if base == 0 else
                                      not lines[i].strip() or lines[i].startswith(" " * base)):
                body.append(lines[i][base:] if lines[i].strip() else "")
                i += 1
            while body and not body[-1].strip():
                body.pop()
            if header.startswith("Example"):
                out += ["    " + b if b.strip() else "" for b in body]
            else:
                for b in body:
                    if not b.strip():
                        continue
                    if b.startswith(" "):  # continuation of the previous entry
                        out[-1] += " " + b.strip()
                    else:
                        entry = re.match(r"([\w*, ]+?)(?: \([^)]*\))?: (.*)", b)
                        out.append(f"- `{entry.group(1)}`: {entry.group(2)}" if entry else f"- {b}")
            out.append("")
            continue
        out.append(line[:-2] + ":" if line.endswith("::") else line)
        i += 1
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _own_members(cls) -> list[tuple[str, object]]:
    """Public methods and properties that ``cls`` itself defines (dataclass fields excluded)."""
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    fields |= set(getattr(cls, "_fields", ()))
    members = []
    for name, value in vars(cls).items():
        if name.startswith("_") or name in fields:
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property) or hasattr(value, "func"):
            members.append((name, value))
    return members


def entry(name: str, obj, module: str = "shardml") -> str:
    """The reference entry of one public name of ``module``."""
    lines = [f"### `{module}.{name}`", ""]
    if inspect.ismodule(obj):  # its repr holds the install path, which differs between machines
        doc = inspect.getdoc(obj)
        lines += ["```text", f"module {obj.__name__}", "```", "", markdown(doc) if doc else "(no docstring)"]
    elif inspect.isclass(obj) or callable(obj):
        kind = "class " if inspect.isclass(obj) else ""
        lines += ["```text", kind + signature(obj, name), "```", ""]
        doc = inspect.getdoc(obj)
        if inspect.isclass(obj) and doc and (doc == inspect.getdoc(obj.__mro__[1]) or doc.startswith(f"{name}(")):
            doc = None  # inherited (NamedTuple's) or generated (dataclass') docstrings say nothing of this class
        lines.append(markdown(doc) if doc else "(no docstring)")
        if inspect.isclass(obj) and _own_members(obj):
            lines += ["", "**Methods and properties:**"]
            for member, value in _own_members(obj):
                target = value.fget if isinstance(value, property) else getattr(value, "func", value)
                head = f"{name}.{member}" if isinstance(value, property) else signature(target, f"{name}.{member}", method=True)
                member_doc = inspect.getdoc(target)
                lines += ["", f"- `{head}`" + (" (property)" if isinstance(value, property) else "")]
                if member_doc:
                    lines += ["", "  " + markdown(member_doc).replace("\n", "\n  ")]
    else:
        lines += ["```text", f"{name} = {_default(obj)}", "```"]
    return "\n".join(lines).rstrip() + "\n"


def module_section(module_name: str, title: str) -> list[str]:
    """A public submodule: its docstring, then each name of its ``__all__`` (a name the facade also
    offers points there)."""
    import importlib

    import shardml

    module = importlib.import_module(module_name)
    doc = inspect.getdoc(module)
    out = [f"## {title}", "", markdown(doc) if doc else "(no docstring)", ""]
    for name in sorted(module.__all__, key=str.lower):
        obj = getattr(module, name)
        if name in shardml.__all__ and getattr(shardml, name) is obj:
            out += [f"### `{module_name}.{name}`", "", f"The same as `shardml.{name}` (above).", ""]
        else:
            out += [entry(name, obj, module_name)]
    return out


def render() -> str:
    import shardml

    by_section: dict[str, list[str]] = {prefix: [] for prefix, _ in SECTIONS}
    for name in sorted(shardml.__all__, key=str.lower):
        obj = getattr(shardml, name)
        module = obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", None) or ""
        if not inspect.isclass(obj) and not callable(obj) and not inspect.ismodule(obj):
            module = "shardml.core"  # constants: MESH_AXES
        prefix = next((p for p, _ in SECTIONS if module.startswith(p)), SECTIONS[2][0])
        by_section[prefix].append(name)
    out = ["# API reference", "",
           "Generated by `python docs/make_api.py` from the signatures and docstrings of the public names:",
           "`shardml.__all__` (everything `import shardml` offers) and the `__all__` of the public",
           "submodules `shardml.analysis`, `shardml.testing` and `shardml.flower`; do not edit by hand.",
           "Every other module (`shardml.core`, `shardml.models`, `shardml.parallel`, `shardml.run`, and",
           "the modules under `shardml.analysis` and `shardml.testing`) is internal and may change without",
           "notice. The concepts and how-tos are in [README.md](README.md).", ""]
    for prefix, title in SECTIONS:
        names = by_section[prefix]
        if names:
            out += [f"- [{title}](#{_anchor(title)}): " + ", ".join(f"`{n}`" for n in names)]
    for module_name, title in PUBLIC_MODULES:
        out += [f"- [{title}](#{_anchor(title)})"]
    out.append("")
    for prefix, title in SECTIONS:
        if not by_section[prefix]:
            continue
        out += [f"## {title}", ""]
        for name in by_section[prefix]:
            out += [entry(name, getattr(shardml, name))]
    for module_name, title in PUBLIC_MODULES:
        out += module_section(module_name, title)
    return "\n".join(out).rstrip() + "\n"


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print("docs/api.md is out of date: run python docs/make_api.py")
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(DOCS.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
