"""shardml as a user gets it: the sdist and wheel built from this checkout, and fresh virtual
environments without shardml that borrow every dependency from the tests' environment, with pip
kept off the network. Shared by the packaging and notebook tests::

    dist = build_distributions(tmp_path_factory)            # once per session: sdist + wheel
    python = fresh_venv(tmp_path / "venv", tmp_path_factory)  # shardml missing, JAX & co. importable
    subprocess.run([python, "-m", "pip", "install", wheel], env=offline_env(dist), check=True)
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib

REPO = pathlib.Path(__file__).resolve().parent.parent
# Never copied into the build, never borrowed from this environment: what a fresh clone lacks, and
# shardml itself (else pip and the setup cell would find it installed already).
_NOT_SOURCE = (".git", ".venv*", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs")
_NOT_BORROWED = ("shardml", "_shardml_pytestplugin", "__editable__")  # lower case, as compared
_CACHE: dict[str, pathlib.Path] = {}  # one build and one borrowed site-packages per session (module global)
# The extras of single features (not dev, notebooks, bench, tpu, cuda); what they install can be hidden.
FEATURE_EXTRAS = ("examples", "search", "text", "privacy", "flower", "tensorboard")
_IMPORT_NAMES = {"scikit-learn": "sklearn"}  # where a distribution's import name is not its own


def build_distributions(tmp_path_factory) -> pathlib.Path:
    """``python -m build --no-isolation`` on a clean copy of this checkout: the folder holding
    ``shardml-*.tar.gz`` and ``shardml-*.whl``. Built once per session, whichever test asks first."""
    if "dist" not in _CACHE:
        root = tmp_path_factory.mktemp("release")
        source = root / "shardml"
        shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*_NOT_SOURCE))  # no stale build/ or egg-info
        proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(root / "dist"),
                               str(source)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"python -m build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        _CACHE["dist"] = root / "dist"
    return _CACHE["dist"]


def the_wheel(dist: pathlib.Path) -> pathlib.Path:
    (wheel,) = dist.glob("shardml-*.whl")
    return wheel


def extra_packages(extras) -> tuple[str, ...]:
    """The import and distribution names of what ``extras`` install, lower case: the prefixes of
    their site-packages entries (``sklearn``, ``scikit_learn-1.9.1.dist-info``, ``scikit_learn.libs``)."""
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.match(r"[\w.-]+", requirement).group(0) for extra in extras for requirement in table[extra]}
    prefixes = set()
    for name in names:
        prefixes |= {_IMPORT_NAMES.get(name, name).replace("-", "_").lower(), re.sub(r"[-.]", "_", name).lower()}
    return tuple(sorted(prefixes))


def _borrowed_site_packages(tmp_path_factory, hide: tuple[str, ...] = ()) -> pathlib.Path:
    """A folder of links to everything in this environment's site-packages except shardml (and the
    entries starting with one of ``hide``)."""
    key = f"borrowed{hide}"
    if key not in _CACHE:
        borrowed = tmp_path_factory.mktemp("borrowed-site-packages")
        places = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
        for place in dict.fromkeys(p for p in places if os.path.isdir(p)):
            for entry in pathlib.Path(place).iterdir():
                # .pth files are left out: the editable install of a developer's shardml is one.
                if entry.name.lower().startswith(_NOT_BORROWED + hide) or entry.suffix == ".pth" or \
                        (borrowed / entry.name).exists():
                    continue
                (borrowed / entry.name).symlink_to(entry)
        _CACHE[key] = borrowed
    return _CACHE[key]


def fresh_venv(path: pathlib.Path, tmp_path_factory, hide: tuple[str, ...] = ()) -> pathlib.Path:
    """A new virtual environment at ``path`` (its python returned) without shardml. The dependencies
    (JAX, Flax, Orbax, pip's view of them included) come from this environment through one ``.pth``
    line; they lie outside the new environment, so its pip never uninstalls or changes them.
    ``hide``: site-packages entries left out as well (``extra_packages(FEATURE_EXTRAS)``: no extras)."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
    python = path / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    pathlib.Path(purelib, "shardml_test_deps.pth").write_text(f"{_borrowed_site_packages(tmp_path_factory, hide)}\n")
    return python


def offline_env(find_links: pathlib.Path) -> dict[str, str]:
    """The environment of a fresh user's process: none of the tests' device flags or PYTHONPATH,
    and pip with no index and no config files, finding packages only in ``find_links``."""
    drop = ("PYTHONPATH", "JAX_NUM_CPU_DEVICES", "JAX_PLATFORMS", "XLA_FLAGS", "NPROC", "SHARDML_NO_INSTALL")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PIP_")}
    env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(find_links), PIP_CONFIG_FILE=os.devnull,
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env
