"""`shardml plan`: per-device memory and per-step communication, checked against closed-form theory
written here (independent of shardml's rules and of shardml.analysis.theory)."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from shardml.analysis.audit import collectives
from shardml.analysis.plan import (
    comm_rows,
    compiled_step,
    format_bytes,
    format_comparison,
    format_plan,
    parse_bytes,
    plan_of,
)
from shardml.core.errors import SettingError
from shardml.run.errors import ConfigError
from shardml.core.mesh import make_mesh
from shardml.models.transformer import transformer_specs
from shardml.run import cli
from shardml.run.config import load_config
from shardml.run.planning import abstract_batch, layout_config
from shardml.run.recipe import build

# The layouts of the tiny preset this module plans (as `--compare` columns). tests/test_audit_theory.py
# reads the same compiled steps through `compiled_layout`.
LAYOUTS = {
    "data=8": "mesh.data=8",
    "fsdp=8": "mesh.fsdp=8",
    "data=2,tensor=4": "mesh.data=2,mesh.tensor=4",
    "fsdp=2,tensor=4": "mesh.fsdp=2,mesh.tensor=4",
}
# A pipelined layout: circular (v = 2) on pipeline=2 x data=2 x fsdp=2, 2 pipeline microbatches per
# pass, 2 passes per step (the run tests/test_pipeline.py trains through the command line, so one
# compile serves both).
PIPELINED = ("mesh.pipeline=2,mesh.fsdp=2,pipeline.schedule=circular,pipeline.repeats=2,pipeline.microbatches=2,"
             "train.microbatches=2,train.steps=4")
SMALL = parse_bytes("64KiB")

# Independent of shardml's rules: which mesh axis divides each logical weight dimension (ZeRO-3
# shards the model dimension over fsdp; Megatron splits heads, MLP hidden and vocabulary; the
# pipeline splits the stacked layers).
THEORY_AXIS = {"layers": "pipeline", "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
               "vocab": "tensor", "experts": "expert"}


# The plans and audits read each layer's collectives in the layer loop: the layers scanned, with the
# remat the tiny preset would take on a device too small for it unrolled.
SCANNED = ["model.remat=dots", "model.layer_loop=scan"]


@functools.cache
def compiled_layout(layout: str, devices: int = 8, scanned: bool = True):
    """(parts, CompiledStep) of the tiny preset with one ``--compare`` layout, compiled once per session."""
    cfg = layout_config(load_config("tiny", SCANNED if scanned else []), layout)
    parts = build(cfg, jax.devices()[:devices])
    return parts, compiled_step(parts.trainer, abstract_batch(parts))


class _Plans(dict):
    """Each layout's plan, compiled when a test first asks for it (the pipelined one only in the slow suite)."""

    def __missing__(self, name):
        layout = {**LAYOUTS, "pipeline=2": PIPELINED}[name]
        self[name] = plan_of(compiled_layout(layout)[1], device_memory=SMALL, label=name)
        return self[name]


@pytest.fixture(scope="module")
def plans():
    return _Plans()


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


def theory_batch_bytes(cfg, mesh):
    """inputs, targets (int32) and mask (f32): 3 x 4 bytes per token of this device's rows."""
    return 3 * 4 * cfg.train.batch_size * cfg.data.seq_len // (mesh["data"] * mesh["fsdp"])


def config_of(layout):
    return compiled_layout(layout)[0].cfg


# Mixture of experts on an expert axis: 4 experts (and a shared one), 2 per device.
EXPERTS = "mesh.expert=2,mesh.fsdp=2,mesh.tensor=2,model.experts=4,model.shared_experts=1,model.expert_d_ff=48,model.layers=2"


def test_theory_counts_expert_parameters_per_device_as_written_here():
    """No compile: :mod:`shardml.analysis.theory`'s parameter bytes of a mixture-of-experts config on
    expert layouts equal the count written here from the model's own shapes."""
    from shardml.analysis.theory import layout_theory  # noqa: PLC0415
    from shardml.run.planning import workload  # noqa: PLC0415

    cfg = build(layout_config(load_config("tiny", SCANNED), EXPERTS), jax.devices()[:8]).cfg
    for sizes in ({"expert": 2, "fsdp": 2, "tensor": 2}, {"expert": 4, "data": 2}, {"expert": 1, "data": 8}):
        mesh = {"members": 1, "pipeline": 1, "data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **sizes}
        expected = theory_param_bytes(cfg, mesh)
        assert layout_theory(workload(cfg), mesh).params_bytes == expected, f"{sizes}: theory vs {expected}"


@pytest.mark.slow
def test_expert_layout_parameter_bytes_match_theory_and_the_oracle():
    """The compiled step's parameter (and moment) bytes per device on expert=2 x fsdp=2 x tensor=2
    equal the count written here and :mod:`shardml.analysis.theory`'s (experts / expert per device)."""
    from shardml.analysis.theory import layout_theory  # noqa: PLC0415
    from shardml.run.planning import workload  # noqa: PLC0415

    parts, step = compiled_layout(EXPERTS)
    p = plan_of(step, device_memory=SMALL, label="expert=2")
    expected = theory_param_bytes(parts.cfg, p.mesh)
    assert p.params_bytes == expected, f"parameters {p.params_bytes} B/device, written here {expected}"
    assert theory_param_bytes(parts.cfg, p.mesh, only="expert") * 2 == theory_param_bytes(
        parts.cfg, {**p.mesh, "expert": 1}, only="expert"), "the experts must be split over expert"
    theory = layout_theory(workload(parts.cfg), dict(p.mesh))
    assert (theory.params_bytes, theory.opt_state_bytes) == (expected, 2 * expected), theory
    assert 0 <= p.opt_state_bytes - 2 * expected <= 64


@pytest.mark.parametrize("name", [*LAYOUTS, pytest.param("pipeline=2", marks=pytest.mark.slow)])
def test_state_bytes_per_device_match_theory(plans, name):
    p = plans[name]
    cfg = config_of(LAYOUTS.get(name, PIPELINED))
    expected = theory_param_bytes(cfg, p.mesh)
    assert p.params_bytes == expected, f"{name}: parameters {p.params_bytes} B/device, theory {expected}"
    # AdamW keeps two f32 moments shaped like the parameters, plus a few step counters.
    extra = p.opt_state_bytes - 2 * expected
    assert 0 <= extra <= 64, f"{name}: optimizer state {p.opt_state_bytes} B vs 2 x params {2 * expected}"
    batch = theory_batch_bytes(cfg, p.mesh)
    assert p.batch_bytes == batch, f"{name}: batch {p.batch_bytes} B/device, theory {batch}"
    # The compiler's own argument count: the same state and batch (+ step counters and rng key).
    state = 3 * expected + batch
    assert state <= p.arguments_bytes <= state + 128, f"{name}: compiled arguments {p.arguments_bytes} vs {state}"
    # What stays resident besides temporaries: the arguments, and of the outputs only what is not
    # written over the donated state (metrics and counters: a few scalars, ~400 B on XLA:CPU).
    # Without donation the new state would count a second time; a peak that forgot aliasing or
    # sharding would differ from this theory.
    resident = p.peak_bytes - p.temporaries_bytes
    assert state <= resident <= state + 1024, (
        f"{name}: peak {p.peak_bytes} B - temporaries {p.temporaries_bytes} B = {resident} B resident, theory "
        f"{state} B (params + 2 moments + batch; the new state must be aliased to the donated one)")


def test_sharding_divides_parameters_as_layouts_say(plans):
    total = 4 * plans["data=8"].num_params
    assert plans["data=8"].params_bytes == total, "data parallel must replicate every parameter"
    for name in ("fsdp=8", "fsdp=2,tensor=4"):
        assert plans[name].params_bytes < total / 3, f"{name}: {plans[name].params_bytes} B of {total}"
    # Memory that must scale with fsdp: fsdp=8 holds an eighth of every weight with an fsdp axis.
    cfg = config_of(LAYOUTS["data=8"])
    sharded = theory_param_bytes(cfg, {"pipeline": 1, "fsdp": 1, "tensor": 1}, only="fsdp")
    saved = plans["data=8"].params_bytes - plans["fsdp=8"].params_bytes
    assert saved == sharded - sharded // 8, f"fsdp=8 saves {saved} B/device of parameters, theory {sharded * 7 // 8}"


def test_data_parallel_all_reduce_is_the_gradient(plans):
    """DP: one f32 all-reduce of every gradient element per step (scaling book), nothing else."""
    p = plans["data=8"]
    grads = 4 * p.num_params
    moved = p.comm_bytes("all-reduce", axis="data")
    assert grads <= moved <= 1.05 * grads, f"data all-reduce {moved} B vs gradient bytes {grads}"
    assert [r.kind for r in p.comm] == ["all-reduce"], f"unexpected collectives under data=8: {p.comm}"


def test_ring_estimate_of_each_collective_kind():
    """What one device sends on a ring of 8, counted by hand for a concrete program (per device:
    psum of f32[64], all_gather of f32[16], psum_scatter of f32[64], a ppermute 0->1, 1->2 of f32[10])."""
    mesh = make_mesh({"data": 8})

    def per_device(a, b, c, d):
        return (jax.lax.psum(a, "data"), jax.lax.all_gather(b, "data", tiled=True),
                jax.lax.psum_scatter(c, "data", tiled=True), jax.lax.ppermute(d, "data", [(0, 1), (1, 2)]))

    f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("data"),
                              out_specs=(P(), P("data"), P("data"), P("data"))))
    args = (jnp.ones(8 * 64), jnp.ones(8 * 16), jnp.ones(8 * 64), jnp.ones(8 * 10))
    rows = comm_rows(collectives(f.lower(*args).compile().as_text(), mesh), mesh)
    sent = {r.kind: r.sent_bytes for r in rows}
    expected = {
        # Ring all-reduce of 64 floats: 8 chunks of 8 floats (32 B); 7 reduce-scatter steps and 7
        # all-gather steps, each sending one chunk: 14 x 32 B.
        "all-reduce": 448,
        # Ring all-gather of 8 x 16 floats: each device forwards 7 chunks of 16 floats (64 B).
        "all-gather": 448,
        # Ring reduce-scatter of 64 floats into chunks of 8: 7 steps of one 32 B chunk.
        "reduce-scatter": 224,
        # Two devices send 10 floats (40 B) each, the other six nothing: 80 B / 8 devices.
        "collective-permute": 10,
    }
    assert sent == expected, f"ring estimates {sent}, counted by hand {expected}"
    assert all(r.axes == ("data",) and not r.in_loop for r in rows), rows


def test_fsdp_gathers_each_weight_once_or_twice(plans):
    """ZeRO-3: every fsdp-sharded weight is all-gathered in the forward and (at most) again in the
    backward, so gathered bytes lie between 1x and 2x the full f32 weights sharded over fsdp."""
    p, cfg = plans["fsdp=8"], config_of(LAYOUTS["fsdp=8"])
    full = theory_param_bytes(cfg, {"pipeline": 1, "fsdp": 1, "tensor": 1}, only="fsdp")
    gathered = p.comm_bytes("all-gather", axis="fsdp")
    assert full <= gathered <= 2 * full, f"fsdp all-gather {gathered} B vs sharded weights {full} B (x1..x2)"
    assert p.comm_bytes(axis="data") == 0 and p.comm_bytes(axis="tensor") == 0, p.comm
    # Gradients are reduced over fsdp (reduce-scatter, or all-reduce where the backend does not form one).
    reduced = p.comm_bytes("reduce-scatter", axis="fsdp") + p.comm_bytes("all-reduce", axis="fsdp")
    assert reduced >= full / 8, f"fsdp gradient reduction {reduced} B < one shard of the gradients {full / 8}"


def test_tensor_parallel_moves_activations_not_weights(plans):
    """Megatron TP: per layer >= 2 forward + 2 backward all-reduces of the local activations
    [B/data, S, D] (f32 here); the data axis still carries the (tensor-sharded) gradients."""
    p, cfg = plans["data=2,tensor=4"], config_of(LAYOUTS["data=2,tensor=4"])
    act = 4 * cfg.train.batch_size // 2 * cfg.data.seq_len * cfg.model.d_model
    in_layers = sum(r.bytes for r in p.comm if r.kind == "all-reduce" and r.axes == ("tensor",) and r.in_loop)
    assert in_layers >= 4 * cfg.model.layers * act, f"tensor all-reduce in layers {in_layers} B < 4 L x {act}"
    assert in_layers % act == 0, f"tensor all-reduces {in_layers} B are not whole activations of {act} B"
    assert p.comm_bytes("all-gather") == 0, "TP without fsdp must not gather weights"
    grads = theory_param_bytes(cfg, p.mesh)
    data = p.comm_bytes("all-reduce", axis="data")
    assert grads <= data <= 1.05 * grads + 256, f"data all-reduce {data} B vs tensor-sharded gradients {grads}"


@pytest.mark.slow
def test_pipeline_plan_sends_activations_between_stages(plans):
    """pipeline=2 x data=2 x fsdp=2, circular with v=2 repeats, m=2 pipeline microbatches, k=2
    passes. Each microbatch's activation [rows, S, D] goes round the ring of 2 stages twice, crossing
    v·p - 1 = 3 stage boundaries forward, and its cotangent crosses them back."""
    p, cfg = plans["pipeline=2"], config_of(PIPELINED)
    assert (p.mesh["pipeline"], p.mesh["data"], p.mesh["fsdp"]) == (2, 2, 2), p.mesh
    rows = cfg.train.batch_size // (2 * 2 * 2 * 2)  # 16 rows / (data x fsdp x k x m) = 1 row per device
    activation = rows * cfg.data.seq_len * cfg.model.d_model * 4  # f32 [1, 32, 32] = 4096 B
    # Per pipeline and step: k=2 passes x m=2 microbatches x 3 boundaries x (forward + backward) =
    # 24 sends; the 4 pipelines (data x fsdp) send 96 activation shards of one row in all, 12 per device.
    expected = 12 * activation
    permutes = [r for r in p.comm if r.kind == "collective-permute"]
    assert permutes and all(r.axes == ("pipeline",) for r in permutes), f"permutes: {permutes}"
    sent = sum(r.sent_bytes for r in permutes)
    assert sent == expected, f"permutes send {sent} B per device and step, counted by hand {expected} B"
    # The embedding and the head live on one stage each but are replicated: their gradients are
    # reduced over the pipeline axis too.
    assert any(r.kind == "all-reduce" and "pipeline" in r.axes for r in p.comm), p.comm
    gathered = {axis for r in p.comm if r.kind == "all-gather" for axis in r.axes}
    assert gathered == {"fsdp"}, f"only fsdp gathers (weights): {p.comm}"
    assert "collective-permute  pipeline" in format_plan(p), format_plan(p)


def test_device_memory_warning_and_table(plans):
    small = plans["data=8"]
    assert small.fits is False and small.peak_bytes > SMALL
    text = format_plan(small)
    assert "WARNING" in text and "exceeds the device memory 64 KiB" in text, text
    roomy = dataclasses.replace(small, device_memory=parse_bytes("16GiB"))
    assert roomy.fits is True and "WARNING" not in format_plan(roomy)
    table = format_comparison(list(plans.values()))
    header = table.splitlines()[0]
    assert all(name in header for name in plans), header
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
    with pytest.raises(SettingError, match="is not a size"):
        parse_bytes(text)


def _value(out: str, label: str) -> str:
    """The figure at the end of the line of ``out`` that starts with ``label``."""
    line = next((line for line in out.splitlines() if line.strip().startswith(label)), None)
    assert line is not None, f"no line '{label}' in:\n{out}"
    return line[len(line) - len(line.lstrip()) + len(label):].strip()


def test_cli_plan_prints_memory_comm_and_warning(plans, capsys):
    code = cli.main(["plan", "tiny", "mesh.data=8", "--device-memory", "64KiB"])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert "8 cpu device(s): data=8" in out, out
    expected = plans["data=8"]
    for label, value in (("parameters (state shardings)", expected.params_bytes),
                         ("optimizer state (state shardings)", expected.opt_state_bytes),
                         ("estimated peak", expected.peak_bytes)):
        assert _value(out, label) == format_bytes(value), f"{label}: printed {_value(out, label)!r}, plan {value} B"
    assert "all-reduce" in out and "data" in out and "WARNING" in out, out


def test_cli_plan_compare_prints_layouts_side_by_side(plans, capsys):
    code = cli.main(["plan", "tiny", "--device-memory", "64KiB", "--compare", LAYOUTS["data=8"],
                     LAYOUTS["fsdp=8"]])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    lines = out.splitlines()
    assert lines[0].split()[1:] == [LAYOUTS["data=8"], LAYOUTS["fsdp=8"]], lines[0]
    for label, figure in (("parameters / device", "params_bytes"), ("optimizer state / device", "opt_state_bytes"),
                          ("estimated peak / device", "peak_bytes")):
        expected = [format_bytes(getattr(plans[name], figure)) for name in ("data=8", "fsdp=8")]
        row = next(line for line in lines if line.startswith(label))
        assert row[len(label):].split() == " ".join(expected).split(), f"{label}: {row!r} vs {expected}"
    fits = next(line for line in lines if line.startswith("fits --device-memory"))
    assert fits.split()[-2:] == ["NO", "NO"], fits
    gather = next(line for line in lines if line.startswith("all-gather fsdp "))  # outside loops
    expected = format_bytes(sum(r.bytes for r in plans["fsdp=8"].comm
                                if (r.kind, r.axes, r.in_loop) == ("all-gather", ("fsdp",), False)))
    assert gather.split()[2:] == ["-", *expected.split()], f"only fsdp=8 gathers over fsdp ({expected}): {gather!r}"
    assert out.count("WARNING") == 2, out


@pytest.mark.parametrize("args,message", [
    (["tiny", "mesh.data=1", "mesh.tensor=3"], "multiply to 3 but 8 devices"),
    (["tiny", "--compare", "mesh.data=8", "mesh.data=2,mesh.tensor=3"],
     "--compare layout 'mesh.data=2,mesh.tensor=3': mesh sizes"),
    (["tiny", "--compare", "mesh.data=8", "mesh.data=2,mesh.tensor=4,model.d_ff=66"],
     "has size 66 along 'mlp'"),
    (["tiny", "--device-memory", "16 potatoes"], "device memory '16 potatoes' is not a size"),
    (["tiny", "mesh.tensr=2"], "unknown config key 'mesh.tensr'"),
    (["tiny", "mesh.pipeline=2", "pipeline.repeats=2"], "pipeline.repeats=2 needs pipeline.schedule=circular"),
])
def test_cli_bad_input_exits_2_before_compiling(args, message, no_compile, capsys):
    """Every layout is checked before the first compile: compiling raises here (conftest's
    no_compile), so a check that came after a compile (of the first --compare column, say) fails."""
    code = cli.main(["plan", *args])
    out, err = capsys.readouterr()
    assert code == 2, (code, out[-2000:], err[-2000:])
    assert message in err, err
    assert "plan:" not in out, out
