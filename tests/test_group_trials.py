"""Optuna over architectures (``population.sampler=optuna`` with ``model.*`` spaces): the sampler
picks the shapes (seeded), every trial trains at once on its own group and equals the plain run of
its ``population.json`` overrides, the median pruner stops a trial's group (fewer steps in
``metrics.jsonl``, said on stderr) without touching the others, and bad spaces exit 2 before
compiling."""

import json
import sys

import numpy as np
import pytest

from shardml.run.cli import main
from shardml.run.config import load_config
from shardml.run.train import train

BASE = ["model.kind=mlp", "data.corpus=digits", "model.dtype=float32", "optim.lr=1e-2", "train.steps=4",
        "train.log_every=1", "train.batch_size=32", "train.eval_batches=2", "checkpoint.every=0"]
# 4 trials of 2 devices each (mesh.tensor=2); odd widths do not fit tensor=2 and are asked again
SEARCH = ["population.kind=sweep", "population.size=4", "population.sampler=optuna", "model.d_ff=uniform(8,40)",
          "mesh.tensor=2", "population.pruner=median", "train.eval_every=2"]
STEP = 2  # the evaluation where trials report (train.eval_every)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out, trial=None):
    return [r["loss"] for r in records(out) if r.get("trial") == trial]


def study_of(out):
    import optuna

    return optuna.load_study(study_name="shardml", storage=f"sqlite:///{out / 'optuna.db'}")


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """One generation; the pruner has no completed trials to judge by, so every trial trains to the end."""
    out = tmp_path_factory.mktemp("trials") / "first"
    train(load_config("tiny", [*BASE, *SEARCH, f"out_dir={out}"]), verbose=False)
    return out, json.loads((out / "population.json").read_text())["trials"]


def test_optuna_picks_different_shapes_and_each_trains_on_its_own_group(first):
    out, trials = first
    assert len(trials) == 4 and not any(t["pruned"] for t in trials), trials
    widths = [t["params"]["d_ff"] for t in trials]
    assert len(set(widths)) > 1 and all(w % 2 == 0 and 8 <= w <= 40 for w in widths), widths
    for t in trials:
        assert t["overrides"][0] == f"model.d_ff={t['params']['d_ff']}" and t["steps"] == 4, t
        assert t["value"] == t["val_loss"] and np.isfinite(t["value"]), t
    groups = {t["group"]: t["devices"] for t in trials}
    assert sum(groups.values()) == 8, f"the groups do not partition the 8 devices: {groups}"
    study = study_of(out)
    told = {t.number: t.value for t in study.get_trials() if t.user_attrs.get("generation") == 0}
    assert told == {t["trial"]: pytest.approx(t["value"]) for t in trials}, "the study was told other values"
    assert (out / "gen-0" / "population.json").is_file()


def test_the_sampler_is_seeded_by_train_seed(tmp_path):
    """Asking a generation again from train.seed gives the same shapes, another seed others (no training)."""
    from shardml.run.group_trials import generation_trials, model_distributions
    from shardml.run.population import optuna_study

    space = model_distributions({"d_ff": "uniform(8,40)"})
    ask = lambda seed, name: [t.params["d_ff"] for t in generation_trials(  # noqa: E731
        optuna_study(str(tmp_path / name), seed), 0, 4, space, lambda arch: None, print)[0]]
    first = ask(0, "a")
    assert first == ask(0, "b") and first != ask(1, "c")


def test_a_shape_the_layout_cannot_split_is_told_fail_and_asked_again():
    import optuna

    from shardml.run.group_trials import generation_trials, model_distributions

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    odd = lambda arch: "odd" if int(arch[0].split("=")[1]) % 2 else None  # noqa: E731
    trials, done = generation_trials(study, 0, 4, model_distributions({"d_ff": "uniform(8,40)"}), odd, lambda line: None)
    assert not done and all(t.params["d_ff"] % 2 == 0 for t in trials), [t.params for t in trials]
    failed = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.FAIL]
    assert failed and all(t.params["d_ff"] % 2 for t in failed), "no odd proposal was told FAIL"
    assert [t.user_attrs["member"] for t in trials] == [0, 1, 2, 3]


def test_trials_of_one_shape_share_a_group():
    from types import SimpleNamespace

    from shardml.run.group_trials import plan_groups

    trials = [SimpleNamespace(params=p) for p in ({"d_ff": 16}, {"d_ff": 32}, {"d_ff": 16, "layers": 2}, {"d_ff": 16})]
    assert plan_groups(trials) == [(["model.d_ff=16"], [0, 3]), (["model.d_ff=32"], [1]),
                                   (["model.d_ff=16", "model.layers=2"], [2])]


def test_a_trial_equals_the_plain_run_of_its_overrides(first, tmp_path):
    out, trials = first
    trial = trials[1]
    alone = tmp_path / "alone"
    train(load_config("tiny", [*BASE, "mesh.data=4", "mesh.tensor=2", *trial["overrides"], f"out_dir={alone}"]),
          verbose=False)
    np.testing.assert_allclose(losses(out / "gen-0", trial["trial"]), losses(alone), rtol=1e-5,
                               err_msg=f"trial {trial['trial']} ({trial['overrides']}) in its group vs as a plain run")


def test_the_median_pruner_stops_a_worse_trials_group_and_leaves_the_others(first, tmp_path, capsys):
    """A study holding 4 completed trials whose loss at step 2 was the median of the first run's:
    the same shapes are asked (random startup), the 2 worse trials are pruned at step 2 and their
    groups stop; the others train on exactly as before."""
    import optuna

    out0, trials0 = first
    reported = {t.number + 4: t.intermediate_values[STEP] for t in study_of(out0).get_trials()
                if t.user_attrs.get("generation") == 0}  # numbered as in the run below, after 4 planted trials
    median = float(np.median(list(reported.values())))
    out = tmp_path / "pruned"
    out.mkdir()
    study = optuna.create_study(study_name="shardml", storage=f"sqlite:///{out / 'optuna.db'}")
    for _ in range(4):
        study.add_trial(optuna.trial.create_trial(value=median, params={}, distributions={},
                                                  intermediate_values={STEP: median}))
    train(load_config("tiny", [*BASE, *SEARCH, f"out_dir={out}"]), verbose=False)
    trials = json.loads((out / "population.json").read_text())["trials"]
    assert [t["params"] for t in trials] == [t["params"] for t in trials0], "the planted trials changed the shapes"
    pruned = {t["trial"] for t in trials if t["pruned"]}
    expected = {number for number, value in reported.items() if value > median}
    assert len(pruned) == 2 and pruned == expected, trials
    err = capsys.readouterr().err
    for t in trials:
        mine = losses(out / "gen-0", t["trial"])
        before = losses(out0 / "gen-0", t["trial"] - 4)  # the same trial, numbered after the 4 planted ones
        if t["pruned"]:  # its group stopped: its final evaluation is the one it reported at the pruning step
            assert t["val_loss"] == pytest.approx(reported[t["trial"]], rel=1e-6), t
            assert len(mine) == STEP and f"trial {t['trial']} pruned at step {STEP}; its 2 devices idle" in err, err
            np.testing.assert_allclose(mine, before[:STEP], rtol=1e-6)
        else:
            assert len(mine) == 4 and t["steps"] == 4
            np.testing.assert_allclose(mine, before, rtol=1e-6, err_msg="a live trial changed when others were pruned")
    states = {t.number: t.state for t in study_of(out).get_trials()}
    assert all(states[n] == optuna.trial.TrialState.PRUNED for n in pruned), states


def shardml(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args,message", [
    (["model.rope_base=uniform(1000,10000)"], "model.rope_base is float; list its values instead"),
    (["model.d_ff=uniform(8.5,32)"], "the bounds of a model range are integers"),
    (["model.d_ff=uniform(0,32)"], "model.d_ff=0"),
    (["population.sampler=grid", "population.pruner=none"], "a model distribution is sampled by Optuna"),
    (["population.size=5"], "population.size=5 trials per generation"),
    (["train.eval_every=0"], "population.pruner=median decides at evaluations"),
    (["mesh.members=2"], "leave mesh.members=1"),
])
def test_bad_architecture_searches_exit_2_before_compiling(capsys, no_compile, args, message):
    code, _, err = shardml(capsys, "train", "tiny", *BASE, *SEARCH, *args)
    assert code == 2, err
    assert message in err and "Traceback" not in err, err


def test_without_optuna_the_search_extra_is_named_before_compiling(capsys, no_compile, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    code, _, err = shardml(capsys, "train", "tiny", *BASE, *SEARCH)
    assert code == 2 and "pip install 'shardml[search]'" in err and "Traceback" not in err, err


def test_plan_refuses_architectures_optuna_has_not_picked_yet(capsys, no_compile):
    code, _, err = shardml(capsys, "plan", "tiny", *BASE, *SEARCH)
    assert code == 2 and "cannot be built ahead" in err and "Traceback" not in err, err


@pytest.mark.slow
def test_a_pruned_trial_sharing_its_group_is_frozen_while_the_others_train_on(tmp_path, capsys):
    """Every trial one shape (one group of 4 members, seeds 0..3), two generations: the second's
    trials repeat the first's exactly, so the median pruner stops the two above the first
    generation's median at step 2; they are frozen (their loss stays the one they reported), the
    others train on as before."""
    out = tmp_path / "shared"
    search = [*SEARCH, "model.d_ff=[16]", "population.generations=2"]
    train(load_config("tiny", [*BASE, *search, f"out_dir={out}"]), verbose=False)
    trials = json.loads((out / "population.json").read_text())["trials"]
    first, second = trials[:4], trials[4:]
    assert {t["group"] for t in trials} == {0} and [t["overrides"][1] for t in second] == [
        f"train.init_seed={i}" for i in range(4)], trials
    at_step = {t.number: t.intermediate_values[STEP] for t in study_of(out).get_trials()}
    median = float(np.median([at_step[t["trial"]] for t in first]))
    assert {t["trial"] for t in second if t["pruned"]} == {t["trial"] for t in second if at_step[t["trial"]] > median}
    assert sum(t["pruned"] for t in second) == 2 and "frozen in its group" in capsys.readouterr().err
    for before, t in zip(first, second):
        mine, theirs = losses(out / "gen-1", t["trial"]), losses(out / "gen-0", before["trial"])
        if t["pruned"]:
            assert len(mine) == STEP and t["val_loss"] == pytest.approx(at_step[t["trial"]], rel=1e-6), t
        else:
            np.testing.assert_allclose(mine, theirs, rtol=1e-6, err_msg="a live member changed when one was frozen")
            assert t["val_loss"] == pytest.approx(before["val_loss"], rel=1e-6)
