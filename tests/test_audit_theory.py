"""The closed-form theory of shardml.analysis.theory against the compiled step, where they must agree.

The tiny preset computes in f32, so no collective is widened by XLA:CPU and bytes compare as they are.
The compiled steps are tests/test_plan.py's (``compiled_layout``), shared for the whole session.
"""

import pytest
from test_plan import LAYOUTS, compiled_layout

from shardml.analysis.audit import collectives
from shardml.analysis.plan import plan_of
from shardml.analysis.theory import Workload
from shardml.core.errors import SettingError
from shardml.models import transformer
from shardml.run.config import load_config
from shardml.run.errors import ConfigError
from shardml.run.planning import config_theory as layout_theory


def _step(layout: str, devices: int = 8):
    parts, step = compiled_layout(layout, devices)
    return parts, step, layout_theory(parts.cfg, parts.sizes)


def test_the_theory_takes_resolved_choices_only():
    with pytest.raises(ConfigError, match=r"model.remat and model.layer_loop resolved: pass build\(cfg\).cfg"):
        layout_theory(load_config("tiny", ["model.remat=auto"]), {"pipeline": 1, "data": 8, "fsdp": 1, "tensor": 1})
    with pytest.raises(SettingError, match=r"remat='auto': the theory needs none, full or dots"):
        Workload(d_model=8, heads=2, kv_heads=2, d_ff=16, vocab=32, layers=2, dtype="float32", remat="auto",
                 seq_len=4, batch_size=8)


@pytest.mark.parametrize("head_dim", [0, 24], ids=["d_model-over-heads", "head_dim-set"])
def test_theory_counts_every_parameter(head_dim):
    """Also with a head dimension apart from d_model / heads (Qwen3, Gemma)."""
    cfg = load_config("tiny", ["model.remat=dots", "model.layer_loop=scan", f"model.head_dim={head_dim}"])
    replicated = layout_theory(cfg, {"members": 1, "pipeline": 1, "data": 8, "fsdp": 1, "tensor": 1})
    expected = 4 * transformer(cfg.model, cfg.data.seq_len).num_params
    assert replicated.params_bytes == expected, f"theory {replicated.params_bytes} B vs model {expected} B (f32)"
    assert replicated.opt_state_bytes == 2 * expected


def test_data_parallel_all_reduce_bytes_match_theory():
    _, step, theory = _step(LAYOUTS["data=8"])
    plan = plan_of(step)
    sent = sum(r.sent_bytes for r in plan.comm if r.kind == "all-reduce" and r.axes == ("data",))
    expected = theory.comm_bytes("all-reduce", ("data",))
    assert expected > 0 and 1.0 <= sent / expected <= 1.1, \
        f"data all-reduce: compiled sends {sent} B per device, theory {expected:.0f} B ({plan.comm})"
    assert {r.kind for r in plan.comm} == {"all-reduce"}, f"data=8 should only all-reduce: {plan.comm}"


@pytest.fixture(scope="module")
def fsdp_tensor():
    return _step(LAYOUTS["fsdp=2,tensor=4"])


def test_fsdp_tensor_state_bytes_per_device_match_theory(fsdp_tensor):
    _, step, theory = fsdp_tensor
    measured = step.argument_bytes()  # from the shardings the compiled program takes its arguments in
    for part, expected in (("params", theory.params_bytes), ("opt_state", theory.opt_state_bytes)):
        assert abs(measured[part] / expected - 1) <= 0.10, \
            f"{part}: compiled argument shards {measured[part]} B per device, theory {expected} B"


def _fsdp_gather_sent(plan):
    """Bytes a device sends per step in the compiled step's all-gathers over fsdp alone."""
    return sum(r.sent_bytes for r in plan.comm if r.kind == "all-gather" and r.axes == ("fsdp",))


def test_fsdp_gathers_each_weight_for_forward_and_backward(fsdp_tensor):
    _, step, theory = fsdp_tensor
    plan = plan_of(step)
    sent = _fsdp_gather_sent(plan)
    expected = theory.comm_bytes("all-gather", ("fsdp",))
    assert expected > 0 and abs(sent / expected - 1) <= 0.1, \
        f"fsdp all-gather: compiled sends {sent} B per device, theory {expected:.0f} B ({plan.comm})"


@pytest.mark.slow
def test_bf16_step_reduces_gradients_in_f32_and_activations_per_product():
    """bf16 compute on fsdp=2 x tensor=2 with model.grad_dtype=float32: weight gradients are f32 products before the FSDP reduction
    (not bf16 partial sums widened by XLA:CPU, which would read f32 in the collective's own dtype:
    the audit's source dtype says what the program reduced), and the layer loops all-reduce 7
    activations over `tensor` per layer (Megatron: 2 forward; 5 backward, the input gradients of
    q, k, v, gate and up, each its own product)."""
    parts, step, _ = _step("mesh.fsdp=2,mesh.tensor=2,model.dtype=bfloat16,model.remat=dots,model.grad_dtype=float32",
                           devices=4)
    assert parts.sizes["data"] == 1 and parts.cfg.model.dtype == "bfloat16", parts.sizes
    report = collectives(step.compiled.as_text(), step.mesh)
    fsdp = [c for c in report.select("all-reduce", axis="fsdp") if c.bytes > 64]
    assert fsdp, f"no fsdp gradient all-reduce found:\n{report.table()}"
    not_f32 = [(c.name, c.source_dtypes) for c in fsdp if set(c.source_dtypes) != {"f32"}]
    assert not not_f32, f"fsdp gradient reductions of values the program held in bf16: {not_f32}\n{report.table()}"
    per_layer = sum(len(c.arrays) * c.trips for c in report.select("all-reduce", in_loop=True)
                    if c.axes(step.mesh) == ("tensor",)) / parts.cfg.model.layers
    assert per_layer == 7, f"{per_layer} activation all-reduces over tensor per layer, expected 2 + 5"
    # The activations themselves stay bf16 in the program (XLA:CPU only widens the wire).
    acts = [c for c in report.select("all-reduce", in_loop=True) if c.axes(step.mesh) == ("tensor",)]
    assert all(set(c.source_dtypes) == {"bf16"} for c in acts), [(c.name, c.source_dtypes) for c in acts]


@pytest.mark.parametrize("loop", ["unroll", "scan"])
def test_without_remat_the_backward_reuses_the_forward_s_gathered_weights(fsdp_tensor, loop):
    """remat=none (unrolled: the tiny preset's own choice on 8 devices; and scanned): each FSDP
    weight is all-gathered once, for the forward, and its backward products use that copy (the
    residual ``dense`` keeps), so the step gathers what the theory says for remat=none: half of the
    scanned remat=dots step's forward-and-backward gathers, plus the embedding's one."""
    overrides = "" if loop == "unroll" else ",model.remat=none,model.layer_loop=scan"
    parts, step = compiled_layout(LAYOUTS["fsdp=2,tensor=4"] + overrides, 8, scanned=False)
    assert (parts.cfg.model.remat, parts.cfg.model.layer_loop) == ("none", loop), parts.cfg.model
    sent = _fsdp_gather_sent(plan_of(step))
    once = layout_theory(parts.cfg, parts.sizes).comm_bytes("all-gather", ("fsdp",))
    twice = fsdp_tensor[2].comm_bytes("all-gather", ("fsdp",))
    assert 0 < once < 0.6 * twice, f"theory: remat=none gathers {once:.0f} B, remat=dots {twice:.0f} B"
    assert abs(sent / once - 1) <= 0.1, f"{loop}: compiled sends {sent} B per device; the theory {once:.0f} B"


def test_bf16_weights_are_gathered_in_16_bits():
    """bf16 compute, remat=none: each FSDP weight is gathered once in the compute dtype, as the
    theory counts it, not widened to f32 (which XLA:CPU does to a bf16 collective): ``dense`` moves
    the cast weight as raw 16-bit words."""
    parts, step = compiled_layout(LAYOUTS["fsdp=2,tensor=4"] + ",model.dtype=bfloat16", 8, scanned=False)
    assert (parts.cfg.model.remat, parts.cfg.model.dtype) == ("none", "bfloat16"), parts.cfg.model
    sent = _fsdp_gather_sent(plan_of(step))
    expected = layout_theory(parts.cfg, parts.sizes).comm_bytes("all-gather", ("fsdp",))
    assert expected > 0 and abs(sent / expected - 1) <= 0.1, \
        f"compiled fsdp all-gathers send {sent} B per device; bf16 weights gathered once: {expected:.0f} B"
