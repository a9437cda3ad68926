"""The Colab notebooks of ``colab/``: each ``NAME.py`` (jupytext percent format) and its twin
``NAME.ipynb`` hold the same cells, the twins carry no outputs, the standard cells install and set
up devices as promised, and (slow) every notebook runs top to bottom on 8 emulated CPU devices.

Notebooks are found by name: adding ``colab/NAME.py`` (and running ``python colab/sync.py``) adds
it to every test here.
"""

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import tomllib
import types

import pytest

import freshenv

ROOT = pathlib.Path(__file__).resolve().parent.parent
COLAB = ROOT / "colab"
_FIND_SPEC = importlib.util.find_spec  # the real ones, before any test patches them
_DISTRIBUTION = importlib.metadata.distribution
REPOSITORY = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def _load_sync() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("colab_sync", COLAB / "sync.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sync = _load_sync()
NAMES = sync.notebook_names()


def test_the_notebooks_are_there():
    assert {"quickstart", "layouts", "multibatch", "pipeline", "own_model", "populations", "federated",
            "inference", "open_model"} <= set(NAMES), NAMES
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
    owner_name = REPOSITORY.removeprefix("https://github.com/")
    colab_url = f"https://colab.research.google.com/github/{owner_name}/blob/main/colab/{name}.ipynb"
    assert f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url})" in \
        cells[0].source, f"{name}: no Colab badge for {name}.ipynb in the first cell"
    assert cells[1].source.startswith("# Setup:"), f"{name}: the second cell is not the setup cell"
    params = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
    assert params == [2], f"{name}: parameters cells at {params}, want exactly one, the third"
    assert "BACKEND" in cells[2].source, f"{name}: the parameters cell does not size the run by BACKEND"


def test_the_repository_is_named_once():
    """pyproject.toml's [project.urls] is the one source: the notebooks and colab/ hold no other
    repository URL, and colab/sync.py none of its own."""
    assert REPOSITORY.startswith("https://github.com/"), REPOSITORY
    assert "github.com" not in sync.SETUP and REPOSITORY not in (COLAB / "sync.py").read_text()
    for path in [*COLAB.glob("*.ipynb"), *(p for p in COLAB.glob("*.py") if p.stem != "sync"), COLAB / "README.md"]:
        for url in re.findall(r"github\.com/[\w.-]+/[\w.-]+", path.read_text()):
            assert f"https://{url}" == REPOSITORY, f"{path.name} names {url}"


class _Ran:
    """subprocess.run stand-in: records pip calls (those installing from a source in ``failing``
    fail), answers the device probe with ``devices``."""

    def __init__(self, devices: int, failing: tuple[str, ...] = ()):
        self.devices, self.failing, self.calls = devices, failing, []

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        fails = cmd[1:4] == ["-m", "pip", "install"] and any(cmd[-1].endswith(f"@ {s}") for s in self.failing)
        return subprocess.CompletedProcess(cmd, 1 if fails else 0, stdout=f"{self.devices}\n",
                                           stderr="ERROR: no route to host\n" if fails else "")


def _run_setup(monkeypatch, *, installed: bool, no_install: bool, plugin: str | None = None, devices: int = 8,
               failing: tuple[str, ...] = ()):
    """Runs the setup cell here (JAX already has 8 CPU devices) with what it can see patched: whether
    pip installed shardml, the accelerator plugins, and subprocess.run (pip, the device probe)."""
    def find_spec(module, *args):
        if module in ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin"):
            return object() if module == plugin else None
        return _FIND_SPEC(module, *args)

    def distribution(name):
        if name == "shardml" and not installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return _DISTRIBUTION(name)

    ran = _Ran(devices, failing)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    monkeypatch.setattr(subprocess, "run", ran)
    if no_install:
        monkeypatch.setenv("SHARDML_NO_INSTALL", "1")
    else:
        monkeypatch.delenv("SHARDML_NO_INSTALL", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))  # restored after the test
    scope: dict = {}
    exec(compile(sync.setup_source(), "setup cell", "exec"), scope)  # noqa: S102 - the notebooks' own cell
    pips = [c[-1] for c in ran.calls if c[1:4] == ["-m", "pip", "install"]]
    return scope, pips, ran.calls


def test_setup_cell_installs_only_where_shardml_is_missing(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no wheel, no checkout: the repository
    scope, pips, _ = _run_setup(monkeypatch, installed=False, no_install=False)
    assert pips == [f"shardml @ git+{REPOSITORY}"], pips
    assert scope["BACKEND"] == "cpu" and scope["jax"].device_count() == 8
    assert _run_setup(monkeypatch, installed=True, no_install=False)[1] == [], "reinstalled an installed shardml"
    assert _run_setup(monkeypatch, installed=False, no_install=True)[1] == [], "installed despite SHARDML_NO_INSTALL"


def _checkout(folder: pathlib.Path, name: str = "shardml") -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(f'[project]\nname = "{name}"\nversion = "0"\n')
    return folder


def test_setup_cell_installs_from_an_uploaded_wheel_then_a_checkout_then_the_repository(monkeypatch, tmp_path):
    """The newest shardml-*.whl in the working directory first, then a checkout (the working
    directory's parents, ./shardml; another project's pyproject.toml is no checkout), then the
    repository; each only when the one before fails."""
    work = _checkout(tmp_path / "clone") / "colab"  # a notebook opened inside a clone of shardml
    _checkout(work / "shardml")  # and another clone in ./shardml
    _checkout(work / "other", name="not-shardml")
    work.mkdir(exist_ok=True)
    old, new = work / "shardml-0.1.0-py3-none-any.whl", work / "shardml-0.2.0-py3-none-any.whl"
    old.write_bytes(b"")
    new.write_bytes(b"")
    os.utime(old, (1, 1))
    monkeypatch.chdir(work)
    wheel, parent, inner, repo = new.as_uri(), (tmp_path / "clone").as_uri(), (work / "shardml").as_uri(), \
        f"git+{REPOSITORY}"
    assert _run_setup(monkeypatch, installed=False, no_install=False)[1] == [f"shardml @ {wheel}"]
    _, pips, _ = _run_setup(monkeypatch, installed=False, no_install=False, failing=(wheel,))
    assert pips == [f"shardml @ {wheel}", f"shardml @ {parent}"], pips
    _, pips, _ = _run_setup(monkeypatch, installed=False, no_install=False, failing=(wheel, parent, inner))
    assert pips == [f"shardml @ {s}" for s in (wheel, parent, inner, repo)], pips
    _, pips, _ = _run_setup(monkeypatch, installed=False, no_install=False, plugin="libtpu", failing=(wheel,))
    assert pips == [f"shardml[tpu] @ {wheel}", f"shardml[tpu] @ {parent}"], pips


def test_setup_cell_says_what_to_do_when_nothing_installs(monkeypatch, tmp_path, capsys):
    """No wheel, no checkout, no network: the cell stops with what to do (SystemExit: IPython shows
    its message, not a traceback), naming what it tried and why each failed."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        _run_setup(monkeypatch, installed=False, no_install=False, failing=(f"git+{REPOSITORY}",))
    message = str(stop.value.code)
    assert f"git+{REPOSITORY}: ERROR: no route to host" in message, message
    assert "python -m build --wheel" in message and f"to {tmp_path}" in message, message
    assert f"!git clone {REPOSITORY} {tmp_path / 'shardml'}" in message, message
    assert f"installing shardml from git+{REPOSITORY}" in capsys.readouterr().out


def test_setup_cell_on_an_accelerator(monkeypatch, tmp_path):
    """A TPU runtime installs the tpu extra; an accelerator with fewer than 8 devices falls back to
    8 emulated CPU devices (JAX_PLATFORMS=cpu before JAX starts)."""
    monkeypatch.chdir(tmp_path)
    scope, pips, calls = _run_setup(monkeypatch, installed=False, no_install=False, plugin="libtpu", devices=8)
    assert pips == [f"shardml[tpu] @ git+{REPOSITORY}"], pips
    assert any("jax.device_count()" in " ".join(c) for c in calls), calls
    assert scope["ACCELERATOR"] == "tpu"
    scope, pips, _ = _run_setup(monkeypatch, installed=True, no_install=False, plugin="jax_cuda12_plugin", devices=1)
    assert pips == [] and scope["ACCELERATOR"] == "cpu" and os.environ["JAX_PLATFORMS"] == "cpu"


# ----------------------------------------------------------------------------- a fresh environment, as on Colab

# What the kernel reports after the setup cell: where shardml came from and where it was imported from.
_PROBE = """\
import json
print("PROBE " + json.dumps({"file": shardml.__file__, "prefix": sys.prefix, "devices": jax.device_count(),
                            "direct_url": importlib.metadata.distribution("shardml").read_text("direct_url.json")}))
"""
_FRESH_RUNS: dict[str, dict] = {}  # setup cell source -> what it did (the cell is the same in every notebook)


@pytest.fixture(scope="session")
def dist(tmp_path_factory):
    return freshenv.build_distributions(tmp_path_factory)


def _run_in_fresh_kernel(cell: str, dist: pathlib.Path, tmp_path_factory, monkeypatch) -> dict:
    """The cell, then the probe, in a Jupyter kernel of a new virtual environment without shardml, in
    a working directory holding the wheel (uploaded, as to /content), pip offline."""
    import nbclient
    import nbformat

    root = tmp_path_factory.mktemp("colab")
    python = freshenv.fresh_venv(root / "venv", tmp_path_factory)
    work = root / "content"
    work.mkdir()
    wheel = pathlib.Path(shutil.copy2(freshenv.the_wheel(dist), work))
    spec = root / "jupyter" / "kernels" / "fresh"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fresh", "language": "python"}))
    env = {**freshenv.offline_env(work), "JUPYTER_PATH": str(root / "jupyter"), "IPYTHONDIR": str(root / "ipython")}
    for key in list(os.environ):  # the kernel inherits this process's environment: make it a fresh user's
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell), nbformat.v4.new_code_cell(_PROBE)])
    client = nbclient.NotebookClient(notebook, kernel_name="fresh", timeout=600,
                                     resources={"metadata": {"path": str(work)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"the setup cell in a fresh environment:\n{err}", pytrace=False)
    text = "".join(o.get("text", "") for c in notebook.cells for o in c.outputs)
    probe = json.loads(text.split("PROBE ", 1)[1].splitlines()[0])
    return {"venv": root / "venv", "wheel": wheel, "text": text, **probe}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_setup_cell_installs_the_uploaded_wheel_in_a_fresh_environment(name, dist, tmp_path_factory, monkeypatch):
    """As on Colab: shardml not installed, the freshly built wheel uploaded to the working directory,
    no network. The notebook's first code cell installs the wheel and imports shardml from the new
    environment, on 8 emulated CPU devices. A cell identical to one already run here is not run again."""
    import jupytext

    cell = jupytext.read(COLAB / f"{name}.py", fmt="py:percent").cells[1].source
    if cell not in _FRESH_RUNS:
        _FRESH_RUNS[cell] = _run_in_fresh_kernel(cell, dist, tmp_path_factory, monkeypatch)
    ran = _FRESH_RUNS[cell]
    assert f"installing shardml from {ran['wheel'].as_uri()}" in ran["text"], ran["text"]
    assert json.loads(ran["direct_url"])["url"] == ran["wheel"].as_uri(), ran["direct_url"]
    assert ran["prefix"] == str(ran["venv"]) and ran["file"].startswith(str(ran["venv"])), ran
    assert ran["devices"] == 8, ran


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
