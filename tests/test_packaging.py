"""shardml as a user installs it: a plain (not editable) wheel in a fresh virtual environment runs a
preset from another directory, and ``python -m shardml`` is the ``shardml`` command."""

import os
import pathlib
import site
import subprocess
import sys
import sysconfig

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_a_preset_from_another_directory(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(REPO)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = dist.glob("shardml-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    fresh_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                check=True, capture_output=True, text=True).stdout.strip()
    # The wheel goes in first: with this environment's site-packages already visible, pip would find the
    # shardml installed there (CI installs it non-editable) and install nothing.
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, text=True, timeout=300)
    # The dependencies (JAX, Flax, Orbax...) come from this environment's site-packages, read as plain
    # directories after the fresh venv's own (its .pth files, the editable install among them, are not processed).
    deps = [p for p in {sysconfig.get_paths()["purelib"], *site.getsitepackages()} if os.path.isdir(p)]
    pathlib.Path(fresh_site, "shardml_test_deps.pth").write_text("\n".join(deps) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAX_NUM_CPU_DEVICES", "XLA_FLAGS", "NPROC")}
    where = subprocess.run([str(python), "-c", "import shardml; print(shardml.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(venv)), f"the test imported shardml from {where}, not the installed wheel"
    for command in ([str(venv / "bin" / "shardml")], [str(python), "-m", "shardml"]):
        proc = subprocess.run([*command, "train", "tiny", "train.steps=2", "out_dir=run", "--quiet"], cwd=elsewhere,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}: {proc.stderr[-3000:]}"
        assert (elsewhere / "run" / "checkpoints" / "2").is_dir(), f"{command}: no checkpoint written"
        proc = subprocess.run([*command, "train", "tinny"], cwd=elsewhere, env=env, capture_output=True, text=True)
        assert proc.returncode == 2 and "no preset named 'tinny'; did you mean tiny? presets: default, tiny" in \
            proc.stderr, proc.stderr
