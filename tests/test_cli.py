"""End to end: the shardml command on the tiny preset, as a user runs it."""

import json
import math
import os
import subprocess
import sys

import yaml


def shardml(*args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS", "NPROC")}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "-m", "shardml.cli", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)


def test_train_tiny_writes_config_and_metrics(tmp_path):
    out = tmp_path / "run"
    proc = shardml("train", "tiny", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.steps=6",
                   f"out_dir={out}", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data=2 x fsdp=2 x tensor=2" in proc.stdout, "the mesh is not printed"
    assert "mesh:" in proc.stdout and "steps: 6" in proc.stdout, "the resolved config is not printed"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["steps"] == 6 and saved["mesh"]["tensor"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 4, 6]
    assert all({"step", "loss", "tokens_per_s"} <= set(r) for r in records)
    assert all(r["tokens_per_s"] > 0 for r in records[1:]), records
    assert math.isfinite(records[-1]["val_loss"]) and records[-1]["loss"] < records[0]["loss"]
    assert any(name.startswith("events") for name in os.listdir(out / "tb")), "no TensorBoard events"


def test_layouts_give_the_same_losses_end_to_end(tmp_path):
    losses = []
    for layout in (["--cpu-devices", "1", "mesh.data=1"], ["mesh.data=2", "mesh.tensor=4"]):
        out = tmp_path / layout[-1]
        proc = shardml("train", "tiny", "train.steps=4", "train.log_every=1", f"out_dir={out}", "--quiet",
                       *layout, tmp_path=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses.append([json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()])
    assert len(losses[0]) == 4
    for a, b in zip(*losses):
        assert abs(a - b) <= 1e-5 * abs(a), f"one device {losses[0]} vs data=2 x tensor=4 {losses[1]}"


def test_bad_override_exits_2_with_suggestion(tmp_path):
    proc = shardml("train", "tiny", "mesh.tensr=2", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "unknown config key 'mesh.tensr'" in proc.stderr and "mesh.tensor" in proc.stderr, proc.stderr


def test_bad_layout_fails_before_compiling(tmp_path):
    proc = shardml("train", "tiny", "mesh.data=2", "mesh.tensor=4", "model.d_ff=66", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "model.d_ff=66 is not divisible by mesh.tensor=4" in proc.stderr, proc.stderr
    assert "Compiling" not in proc.stderr
