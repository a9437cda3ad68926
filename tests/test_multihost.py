"""Many processes on ``jax.distributed``: 2 local processes x 4 emulated CPU devices (loopback, gloo
collectives) started by ``shardml train --coordinator ... --num-processes 2 --process-id I``, against
this process's 8 devices as the reference.

- the loss trajectory of 2 x 4 equals 1 x 8 on the same layout (f32, within 1e-5 relative), for
  data x fsdp and data x tensor: the global batches are the same, each process reads only its rows;
- a SIGTERM to either process stops both at the same step, both save, and the run resumes;
- a checkpoint written by 2 processes (each its own shards) restores in 1 process, and the other
  way round;
- a killed process makes the other stop with an error within the heartbeat timeout (no hang).
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from shardml.run.checkpoint import steps as checkpoint_steps
from shardml.run.config import load_config, to_dict
from shardml.run.loop import run_loop
from shardml.run.recipe import build
from shardml.run.train import loop_settings

from conftest import child_env

REPO = pathlib.Path(__file__).resolve().parent.parent
# gloo's own connection lines; its threads sometimes interleave them mid-line, which leaves a lone
# rank count on a line of its own (seen: "3")
GLOO = re.compile(r"\[Gloo\] Rank \d+ is connected to \d+ peer ranks\. Expected number of connected peer ranks is : ?\d*")
STEPS, EVERY = 24, 8
BASE = [f"train.steps={STEPS}", "train.log_every=1", f"checkpoint.every={EVERY}"]
FSDP = ["mesh.data=2", "mesh.fsdp=4"]
TENSOR = ["mesh.data=2", "mesh.tensor=4"]
TOL = 1e-5  # f32: the same program on the same devices; only the collectives' transport differs
TIMEOUT = 600  # seconds for a 2-process run (compiling dominates on a loaded 2-core machine)
HEARTBEAT = 10  # --heartbeat-timeout of the kill test: the bound it asserts, plus SLACK
SLACK = 10


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """This checkout on the path, 4 devices per process set by --cpu-devices, the session's cache."""
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax-cache")))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm(env, process, port, tasks=2):
    """The environment SLURM gives task ``process`` of a job on one node (what JAX detects)."""
    return {**env, "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": str(tasks),
            "SLURM_PROCID": str(process), "SLURM_LOCALID": str(process), "JAX_COORDINATOR_PORT": str(port)}


def launch(env, out, layout, extra=(), heartbeat=60, detect=False):
    """Two ``shardml train`` processes of one run (process 0 is the coordinator): given
    ``--coordinator --num-processes --process-id``, or (``detect``) a SLURM job's variables."""
    port = free_port()
    procs = []
    for i in (0, 1):
        flags = [] if detect else ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "shardml", "train", "tiny", *BASE, *layout, f"out_dir={out}", *extra, *flags,
             "--cpu-devices", "4", "--heartbeat-timeout", str(heartbeat)],
            env=slurm(env, i, port) if detect else env, cwd=out.parent, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout=TIMEOUT):
    """[(exit status, stdout, stderr)] of both processes; kills both if either hangs."""
    deadline, results = time.monotonic() + timeout, []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append((proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        logs = [proc.communicate()[1][-3000:] for proc in procs]
        pytest.fail(f"the 2-process run did not end within {timeout}s:\n" + "\n---\n".join(logs))
    return results


def records(out):
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for_step(out, step, procs, timeout=TIMEOUT):
    """Waits until process 0 has logged ``step``; fails if the run ends or stalls first."""
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in records(out)):
        if any(proc.poll() is not None for proc in procs):
            logs = [proc.communicate()[1][-3000:] for proc in procs]
            pytest.fail(f"a process ended before step {step}:\n" + "\n---\n".join(logs))
        if time.monotonic() > deadline:
            finish(procs, 1)
        time.sleep(0.05)


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out)}


def assert_curve(got: dict, want: dict, steps, what: str):
    missing = [s for s in steps if s not in got]
    assert not missing, f"{what}: no record of steps {missing}"
    for s in steps:
        rel = abs(got[s] - want[s]) / abs(want[s])
        assert rel <= TOL, f"{what}: step {s} loss {got[s]!r} vs {want[s]!r} (one process), relative {rel:.1e} > {TOL}"


def in_process(overrides, out, resume="auto"):
    """The same config trained by this process on its 8 devices (the reference)."""
    cfg = load_config("tiny", [*BASE, *overrides, f"out_dir={out}", f"train.resume={resume}"])
    parts = build(cfg)
    return run_loop(parts.trainer, parts.data, loop_settings(cfg, verbose=False), parts.eval_batches(),
                    config=to_dict(cfg))


def val_loss(out):
    return [r["val_loss"] for r in records(out) if "val_loss" in r][-1]


@pytest.fixture(scope="module")
def reference_fsdp(tmp_path_factory):
    out = tmp_path_factory.mktemp("one-fsdp") / "run"
    summary = in_process(FSDP, out)
    assert checkpoint_steps(str(out / "checkpoints")) == [8, 16, 24]
    return out, losses(out), summary


PROBE = ("import shardml.run.distributed as d; started = d.start(heartbeat_timeout=10, init_timeout=30); "
         "import jax; print(started, jax.process_count(), jax.distributed.is_initialized())")


def test_one_plain_process_without_a_cluster_and_jax_distributed_in_a_slurm_job(env):
    """No cluster: ``start()`` leaves one plain process. SLURM's variables (one task): JAX detects
    the job and shardml starts jax.distributed from them."""
    clean = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR"))}
    plain = subprocess.run([sys.executable, "-c", PROBE], check=False, env=clean, capture_output=True, text=True, timeout=120)
    assert plain.stdout.split() == ["False", "1", "False"], plain.stdout + plain.stderr[-2000:]
    job = subprocess.run([sys.executable, "-c", PROBE], check=False, env=slurm(clean, 0, free_port(), tasks=1),
                         capture_output=True, text=True, timeout=120)
    assert job.stdout.split() == ["True", "1", "True"], job.stdout + job.stderr[-2000:]


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "127.0.0.1:4000", "--num-processes", "2"], r"go together"),
    (["--coordinator", "127.0.0.1:4000", "--num-processes", "2", "--process-id", "2"], r"must lie in \[0, 2\)"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], r"must be HOST:PORT"),
    (["--coordinator", "127.0.0.1:4000", "--num-processes", "2", "--process-id", "0"], r"before JAX's backend"),
])
def test_bad_process_flags_are_refused_before_anything_starts(capsys, flags, message):
    import re

    from shardml.run.cli import main

    assert main(["train", "tiny", "out_dir=unused", *flags]) == 2  # JAX's backend runs already in this process
    err = capsys.readouterr().err
    assert re.search(message, err), err


def stopped_at(stderr: str) -> int:
    marker = "stopped by SIGTERM after step "
    assert marker in stderr, f"process 0 did not report a graceful stop:\n{stderr[-3000:]}"
    return int(stderr.split(marker)[1].split()[0])


@pytest.mark.slow
def test_two_processes_train_like_one_stop_together_and_restore_in_one(env, tmp_path, reference_fsdp):
    ref_dir, reference, _ = reference_fsdp
    out = tmp_path / "two"
    procs = launch(env, out, FSDP)
    wait_for_step(out, 3, procs)
    procs[1].send_signal(signal.SIGTERM)  # only process 1 is asked to stop
    (rc0, out0, err0), (rc1, out1, err1) = finish(procs)
    assert (rc0, rc1) == (0, 0), f"exit {rc0}, {rc1}:\n{err0[-3000:]}\n---\n{err1[-3000:]}"
    stop = stopped_at(err0)
    assert 3 <= stop < STEPS - 4, f"the stop at step {stop} did not land mid-run"
    assert checkpoint_steps(str(out / "checkpoints")) == [s for s in (8, 16) if s < stop] + [stop]
    params = sorted(os.listdir(out / "checkpoints" / str(stop) / "params"))
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(params), f"not every process wrote its shards: {params}"
    printed = [line for line in GLOO.sub("", out1).splitlines() if line.strip() and not line.strip().isdigit()]
    assert "mesh: 8 cpu device(s): data=2 x fsdp=4" in out0 and not printed, f"process 1 printed {printed[:5]}"
    assert_curve(losses(out), reference, range(1, stop + 1), "2 processes x 4 devices")
    # 2 -> 1: this process restores the checkpoint the two wrote, and finishes the run like the reference.
    one = tmp_path / "one"
    resumed = in_process(FSDP, one, resume=str(out / "checkpoints" / str(stop)))
    assert resumed.resumed_from == stop
    assert_curve(losses(one), reference, range(stop + 1, STEPS + 1), f"1 process after the 2-process step {stop}")
    assert abs(val_loss(one) - val_loss(ref_dir)) <= TOL * val_loss(ref_dir)


@pytest.mark.slow
def test_data_tensor_with_workers_preempted_through_process_0_resumes_on_two(env, tmp_path):
    ref = tmp_path / "one"
    in_process(TENSOR, ref)
    reference = losses(ref)
    out = tmp_path / "two"
    procs = launch(env, out, TENSOR, ["data.workers=2"])
    wait_for_step(out, 3, procs)
    procs[0].send_signal(signal.SIGTERM)  # the coordinator this time
    results = finish(procs)
    assert [r[0] for r in results] == [0, 0], [r[2][-3000:] for r in results]
    stop = stopped_at(results[0][2])
    assert stop < STEPS - 4, f"the stop at step {stop} did not land mid-run"
    grain_files = set(os.listdir(out / "checkpoints" / str(stop) / "data"))  # grain's handler: a file per process
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= grain_files, grain_files
    results = finish(launch(env, out, TENSOR, ["data.workers=2"]))  # the same command again: resumes
    assert [r[0] for r in results] == [0, 0], [r[2][-3000:] for r in results]
    err = results[0][2]
    assert f"resuming from step {stop}" in err and "input position" not in err, err[-3000:]
    assert_curve(losses(out), reference, range(1, STEPS + 1), "2 processes x 4 devices, data x tensor, resumed")
    assert abs(val_loss(out) - val_loss(ref)) <= TOL * val_loss(ref)


@pytest.mark.slow
def test_a_one_process_checkpoint_continues_on_two_processes_found_in_a_slurm_job(env, tmp_path, reference_fsdp):
    ref_dir, reference, _ = reference_fsdp
    out = tmp_path / "two"
    results = finish(launch(env, out, FSDP, [f"train.resume={ref_dir / 'checkpoints' / '8'}"], detect=True))
    assert [r[0] for r in results] == [0, 0], [r[2][-3000:] for r in results]
    assert "resuming from step 8" in results[0][2]
    assert_curve(losses(out), reference, range(9, STEPS + 1), "2 processes after the 1-process step 8")


@pytest.mark.slow
# A killed coordinator fails the survivor the same way a killed worker does (its sockets close);
# the frozen worker is the case only the heartbeat ends.
@pytest.mark.parametrize("victim, how", [(1, signal.SIGKILL), (1, signal.SIGSTOP)], ids=["worker-killed", "worker-frozen"])
def test_a_dead_process_stops_the_other_within_the_heartbeat_timeout(env, tmp_path, victim, how):
    """Killed: its sockets close, the survivor's next collective fails at once. Frozen (SIGSTOP, as
    a hung host or a lost network): nothing fails, only the missed heartbeats end the survivor."""
    out = tmp_path / "run"
    procs = launch(env, out, FSDP, ["train.steps=2000", "checkpoint.every=0"], heartbeat=HEARTBEAT)
    wait_for_step(out, 2, procs)
    procs[victim].send_signal(how)
    killed = time.monotonic()
    survivor = procs[1 - victim]
    try:
        survivor.wait(timeout=HEARTBEAT + SLACK)
    except subprocess.TimeoutExpired:
        survivor.kill()
        pytest.fail(f"process {1 - victim} still ran {HEARTBEAT + SLACK}s after process {victim} got {how.name}")
    finally:
        procs[victim].kill()
    took = time.monotonic() - killed
    err = survivor.communicate()[1]
    procs[victim].communicate()
    assert survivor.returncode != 0, f"the survivor exited 0 after {took:.1f}s:\n{err[-3000:]}"
    clear = ("another task died", "stopping this process now")
    assert any(text in err for text in clear), f"no clear error from the survivor:\n{err[-3000:]}"
    print(f"process {1 - victim} stopped {took:.1f}s after process {victim} got {how.name} "
          f"(exit {survivor.returncode})")
