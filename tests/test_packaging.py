"""shardml as a user installs it: the release check (``python -m build`` makes the sdist and the
wheel, ``twine check`` accepts both, each holds the presets and the pytest plugin), and the wheel,
installed by pip without network and without extras into a fresh virtual environment, runs
``shardml --help`` and a preset from another directory, and names the extra a feature needs;
``python -m shardml`` is the ``shardml`` command.

The build is shared with tests/test_notebooks.py (tests/freshenv.py: once per session).
"""

import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import pytest

import freshenv

PRESETS = ("default.yaml", "tiny.yaml")


@pytest.fixture(scope="session")
def dist(tmp_path_factory):
    return freshenv.build_distributions(tmp_path_factory)


@pytest.mark.slow
def test_release_builds_an_sdist_and_a_wheel_that_twine_accepts(dist):
    version = tomllib.loads((freshenv.REPO / "pyproject.toml").read_text())["project"]["version"]
    (sdist,) = dist.glob("shardml-*.tar.gz")
    wheel = freshenv.the_wheel(dist)
    assert sdist.name == f"shardml-{version}.tar.gz" and wheel.name == f"shardml-{version}-py3-none-any.whl"
    proc = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"twine check: {proc.stdout}{proc.stderr}"

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = f"shardml-{version}.dist-info"
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        metadata = zf.read(f"{info}/METADATA").decode()
    assert {f"shardml/run/configs/{p}" for p in PRESETS} | {"_shardml_pytestplugin.py"} <= names, sorted(names)
    assert "shardml = shardml.run.cli:main" in entry_points and "shardml = _shardml_pytestplugin" in entry_points
    assert not any(n.startswith(("tests/", "benchmarks/", "colab/")) for n in names), "the wheel ships the tests"
    assert "Project-URL: Repository, https://github.com/" in metadata, "pyproject's [project.urls] is lost"
    assert "Description-Content-Type: text/markdown" in metadata
    with tarfile.open(sdist) as tf:
        members = {m.split("/", 1)[1] for m in tf.getnames() if "/" in m}
    assert {"pyproject.toml", "README.md", "_shardml_pytestplugin.py",
            *(f"shardml/run/configs/{p}" for p in PRESETS)} <= members, sorted(members)


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_a_preset_from_another_directory(dist, tmp_path, tmp_path_factory):
    venv = tmp_path / "venv"
    # What `pip install .` gives: the feature extras' libraries (scikit-learn, Optuna, ...) hidden.
    python = freshenv.fresh_venv(venv, tmp_path_factory, hide=freshenv.extra_packages(freshenv.FEATURE_EXTRAS))
    env = freshenv.offline_env(dist)
    # No --no-deps: pip resolves the wheel's requirements against what the environment holds, offline.
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", str(freshenv.the_wheel(dist))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"pip install of the wheel: {proc.stderr[-3000:]}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import shardml; print(shardml.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(venv)), f"the test imported shardml from {where}, not the installed wheel"
    assert subprocess.run([str(python), "-c", "import sklearn"], env=env, capture_output=True).returncode, \
        "scikit-learn is importable: the environment is not what `pip install .` gives"
    for command in ([str(venv / "bin" / "shardml")], [str(python), "-m", "shardml"]):
        proc = subprocess.run([*command, "--help"], cwd=elsewhere, env=env, capture_output=True, text=True)
        assert proc.returncode == 0 and "train" in proc.stdout, f"{command} --help: {proc.stdout}{proc.stderr}"
        proc = subprocess.run([*command, "train", "tiny", "train.steps=2", "out_dir=run", "--quiet"], cwd=elsewhere,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}: {proc.stderr[-3000:]}"
        assert (elsewhere / "run" / "checkpoints" / "2").is_dir(), f"{command}: no checkpoint written"
        proc = subprocess.run([*command, "train", "tinny"], cwd=elsewhere, env=env, capture_output=True, text=True)
        assert proc.returncode == 2 and "no preset named 'tinny'; did you mean tiny? presets: default, tiny" in \
            proc.stderr, proc.stderr
    proc = subprocess.run([str(venv / "bin" / "shardml"), "train", "tiny", "model.kind=mlp", "data.corpus=digits",
                           "out_dir=digits", "--quiet"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "[examples]" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_dev_extra_holds_the_release_tools():
    """CI installs ``.[dev]``: the release check needs build and twine there."""
    extras = tomllib.loads((freshenv.REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.match(r"[\w.-]+", requirement).group(0) for requirement in extras["dev"]}
    assert {"build", "twine", "setuptools", "wheel"} <= names, names
