"""The shardml command as a user runs it: called in-process (``main([...])``, exit codes and output
captured), and as ``python -m shardml`` where a fresh process is the point (device settings)."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml

from shardml.core.data import TextBatches, load_tokens
from shardml.core.optim import default_optimizer
from shardml.run.cli import main
from shardml.run.config import load_config
from shardml.run.recipe import build

from conftest import child_env


def shardml(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def independent_tiny_losses():
    """The tiny preset's first 4 steps with plain jax.grad + optax on one device (no shardml step)."""
    cfg = load_config("tiny")
    parts = build(cfg)
    model = parts.model
    params = jax.device_put(jax.device_get(parts.trainer.init(cfg.train.seed).params), jax.devices()[0])
    source = TextBatches(load_tokens("pydoc"), cfg.train.batch_size, cfg.data.seq_len, cfg.train.seed)
    optimizer = default_optimizer(cfg.optim, cfg.train.steps)
    opt_state = optimizer.init(params)

    @jax.jit
    def update(p, opt_state, batch):
        def loss(p):
            logits = model(p, batch["inputs"])
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]))

        value, grads = jax.value_and_grad(loss)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, value

    losses = []
    for step in range(4):
        params, opt_state, value = update(params, opt_state, source.batch(step))
        losses.append(float(value))
    return losses


def test_train_tiny_writes_config_metrics_and_events(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = shardml(capsys, "train", "tiny", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                                "train.steps=6", f"out_dir={out}")
    assert code == 0, err[-3000:]
    assert "8 cpu device(s): data=2 x fsdp=2 x tensor=2" in stdout, "the mesh is not printed"
    assert f"config: {out / 'config.yaml'} holds the full resolved config" in stdout, "the header does not say where"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["steps"] == 6 and saved["mesh"]["tensor"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 4, 6]
    assert all(r["tokens_per_s"] > 0 for r in records[1:]), records
    assert math.isfinite(records[-1]["val_loss"]) and records[-1]["loss"] < records[0]["loss"]
    assert any(name.startswith("events") for name in os.listdir(out / "tb")), "no TensorBoard events"
    assert json.loads((out / "run.json").read_text())["model"] == "transformer"


@pytest.mark.parametrize("layout", [["mesh.data=8"],
                                    pytest.param(["mesh.data=2", "mesh.tensor=4"], marks=pytest.mark.slow)])
def test_command_line_losses_equal_the_independent_update(capsys, tmp_path, independent_tiny_losses, layout):
    out = tmp_path / "run"
    code, _, err = shardml(capsys, "train", "tiny", "train.steps=4", "train.log_every=1", f"out_dir={out}",
                           "--quiet", *layout)
    assert code == 0, err[-3000:]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(losses, independent_tiny_losses, rtol=1e-5,
                               err_msg=f"{layout}: shardml train vs plain jax.grad + optax on one device")


def test_bad_override_exits_2_with_suggestion(capsys):
    code, _, err = shardml(capsys, "train", "tiny", "mesh.tensr=2")
    assert code == 2
    assert "unknown config key 'mesh.tensr'" in err and "mesh.tensor" in err, err


@pytest.mark.parametrize("args,message", [
    (["mesh.data=2", "mesh.tensor=4", "model.d_ff=66"], "has size 66 along 'mlp'"),
    (["optim.lr=-1"], "optim.lr=-1.0 must be > 0.0"),
    (["model.kv_heads=3"], "model.heads=4 is not divisible by model.kv_heads=3"),
    (["model.experts=4", "model.capacity_factor=-1"], "model.capacity_factor=-1.0 must be >= 0"),
    (["model.capacity_factor=1.5"], "model.capacity_factor=1.5 does nothing with model.experts=0"),
    # Library errors (argument names) reworded in config keys by the run layer.
    (["data.seq_len=600000"], "data.seq_len=600000 is longer than the training text"),
    (["mesh.pipeline=4", "mesh.data=2", "model.layers=6"],
     "model.layers=6 is not divisible by mesh.pipeline x pipeline.repeats = 4 x 1 = 4"),
    (["mesh.pipeline=2", "mesh.data=4", "pipeline.schedule=circular", "pipeline.repeats=2", "pipeline.microbatches=3"],
     "pipeline.microbatches=3 is not a multiple of mesh.pipeline=2"),
])
def test_bad_input_exits_2_before_compiling(capsys, no_compile, args, message):
    code, _, err = shardml(capsys, "train", "tiny", *args)
    assert code == 2, err
    assert message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, f"not one line: {err}"


def test_out_dir_naming_a_file_exits_2_and_leaves_it(capsys, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("my notes")
    code, _, err = shardml(capsys, "train", "tiny", "train.steps=1", f"out_dir={target}")
    assert code == 2 and "is an existing file" in err, err
    assert target.read_text() == "my notes"


def test_yaml_that_does_not_parse_exits_2(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: {steps: 3\n")
    code, _, err = shardml(capsys, "train", str(path))
    assert code == 2 and "is not valid YAML at line" in err and "Traceback" not in err, err


def _fresh_process(args, env_changes, cwd):
    env = child_env(**env_changes)
    return subprocess.run([sys.executable, "-m", "shardml", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


@pytest.mark.slow  # two fresh processes
@pytest.mark.parametrize("env,devices", [
    ({"JAX_NUM_CPU_DEVICES": "4"}, 4),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, 2),
], ids=["JAX_NUM_CPU_DEVICES", "XLA_FLAGS"])
def test_python_m_shardml_honours_the_users_device_count(tmp_path, env, devices):
    proc = _fresh_process(["train", "tiny", "train.steps=1", f"out_dir={tmp_path / 'run'}"],
                          env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{devices} cpu device(s)" in proc.stdout, proc.stdout[-2000:]


def test_conflicting_device_settings_are_an_error_naming_both(tmp_path):
    proc = _fresh_process(["train", "tiny", "--cpu-devices", "4"],
                          {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--cpu-devices asks for 4" in proc.stderr and "xla_force_host_platform_device_count asks for 2" in \
        proc.stderr and "Traceback" not in proc.stderr, proc.stderr
