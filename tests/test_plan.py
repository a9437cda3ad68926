"""`shardml plan`: per-device memory and per-step communication, checked against closed-form theory."""

import dataclasses
import math
import os
import subprocess
import sys

import pytest

from shardml.config import ConfigError, load_config
from shardml.models.transformer import transformer_specs
from shardml.plan import (
    format_comparison,
    format_plan,
    layout_config,
    make_plan,
    parse_bytes,
)

LAYOUTS = {
    "data=8": ["mesh.data=8"],
    "fsdp=8": ["mesh.data=1", "mesh.fsdp=8"],
    "data=2,tensor=4": ["mesh.data=2", "mesh.tensor=4"],
    "fsdp=2,tensor=4": ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4"],
}

# Independent of shardml.sharding: which mesh axis divides each logical weight dimension
# (ZeRO-3 shards the model dimension over fsdp; Megatron splits heads, MLP hidden and vocabulary).
THEORY_AXIS = {"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"}


@pytest.fixture(scope="module")
def plans():
    return {name: make_plan(load_config("tiny", overrides), device_memory=parse_bytes("64KiB"), label=name)
            for name, overrides in LAYOUTS.items()}


def _leaves(tree):
    for value in tree.values():
        yield from (_leaves(value) if isinstance(value, dict) else [value])


def theory_param_bytes(cfg, mesh, only=None):
    """f32 bytes per device of every weight (or of those whose axes include ``only``)."""
    total = 0
    for spec in _leaves(transformer_specs(cfg.model)):
        axes = [THEORY_AXIS.get(name) for name in spec.logical]
        if only is not None and only not in axes:
            continue
        divisor = math.prod(mesh[a] for a in axes if a is not None)
        total += 4 * math.prod(spec.shape) // divisor
    return total


@pytest.mark.parametrize("name", LAYOUTS)
def test_state_bytes_per_device_match_theory(plans, name):
    p, cfg = plans[name], load_config("tiny", LAYOUTS[name])
    expected = theory_param_bytes(cfg, p.mesh)
    assert p.params_bytes == expected, f"{name}: parameters {p.params_bytes} B/device, theory {expected}"
    # AdamW keeps two f32 moments shaped like the parameters, plus a few step counters.
    extra = p.opt_state_bytes - 2 * expected
    assert 0 <= extra <= 64, f"{name}: optimizer state {p.opt_state_bytes} B vs 2 x params {2 * expected}"
    batch = 3 * 4 * cfg.train.batch_size * cfg.data.seq_len // (p.mesh["data"] * p.mesh["fsdp"])
    assert p.batch_bytes == batch, f"{name}: batch {p.batch_bytes} B/device, theory {batch}"
    # The compiler's own argument count: the same state and batch (+ step counter and rng key).
    state = p.params_bytes + p.opt_state_bytes + p.batch_bytes
    assert state <= p.arguments_bytes <= state + 64, f"{name}: compiled arguments {p.arguments_bytes} vs {state}"
    assert p.peak_bytes >= p.arguments_bytes + p.temporaries_bytes - p.aliased_bytes


def test_sharding_divides_parameters_as_layouts_say(plans):
    total = 4 * plans["data=8"].num_params
    assert plans["data=8"].params_bytes == total, "data parallel must replicate every parameter"
    for name in ("fsdp=8", "fsdp=2,tensor=4"):
        assert plans[name].params_bytes < total / 3, f"{name}: {plans[name].params_bytes} B of {total}"


def test_data_parallel_all_reduce_is_the_gradient(plans):
    """DP: one f32 all-reduce of every gradient element per step (scaling book), nothing else."""
    p = plans["data=8"]
    grads = 4 * p.num_params
    moved = p.comm_bytes("all-reduce", axis="data")
    assert grads <= moved <= 1.05 * grads, f"data all-reduce {moved} B vs gradient bytes {grads}"
    assert [r.kind for r in p.comm] == ["all-reduce"], f"unexpected collectives under data=8: {p.comm}"
    ring = 2 * 7 / 8 * moved
    assert abs(p.sent_bytes - ring) <= 8, f"ring estimate {p.sent_bytes} vs 2(n-1)/n x {moved} = {ring}"


def test_fsdp_gathers_each_weight_once_or_twice(plans):
    """ZeRO-3: every fsdp-sharded weight is all-gathered in the forward and (at most) again in the
    backward, so gathered bytes lie between 1x and 2x the full f32 weights sharded over fsdp."""
    p, cfg = plans["fsdp=8"], load_config("tiny", LAYOUTS["fsdp=8"])
    full = theory_param_bytes(cfg, {"fsdp": 1, "tensor": 1}, only="fsdp")
    gathered = p.comm_bytes("all-gather", axis="fsdp")
    assert full <= gathered <= 2 * full, f"fsdp all-gather {gathered} B vs sharded weights {full} B (x1..x2)"
    assert p.comm_bytes(axis="data") == 0 and p.comm_bytes(axis="tensor") == 0, p.comm
    # Gradients are reduced over fsdp (reduce-scatter, or all-reduce where the backend does not form one).
    reduced = p.comm_bytes("reduce-scatter", axis="fsdp") + p.comm_bytes("all-reduce", axis="fsdp")
    assert reduced >= full / 8, f"fsdp gradient reduction {reduced} B < one shard of the gradients {full / 8}"


def test_tensor_parallel_moves_activations_not_weights(plans):
    """Megatron TP: per layer >= 2 forward + 2 backward all-reduces of the local activations
    [B/data, S, D] (f32 here); the data axis still carries the (tensor-sharded) gradients."""
    p, cfg = plans["data=2,tensor=4"], load_config("tiny", LAYOUTS["data=2,tensor=4"])
    act = 4 * cfg.train.batch_size // 2 * cfg.data.seq_len * cfg.model.d_model
    in_layers = sum(r.bytes for r in p.comm if r.kind == "all-reduce" and r.axes == ("tensor",) and r.in_loop)
    assert in_layers >= 4 * cfg.model.layers * act, f"tensor all-reduce in layers {in_layers} B < 4 L x {act}"
    assert in_layers % act == 0, f"tensor all-reduces {in_layers} B are not whole activations of {act} B"
    assert p.comm_bytes("all-gather") == 0, "TP without fsdp must not gather weights"
    grads = theory_param_bytes(cfg, p.mesh)
    data = p.comm_bytes("all-reduce", axis="data")
    assert grads <= data <= 1.05 * grads + 256, f"data all-reduce {data} B vs tensor-sharded gradients {grads}"


def test_device_memory_warning_and_table(plans):
    small = plans["data=8"]
    assert small.fits is False and small.peak_bytes > parse_bytes("64KiB")
    text = format_plan(small)
    assert "WARNING" in text and "exceeds the device memory 64 KiB" in text, text
    roomy = dataclasses.replace(small, device_memory=parse_bytes("16GiB"))
    assert roomy.fits is True and "WARNING" not in format_plan(roomy)
    table = format_comparison(list(plans.values()))
    header = table.splitlines()[0]
    assert all(name in header for name in LAYOUTS), header
    assert "all-gather fsdp" in table and "all-reduce tensor (loop)" in table, table
    assert table.count("WARNING") == len(plans), "every layout over 64 KiB must be flagged"


def test_compare_layouts_start_from_a_fresh_mesh():
    base = load_config("default")  # preset mesh data=2 x fsdp=2 x tensor=2
    cfg = layout_config(base, "mesh.fsdp=8")
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (-1, 8, 1), cfg.mesh
    cfg = layout_config(base, "mesh.data=2, mesh.tensor=4, train.microbatches=2")
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.train.microbatches) == (2, 1, 4, 2)
    assert layout_config(base, "train.microbatches=4").mesh == base.mesh, "no mesh key: keep the mesh"
    with pytest.raises(ConfigError, match="'mesh.fsdp' is not key=value"):
        layout_config(base, "mesh.fsdp")


@pytest.mark.parametrize("text,expected", [("16GiB", 16 * 2**30), ("80GB", 80 * 10**9), ("512MiB", 2**29),
                                           ("1.5K", 1536), ("4096", 4096), ("2g", 2 * 2**30)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["16 potatoes", "-1GiB", "", "GiB", "0"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ConfigError, match="is not a size"):
        parse_bytes(text)


def shardml(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS", "NPROC")}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "-m", "shardml.cli", "plan", *args], check=False, capture_output=True, text=True,
                          env=env, timeout=600)


def test_cli_plan_prints_memory_comm_and_warning(plans):
    proc = shardml("tiny", "mesh.data=8", "--device-memory", "64KiB")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "8 cpu device(s): data=8" in out, out
    expected = plans["data=8"]
    for label, value in (("parameters (state shardings)", expected.params_bytes),
                         ("optimizer state (state shardings)", expected.opt_state_bytes)):
        line = next(line for line in out.splitlines() if label in line)
        assert line.split()[-2:] == _fmt(value).split(), f"{line!r} vs {value} B"
    assert "all-reduce" in out and "data" in out and "WARNING" in out, out


def _fmt(value):
    from shardml.plan import format_bytes

    return format_bytes(value)


@pytest.mark.parametrize("args,message", [
    (["tiny", "mesh.data=1", "mesh.tensor=3"], "multiply to 3 but 8 devices"),
    (["tiny", "--compare", "mesh.data=8", "mesh.data=2,mesh.tensor=3"],
     "--compare layout 'mesh.data=2,mesh.tensor=3': mesh sizes"),
    (["tiny", "--compare", "mesh.data=2,mesh.tensor=4,model.d_ff=66"], "model.d_ff=66 is not divisible"),
    (["tiny", "--device-memory", "16 potatoes"], "device memory '16 potatoes' is not a size"),
    (["tiny", "mesh.tensr=2"], "unknown config key 'mesh.tensr'"),
])
def test_cli_bad_input_exits_2_before_compiling(args, message):
    proc = shardml(*args)
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert message in proc.stderr, proc.stderr
    assert "plan:" not in proc.stdout and "compile" not in proc.stdout, "compiled before rejecting the input"
