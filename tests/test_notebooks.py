"""The Colab notebooks of ``colab/``: each ``NAME.py`` (jupytext percent format) and its twin
``NAME.ipynb`` hold the same cells, the twins carry no outputs, the standard cells install and set
up devices as promised, and (slow) every notebook runs top to bottom on 8 emulated CPU devices.

Notebooks are found by name: adding ``colab/NAME.py`` (and running ``python colab/sync.py``) adds
it to every test here.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
COLAB = ROOT / "colab"
_FIND_SPEC = importlib.util.find_spec  # the real one, before any test patches it


def _load_sync() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("colab_sync", COLAB / "sync.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sync = _load_sync()
NAMES = sync.notebook_names()


def test_the_notebooks_are_there():
    assert {"quickstart", "layouts", "multibatch", "pipeline", "own_model", "populations", "federated",
            "inference"} <= set(NAMES), NAMES
    assert {p.stem for p in COLAB.glob("*.ipynb")} == set(NAMES), "every NAME.py needs its NAME.ipynb and back"


@pytest.mark.parametrize("name", NAMES)
def test_twins_hold_the_same_cells(name):
    """Read with jupytext (.py) and nbformat (.ipynb), independently of colab/sync.py's writer."""
    import jupytext
    import nbformat

    source = jupytext.read(COLAB / f"{name}.py", fmt="py:percent").cells
    twin = nbformat.read(COLAB / f"{name}.ipynb", as_version=4).cells
    assert len(source) == len(twin), f"{name}: {len(source)} cells in the .py, {len(twin)} in the .ipynb"
    for i, (a, b) in enumerate(zip(source, twin)):
        assert (a.cell_type, a.source) == (b.cell_type, b.source), (
            f"{name}.ipynb cell {i} differs from {name}.py ({a.cell_type} vs {b.cell_type}):\n"
            f"{a.source[:300]}\n---\n{b.source[:300]}\nrun: python colab/sync.py")
        assert a.metadata.get("tags", []) == b.metadata.get("tags", []), f"{name}: cell {i} tags differ"


@pytest.mark.parametrize("name", NAMES)
def test_twins_are_stripped(name):
    notebook = json.loads((COLAB / f"{name}.ipynb").read_text())
    for i, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{name}.ipynb cell {i} has outputs"
        assert set(cell["metadata"]) <= {"tags"}, f"{name}.ipynb cell {i} metadata {cell['metadata']}"
        assert "attachments" not in cell, f"{name}.ipynb cell {i} has attachments"
    assert "widgets" not in notebook["metadata"], f"{name}.ipynb keeps widget state"


def test_committed_files_are_what_sync_writes():
    """Standard badge and setup cells, the .ipynb twins and colab/README.md's table are up to date."""
    assert sync.stale() == [], f"out of date: {sync.stale()}; run: python colab/sync.py"


@pytest.mark.parametrize("name", NAMES)
def test_first_cells(name):
    """A title with this notebook's Colab badge, the setup cell, then exactly one parameters cell that
    sizes the run by the backend."""
    import jupytext

    cells = jupytext.read(COLAB / f"{name}.py", fmt="py:percent").cells
    colab_url = f"https://colab.research.google.com/github/{sync.REPOSITORY}/blob/main/colab/{name}.ipynb"
    assert f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url})" in \
        cells[0].source, f"{name}: no Colab badge for {name}.ipynb in the first cell"
    assert cells[1].source.startswith("# Setup:"), f"{name}: the second cell is not the setup cell"
    params = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
    assert params == [2], f"{name}: parameters cells at {params}, want exactly one, the third"
    assert "BACKEND" in cells[2].source, f"{name}: the parameters cell does not size the run by BACKEND"


class _Ran:
    """subprocess.run stand-in: records pip calls, answers the device probe with ``devices``."""

    def __init__(self, devices: int):
        self.devices, self.calls = devices, []

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=f"{self.devices}\n", stderr="")


def _run_setup(monkeypatch, *, installed: bool, no_install: bool, plugin: str | None = None, devices: int = 8):
    """Runs the setup cell here (JAX already has 8 CPU devices) with what it can see patched."""
    def find_spec(module, *args):
        if module == "shardml" and not installed:
            return None
        if module in ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin"):
            return object() if module == plugin else None
        return _FIND_SPEC(module, *args)

    ran = _Ran(devices)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(subprocess, "run", ran)
    if no_install:
        monkeypatch.setenv("SHARDML_NO_INSTALL", "1")
    else:
        monkeypatch.delenv("SHARDML_NO_INSTALL", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))  # restored after the test
    scope: dict = {}
    exec(compile(sync.setup_source(), "setup cell", "exec"), scope)  # noqa: S102 - the notebooks' own cell
    pips = [c for c in ran.calls if c[1:4] == ["-m", "pip", "install"]]
    return scope, pips, ran.calls


def test_setup_cell_installs_only_where_shardml_is_missing(monkeypatch):
    scope, pips, _ = _run_setup(monkeypatch, installed=False, no_install=False)
    assert pips == [[sys.executable, "-m", "pip", "install", "-q",
                     f"shardml @ git+https://github.com/{sync.REPOSITORY}"]], pips
    assert scope["BACKEND"] == "cpu" and scope["jax"].device_count() == 8
    assert _run_setup(monkeypatch, installed=True, no_install=False)[1] == [], "reinstalled an installed shardml"
    assert _run_setup(monkeypatch, installed=False, no_install=True)[1] == [], "installed despite SHARDML_NO_INSTALL"


def test_setup_cell_on_an_accelerator(monkeypatch):
    """A TPU runtime installs the tpu extra; an accelerator with fewer than 8 devices falls back to
    8 emulated CPU devices (JAX_PLATFORMS=cpu before JAX starts)."""
    scope, pips, calls = _run_setup(monkeypatch, installed=False, no_install=False, plugin="libtpu", devices=8)
    assert pips[0][-1] == f"shardml[tpu] @ git+https://github.com/{sync.REPOSITORY}", pips
    assert any("jax.device_count()" in " ".join(c) for c in calls), calls
    assert scope["ACCELERATOR"] == "tpu"
    scope, pips, _ = _run_setup(monkeypatch, installed=True, no_install=False, plugin="jax_cuda12_plugin", devices=1)
    assert pips == [] and scope["ACCELERATOR"] == "cpu" and os.environ["JAX_PLATFORMS"] == "cpu"


# ----------------------------------------------------------------------------- execution


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A Jupyter kernel on this interpreter (whatever ``python`` on PATH is), found first through
    JUPYTER_PATH; the notebooks inherit the tests' 8 emulated CPU devices and compilation cache."""
    home = tmp_path_factory.mktemp("jupyter")
    spec = home / "kernels" / "shardml-tests"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "shardml tests", "language": "python"}))
    return {"JUPYTER_PATH": str(home), "IPYTHONDIR": str(home / "ipython"), "SHARDML_NO_INSTALL": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_on_cpu(name, kernel_env, tmp_path, monkeypatch):
    """Top to bottom with the small (CPU) parameters; any error fails, naming the cell."""
    import nbclient
    import nbformat

    for key, value in kernel_env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, kernel_name="shardml-tests", timeout=600,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"colab/{name}.ipynb failed:\n{err}", pytrace=False)
    print(f"colab/{name}.ipynb ran in {time.perf_counter() - start:.1f}s")
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}: error outputs {errors}"
