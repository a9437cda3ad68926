"""Populations on the members axis: every member equals the same model trained alone (from the
overrides population.json gives), one compile for all, own keys, PBT and early stopping on
device, ensemble metrics, checkpoints of whole populations, Optuna generations."""

import json

import numpy as np
import pytest

from conftest import assert_bitwise_equal, host
from shardml.core.errors import ConfigError
from shardml.parallel.members import hyperparams_of
from shardml.parallel.population import EnsembleMetrics, plan_members
from shardml.run.config import load_config
from shardml.run.recipe import build
from shardml.run.train import train

BASE = ["model.kind=mlp", "data.corpus=digits", "model.d_ff=32", "model.dtype=float32", "optim.lr=1e-2",
        "train.steps=8", "train.log_every=1", "train.batch_size=32", "train.eval_batches=0", "checkpoint.every=0"]
SHARDED = ["mesh.members=2", "mesh.data=2", "mesh.tensor=2"]
ALONE = ["mesh.data=4", "mesh.tensor=2"]  # the same devices per member, without the members axis


def run(tmp_path, name, overrides):
    out = tmp_path / name
    summary = train(load_config("tiny", [*BASE, *overrides, f"out_dir={out}"]), verbose=False)
    return out, summary


def member_losses(out, member=None, key="loss"):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if r.get("member") == member]


@pytest.fixture(scope="module")
def populations(tmp_path_factory):
    root = tmp_path_factory.mktemp("populations")
    kinds = {
        "ensemble": ["population.kind=ensemble", "population.size=4"],
        "bootstrap": ["population.kind=ensemble", "population.size=4", "population.bootstrap=true"],
        "sweep": ["population.kind=sweep", "population.size=4", "optim.lr=[3e-3,3e-2]"],
        "pbt": ["population.kind=pbt", "population.size=4", "optim.lr=loguniform(1e-3,1e-1)",
                "population.ready_every=4", "population.exploit_fraction=0.5"],
    }
    return {kind: run(root, kind, [*SHARDED, *overrides]) for kind, overrides in kinds.items()}


@pytest.mark.parametrize("kind,members,steps", [("ensemble", (1, 3), 8), ("bootstrap", (2,), 8), ("sweep", (0, 3), 8),
                                                ("pbt", (1,), 4)])
def test_every_member_equals_the_model_trained_alone(populations, tmp_path, kind, members, steps):
    out, _ = populations[kind]
    report = json.loads((out / "population.json").read_text())
    for member in members:
        overrides = report["members"][member]["overrides"]
        alone, _ = run(tmp_path, f"{kind}-{member}", [*ALONE, *overrides])
        want = member_losses(out, member)[:steps]  # PBT: until its first exploit
        np.testing.assert_allclose(member_losses(alone)[:steps], want, rtol=1e-5,
                                   err_msg=f"{kind} member {member} ({overrides}) alone vs in the population")
        # Adam normalises a gradient's scale away from the losses: compare the gradients' too.
        np.testing.assert_allclose(member_losses(alone, key="grad_norm")[:steps],
                                   member_losses(out, member, key="grad_norm")[:steps], rtol=1e-5,
                                   err_msg=f"{kind} member {member}: gradient norms alone vs in the population")
    assert len({tuple(m["overrides"]) for m in report["members"]}) == 4, "two members have the same overrides"


def test_members_have_their_own_keys_initialisation_and_data(populations):
    _, summary = populations["ensemble"]
    state = host(summary.state)
    assert len({bytes(row) for row in state.rng}) == 4, f"members share an RNG key: {state.rng}"
    w = state.params["w_in"]
    assert all(not np.allclose(w[i], w[j]) for i in range(4) for j in range(i)), "two members are equal"
    losses = np.array([member_losses(populations["ensemble"][0], m)[0] for m in range(4)])
    assert len(set(losses.round(6))) == 4, f"members start alike: {losses}"
    boot = build(load_config("tiny", [*BASE, *SHARDED, "population.kind=ensemble", "population.size=4",
                                      "population.bootstrap=true"]))
    batch = boot.data.batch(0)["inputs"]
    assert batch.shape[0] == 4 and not np.array_equal(batch[0], batch[1]), "bootstrap members see the same rows"


def test_one_compile_serves_the_population_and_pbt_records_lineage(populations):
    out, summary = populations["pbt"]
    report = json.loads((out / "population.json").read_text())
    lineage = [e for m in report["members"] for e in m.get("lineage", [])]
    assert lineage and all(e["step"] == 4 for e in lineage), lineage
    for event in lineage:  # the copy carries its donor's hyperparameters, perturbed by 0.8 or 1.2
        donor = report["members"][event["copied_from"]]
        ratio = event["hyperparams"]["lr"] / donor["hyperparams"]["lr"]
        assert min(abs(ratio - 0.8), abs(ratio - 1.2)) < 1e-5 or event["copied_from"] in \
            [e["member"] for e in lineage], (event, donor)
    sweep = build(load_config("tiny", [*BASE, *SHARDED, "population.kind=sweep", "population.size=4",
                                       "optim.lr=[3e-3,3e-2]"]))
    trainer = sweep.trainer
    state = trainer.init(0)
    for step in range(3):
        state, _ = trainer.step(state, trainer.put(sweep.data.batch(step)))
    np.testing.assert_allclose(np.asarray(hyperparams_of(state.opt_state)["lr"]), [3e-3, 3e-3, 3e-2, 3e-2], rtol=1e-6)
    from shardml.parallel.population import freeze
    frozen = freeze(state, [1])
    before = host(frozen.params)
    frozen, _ = trainer.step(frozen, trainer.put(sweep.data.batch(3)))
    assert np.array_equal(host(frozen.params)["w_in"][1], before["w_in"][1]), "a stopped member still trains"
    assert not np.array_equal(host(frozen.params)["w_in"][0], before["w_in"][0])
    assert trainer._step._cache_size() == 1, "another value or a stopped member recompiled the step"


def test_ensemble_reports_members_and_the_mean_of_probabilities(populations):
    out, _ = populations["ensemble"]
    report = json.loads((out / "population.json").read_text())
    ensemble = report["ensemble"]
    assert set(ensemble) >= {"loss", "accuracy", "ece", "entropy", "disagreement", "member_accuracy"}
    accuracies = [m["val_accuracy"] for m in report["members"]]
    np.testing.assert_allclose(ensemble["member_accuracy"], accuracies, rtol=1e-9)


def test_ensemble_metrics_against_a_hand_computation():
    # Two members, two examples, two classes.
    logits = np.log(np.array([[[0.9, 0.1], [0.4, 0.6]], [[0.7, 0.3], [0.8, 0.2]]]))
    targets = np.array([0, 1])
    metrics = EnsembleMetrics()
    metrics.add(logits, targets)
    out = metrics.result()
    mean = np.array([[0.8, 0.2], [0.6, 0.4]])  # mean of probabilities
    assert abs(out["loss"] - (-(np.log(0.8) + np.log(0.4)) / 2)) < 1e-12
    assert out["accuracy"] == 0.5 and out["member_accuracy"] == [1.0, 0.5]
    entropy = -(mean * np.log(mean)).sum(-1).mean()
    assert abs(out["entropy"] - entropy) < 1e-12
    assert out["disagreement"] == 0.25  # member 0 predicts class 1 for example 1, the ensemble class 0
    # ECE: confidences 0.8 (correct) and 0.6 (wrong) in different bins: (|0.8-1| + |0.6-0|) / 2.
    assert abs(out["ece"] - 0.4) < 1e-12


def test_search_spaces_form_grids_and_samples():
    members = plan_members("sweep", 8, {"lr": [1e-3, 1e-2], "b1": [0.8, 0.9], "weight_decay": "uniform(0,0.1)"}, 0)
    grid = [(m.hyperparams["lr"], m.hyperparams["b1"]) for m in members]
    assert sorted(set(grid)) == [(1e-3, 0.8), (1e-3, 0.9), (1e-2, 0.8), (1e-2, 0.9)] and len(grid) == 8
    decays = [m.hyperparams["weight_decay"] for m in members]
    assert len(set(decays)) == 8 and all(0 <= d <= 0.1 for d in decays)
    again = plan_members("sweep", 8, {"lr": [1e-3, 1e-2], "b1": [0.8, 0.9], "weight_decay": "uniform(0,0.1)"}, 0)
    assert [m.hyperparams for m in again] == [m.hyperparams for m in members], "sampling is not seeded"
    assert [m.init_seed for m in members] == list(range(8))
    with pytest.raises(ConfigError, match=r"size=6 is not a multiple of the grid's 4 points"):
        plan_members("sweep", 6, {"lr": [1e-3, 1e-2], "b1": [0.8, 0.9]}, 0)


@pytest.mark.parametrize("overrides,message", [
    (["population.size=3", "mesh.members=2"], r"population.size=3 is not divisible by mesh.members=2"),
    (["population.size=4", "mesh.pipeline=2", "model.kind=transformer", "data.corpus=pydoc"],
     r"with mesh.pipeline=2: members are vmapped"),
    (["population.kind=ensemble", "population.size=4", "optim.lr=[1e-3,1e-2]"], r"members differ by initialisation"),
    (["population.kind=sweep", "population.size=4"], r"needs a search space"),
    (["optim.lr=[1e-3,1e-2]"], r"a search space needs a population"),
    # model.* lists train on groups of devices (tests/test_groups_config.py), not through build
    (["population.kind=sweep", "population.size=2", "model.d_ff=[32,64]"],
     r"model.\* lists .* build them with shardml.run.groups"),
    (["population.kind=pbt", "population.size=2", "optim.lr=[1e-3,1e-2]"], r"needs population.ready_every"),
])
def test_bad_populations_are_refused_before_compiling(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build(load_config("tiny", [*BASE, *overrides]))


def test_a_killed_population_resumes_bitwise(tmp_path):
    from shardml.run.loop import run_loop
    from shardml.run.train import loop_settings

    cfg = load_config("tiny", [*BASE, *SHARDED, "population.kind=sweep", "population.size=4",
                               "optim.lr=[3e-3,3e-2]", "checkpoint.every=3", f"out_dir={tmp_path / 'a'}"])
    parts = build(cfg)
    whole = run_loop(parts.trainer, parts.data, loop_settings(cfg, verbose=False))

    class Killed(Exception):
        pass

    class Dies:
        fingerprint = parts.data.fingerprint

        def batch(self, step):
            if step == 5:
                raise Killed()
            return parts.data.batch(step)

    import dataclasses
    other = dataclasses.replace(cfg, out_dir=str(tmp_path / "b"))
    with pytest.raises(Killed):
        run_loop(parts.trainer, Dies(), loop_settings(other, verbose=False))
    resumed = run_loop(parts.trainer, parts.data, loop_settings(other, verbose=False))
    assert resumed.resumed_from == 3
    assert_bitwise_equal(host(resumed.state), host(whole.state), "population resumed vs uninterrupted")


@pytest.mark.slow
def test_optuna_generations_continue_the_stored_study(tmp_path, capsys):
    import optuna

    overrides = ["population.kind=sweep", "population.size=2", "population.sampler=optuna",
                 "optim.lr=loguniform(1e-3,1e-1)", "train.steps=4", f"out_dir={tmp_path / 'study'}"]
    train(load_config("tiny", [*BASE, *overrides, "population.generations=1"]), verbose=False)
    train(load_config("tiny", [*BASE, *overrides, "population.generations=2"]), verbose=False)
    study = optuna.load_study(study_name="shardml", storage=f"sqlite:///{tmp_path / 'study' / 'optuna.db'}")
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), trials
    assert [t.user_attrs["generation"] for t in trials] == [0, 0, 1, 1]
    assert (tmp_path / "study" / "gen-1" / "population.json").is_file()


def test_throughput_counts_every_members_examples_and_one_models_flops():
    """tokens/s and MFU of a population or a federated round: examples of every member, slot and local
    step, at the FLOPs of one model's forward (not of a batch read as if its leading axes were rows)."""
    import jax
    import optax

    from shardml import build_population, make_mesh
    from shardml.analysis.flops import training_flops_per_example
    from shardml.core.losses import classification
    from shardml.models.mlp import mlp_classifier
    from shardml.parallel.federated import build_federated, fedavg
    from shardml.run.loop import Throughput

    model = mlp_classifier(64, 16, 10)
    mesh = make_mesh({"members": 2, "data": 4})
    per_example = training_flops_per_example(model, jax.ShapeDtypeStruct((8, 64), np.float32))

    def measured(trainer, shape):
        batch = {"inputs": np.zeros((*shape, 64), np.float32), "targets": np.zeros(shape, np.int32)}
        meter = Throughput(trainer, batch)
        return meter.rows, meter.flops_per_example

    shared = build_population(model, mesh, optax.sgd(0.1), 4, loss=classification)
    own = build_population(model, mesh, optax.sgd(0.1), 4, loss=classification, per_member_data=True)
    rounds = build_federated(model, mesh, fedavg(0.1), clients=4, local_steps=3, loss=classification)
    assert measured(shared, (8,)) == (4 * 8, per_example)
    assert measured(own, (4, 8)) == (4 * 8, per_example)
    assert measured(rounds, (4, 3, 8)) == (4 * 3 * 8, per_example)
