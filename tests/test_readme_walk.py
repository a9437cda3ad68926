"""README.md's shell blocks walked in order, as a new user would from a fresh clone (issue 31).

The repository's tracked files (``git ls-files``) are copied to a temporary directory, the clone,
and every command of every ```bash block of its README runs there, in order, as written: the
``shardml`` commands in this process (``shardml.run.cli.main``, the function the ``shardml``
script calls: no interpreter start and no recompiling per command), those that set the device
count or start several processes in their own processes, the commands of one block written for
separate terminals at the same time, and the main job (the first block's ``shardml train``) as a
user's process, without the tests' settings (tests/conftest.py's -O0 code runs its 300 steps
several times slower). Every command must exit 0 (no README command documents
another code), and no two experiments (``shardml train`` commands, the processes of one run
counted once) may share an ``out_dir``, nor may any run print that it found another's.

Not run, each for the reason :func:`not_run` gives: the usage synopses, the install commands when
shardml is importable here already (it is: this test imports it, as ``pip install .`` would make
it), the test suite itself (this test is part of it), and the commands for a Cloud TPU pod and a
SLURM cluster. What a user brings, the README's ``~/notes/`` and ``tokens.npy``, is made first:
a directory of text under a temporary ``HOME`` and a file of token ids below ``model.vocab``.

It takes a while (the main job trains 300 steps, the digits populations 300 each): ``slow``.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from shardml.run.cli import _arguments, main
from shardml.run.config import load_config
from shardml.run.driver import with_default_out_dir

from conftest import child_env

REPO = pathlib.Path(__file__).resolve().parent.parent
INSTALL = ("python3 -m venv", ". .venv/bin/activate", "pip install")
# What a run prints when it found another experiment's run in its out_dir.
COLLISION = ("nothing to train", "config differs")
# Flags that fix the process's devices or processes: such a command needs a process of its own.
OWN_PROCESS = ("--cpu-devices", "--coordinator", "--num-processes", "--process-id")


def clone(to: pathlib.Path) -> pathlib.Path:
    """The tracked files of this checkout, copied as a fresh clone holds them."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for name in filter(None, files.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, to / name)
    return to


def blocks(readme: str) -> list[list[str]]:
    """The commands of each ```bash block, in order: continued lines joined, comment lines dropped,
    ``&&`` chains split into their commands."""
    out = []
    for body in re.findall(r"```bash\n(.*?)```", readme, re.S):
        commands = []
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands += chain(line)
        out.append(commands)
    return out


def chain(line: str) -> list[str]:
    """The commands of an ``a && b`` chain (an ``&&`` inside quotes belongs to its argument)."""
    parts, quote, start = [], None, 0
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif line.startswith(" && ", i):
            parts.append(line[start:i])
            start = i + 4
    return [part.strip() for part in [*parts, line[start:]]]


def terminals(readme: str) -> list[bool]:
    """Per ```bash block: whether its commands are meant for separate terminals (run at once)."""
    return ["# terminal" in body for body in re.findall(r"```bash\n(.*?)```", readme, re.S)]


def argv_of(command: str) -> list[str] | None:
    """The arguments after ``shardml`` (or ``python -m shardml``), comments dropped; None for
    another program."""
    words = shlex.split(command, comments=True)
    if words[:1] == ["shardml"]:
        return words[1:]
    if words[:3] in (["python", "-m", "shardml"], ["python3", "-m", "shardml"]):
        return words[3:]
    return None


def not_run(command: str) -> str | None:
    """Why the walk leaves ``command`` out, or None when it runs it."""
    placeholder = re.search(r"\[[A-Za-z-][^]]*]", command.split("#")[0])  # [CONFIG], not '[1e-3,3e-3]'
    if command.startswith("[") or argv_of(command) is not None and placeholder:
        return "a usage synopsis ([CONFIG], [key=value ...]), not a command"
    if command.startswith(INSTALL) and importlib.util.find_spec("shardml") is not None:
        return "shardml is importable here already (the tests import it), as `pip install .` would make it"
    if command.startswith(("python -m pytest", "pytest")):
        return "the whole test suite, of which this walk is a part (CI runs it: .ci/run)"
    if command.startswith("gcloud "):
        return "needs a Cloud TPU pod"
    if command.startswith("srun "):
        return "needs a SLURM cluster"
    return None


def user_inputs(root: pathlib.Path, home: pathlib.Path) -> None:
    """What the README's commands expect a user to bring: ``~/notes/`` (text) and ``tokens.npy``
    (token ids below ``model.vocab=50304``)."""
    notes = home / "notes"
    notes.mkdir(parents=True)
    for page in ("README.md", "docs/architecture.md"):
        shutil.copy(root / page, notes / pathlib.Path(page).name.replace(".md", ".txt"))
    np.save(root / "tokens.npy", np.random.default_rng(0).integers(0, 50304, size=40_000, dtype=np.int32))


def out_dir_of(argv: list[str], root: pathlib.Path) -> pathlib.Path | None:
    """Where a ``train`` command writes (its ``{experiment}`` filled in); None for other commands."""
    args, preset, overrides = _arguments(argv)
    if args.command != "train":
        return None
    cfg = with_default_out_dir(load_config(preset or "default", overrides))
    return (root / os.path.expanduser(cfg.out_dir)).resolve()


def own_env(root: pathlib.Path, user: bool = False) -> dict[str, str]:
    """A separate process's environment: the clone's shardml, none of the tests' device flags; with
    ``user``, none of the tests' settings at all: a user's."""
    return child_env(user, PYTHONPATH=str(root))


def run_apart(commands: list[str], root: pathlib.Path, user: bool = False, timeout: int = 900) -> list[tuple[int, str]]:
    """Runs ``commands`` at once (one process each, as in separate terminals); (code, output) each."""
    procs = [subprocess.Popen([sys.executable, "-m", "shardml", *argv_of(c)], cwd=root, env=own_env(root, user),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in commands]
    return [(p.wait(timeout=timeout), p.stdout.read()) for p in procs]


def run_here(command: str, capsys) -> tuple[int, str]:
    """Runs ``command``: a ``shardml`` command in this process, another in a shell."""
    argv = argv_of(command)
    if argv is None:
        proc = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=900)
        return proc.returncode, proc.stdout + proc.stderr
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse
        code = stop.code
    out, err = capsys.readouterr()
    return code, out + err


def claim(owners: dict, commands: list[str], root: pathlib.Path) -> None:
    """Records where each experiment of ``commands`` (one run when they are one run's processes)
    writes; fails when an earlier experiment wrote there."""
    dirs = {out_dir_of(argv_of(c), root): c for c in commands if argv_of(c)}
    for out_dir, command in dirs.items():
        if out_dir is not None:
            assert out_dir not in owners, f"{command!r} writes to {out_dir}, as {owners[out_dir]!r} does"
            owners[out_dir] = command


@pytest.mark.slow
def test_readme_shell_blocks_run_in_order_from_a_fresh_clone(tmp_path, monkeypatch, capsys):
    root = clone(tmp_path / "shardml")
    user_inputs(root, tmp_path / "home")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(root)
    readme = (root / "README.md").read_text()
    owners: dict[pathlib.Path, str] = {}
    ran, skipped, start = [], [], time.perf_counter()
    for block, (commands, at_once) in enumerate(zip(blocks(readme), terminals(readme))):
        skipped += [(c, not_run(c)) for c in commands if not_run(c) is not None]
        todo = [c for c in commands if not_run(c) is None]
        groups = [todo] if at_once and todo else [[c] for c in todo]  # separate terminals: one run, at once
        for group in groups:
            claim(owners, group, root)
            # The first block is the newcomer's install-and-run command: its main job (300 steps of the
            # default preset) runs as a user runs it, a process with none of the tests' settings.
            apart = at_once or block == 0 or any(flag in group[0] for flag in OWN_PROCESS)
            began = time.perf_counter()
            results = run_apart(group, root, user=block == 0) if apart else [run_here(group[0], capsys)]
            took = round(time.perf_counter() - began)
            for command, (code, output) in zip(group, results):
                assert code == 0, f"{command!r} exited {code}:\n{output[-3000:]}"
                found = [sign for sign in COLLISION if sign in output]
                assert not found, f"{command!r} found another run ({found}):\n{output[-3000:]}"
                ran.append((took, command))
    # every command's time, slowest first (shown with -rP): what the walk's share of CI goes to
    times = "; ".join(f"{t} s {c[:60]}" for t, c in sorted(ran, reverse=True))
    print(f"README walk: {len(ran)} commands in {time.perf_counter() - start:.0f} s ({times}); "
          f"not run: {skipped}")
    assert len(ran) >= 25, ran
