"""The run directory: a run that would train something else (another population kind, federated
algorithm, model or data) is refused, naming the keys and the flag that starts fresh, before
anything compiles; settings that do not change what is trained continue the run; every experiment
gets its own default out_dir; the checkpoint metadata is typed and versioned."""

import dataclasses
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shardml.core.errors import ConfigError
from shardml.run import run_dir as rd
from shardml.run.cli import main
from shardml.run.config import load_config, to_dict
from shardml.run.recipe import build
from shardml.run.train import train

BASE = ["model.kind=mlp", "data.corpus=digits", "model.d_ff=16", "model.dtype=float32", "train.batch_size=32",
        "train.eval_batches=0", "train.log_every=1", "checkpoint.every=0"]
POP = ["mesh.members=2", "mesh.data=2", "mesh.tensor=2", "population.size=2"]


def _contents(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in pathlib.Path(root).rglob("*") if p.is_file()}


def _refuse_compiling(monkeypatch):
    from jax._src import compiler

    def refuse(*args, **kwargs):
        raise AssertionError("compiled before rejecting the run")

    monkeypatch.setattr(compiler, "compile_or_get_cached", refuse)
    with pytest.raises(AssertionError, match="compiled before"):
        jax.jit(lambda x: x * 5.0 - 2.0)(jnp.float32(np.random.default_rng().random()))


def test_cli_refuses_a_population_kind_change_before_compiling_and_fresh_starts_over(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    common = ["train", "tiny", *BASE, *POP, "train.steps=2", f"out_dir={out}", "--quiet"]
    assert main([*common, "population.kind=ensemble"]) == 0, capsys.readouterr().err[-3000:]
    before = _contents(out)
    capsys.readouterr()
    with monkeypatch.context() as patch:
        _refuse_compiling(patch)
        code = main([*common, "population.kind=sweep", "optim.lr=[1e-3,1e-2]"])
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}: {err[-3000:]}"
    assert "population.kind: 'ensemble' -> 'sweep'" in err and "--fresh" in err and "fresh=True" in err, err
    assert "nothing to train" not in err and "Traceback" not in err, err
    assert _contents(out) == before, "the refused run changed the out_dir"
    assert main([*common, "population.kind=sweep", "optim.lr=[1e-3,1e-2]", "--fresh"]) == 0
    report = json.loads((out / "population.json").read_text())
    assert sorted(report["members"][0]["hyperparams"]) and "ensemble" not in report, report
    assert os.listdir(out / "previous"), "--fresh did not keep the previous run"


def test_python_refuses_a_federated_algorithm_change(tmp_path):
    fed = [*BASE, "mesh.members=4", "mesh.data=2", "federated.clients=8", "federated.local_steps=2",
           "train.batch_size=8", "train.steps=1", f"out_dir={tmp_path / 'fed'}"]
    train(load_config("tiny", [*fed, "federated.algorithm=fedavg"]), verbose=False)
    with pytest.raises(ConfigError, match=r"federated.algorithm: 'fedavg' -> 'fedprox'.*--fresh \(fresh=True"):
        train(load_config("tiny", [*fed, "federated.algorithm=fedprox"]), verbose=False)


def _identity(overrides):
    cfg = load_config("tiny", [*BASE, *overrides])
    parts = build(cfg)  # nothing compiles: the identity takes abstract shapes
    return rd.identity(parts.trainer, parts.data.fingerprint, to_dict(cfg))


@pytest.mark.parametrize("overrides,message", [
    (["model.d_ff=32"], r"holds a run of another model \(mlp_classifier .*first: b_in \[\[16\], 'float32'\] -> "
                       r"\[\[32\], 'float32'\]\)\) \(model.d_ff: 16 -> 32\); it was not touched"),
    (["model.heads=8"], r"trains something else \(model.heads: 4 -> 8\)"),
    (["data.noise=0.1"], r"trains something else \(data.noise: 0.0 -> 0.1\)"),
    (["train.seed=3"], r"trains something else \(train.seed: 0 -> 3\)"),
])
def test_a_model_or_data_change_is_refused_naming_the_keys(tmp_path, overrides, message):
    out = tmp_path / "run"
    out.mkdir()
    rd.write_run(str(out), _identity([]))
    with pytest.raises(ConfigError, match=message) as err:
        rd.claim_out_dir(str(out), _identity(overrides))
    assert "--fresh" in str(err.value) and "fresh=True" in str(err.value), err.value
    rd.claim_out_dir(str(out), _identity(overrides), fresh=True, notice=lambda _: None)
    assert os.listdir(out) == ["previous"], os.listdir(out)


def test_settings_that_do_not_change_what_is_trained_continue(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    rd.write_run(str(out), _identity([]))
    rd.claim_out_dir(str(out), _identity(["train.steps=500", "train.log_every=7", "train.eval_every=50",
                                          "checkpoint.every=9", "mesh.data=2", "mesh.tensor=4", "data.workers=1"]))


def test_identity_and_meta_round_trip_and_another_version_is_refused(tmp_path):
    ident = _identity([])
    assert rd.Identity.from_json(json.loads(json.dumps(ident.to_json()))) == ident
    assert ident.trained["model.kind"] == "mlp" and "train.steps" not in ident.trained, ident.trained
    meta = rd.Meta(rd.VERSION, 3, ident, 3, None, {"data": 8}, {"params/w": [[2], "float32"]}, {"params/w": 7})
    assert rd.Meta.from_json(json.loads(json.dumps(meta.to_json())), "here") == meta
    with pytest.raises(ConfigError, match=r"another shardml version \(checkpoint format 99.*--fresh"):
        rd.Meta.from_json({**meta.to_json(), "format": 99}, "here")


README_POPULATION = [
    ["population.kind=ensemble", "population.size=8", "mesh.members=2", "mesh.fsdp=1"],
    ["population.kind=ensemble", "population.size=8", "population.bootstrap=true"],
    ["population.kind=sweep", "population.size=8", "optim.lr=[1e-3,3e-3,1e-2,3e-2]"],
    ["population.kind=sweep", "population.size=8", "optim.lr=loguniform(1e-4,1e-1)", "population.prune_every=100"],
    ["population.kind=sweep", "population.size=8", "optim.lr=loguniform(1e-4,1e-1)", "population.sampler=optuna",
     "population.generations=3"],
    ["population.kind=pbt", "population.size=8", "optim.lr=loguniform(1e-4,1e-1)", "population.ready_every=50"],
    ["federated.algorithm=fedavg", "federated.clients=64", "federated.local_steps=8", "federated.partition=dirichlet",
     "federated.alpha=0.3"],
    ["federated.algorithm=fedopt", "federated.server_optimizer=yogi", "federated.clients=200", "federated.fraction=0.1"],
    ["federated.algorithm=fedavg", "federated.clients=64", "federated.update_clip=0.1", "federated.update_noise=1.0"],
    ["federated.algorithm=diloco", "federated.clients=8", "federated.local_steps=16", "federated.partition=natural"],
]


def test_default_out_dirs_keep_experiments_apart():
    def out_dir(overrides):
        cfg = load_config("tiny", [*BASE, "out_dir=runs/digits{experiment}", *overrides])
        return rd.default_out_dir(cfg.out_dir, to_dict(cfg))

    dirs = [out_dir(o) for o in README_POPULATION]
    assert len(set(dirs)) == len(dirs), f"two experiments share a directory: {dirs}"
    assert out_dir([]) == "runs/digits", "a plain run writes where out_dir says"
    assert dirs[0].startswith("runs/digits-ensemble8-") and dirs[6].startswith("runs/digits-fedavg-"), dirs
    assert out_dir(README_POPULATION[2] + ["train.steps=900", "mesh.data=4"]) == dirs[2], \
        "steps or mesh changed the experiment's directory: the run would not resume"
    assert load_config("tiny", ["out_dir=runs/x"]).out_dir == "runs/x"


# ----------------------------------------------------------------------------- structure

RUN = pathlib.Path(__file__).resolve().parent.parent / "shardml" / "run"
OWN = ("checkpoint", "resume", "loop", "engine", "throughput", "metrics", "run_dir", "store", "driver", "train",
       "federated", "population", "recipe", "inference", "preemption", "distributed", "library_log")


def _run_imports(name, inside_functions):
    """The ``shardml.run`` modules ``name`` imports (at module level, or inside functions)."""
    import ast

    tree = ast.parse((RUN / f"{name}.py").read_text())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and (id(node) in nested) == inside_functions:
            if node.module == "shardml.run":
                found |= {a.name for a in node.names}
            elif node.module.startswith("shardml."):
                found.add(node.module.removeprefix("shardml.run."))
    return found


def test_the_run_lifecycle_modules_import_without_cycles_or_imports_inside_functions():
    inside = {name: sorted(m for m in _run_imports(name, True)) for name in OWN}
    assert not any(inside.values()), f"shardml imports inside functions: { {k: v for k, v in inside.items() if v} }"
    graph = {name: {m for m in _run_imports(name, False) if m in OWN} for name in OWN}

    def reaches(start, target, seen=()):
        return any(m == target or (m not in seen and reaches(m, target, (*seen, m))) for m in graph[start])

    cycles = [name for name in OWN if reaches(name, name)]
    assert not cycles, f"import cycles through {cycles}: {graph}"


def test_a_config_given_as_dataclasses_asdict_is_the_same_run_as_its_config_keys():
    """A caller's ``dataclasses.asdict(cfg)`` spells ``model.from`` as ``model.from_``: it must not
    make a different run (the resumed multi-host run was refused so)."""
    cfg = load_config("tiny", [])
    assert rd.trained_keys(dataclasses.asdict(cfg)) == rd.trained_keys(to_dict(cfg))
    assert not any(key.endswith("_") for key in rd.trained_keys(dataclasses.asdict(cfg)))
