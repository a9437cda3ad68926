"""The context axis in the closed-form theory (shardml.analysis.theory) against the compiled train step:
ring attention's collective-permutes and all-gathered attention's K/V traffic, counted and weighed per
device in the optimized HLO (the audit multiplies ops in the layer loop by its trip count), and the
activation estimate falling as 1 / context in step with XLA's memory analysis.

The tiny preset (2 layers here) computes in f32, so no collective is widened by XLA:CPU and bytes
compare as they are. Each layout compiles once per module.
"""

import functools

import jax
import pytest

from shardml.analysis.audit import collectives, memory
from shardml.analysis.plan import compiled_step, format_bytes, format_plan, plan_of
from shardml.analysis.theory import Workload
from shardml.core.errors import SettingError
from shardml.run.config import load_config
from shardml.run.planning import abstract_batch, config_theory, layout_config
from shardml.run.recipe import build

BASE = ["model.layers=2", "model.layer_loop=scan"]
RING = "mesh.context=2,mesh.data=2,model.context_attention=ring,model.remat=dots"
GATHER = "mesh.context=2,mesh.data=2,model.context_attention=allgather,model.remat=none"


@functools.cache
def compiled(layout: str, devices: int = 4):
    """(parts, CompiledStep, collective report, theory) of the tiny preset on ``layout``."""
    parts = build(layout_config(load_config("tiny", BASE), layout), jax.devices()[:devices])
    step = compiled_step(parts.trainer, abstract_batch(parts))
    return parts, step, collectives(step.compiled.as_text(), step.mesh), config_theory(parts.cfg, parts.sizes)


def _theory(theory, kind, what=""):
    """(count, bytes per device) of the theory's rows of ``kind`` over context whose purpose says ``what``."""
    rows = [t for t in theory.traffic if t.kind == kind and t.axes == ("context",) and what in t.what]
    return sum(t.count for t in rows), sum(t.elements * (4 if t.dtype in ("float32", "int32") else 2) for t in rows)


def _compiled(report, kind, dtype):
    """(executions, result bytes per device per step) of ``kind`` over context only, of one element type."""
    ops = [op for op in report.select(kind) if op.axes(report.mesh) == ("context",) and op.dtype == dtype]
    return sum(len(op.arrays) * op.trips for op in ops), sum(op.bytes * op.trips for op in ops)


@pytest.mark.parametrize("layout,devices", [(RING, 4), pytest.param(
    "mesh.context=4,model.context_attention=ring,model.remat=none", 4, marks=pytest.mark.slow)],
    ids=["context=2xdata=2,remat=dots", "context=4,remat=none"])
def test_ring_permutes_match_the_theory(layout, devices):
    """K and V blocks (f32) and their int32 indices: count and bytes per device, exactly; each block
    [rows, S / C, K, E] is what every device sends per permute (all send: the ring leaves none out)."""
    parts, step, report, theory = compiled(layout, devices)
    c, layers = parts.sizes["context"], parts.cfg.model.layers
    for dtype, what in (("f32", "K and V"), ("s32", "int32")):
        expected = _theory(theory, "collective-permute", what)
        assert _compiled(report, "collective-permute", dtype) == expected, \
            f"{dtype} permutes over context (executions, bytes) vs theory {expected}:\n{report.table()}"
    # The K/V permutes run in the ring's loop of C - 1 steps inside the layer loop, counted there by
    # both trip counts.
    in_loop = [op for op in report.select("collective-permute", in_loop=True) if op.dtype == "f32"]
    assert in_loop and all(op.trips == layers * (c - 1) for op in in_loop), [(op.name, op.trips) for op in in_loop]
    redo = parts.cfg.model.remat != "none"
    assert sum(op.trips for op in in_loop) == 2 * (2 + redo) * (c - 1) * layers
    sent = sum(t.sent_bytes for t in theory.traffic if t.kind == "collective-permute")
    assert sent == sum(op.bytes * op.trips for op in report.select("collective-permute")), "permutes: sent = result"


def test_ring_restores_the_natural_order_by_gathering_the_output_over_context():
    _, _, report, theory = compiled(RING)
    assert _compiled(report, "all-gather", "f32") == _theory(theory, "all-gather", "natural order"), report.table()


def test_allgather_attention_gathers_k_and_v_and_sums_their_gradients_over_context():
    """Forward: one all-gather of K and one of V per layer (remat=none: no recompute). Backward: dK and dV
    summed over context; the theory's reduce-scatter, which XLA:CPU runs as an all-reduce of the whole
    arrays (then slices), so arrays and elements compare, not the kind."""
    parts, _, report, theory = compiled(GATHER)
    assert _compiled(report, "all-gather", "f32") == _theory(theory, "all-gather", "K and V"), report.table()
    count, nbytes = _theory(theory, "reduce-scatter", "dK and dV")
    dkdv = [op for op in report.select("all-reduce", in_loop=True) if op.axes(report.mesh) == ("context",)
            and "bkgst,btke->bskge" in op.op_name]
    assert (sum(len(op.arrays) * op.trips for op in dkdv), sum(op.bytes * op.trips for op in dkdv)) == (count, nbytes), \
        report.table()


@pytest.mark.parametrize("layout", [RING, GATHER], ids=["ring", "allgather"])
def test_gradients_are_summed_over_context_once_per_weight(layout):
    """Every weight's f32 gradient all-reduced over context (apart from the data axis's reduction), plus
    the ring's output gradient: bytes per device within 1 % (the loss's scalar sums ride along)."""
    _, _, report, theory = compiled(layout)
    expected = sum(t.elements * 4 for t in theory.traffic if t.kind == "all-reduce" and t.axes == ("context",))
    measured = sum(op.bytes * op.trips for op in report.select("all-reduce") if op.axes(report.mesh) == ("context",)
                   and "bkgst,btke->bskge" not in op.op_name)
    assert expected > 0 and abs(measured / expected - 1) < 0.01, f"{measured} B vs theory {expected} B\n{report.table()}"


def _activations(context: int, attention: str = "ring", remat: str = "full", seq_len: int = 64) -> int:
    cfg = load_config("tiny", BASE + [f"model.remat={remat}", f"model.context_attention={attention}",
                                      f"data.seq_len={seq_len}"])
    sizes = {"members": 1, "pipeline": 1, "data": 1, "fsdp": 1, "expert": 1, "context": context, "tensor": 1}
    return config_theory(cfg, sizes).activation_bytes


@pytest.mark.parametrize("attention", ["ring", "allgather"])
def test_the_activation_estimate_falls_as_one_over_context(attention):
    """Closed form, no compile: the positions a device holds are S / C, so what remat keeps halves."""
    one, two, four = (_activations(c, attention) for c in (1, 2, 4))
    assert (one, two) == (2 * two, 2 * four), (one, two, four)


@pytest.mark.slow
def test_the_activation_estimate_falls_in_step_with_the_compiled_temporaries():
    """All-gathered attention, remat=none, S=64, context 1, 2, 4: what XLA's temporaries lose from C to
    2C (activations; the f32 gradients and update buffers stay) against what the estimate loses, the
    same multiple at both steps within 1.25 (measured 1.49 and 1.53: the estimate leaves out the
    gradients' working buffers that also go with the tokens). Not claimed for ring attention on so
    small a model: there the same ratios measure 1.3 and 2.4 (remat=none) as XLA's buffer reuse
    and the fixed buffers outweigh the 1/C part."""
    temps, estimates = [], []
    for c in (1, 2, 4):
        _, step, _, theory = compiled(f"mesh.context={c},model.context_attention=allgather,model.remat=none,"
                                      "data.seq_len=64,train.batch_size=4", c)
        temps.append(memory(step.compiled).temporaries)
        estimates.append(theory.activation_bytes)
    assert estimates[0] == 2 * estimates[1] == 4 * estimates[2], estimates
    ratios = [(temps[i] - temps[i + 1]) / (estimates[i] - estimates[i + 1]) for i in (0, 1)]
    assert max(ratios) / min(ratios) < 1.25 and all(1 <= r <= 2 for r in ratios), \
        f"compiled temporaries {temps} B vs estimates {estimates} B at context 1, 2, 4: ratios {ratios}"


def test_the_plan_prints_the_context_theory_beside_the_compiled_rows():
    """``shardml plan``'s report of a ring layout: the audit's permutes over context and the theory's."""
    _, step, report, theory = compiled(RING)
    text = format_plan(plan_of(step, theory=theory))
    assert "activations kept for the backward (theory)" in text and format_bytes(theory.activation_bytes) in text
    permutes = [line for line in text.splitlines() if line.lstrip().startswith("collective-permute")]
    assert len(permutes) >= 3 and any("K and V blocks" in line for line in permutes), text


def test_the_theory_refuses_an_unknown_context_attention():
    with pytest.raises(SettingError, match=r"context_attention='flash': the theory knows allgather and ring"):
        Workload(d_model=8, heads=2, kv_heads=2, d_ff=16, vocab=32, layers=2, dtype="float32", remat="none",
                 seq_len=4, batch_size=8, context_attention="flash")
