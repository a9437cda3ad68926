"""A groups run (``model.*`` lists) checkpoints every group at the same steps: stopped by SIGTERM,
or killed between checkpoints (and even while saving), the same command resumes it and ends with
parameters bitwise equal to the run that was never interrupted, every group and member, with the
same metrics.jsonl and population.json; another experiment in the same out_dir is refused."""

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from shardml.run import groups as run_groups
from shardml.run.cli import main
from shardml.run.config import load_config
from shardml.run.train import train

STEPS = 6
BASE = ["model.kind=mlp", "data.corpus=digits", "model.dtype=float32", "optim.lr=1e-2", f"train.steps={STEPS}",
        "train.log_every=1", "train.batch_size=32", "train.eval_batches=2", "population.kind=sweep",
        "population.size=4", "model.d_ff=[16,32]"]


def run(out, *extra, verbose=False):
    return train(load_config("tiny", [*BASE, *extra, f"out_dir={out}"]), verbose=verbose)


def leaves(groups_run):
    return [[np.asarray(x) for x in jax.tree.leaves(state.params)] for state in groups_run.states]


def files(out):
    report = json.loads((out / "population.json").read_text())
    return (out / "metrics.jsonl").read_text(), report


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("groups-resume") / "whole"
    return out, leaves(run(out, "checkpoint.every=0"))


def assert_same_run(out, resumed, reference):
    ref_out, ref_params = reference
    for g, (got, want) in enumerate(zip(leaves(resumed), ref_params)):
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), f"group {g}'s parameters differ after resuming"
    (metrics, report), (ref_metrics, ref_report) = files(out), files(ref_out)
    assert metrics.count("\n") == STEPS * 4, "metrics.jsonl lacks records: one per member per step"
    assert metrics == ref_metrics, "metrics.jsonl of the resumed run differs from the uninterrupted run's"
    assert report == ref_report, "population.json of the resumed run differs from the uninterrupted run's"


def on_step(monkeypatch, step, act):
    """The run's data source, doing ``act()`` when the batch of ``step`` is asked for."""
    original = run_groups.data_source

    class Hooked:
        def __init__(self, data):
            self.data = data

        def __getattr__(self, name):
            return getattr(self.data, name)

        def batch(self, s):
            if s == step:
                act()
            return self.data.batch(s)

    def source(cfg):
        return Hooked(original(cfg))

    monkeypatch.setattr(run_groups, "data_source", source)


def test_sigterm_saves_every_group_and_the_same_command_resumes_bitwise(reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as patched:
        on_step(patched, 2, lambda: os.kill(os.getpid(), signal.SIGTERM))
        stopped = run(out, "checkpoint.every=0", verbose=True)
    assert len(stopped.metrics[0]) == 3, "the stop did not end the run after the step it came in"
    assert "stopped by SIGTERM after step 3 of 6" in capsys.readouterr().out
    assert sorted(os.listdir(out / "checkpoints")) == ["group-0", "group-1"]
    assert all(os.listdir(out / "checkpoints" / g) == ["3"] for g in ("group-0", "group-1"))
    resumed = run(out, "checkpoint.every=0", verbose=True)
    assert "resuming every group from step 3" in capsys.readouterr().out
    assert_same_run(out, resumed, reference)


def test_killed_between_and_during_saves_resumes_from_the_last_step_every_group_saved(reference, tmp_path,
                                                                                   monkeypatch, capsys):
    out = tmp_path / "run"

    def crash():
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        on_step(patched, 5, crash)
        run(out, "checkpoint.every=2")
    assert not (out / "metrics.jsonl").exists()
    # as if killed while saving step 4: group 1 never wrote it
    shutil.rmtree(out / "checkpoints" / "group-1" / "4")
    resumed = run(out, "checkpoint.every=2", verbose=True)
    printed = capsys.readouterr().out
    assert "resuming every group from step 2" in printed, printed
    assert "not every group saved it" in printed, printed
    assert os.listdir(out / "checkpoints" / "group-0-damaged") == ["4"], "group 0's lone step 4 was not set aside"
    assert_same_run(out, resumed, reference)


def test_another_model_list_in_the_same_out_dir_exits_2_naming_the_key(reference, capsys, no_compile):
    out, _ = reference
    code = main(["train", "tiny", *BASE, "model.d_ff=[16,64]", f"out_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "population.models.d_ff: [16, 32] -> [16, 64]" in err and "--fresh" in err and "Traceback" not in err, err
