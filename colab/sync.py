"""Keeps the notebooks of ``colab/`` in one shape.

Each notebook is written as ``NAME.py`` in jupytext's percent format (the file to edit and review)
and has a twin ``NAME.ipynb`` (what Colab opens), generated from it with every output stripped.
Two cells are the same in every notebook and come from the templates below: the title cell's
"Open in Colab" badge and the setup cell (install shardml as Colab would, then pick the devices).
The table of notebooks in ``colab/README.md`` is generated from their titles too, so adding a
notebook is writing one ``NAME.py`` and running this script::

    python colab/sync.py           # rewrite the standard cells, every NAME.ipynb and the README table
    python colab/sync.py --check   # change nothing; exit 1 naming what is out of date (the tests do this)

The repository the notebooks install from and Colab opens them in is named once, as
``Repository`` in ``pyproject.toml``'s ``[project.urls]``; this script writes it into every
setup cell and badge (change it there and run the script).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import tomllib

BRANCH = "main"
COLAB = pathlib.Path(__file__).resolve().parent
PYPROJECT = COLAB.parent / "pyproject.toml"
README = COLAB / "README.md"
NOT_NOTEBOOKS = {"sync"}  # .py files of colab/ that are not notebooks

BADGE = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
         "(https://colab.research.google.com/github/{repository}/blob/{branch}/colab/{name}.ipynb)")
SETUP_MARK = "# Setup:"
# The setup cell. "<REPOSITORY>" becomes the repository URL; a plain template (no str.format) so that
# the cell's own braces stay as they are.
SETUP = """\
# Setup: install shardml where it is missing (from a wheel uploaded here, else a checkout, else the repository),
# then take the TPU or GPU if it has 8 devices, else 8 emulated CPU devices (same layouts, only slower).
import importlib.metadata
import importlib.util
import os
import pathlib
import subprocess
import sys
import tomllib

SHARDML_REPOSITORY = "<REPOSITORY>"  # [project.urls] of pyproject.toml, via colab/sync.py
ACCELERATOR = ("tpu" if importlib.util.find_spec("libtpu") else
               "gpu" if importlib.util.find_spec("jax_cuda12_plugin") or importlib.util.find_spec("jax_cuda13_plugin")
               else "cpu")


def shardml_installed() -> bool:
    # Installed means pip's record, not find_spec: a clone in ./shardml would pass for an (empty) package.
    try:
        return importlib.metadata.distribution("shardml") is not None
    except importlib.metadata.PackageNotFoundError:
        return False


def is_checkout(folder: pathlib.Path) -> bool:
    try:
        return tomllib.loads((folder / "pyproject.toml").read_text())["project"]["name"] == "shardml"
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return False


def install_shardml(extra: str) -> None:
    \"\"\"pip-installs shardml from the first source that works: the newest shardml-*.whl in the working
    directory, a checkout (the working directory, a parent of it, or ./shardml), the repository.\"\"\"
    here = pathlib.Path.cwd()
    wheels = sorted(here.glob("shardml-*.whl"), key=lambda wheel: wheel.stat().st_mtime, reverse=True)
    checkouts = [folder for folder in (here, *here.parents, here / "shardml") if is_checkout(folder)]
    sources = [path.as_uri() for path in (*wheels[:1], *checkouts)] + [f"git+{SHARDML_REPOSITORY}"]
    failed = []
    for source in sources:
        print(f"installing shardml{extra} from {source}")
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"shardml{extra} @ {source}"],
                             capture_output=True, text=True, check=False)
        if pip.returncode == 0:
            importlib.invalidate_caches()  # this Python has looked at site-packages before the install
            return
        failed.append(f"  {source}: {(pip.stderr.strip().splitlines() or ['pip failed'])[-1]}")
    raise SystemExit("\\n".join([
        "could not install shardml:", *failed, "Do one of these, then run this cell again:",
        "  - upload a wheel: in a shardml checkout run `pip install build && python -m build --wheel` and upload",
        f"    dist/shardml-*.whl to {here} (Colab: the Files pane on the left);",
        f"  - clone the repository into the runtime: `!git clone {SHARDML_REPOSITORY} {here / 'shardml'}`."]))


if not shardml_installed() and not os.environ.get("SHARDML_NO_INSTALL"):
    install_shardml({"tpu": "[tpu]", "gpu": "[cuda]", "cpu": ""}[ACCELERATOR])
if ACCELERATOR != "cpu":  # count the accelerator's devices in a child process: JAX starts only once here
    probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"], capture_output=True,
                           text=True, check=False)
    if probe.returncode or int(probe.stdout.split()[-1]) < 8:
        print(f"fewer than 8 {ACCELERATOR} devices: running on 8 emulated CPU devices instead")
        os.environ["JAX_PLATFORMS"], ACCELERATOR = "cpu", "cpu"

import shardml

if ACCELERATOR == "cpu":
    shardml.emulate_cpu_devices(8)  # before JAX starts its backend
import jax

BACKEND = jax.default_backend()
print(f"shardml {shardml.__version__}, jax {jax.__version__}: {jax.device_count()} {BACKEND} devices")"""

TABLE_START = "<!-- notebooks: generated by colab/sync.py -->"
TABLE_END = "<!-- end of notebooks -->"


# The reading order of the table in colab/README.md; notebooks not named here follow, by name.
ORDER = ("quickstart", "layouts", "multibatch", "pipeline", "own_model", "populations")


def notebook_names() -> list[str]:
    names = [p.stem for p in COLAB.glob("*.py") if p.stem not in NOT_NOTEBOOKS and not p.stem.startswith("_")]
    return sorted(names, key=lambda name: (ORDER.index(name) if name in ORDER else len(ORDER), name))


def repository_url() -> str:
    """``Repository`` of pyproject.toml's ``[project.urls]``: the one place the project's home is named.

    Raises:
      ValueError: it is missing, or not a GitHub repository (Colab opens notebooks from GitHub).
    """
    urls = tomllib.loads(PYPROJECT.read_text()).get("project", {}).get("urls", {})
    url = urls.get("Repository", "")
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url):
        raise ValueError(f"{PYPROJECT}: [project.urls] Repository = {url!r}; want 'https://github.com/OWNER/NAME'")
    return url


def badge(name: str) -> str:
    owner_name = repository_url().removeprefix("https://github.com/")
    return BADGE.format(repository=owner_name, branch=BRANCH, name=name)


def setup_source() -> str:
    return SETUP.replace("<REPOSITORY>", repository_url())


def read(name: str):
    """The notebook of ``NAME.py``."""
    import jupytext

    return jupytext.read(COLAB / f"{name}.py", fmt="py:percent")


def standardize(name: str, nb):
    """The notebook with the template's badge (second line of the title cell) and setup cell (the
    first code cell, which must start with ``# Setup:``).

    Raises:
      ValueError: the notebook does not open with a markdown title cell and a setup cell.
    """
    cells = nb.cells
    if len(cells) < 3 or cells[0].cell_type != "markdown" or not cells[0].source.startswith("# "):
        raise ValueError(f"colab/{name}.py: the first cell must be markdown starting with '# <title>'")
    lines = cells[0].source.split("\n")
    rest = [line for line in lines[1:] if not line.startswith("[![Open In Colab]")]
    while rest and not rest[0].strip():
        rest = rest[1:]
    cells[0].source = "\n".join([lines[0], "", badge(name), *([""] + rest if rest else [])])
    if cells[1].cell_type != "code" or not cells[1].source.startswith(SETUP_MARK):
        raise ValueError(f"colab/{name}.py: the second cell must be the setup cell, starting with '{SETUP_MARK}' "
                         "(paste any notebook's and run python colab/sync.py)")
    cells[1].source = setup_source()
    parameters = [c for c in cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if len(parameters) != 1 or cells[2] is not parameters[0]:
        raise ValueError(f"colab/{name}.py: the third cell must be the one parameters cell "
                         "('# %% tags=[\"parameters\"]': the sizes, small on CPU)")
    return nb


def py_text(name: str) -> str:
    import jupytext

    nb = standardize(name, read(name))
    nb.metadata = {"jupytext": {"notebook_metadata_filter": "-all", "cell_metadata_filter": "tags"}}
    return jupytext.writes(nb, fmt="py:percent")


def ipynb_text(name: str) -> str:
    """The Colab twin: the same cells, no outputs, stable cell ids, the TPU runtime asked for."""
    nb = standardize(name, read(name))
    cells = []
    for i, cell in enumerate(nb.cells):
        out = {"cell_type": cell.cell_type, "id": f"{name}-{i}", "metadata": dict(cell.metadata),
               "source": cell.source.splitlines(keepends=True)}
        if cell.cell_type == "code":
            out.update(execution_count=None, outputs=[])
        cells.append(out)
    notebook = {
        "cells": cells,
        "metadata": {"accelerator": "TPU", "colab": {"provenance": []},
                     "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                     "language_info": {"name": "python"}},
        "nbformat": 4, "nbformat_minor": 5,
    }
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def title(name: str) -> tuple[str, str]:
    """(title, first sentence of the introduction) of a notebook."""
    lines = read(name).cells[0].source.split("\n")
    intro = " ".join(line for line in lines[1:] if line.strip() and not line.startswith("[![")).strip()
    first = re.split(r"(?<=\.)\s", intro, maxsplit=1)[0] if intro else ""
    return lines[0].lstrip("# ").strip(), first


def readme_text() -> str:
    text = README.read_text()
    rows = ["| notebook | what it shows |", "|---|---|"]
    for name in notebook_names():
        head, first = title(name)
        rows.append(f"| [{head}]({name}.ipynb) ([source]({name}.py)) {badge(name)} | {first} |")
    table = "\n".join([TABLE_START, *rows, TABLE_END])
    pattern = re.compile(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"{README}: no '{TABLE_START}' ... '{TABLE_END}' section")
    return pattern.sub(lambda _: table, text)


def expected() -> dict[pathlib.Path, str]:
    """Every file this script writes, with its content."""
    files = {}
    for name in notebook_names():
        files[COLAB / f"{name}.py"] = py_text(name)
        files[COLAB / f"{name}.ipynb"] = ipynb_text(name)
    files[README] = readme_text()
    return files


def stale() -> list[str]:
    """Files that differ from what this script would write, and twins without a source."""
    files = expected()
    problems = [str(path.relative_to(COLAB.parent)) for path, text in files.items()
                if not path.exists() or path.read_text() != text]
    orphans = [p for p in COLAB.glob("*.ipynb") if p not in files]
    problems += [f"{p.relative_to(COLAB.parent)} (no {p.stem}.py beside it)" for p in orphans]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything is out of date")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale()
        for problem in problems:
            print(f"out of date: {problem}")
        if problems:
            print("run: python colab/sync.py")
        return 1 if problems else 0
    for path, text in expected().items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(COLAB.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
