"""The HLO audit, and the once-per-step gradient reduction it proves."""

import math

import jax
import jax.numpy as jnp
import pytest
from conftest import lm_batch, trainer_for
from jax.sharding import PartitionSpec as P

from shardml.analysis.audit import collectives, dots, memory
from shardml.core.mesh import make_mesh


def test_parser_counts_loops_trips_bytes_and_axes():
    mesh = make_mesh({"data": 4, "tensor": 2})

    def per_device(x):
        def body(carry, _):
            return carry + jax.lax.psum(carry, "tensor"), None
        y, _ = jax.lax.scan(body, x, None, length=5)
        return jax.lax.psum(y, "data")

    f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("data", "tensor"), out_specs=P(None, "tensor")))
    x = jnp.ones((8, 6), jnp.float32)
    report = collectives(f.lower(x).compile().as_text(), mesh)
    inside, outside = report.select("all-reduce", in_loop=True), report.select("all-reduce", in_loop=False)
    assert len(inside) == 1 and inside[0].trips == 5, f"loop all-reduce: {inside}"
    assert inside[0].axes(mesh) == ("tensor",), inside[0].axes(mesh)
    assert len(outside) == 1 and outside[0].axes(mesh) == ("data",), f"step all-reduce: {outside}"
    assert outside[0].bytes == 2 * 3 * 4, f"per-device result is f32[2,3]: {outside[0].bytes} bytes"
    assert report.bytes("all-reduce", in_loop=True) == 5 * 2 * 3 * 4


def test_dots_have_per_device_shapes_trip_counts_and_flops():
    mesh = make_mesh({"data": 8})

    def per_device(x_NK, w_KM, v_BKM):
        def body(carry_NK, _):
            return carry_NK + (carry_NK @ w_KM) @ w_KM.T, None
        y_NK, _ = jax.lax.scan(body, x_NK, None, length=3)
        return y_NK, jnp.einsum("bnk,bkm->bnm", x_NK[None].repeat(2, 0), v_BKM)

    f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P(), P()),
                              out_specs=(P("data"), P(None, "data"))))
    x, w, v = jnp.ones((8 * 4, 16), jnp.float32), jnp.ones((16, 32), jnp.float32), jnp.ones((2, 16, 8), jnp.float32)
    found = dots(f.lower(x, w, v).compile().as_text())
    looped = sorted((d for d in found if d.trips == 3), key=lambda d: d.result[1])
    assert [(d.lhs[1], d.result[1]) for d in looped] == [((4, 32), (4, 16)), ((4, 16), (4, 32))], \
        f"the scan's two products per device, 3 trips each: {found}"
    batched = [d for d in found if d.lhs_batch]
    assert len(batched) == 1 and batched[0].trips == 1 and batched[0].result == ("f32", (2, 4, 8)), found
    per_device_flops = sum(d.flops * d.trips for d in found)
    assert per_device_flops == 3 * 2 * (2 * 4 * 16 * 32) + 2 * 2 * 4 * 16 * 8, f"per-device FLOPs {per_device_flops}"


# k microbatches per layout: the most a 32-row batch allows (one row per microbatch and data shard
# at data=8 k=4; k=1 and 4 show the count does not change with k). The 32-row steps are those tests/test_step.py trains, so the compilation cache
# serves both modules.
LAYOUTS = {"data=8": ({"data": 8}, (1, 4)), "data=2,fsdp=2,tensor=2": ({"data": 2, "fsdp": 2, "tensor": 2}, (1, 4))}
ROWS = 32


@pytest.fixture(scope="module")
def reports(tiny_model):
    """(collectives, memory, trainer) of the compiled step of every layout and k, from the session's
    trainers (the ones other modules train with)."""
    out = {}
    for name, (sizes, ks) in LAYOUTS.items():
        for k in ks:
            trainer = trainer_for(tiny_model, sizes, microbatches=k)
            batch = {n: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding)
                     for n, v in lm_batch(ROWS).items()}
            compiled = trainer.lower_step(trainer.abstract_state(), batch).compile()
            out[name, k] = (collectives(compiled.as_text(), trainer.mesh), memory(compiled), trainer)
    return out


@pytest.mark.parametrize("name", LAYOUTS)
def test_data_gradient_reduction_once_per_step_for_any_k(reports, name):
    seen = {}
    ks = LAYOUTS[name][1]
    for k in ks:
        report = reports[name, k][0]
        in_loop = report.select("all-reduce", in_loop=True, axis="data")
        assert not in_loop, f"{name} k={k}: data all-reduce inside a loop:\n{report.table()}"
        ops = report.select("all-reduce", in_loop=False, axis="data")
        seen[k] = report.bytes("all-reduce", axis="data")  # XLA 0.12 may split it into several ops at k=1
        # The dtype the program reduced in (XLA:CPU would widen a bf16 reduction to f32 in `dtype`).
        sources = {src for op in ops for src in op.source_dtypes}
        assert sources == {"f32"}, f"{name} k={k}: data reduction of {sources} values, not f32:\n{report.table()}"
        for kind in ("all-to-all", "collective-permute"):
            assert report.count(kind) == 0, f"{name} k={k}: {kind} in the step (rows moved between devices?)"
    assert len(set(seen.values())) == 1, f"{name}: data all-reduce bytes change with k: {seen}"
    # Theory: one f32 reduction of every gradient element this device holds (its parameter shards),
    # plus a few scalars (loss, token count, norms).
    trainer = reports[name, 1][2]
    state = trainer.abstract_state()
    expected = sum(4 * math.prod(s.shard_shape(p.shape))
                   for s, p in zip(jax.tree.leaves(trainer.state_shardings.params), jax.tree.leaves(state.params)))
    if name == "data=8":  # replicated: every gradient element, counted from the model alone
        assert expected == 4 * trainer.model.num_params, (expected, trainer.model.num_params)
    assert expected <= seen[1] <= 1.05 * expected, f"{name}: data all-reduce bytes {seen[1]} vs theory {expected}"


def test_fsdp_shards_parameter_and_optimizer_memory(reports, tiny_model):
    """Arguments per device (params + 2 Adam moments, f32) shrink with fsdp x tensor."""
    dp = reports["data=8", 1][1].arguments
    mixed = reports["data=2,fsdp=2,tensor=2", 1][1].arguments
    state_bytes = 3 * 4 * tiny_model.num_params
    assert dp >= state_bytes, f"data=8 arguments {dp} < replicated state {state_bytes}"
    assert mixed < 0.5 * dp, f"fsdp=2 x tensor=2 arguments {mixed} not well below data=8's {dp}"


def test_widened_collectives_keep_their_program_dtype():
    """XLA:CPU runs bf16 collectives in f32; the audit reports the bf16 the program asked for, and
    not for an f32 reduction of values the program itself converted up from bf16."""
    mesh = make_mesh({"data": 8})
    x = jnp.ones((8, 64), jnp.bfloat16)

    def audit(fn, out_specs=None):
        f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("data"), out_specs=P() if out_specs is None else out_specs))
        (op,) = collectives(f.lower(x).compile().as_text(), mesh).ops
        return op

    bf16_sum = audit(lambda v: jax.lax.psum(v, "data"))
    assert bf16_sum.arrays == (("f32", 64),) and bf16_sum.source_dtypes == ("bf16",), bf16_sum
    assert bf16_sum.promoted, bf16_sum
    f32_sum = audit(lambda v: jax.lax.psum(v.astype(jnp.float32), "data"))
    assert f32_sum.source_dtypes == ("f32",) and not f32_sum.promoted, f32_sum
    shift = audit(lambda v: jax.lax.ppermute(v, "data", [(i, (i + 1) % 8) for i in range(8)]), P("data"))
    assert shift.kind == "collective-permute" and shift.source_dtypes == ("bf16",), shift
    assert "ppermute" in shift.op_name, shift.op_name
