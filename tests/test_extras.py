"""`pip install .` is enough until a feature needs an optional library; then shardml names the extra
that brings it (`pip install 'shardml[text]'`), in one line, without a traceback.

A library is hidden as if never installed: ``None`` in ``sys.modules`` makes ``import`` fail and
``importlib.util.find_spec`` answer None.
"""

import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
# (extra, hidden modules, command line arguments after `shardml`)
CLI_CASES = [
    pytest.param("examples", ["sklearn", "sklearn.datasets"],
                 ["train", "tiny", "model.kind=mlp", "data.corpus=digits", "train.steps=1"], id="digits"),
    pytest.param("privacy", ["dp_accounting"],
                 ["train", "tiny", "model.kind=mlp", "data.corpus=digits", "mesh.members=8",
                  "federated.algorithm=fedavg", "federated.clients=8", "federated.update_clip=0.1",
                  "federated.update_noise=1.0", "train.steps=1"],
                 id="dp-epsilon"),
    pytest.param("text", ["tokenizers"], ["train", "tiny", "data.tokenizer=bpe", "model.vocab=1024", "train.steps=1"],
                 id="bpe"),
    pytest.param("search", ["optuna"],
                 ["train", str(ROOT / "configs" / "digits.yaml"), "population.kind=sweep", "population.size=8",
                  "optim.lr=loguniform(1e-4,1e-1)", "population.sampler=optuna", "train.steps=1"],
                 id="optuna"),
]


def test_every_extra_named_here_exists():
    assert {"examples", "privacy", "text", "search", "flower", "notebooks", "tensorboard"} <= set(EXTRAS), EXTRAS


@pytest.mark.slow
@pytest.mark.parametrize(("extra", "hidden", "args"), CLI_CASES)
def test_the_command_line_names_the_missing_extra(extra, hidden, args, tmp_path):
    script = (f"import sys\nfor name in {hidden!r}:\n    sys.modules[name] = None\n"
              "from shardml.run.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script, *args, f"out_dir={tmp_path / 'run'}", "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, f"`shardml {' '.join(args)}` ran without {hidden[0]}"
    assert f"[{extra}]" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_load_digits_names_the_examples_extra(monkeypatch):
    import shardml

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(shardml.ShardmlError, match=r"\[examples\]"):
        shardml.load_digits()


def test_flower_names_the_flower_extra(monkeypatch):
    import shardml

    monkeypatch.setitem(sys.modules, "flwr", None)
    with pytest.raises(shardml.ShardmlError, match=r"\[flower\]"):
        shardml.flower.client_app(None, None)


# What in a README section needs an extra (the code it shows or the keys it names), and which.
NEEDS = {
    "examples": ("load_digits", "data.corpus=digits", "configs/digits.yaml"),
    "text": ("data.tokenizer=bpe",),
    "search": ("population.sampler=optuna",),
    "privacy": ("update_noise=", "example_noise="),
    "flower": ("shardml.flower.",),
    "hf": ("load_hf(", "save_hf("),
}


def test_each_readme_section_names_the_extras_it_needs():
    """A section whose code needs an optional library says which extra brings it (`[examples]`,
    `".[examples,flower]"`, ...); the rest run on `pip install .`, the README's first command."""
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    assert "pip install . " in first and "[dev]" not in first, f"the first command installs more than needed: {first}"
    for section in re.split(r"^(?=## )", readme, flags=re.MULTILINE)[1:]:
        title = section.splitlines()[0]
        named = {e for group in re.findall(r"\[([\w,]+)\]", section) for e in group.split(",")}
        for extra, signs in NEEDS.items():
            if any(sign in section for sign in signs):
                assert extra in named, f"README {title!r} needs [{extra}] (it uses {signs}) but does not say so"
