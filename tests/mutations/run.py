"""The mutation check: `python tests/mutations/run.py` plants each bug of mutations.py, one at a time, in a
temporary copy of the checkout, runs only the tests that bug names (stopping at the first failure:
a failure means the bug was caught) and reports caught / survived / not applicable by area; it
exits 1 when any bug survived, could not be planted, or its tests could not run.

A bug is planted by text: its ``original`` snippet must occur exactly once across every ``.py``
file under ``shardml/`` (wherever a refactor moved it); a snippet that is missing or occurs more
than once is reported as not applicable, to be re-anchored in mutations.py, never deleted.

    python tests/mutations/run.py                 # every mutation
    python tests/mutations/run.py -k pbt -k fedopt   # those whose id contains one of the words
    python tests/mutations/run.py --list          # the ids, areas and where each snippet is now
    python tests/mutations/run.py --baseline      # also run each selection unmutated first
    python tests/mutations/run.py --jobs 1        # one bug at a time (default: one per core, at most 4)

The JAX compilation cache (``JAX_COMPILATION_CACHE_DIR``, one temporary directory when unset) is
shared by every pytest process, so a program that a mutation does not touch compiles once. Each job
plants its bugs in its own copy of the checkout; most of a mutation's time is XLA compiling on one
thread, so two jobs on two cores take about half the time of one.

Each pytest run is a process forked from a server that has imported the third-party libraries once
(JAX, Flax, Optax, PyTorch, ...; never shardml or the tests, which the bug changes): a fresh
interpreter would spend 2.5-5 s importing them again for each of the ~160 bugs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import multiprocessing
import os
import queue
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mutations import AREAS, MUTATIONS, Mutation  # noqa: E402

SKIP = {".git", ".venv", ".venv-newest", "__pycache__", ".pytest_cache", ".ipynb_checkpoints", "build", "dist"}
PYTEST = ["-x", "-q", "-p", "no:cacheprovider", "--no-header", "-rN",
          "-n", "0"]  # a mutation runs a few tests: no workers (the jobs run side by side instead)
# What the fork server imports once: libraries the bugs never touch (a missing one is skipped).
PRELOAD = ["__main__", "numpy", "jax", "jax.numpy", "flax", "flax.linen", "flax.nnx", "optax", "orbax.checkpoint",
           "optuna", "grain", "pytest", "xdist", "torch", "transformers", "peft", "safetensors", "tokenizers",
           "jinja2", "huggingface_hub", "sklearn", "dp_accounting", "scipy"]


@dataclasses.dataclass
class Outcome:
    mutation: Mutation
    status: str  # caught | survived | not found | not unique | error
    detail: str = ""
    seconds: float = 0.0


def source_files(root: Path) -> dict[Path, str]:
    return {path.relative_to(root): path.read_text() for path in sorted((root / "shardml").rglob("*.py"))}


def locate(mutation: Mutation, sources: dict[Path, str]) -> tuple[Path | None, str]:
    """The one file that holds the snippet, or None and why not."""
    hits = {path: text.count(mutation.original) for path, text in sources.items() if mutation.original in text}
    total = sum(hits.values())
    if total == 1:
        return next(iter(hits)), ""
    if total == 0:
        return None, "not found"
    where = ", ".join(f"{path} ({n}x)" for path, n in hits.items())
    return None, f"not unique: {total} occurrences in {where}"


def copy_checkout(dest: Path) -> None:
    def ignore(folder, names):
        return [n for n in names if n in SKIP or n.endswith(".egg-info")]

    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)


def pytest_in(copy: str, args: list[str], log: str) -> None:
    """In a process forked from the server: pytest on ``args`` in ``copy``, its output in ``log``,
    its exit code the process's."""
    os.setpgrp()  # so a timeout can end the tests' own subprocesses with it
    assert "shardml" not in sys.modules, "the fork server imported shardml: the bug would not be seen"
    os.chdir(copy)
    sys.path.insert(0, copy)
    sys.dont_write_bytecode = True
    os.environ.update(PYTHONPATH=copy, PYTHONDONTWRITEBYTECODE="1")
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(out, 2)
    import pytest
    code = pytest.main(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code))


def forked_pytest(copy: Path, args: list[str], timeout: float) -> tuple[int | None, str]:
    """(pytest's exit code or None after ``timeout`` seconds, its output's last line)."""
    log = copy.parent / f"{copy.name}.log"
    process = multiprocessing.get_context("forkserver").Process(target=pytest_in, args=(str(copy), args, str(log)))
    process.start()
    process.join(timeout)
    if process.exitcode is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.join()
        return None, ""
    lines = log.read_text(errors="replace").strip().splitlines()
    return process.exitcode, (lines[-1:] or [""])[0]


def run_tests(copy: Path, selections: tuple[str, ...], timeout: float) -> tuple[str, str]:
    """('caught' | 'survived' | 'error', detail) of running each selection in turn in ``copy``."""
    for selection in selections:
        code, tail = forked_pytest(copy, [*PYTEST, *shlex.split(selection)], timeout)
        if code is None:
            return "error", f"{selection}: still running after {timeout:.0f} s"
        if code == 1:
            return "caught", f"{selection}: {tail}"
        if code == 5:
            return "error", f"{selection}: selects no test (renamed or moved?)"
        if code != 0:
            return "error", f"{selection}: pytest exit {code}: {tail}"
    return "survived", "every named test passed"


def check(mutation: Mutation, copy: Path, sources: dict[Path, str], timeout: float, baseline: bool) -> Outcome:
    start = time.perf_counter()
    path, why = locate(mutation, sources)
    if path is None:
        return Outcome(mutation, why.split(":")[0], why)
    if baseline:
        status, detail = run_tests(copy, mutation.tests, timeout)
        if status != "survived":
            return Outcome(mutation, "error", f"fails unmutated: {detail}", time.perf_counter() - start)
    text = sources[path]
    target = copy / path
    target.write_text(text.replace(mutation.original, mutation.mutated))
    try:
        status, detail = run_tests(copy, mutation.tests, timeout)
    finally:
        target.write_text(text)
    return Outcome(mutation, status, f"{path}: {detail}", time.perf_counter() - start)


def check_all(chosen: list[Mutation], tmp: Path, sources: dict[Path, str], args) -> list[Outcome]:
    """Every chosen bug checked, ``args.jobs`` at a time, each job borrowing a copy of the checkout;
    the bugs marked ``alone`` (timing tests) after the others, one by one."""
    copies: queue.Queue[Path] = queue.Queue()
    for j in range(max(1, min(args.jobs, len(chosen)))):
        copy_checkout(tmp / f"checkout-{j}")
        copies.put(tmp / f"checkout-{j}")
    done = iter(range(1, len(chosen) + 1))

    def one(mutation: Mutation) -> Outcome:
        copy = copies.get()
        try:
            outcome = check(mutation, copy, sources, args.timeout, args.baseline)
        finally:
            copies.put(copy)
        print(f"[{next(done)}/{len(chosen)}] {outcome.status:<10} {mutation.id} ({outcome.seconds:.0f} s)", flush=True)
        return outcome

    with concurrent.futures.ThreadPoolExecutor(copies.qsize()) as pool:
        side_by_side = list(pool.map(one, [m for m in chosen if not m.alone]))
    return side_by_side + [one(m) for m in chosen if m.alone]


def report(outcomes: list[Outcome], seconds: float) -> bool:
    table: dict[str, Counter] = defaultdict(Counter)
    for o in outcomes:
        table[o.mutation.area][o.status] += 1
    print(f"\nmutation check: {len(outcomes)} mutations in {seconds:.0f} s")
    print(f"{'area':<10} {'caught':>7} {'survived':>9} {'not applicable':>15} {'error':>6}")
    for area in AREAS:
        c = table.get(area, Counter())
        n = sum(c.values())
        if n:
            na = c["not found"] + c["not unique"]
            print(f"{area:<10} {c['caught']:>3}/{n:<3} {c['survived']:>9} {na:>15} {c['error']:>6}")
    bad = [o for o in outcomes if o.status != "caught"]
    for o in bad:
        print(f"{o.status.upper()}: {o.mutation.id} ({o.mutation.area}) {o.mutation.bug}\n    {o.detail}")
        if o.status in ("not found", "not unique"):
            print(f"    re-anchor in tests/mutations/mutations.py: {o.mutation.original!r}")
        if o.status == "survived":
            print(f"    write the test that catches it (tests tried: {', '.join(o.mutation.tests)})")
    caught = sum(o.status == "caught" for o in outcomes)
    print(f"caught {caught} of {len(outcomes)}" + ("" if not bad else f"; {len(bad)} not caught (see above)"))
    return not bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", action="append", default=[], help="only mutations whose id contains this (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and where they apply, run nothing")
    parser.add_argument("--baseline", action="store_true", help="first check each selection passes unmutated")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest process")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                        help="bugs checked at once, each in its own copy of the checkout")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.k or any(k in m.id for k in args.k)]
    duplicates = [i for i, n in Counter(m.id for m in MUTATIONS).items() if n > 1]
    if duplicates:
        print(f"duplicate mutation ids: {duplicates}")
        return 2
    sources = source_files(ROOT)
    if args.list:
        for m in chosen:
            path, why = locate(m, sources)
            print(f"{m.id:<40} {m.area:<9} {path or why}")
        return 0
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="shardml-mutations-jax-cache-"))
    # Set before the server imports JAX, which reads them then (tests/conftest.py sets the same).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    multiprocessing.set_forkserver_preload(PRELOAD)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="shardml-mutations-") as tmp:
        outcomes = check_all(chosen, Path(tmp), sources, args)
    return 0 if report(outcomes, time.perf_counter() - start) else 1


if __name__ == "__main__":
    sys.exit(main())
