"""The Python API is as careful as the command line (issue 31): ``fit`` refuses what ``shardml train``
refuses, in the same words and before anything compiles; a finished ``fit`` asked again still
reports its evaluation; sweep lists and distributions are checked value by value like single
values; ``population.json``'s overrides train a member alone on the same devices."""

import json

import jax
import numpy as np
import optax
import pytest

import shardml
from shardml.run.cli import main
from shardml.run.config import load_config
from shardml.run.errors import reword
from shardml.run.train import train

MESH = {"data": 2, "fsdp": 2, "tensor": 2}  # data x fsdp = 4 splits the batch
SMALL = ["model.d_ff=32", "train.steps=4", "train.log_every=1", "train.batch_size=32", "checkpoint.every=0"]


def cli(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def digits():
    return shardml.load_digits()


def test_fit_refuses_an_indivisible_batch_before_compiling_in_the_cli_s_words(capsys, no_compile, digits, tmp_path):
    data = shardml.ArrayBatches(digits, batch_size=30)
    with pytest.raises(shardml.LayoutError) as caught:
        shardml.fit(shardml.mlp_classifier(64, 32, 10), data, optax.adam(1e-2), loss=shardml.classification,
                    mesh=MESH, steps=2, out_dir=str(tmp_path / "fit"), verbose=False)
    message = str(caught.value)
    assert message.startswith("batch_size=30 is not divisible by data=2 x fsdp=2 x microbatches=1 = 4"), message
    assert not (tmp_path / "fit").exists(), "the run directory was claimed before the batch was checked"
    code, err = cli(capsys, "train", "configs/digits.yaml", *[f"mesh.{k}={v}" for k, v in MESH.items()],
                    "train.batch_size=30", f"out_dir={tmp_path / 'cli'}")
    assert code == 2, err
    cfg = load_config("configs/digits.yaml", ["train.batch_size=30"])
    assert err.strip() == f"shardml: error: {reword(message, cfg)}", "the CLI and fit word the check differently"


def test_a_finished_fit_asked_again_returns_its_evaluation(digits, tmp_path):
    data = shardml.ArrayBatches(digits, batch_size=32)
    kwargs = dict(loss=shardml.classification, mesh=MESH, steps=3, eval_data=data.eval_batches(2),
                  out_dir=str(tmp_path / "run"), verbose=False)
    first = shardml.fit(shardml.mlp_classifier(64, 32, 10), data, optax.adam(1e-2), **kwargs)
    again = shardml.fit(shardml.mlp_classifier(64, 32, 10), data, optax.adam(1e-2), **kwargs)
    assert again.resumed_from == 3 and first.val is not None
    assert again.val == pytest.approx(first.val, rel=1e-6), (again.val, first.val)


@pytest.mark.parametrize("searched,alone", [
    ("optim.b1=[0.9,1.5]", "optim.b1=1.5"),
    ("optim.b1=uniform(0.5,1.5)", "optim.b1=1.5"),
    ("optim.lr=[1e-3,-1]", "optim.lr=-1"),
    ("optim.weight_decay=loguniform(1e-4,-1)", None),  # an empty range: refused by the space itself
])
def test_sweep_values_are_refused_like_single_values(capsys, no_compile, tmp_path, searched, alone):
    sweep = ["population.kind=sweep", "population.size=2", f"out_dir={tmp_path}"]
    code, err = cli(capsys, "train", "configs/digits.yaml", *sweep, searched)
    assert code == 2 and "Traceback" not in err, err
    if alone is None:
        assert "optim.weight_decay=" in err, err
        return
    single_code, single_err = cli(capsys, "train", "configs/digits.yaml", f"out_dir={tmp_path}", alone)
    assert single_code == 2 and err == single_err, (err, single_err)


def test_a_member_s_overrides_train_it_alone_on_the_same_devices(tmp_path):
    command = ["configs/digits.yaml", *SMALL, "population.kind=ensemble", "population.size=2", "mesh.members=2",
               "mesh.fsdp=1", f"out_dir={tmp_path / 'pop'}"]
    population = train(load_config(command[0], command[1:]), verbose=False)
    entry = json.loads((tmp_path / "pop" / "population.json").read_text())["members"][1]
    overrides = entry["overrides"]
    assert {o.split("=")[0] for o in overrides} >= {f"mesh.{axis}" for axis in shardml.MESH_AXES}, overrides
    assert f"out_dir={tmp_path / 'pop' / 'member-1'}" in overrides
    alone = train(load_config(command[0], [*command[1:], *overrides]), verbose=False)  # as README says
    assert alone.mesh == {"members": 1, "pipeline": 1, "data": 4, "fsdp": 1, "expert": 1, "context": 1, "tensor": 2}, alone.mesh
    member = jax.tree.map(lambda x: np.asarray(x)[1], jax.device_get(population.state.params))
    for got, want in zip(jax.tree.leaves(jax.device_get(alone.state.params)), jax.tree.leaves(member)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
