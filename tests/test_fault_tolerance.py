"""Fault tolerance end to end: real ``python -m shardml train`` processes, real signals, real damaged files.

Every run below is compared with one uninterrupted run of the same command: after a resume the
metrics records and the final parameters must be bitwise equal (same mesh, CPU).
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from shardml.run.checkpoint import flatten, load_params, steps

from conftest import child_env

REPO = pathlib.Path(__file__).resolve().parent.parent
# Short runs (a tiny step takes ~10-30 ms, a save ~0.3 s): every interruption below is sent at least
# 12 steps and 3 saves before the end, and each test asserts that it landed before the end.
STEPS, EVERY = 24, 4
COMMAND = ["train", "tiny", f"train.steps={STEPS}", "train.log_every=1", f"checkpoint.every={EVERY}",
           "checkpoint.keep=3", "--quiet"]
COMPARED = ("loss", "grad_norm", "val_loss", "bad_steps")
TIMEOUT = 300

# Runs the real CLI, but the finalization (the atomic rename) of checkpoint step 8 never ends:
# it writes a marker file and sleeps, so the test can SIGKILL the process in the middle of a save.
STALL_SAVE = """
import sys, time
from orbax.checkpoint._src.path import atomicity
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def stalled(self, *args, **kwargs):
    if self.get_final().name == "8":
        open(sys.argv[1], "w").close()
        time.sleep(600)
    return await finalize(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = stalled
from shardml.run.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The code under test (this checkout) on the path; one compilation cache for all runs."""
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax-cache")))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def start(env, out, cwd, prefix=("-m", "shardml"), extra=()):
    return subprocess.Popen([sys.executable, *prefix, *COMMAND, f"out_dir={out}", *extra], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(env, out, cwd, extra=()):
    proc = start(env, out, cwd, extra=extra)
    _, stderr = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, stderr


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def last_step(out):
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            lines = [line for line in f.read().splitlines() if line.endswith("}")]
    except FileNotFoundError:
        return 0
    return json.loads(lines[-1])["step"] if lines else 0


def wait_until(proc, condition, what):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def interrupt(proc, out, after, sig):
    """Sends ``sig`` once the run has logged step ``after``; returns (exit code, stderr)."""
    wait_until(proc, lambda: last_step(out) >= after, f"step {after}")
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert last_step(out) < STEPS, f"the run finished before {sig.name} arrived; the test proves nothing"
    return proc.returncode, stderr


def resumed_from(stderr):
    found = re.findall(r"resuming from step (\d+)", stderr)
    assert len(found) == 1, f"the run does not say once where it resumed from: {stderr[-2000:]}"
    return int(found[0])


def assert_same_as_uninterrupted(out, reference):
    got, want = records(out), records(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want], "metrics records (steps) differ"
    for a, b in zip(got, want):
        for key in COMPARED:
            assert a.get(key) == b.get(key), \
                f"step {a['step']}: {key} {a.get(key)!r} after the interruption vs {b.get(key)!r} uninterrupted"
    params, ref_params = flatten(load_params(out)), flatten(load_params(reference))
    assert params.keys() == ref_params.keys()
    for name, ref_leaf in ref_params.items():
        np.testing.assert_array_equal(params[name], ref_leaf,
                                      err_msg=f"final parameter {name} differs from the uninterrupted run")


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    code, stderr = run(env, root / "run", root)
    assert code == 0, stderr[-3000:]
    assert steps(str(root / "run" / "checkpoints")) == [16, 20, 24], "checkpoint.every / keep not honoured"
    return str(root / "run")


@pytest.mark.slow
def test_sigkill_at_any_moment_then_rerun_resumes_exactly(env, reference, tmp_path):
    out = tmp_path / "run"
    # After step 9 is logged the save of step 8 has started, and Orbax starts a save only once the
    # previous one (step 4) is finalized: at least one checkpoint is there to resume from.
    code, _ = interrupt(start(env, out, tmp_path), out, after=10, sig=signal.SIGKILL)
    assert code == -signal.SIGKILL
    code, stderr = run(env, out, tmp_path)
    assert code == 0, stderr[-3000:]
    step = resumed_from(stderr)
    assert step >= EVERY and step % EVERY == 0, f"resumed from step {step}"
    assert_same_as_uninterrupted(out, reference)


@pytest.mark.slow
def test_sigint_then_sigterm_stop_gracefully_and_resume_exactly(env, reference, tmp_path):
    out = tmp_path / "run"
    stopped = []
    for sig, after in ((signal.SIGINT, 3), (signal.SIGTERM, 12)):
        code, stderr = interrupt(start(env, out, tmp_path), out, after=after, sig=sig)
        assert code == 0, f"{sig.name}: exit {code}: {stderr[-3000:]}"
        lines = [line for line in stderr.splitlines() if f"stopped by {sig.name}" in line]
        assert len(lines) == 1, f"no one-line message after {sig.name}: {stderr[-3000:]}"
        match = re.search(rf"after step (\d+) of {STEPS}; saved checkpoint (\S+); run the same command again", lines[0])
        assert match, lines[0]
        step, path = int(match.group(1)), match.group(2)
        assert step >= after and path == str(out / "checkpoints" / str(step)), lines[0]
        assert step in steps(str(out / "checkpoints")), f"{path} was not finalized"
        assert last_step(out) == step, "metrics of the steps before the saved one are missing"
        if stopped:
            assert resumed_from(stderr) == stopped[-1]
        stopped.append(step)
    code, stderr = run(env, out, tmp_path)
    assert code == 0 and resumed_from(stderr) == stopped[-1], stderr[-3000:]
    assert_same_as_uninterrupted(out, reference)


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_an_unfinished_write_that_is_skipped(env, reference, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "stalled"
    proc = start(env, out, tmp_path, prefix=("-c", STALL_SAVE, str(marker)))
    wait_until(proc, marker.exists, "the save of step 8 to stall")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    assert last_step(out) < STEPS, "the run finished although its save of step 8 never did"
    assert (out / "checkpoints" / "8.orbax-checkpoint-tmp").is_dir(), os.listdir(out / "checkpoints")
    assert steps(str(out / "checkpoints")) == [4]
    code, stderr = run(env, out, tmp_path)
    assert code == 0, stderr[-3000:]
    assert "ignoring an unfinished checkpoint write" in stderr and resumed_from(stderr) == 4, stderr[-3000:]
    assert_same_as_uninterrupted(out, reference)


def test_truncated_file_in_latest_checkpoint_falls_back_to_previous(env, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    data = [p for p in (out / "checkpoints" / "24" / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    victim = max(data, key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    code, stderr = run(env, out, tmp_path)
    assert code == 0, stderr[-3000:]
    assert "skipping damaged checkpoint step 24: Orbax cannot read it" in stderr, stderr[-3000:]
    assert resumed_from(stderr) == 20, stderr[-3000:]
    assert (out / "checkpoints-damaged" / "24").is_dir(), "the damaged checkpoint was not kept aside"
    assert_same_as_uninterrupted(out, reference)


def test_out_dir_of_another_model_is_refused_and_left_untouched(env, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, stderr = run(env, out, tmp_path, extra=("model.d_model=64",))
    assert code == 2, stderr[-3000:]
    # Detected from the parameter shapes (all 12 arrays of the transformer have a d_model dimension),
    # and the config key that changed them is named.
    assert ("holds a run of another model (transformer with 12 parameter arrays, 12 differing from this "
            "transformer's (first: embed [[256, 32], 'float32'] -> [[256, 64], 'float32'])) (model.d_model: 32 -> "
            "64); it was not touched" in stderr and "--fresh" in stderr), stderr[-3000:]
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before, "out_dir changed although the run was refused"
