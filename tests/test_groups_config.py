"""Architecture sweeps and heterogeneous ensembles from a config (``model.*`` lists): every member
equals the plain run its ``population.json`` overrides describe, the ensemble's metrics are the
heterogeneous ensemble's, bad combinations exit 2 before compiling, and ``shardml plan`` shows
one column per group."""

import json

import numpy as np
import pytest

from shardml.core.errors import ConfigError
from shardml.run.cli import main
from shardml.run.config import load_config
from shardml.run.recipe import build
from shardml.run.train import train

BASE = ["model.kind=mlp", "data.corpus=digits", "model.dtype=float32", "optim.lr=1e-2", "train.steps=4",
        "train.log_every=1", "train.batch_size=32", "train.eval_batches=2", "checkpoint.every=0"]
SWEEP = ["population.kind=sweep", "population.size=4", "model.d_ff=[16,32]", "mesh.tensor=2"]


def losses(out, member=None):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("member") == member]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("groups") / "sweep"
    run = train(load_config("tiny", [*BASE, *SWEEP, f"out_dir={out}"]), verbose=False)
    return out, run


def test_a_sweep_of_architectures_trains_each_on_its_own_group(sweep):
    out, run = sweep
    report = json.loads((out / "population.json").read_text())
    assert report["architectures"] == [["model.d_ff=16"], ["model.d_ff=32"]]
    assert [(m["group"], m["overrides"]) for m in report["members"]] == [
        (0, ["model.d_ff=16", "train.init_seed=0"]), (0, ["model.d_ff=16", "train.init_seed=1"]),
        (1, ["model.d_ff=32", "train.init_seed=0"]), (1, ["model.d_ff=32", "train.init_seed=1"])]
    assert sum(len(g.devices) for g in run.groups) == 8
    assert all(g.trainer.mesh.shape["tensor"] == 2 and g.trainer.members == 2 for g in run.groups)


@pytest.mark.parametrize("member", [1, 2])
def test_every_member_equals_the_plain_run_of_its_overrides(sweep, tmp_path, member):
    out, _ = sweep
    overrides = json.loads((out / "population.json").read_text())["members"][member]["overrides"]
    alone = tmp_path / "alone"
    train(load_config("tiny", [*BASE, "mesh.data=4", "mesh.tensor=2", *overrides, f"out_dir={alone}"]), verbose=False)
    np.testing.assert_allclose(losses(out, member), losses(alone), rtol=1e-5,
                               err_msg=f"member {member} ({overrides}) in its group vs as a plain run")


def test_an_optimizer_and_architecture_sweep_trains_every_member_as_its_plain_run(tmp_path):
    out, alone = tmp_path / "both", tmp_path / "alone"
    train(load_config("tiny", [*BASE, "population.kind=sweep", "population.size=4", "model.d_ff=[16,32]",
                               "optim.lr=[1e-3,3e-2]", f"out_dir={out}"]), verbose=False)
    members = json.loads((out / "population.json").read_text())["members"]
    assert [(m["group"], m["hyperparams"]) for m in members] == [
        (0, {"lr": 1e-3}), (0, {"lr": 3e-2}), (1, {"lr": 1e-3}), (1, {"lr": 3e-2})]
    overrides = members[3]["overrides"]
    assert overrides == ["model.d_ff=32", "optim.lr=0.03", "train.init_seed=1"], overrides
    train(load_config("tiny", [*BASE, "mesh.data=8", *overrides, f"out_dir={alone}"]), verbose=False)
    np.testing.assert_allclose(losses(out, 3), losses(alone), rtol=1e-5,
                               err_msg=f"member 3 ({overrides}) in its group vs as a plain run")
    assert not np.allclose(losses(out, 2), losses(out, 3)), "members of one group with other lr trained alike"


def test_a_heterogeneous_ensemble_reports_the_ensemble_of_every_architecture(tmp_path):
    out = tmp_path / "ensemble"
    train(load_config("tiny", [*BASE, "population.kind=ensemble", "population.size=2", "model.d_ff=[16,32]",
                               f"out_dir={out}"]), verbose=False)
    report = json.loads((out / "population.json").read_text())
    ensemble = report["ensemble"]
    assert len(ensemble["member_loss"]) == 2
    vals = [m["val_loss"] for m in report["members"]]
    np.testing.assert_allclose(ensemble["member_loss"], vals, rtol=1e-5, err_msg="ensemble's members vs evaluate")
    assert ensemble["loss"] <= max(vals), "the mean of probabilities is worse than every member (convexity)"


def shardml(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args,message", [
    (["population.size=3"], "population.size=3 with model.d_ff=[16, 32]: each of the 2 architectures"),
    (["population.size=2", "mesh.data=2"], "mesh.data=2 with model.* lists"),
    (["population.size=2", "population.kind=pbt", "population.ready_every=2"], "population.kind=pbt"),
    (["population.size=4", "optim.lr=[1e-3,1e-2]"], "optimizer search over architectures is a sweep"),
    (["population.size=2", "population.kind=sweep", "optim.lr=[1e-3,1e-2]"], "gives each group one member"),
    (["population.size=6", "population.kind=sweep", "optim.lr=[1e-3,1e-2]"], "cannot be spread over them"),
    (["population.size=2", "model.d_ff=[16,30]", "mesh.tensor=4"],
     "group 'model.d_ff=30' (4 devices): parameter"),
    (["population.size=2", "model.kind=[mlp,transformer]"], "model.kind stays one value"),
])
def test_bad_architecture_runs_exit_2_before_compiling(capsys, no_compile, args, message):
    code, _, err = shardml(capsys, "train", "tiny", *BASE, "model.d_ff=[16,32]", *args)
    assert code == 2, err
    assert message in err and "Traceback" not in err, err


def test_a_single_model_builder_refuses_model_lists():
    with pytest.raises(ConfigError, match="build them with shardml.run.groups.build_architectures"):
        build(load_config("tiny", [*BASE, "population.size=2", "model.d_ff=[16,32]"]))


def test_plan_shows_every_group_and_its_share_of_the_devices(capsys):
    code, out, err = shardml(capsys, "plan", "tiny", *BASE, "population.size=2", "model.d_ff=[16,64]")
    assert code == 0, err
    assert "group 0: model.d_ff=16 on" in out and "group 1: model.d_ff=64 on" in out, out


def test_a_rerun_resumes_the_finished_run_and_fresh_moves_it_aside(sweep, capsys):
    out, _ = sweep
    args = ["train", "tiny", *BASE, *SWEEP, f"out_dir={out}"]
    before = (out / "metrics.jsonl").read_text()
    code, printed, err = shardml(capsys, *args)
    assert code == 0, err
    assert "resuming every group from step 4" in printed and "nothing to train" in printed, printed
    assert (out / "metrics.jsonl").read_text() == before, "a rerun of a finished run changed its metrics"
    code, printed, err = shardml(capsys, *args, "--fresh")
    assert code == 0, err
    assert "fresh start: moved the previous run" in printed and "(--verbose prints it)" in printed, printed
    assert "resuming" not in printed, printed
    assert "optim:" not in printed, "a groups run printed its whole config without --verbose"
    moved = list((out / "previous").glob("*/metrics.jsonl"))
    assert [m.read_text() for m in moved] == [before], "the first run's metrics were not kept aside"
    assert list((out / "previous").glob("*/checkpoints/group-1/4")), "the first run's checkpoints were not moved"
