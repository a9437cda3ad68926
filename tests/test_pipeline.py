"""Pipeline parallelism: every schedule equals plain ``jax.value_and_grad`` of the unpipelined model;
idle slots never leak; embedding and head gradients are reduced over the pipeline axis; 1F1B memory
is flat in the number of microbatches; permutes match the closed form; loops, not unrolling.

Every pipelined case runs on a model whose layers return NaN when their input is all zeros (what
an idle slot computes on), so a result of an idle slot that reached the loss or the gradients
would make them NaN. The compiled gradient functions are cached for the module: one compile
serves the gradient check, the permute count and the memory figures of a case.
"""

import dataclasses
import functools
import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_bitwise_equal, assert_trees_close, host, lm_batch
from jax.sharding import PartitionSpec as P

from shardml.analysis.audit import collectives, memory
from shardml.core import pipeline as pipeline_lib
from shardml.core.errors import ConfigError
from shardml.core.losses import token_cross_entropy
from shardml.core.mesh import make_mesh
from shardml.core.optim import default_optimizer
from shardml.core.pipeline import Pipeline, Schedule, _periodic_window
from shardml.core.sharding import use_rules
from shardml.core.step import build_trainer
from shardml.models import TransformerConfig, transformer

SEQ = 8
D_MODEL = 16
BATCH = 32
TOL = 1e-5

# 8 layers: p = 4 stages x 2 circular repeats still gets one layer per chunk.
CFG = TransformerConfig(layers=8, d_model=D_MODEL, heads=2, d_ff=32, dtype="float32")
MODEL = transformer(CFG, SEQ)
LAYOUTS = {"alone": {}, "data=2": {"data": 2}, "tensor=2": {"tensor": 2}, "fsdp=2": {"fsdp": 2}}


def poisoned(model):
    """``model`` whose layer stack returns NaN when its input is all zeros, as idle pipeline slots'
    inputs are; on real activations it computes exactly what ``model`` does."""
    stages = model.stages

    def layers(stack, h):
        out = stages.layers(stack, h)
        return jnp.where(jnp.all(h == 0), jnp.asarray(jnp.nan, out.dtype), out)

    return dataclasses.replace(model, stages=dataclasses.replace(stages, layers=layers), name=f"poisoned {model.name}")


POISONED = poisoned(MODEL)


def repeats_of(schedule: str) -> int:
    return 2 if schedule == "circular" else 1


@functools.cache
def params():
    # Host arrays: a first call under some test's mesh must not commit them to that mesh's devices.
    return host(MODEL.init(jax.random.key(0)))


@functools.cache
def batch(rows=BATCH):
    return lm_batch(rows, seed=1, seq=SEQ, ragged=True)


def mean_token_loss(model):
    """The mean next-token cross-entropy over real tokens, written here (not shardml's loss)."""

    def loss(params, batch):
        logits = model(params, batch["inputs"]).astype(jnp.float32)
        target = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - target
        return jnp.sum(nll * batch["mask"]) / jnp.sum(batch["mask"])

    return loss


@functools.cache
def reference(rows=BATCH):
    """Plain ``jax.value_and_grad`` of the unpipelined model on one device."""
    value, grads = jax.jit(jax.value_and_grad(mean_token_loss(MODEL)))(params(), batch(rows))
    return float(value), host(grads)


@functools.cache
def pipelined(schedule, p, m, layout, passes=1, rows=BATCH, model=POISONED):
    """(trainer, compiled gradient sums) of one case: the trainer's own gradient strategy (the
    pipeline), its rules and parameter shardings, compiled once."""
    sizes = {"pipeline": p, **LAYOUTS[layout]}
    mesh = make_mesh(sizes, jax.devices()[:math.prod(sizes.values())])
    trainer = build_trainer(model, mesh, optax.sgd(0.1), microbatches=passes,
                            schedule=Schedule(schedule, p, m, repeats_of(schedule)))

    def gradient_sums(params, batch):
        with use_rules(trainer.rules):
            return trainer.strategy.gradient_sums(params, batch)

    shardings = trainer.state_shardings.params
    abstract_params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                   jax.eval_shape(trainer.strategy.layout, model.abstract_params), shardings)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding)
                      for k, v in batch(rows).items()}
    jitted = jax.jit(gradient_sums, in_shardings=(shardings, trainer.batch_sharding))
    with jax.set_mesh(mesh):
        return trainer, jitted.lower(abstract_params, abstract_batch).compile()


def gradients(trainer, compiled, rows=BATCH):
    """(natural mean gradients, mean loss, token count) of the pipelined case."""
    start = jax.device_put(trainer.strategy.layout(params()), trainer.state_shardings.params)
    with jax.set_mesh(trainer.mesh):
        grad_sums, sums = compiled(start, trainer.put(batch(rows)))
    count = float(sums["count"])
    grads = jax.tree.map(lambda g: np.asarray(g) / count, trainer.natural(host(grad_sums)))
    return grads, float(sums["loss"]) / count, count


def check_against_reference(trainer, compiled, label, rows=BATCH):
    ref_loss, ref_grads = reference(rows)
    grads, loss, count = gradients(trainer, compiled, rows)
    tokens = batch(rows)["mask"].sum()
    assert count == tokens, f"{label}: {count} tokens counted, the mask has {tokens}"
    bad = [jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_leaves_with_path(grads)
           if not np.isfinite(g).all()]
    assert np.isfinite(loss) and not bad, f"{label}: NaN from idle slots reached the loss ({loss}) or gradients {bad}"
    assert abs(loss - ref_loss) <= TOL * abs(ref_loss), f"{label}: loss {loss} vs unpipelined {ref_loss}"
    assert_trees_close(grads, ref_grads, TOL, f"{label}: gradients vs jax.value_and_grad of the unpipelined model")
    return grads


def permutes(trainer, compiled):
    """(activation sends per pipeline, bytes of each send) of the compiled program: every permute
    instruction runs ``trips`` times and moves one array per (source, target) pair; the mesh holds
    devices / p pipelines side by side."""
    report = collectives(compiled.as_text(), trainer.mesh)
    ops = report.select("collective-permute")
    pipelines = trainer.mesh.devices.size // trainer.mesh.shape["pipeline"]
    sends = sum(op.trips * len(op.groups) for op in ops)
    assert sends % pipelines == 0, f"{sends} sends do not split over {pipelines} pipelines:\n{report.table()}"
    return sends // pipelines, {op.bytes for op in ops}, report


def activation_bytes(layout, m, rows=BATCH, passes=1, itemsize=4):
    """One microbatch's [rows, S, D] activation on one device (batch rows split over data and fsdp)."""
    sizes = LAYOUTS[layout]
    return rows // (sizes.get("data", 1) * sizes.get("fsdp", 1) * passes * m) * SEQ * D_MODEL * itemsize


# (schedule, p, m, layout). Default: each schedule once, GPipe composed with fsdp among them; with
# the slow ones each (schedule, p) appears, 1F1B with fsdp too, and every pair of values of (schedule, p, m, layout) appears at least
# once (m in {p, 2p, 4p}; test_cases_cover_every_pair checks it).
DEFAULT = [("gpipe", 2, 4, "fsdp=2"), ("circular", 2, 2, "alone"), ("1f1b", 2, 8, "data=2")]
SLOW = [("gpipe", 4, 4, "tensor=2"), ("circular", 4, 4, "data=2"), ("1f1b", 4, 4, "fsdp=2"),
        ("gpipe", 2, 4, "data=2"), ("gpipe", 4, 16, "alone"), ("circular", 2, 4, "tensor=2"),
        ("circular", 2, 8, "fsdp=2"), ("1f1b", 4, 8, "alone"), ("1f1b", 4, 16, "tensor=2")]
CASES = ([pytest.param(*case, id="-".join(map(str, case))) for case in DEFAULT]
         + [pytest.param(*case, marks=pytest.mark.slow, id="-".join(map(str, case))) for case in SLOW])


def test_cases_cover_every_pair():
    factors = [lambda c: c[0], lambda c: c[1], lambda c: c[2] // c[1], lambda c: c[3]]
    values = [("gpipe", "circular", "1f1b"), (2, 4), (1, 2, 4), tuple(LAYOUTS)]
    seen = {(i, f(c), j, g(c)) for c in DEFAULT + SLOW
            for (i, f), (j, g) in itertools.combinations(enumerate(factors), 2)}
    missing = [(i, a, j, b) for i, j in itertools.combinations(range(4), 2) for a in values[i] for b in values[j]
               if (i, a, j, b) not in seen]
    assert not missing, f"pairs of (schedule, p, m/p, layout) values no case covers: {missing}"
    assert sorted(c[0] for c in DEFAULT) == sorted(values[0]), f"the default cases must cover each schedule once: {DEFAULT}"


@pytest.mark.parametrize("schedule,p,m,layout", CASES)
def test_schedule_matches_unpipelined_model(schedule, p, m, layout):
    """Gradients and loss equal the unpipelined model's; the activations cross stage boundaries
    exactly 2·m·(v·p − 1) times per pass (each microbatch crosses v·p − 1 boundaries forward, its
    cotangent as many backward; idle slots send nothing), each send one microbatch's activation."""
    label = f"{schedule} p={p} m={m} {layout}"
    trainer, compiled = pipelined(schedule, p, m, layout)
    check_against_reference(trainer, compiled, label)
    sends, sizes, report = permutes(trainer, compiled)
    v = repeats_of(schedule)
    assert sends == 2 * m * (v * p - 1), f"{label}: {sends} activation sends per pipeline, closed form " \
                                         f"2·m·(v·p−1) = {2 * m * (v * p - 1)}\n{report.table()}"
    assert sizes == {activation_bytes(layout, m)}, \
        f"{label}: permutes of {sizes} B, one microbatch's activation is {activation_bytes(layout, m)} B"
    gathered = {axis for op in report.select("all-gather") for axis in op.axes(trainer.mesh)}
    assert gathered <= {"fsdp"}, f"{label}: all-gathers over {gathered} (activations gathered?)\n{report.table()}"


def test_poisoned_layers_are_nan_on_zeros_only():
    """The test model's poison is real (so the cases above would see a leak) and harmless on data."""
    stages = POISONED.stages

    @jax.jit
    def run(p, tokens):
        h = stages.embed(p, tokens)
        return stages.layers(p["layers"], jnp.zeros_like(h)), stages.head(p, stages.layers(p["layers"], h)), \
            MODEL(p, tokens)

    on_zeros, poisoned_out, clean_out = run(params(), batch()["inputs"])
    assert np.isnan(np.asarray(on_zeros)).all(), "the poisoned layers are finite on zeros"
    np.testing.assert_array_equal(np.asarray(poisoned_out), np.asarray(clean_out),
                                  err_msg="the poisoned stages differ from the model on real activations")


def stage_partials(schedule, p):
    """The embedding and head gradient sums each stage computes for itself, before the pipeline's
    reduction over ``pipeline`` (a test-only shard_map around one pass of the schedule)."""
    mesh = make_mesh({"pipeline": p}, jax.devices()[:p])
    stack = params()["layers"]
    shared = {k: v for k, v in params().items() if k != "layers"}
    names = ("count", "loss")

    def local(stack, shared, batch):
        micro = jax.tree.map(lambda x: x[0], pipeline_lib._split(batch, 1, schedule.microbatches))
        chunks = pipeline_lib._vary(jax.tree.map(lambda w: w[None], stack))
        _, (_, g_shared) = pipeline_lib.pass_gradients(MODEL.stages, token_cross_entropy, names, schedule, chunks,
                                                       pipeline_lib._vary(shared), micro)
        return jax.tree.map(lambda g: g[None], g_shared)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P("pipeline"), P(), P("data")), out_specs=P(("pipeline", "data")),
                       axis_names={"pipeline", "data"})
    with jax.set_mesh(mesh):
        return host(jax.jit(fn)(stack, shared, batch()))


def test_embedding_and_head_gradients_are_reduced_over_the_pipeline_axis():
    """The embedding runs on the first stage and the head (final norm, unembedding) on the last, so
    each stage holds only its own part of their gradients: below, stage 0 has the whole embedding
    gradient and none of the head's, the last stage the reverse. Their copies are replicated on
    every stage, so without the psum over ``pipeline`` after the loop each stage would keep (and
    the optimizer apply) a different, partial gradient, and the out_specs P() value would equal one
    stage's partial: a zero head gradient on stage 0, a zero embedding gradient on the last."""
    _, ref_grads = reference()
    trainer, compiled = pipelined(*DEFAULT[0])  # gpipe p=2 with fsdp=2
    grads, _, count = gradients(trainer, compiled)
    for name in ("embed", "final_norm", "unembed"):
        assert_trees_close(grads[name], ref_grads[name], TOL, f"pipelined {name} gradient vs unpipelined")
    partial = stage_partials(Schedule("gpipe", 2, 2), 2)
    first, last = ({name: partial[name][s] / count for name in ("embed", "final_norm", "unembed")} for s in (0, 1))
    assert_trees_close(first["embed"], ref_grads["embed"], TOL, "stage 0's own embedding gradient")
    assert_trees_close(last["unembed"], ref_grads["unembed"], TOL, "the last stage's own unembedding gradient")
    assert_trees_close(last["final_norm"], ref_grads["final_norm"], TOL, "the last stage's own final-norm gradient")
    for where, name in ((first, "unembed"), (first, "final_norm"), (last, "embed")):
        assert not np.any(where[name]), f"a stage computed part of the {name} gradient it does not own"


@pytest.mark.slow
def test_value_and_grad_through_custom_vjp():
    """``jax.grad`` of the pipelined loss (1F1B inside) composes with other terms of a user's loss;
    called alone, the loss runs the forward-only loop."""
    mesh = make_mesh({"pipeline": 2, "data": 2}, jax.devices()[:4])
    pipe = Pipeline(POISONED, mesh, Schedule("1f1b", 2, 4))

    def penalty(p):
        return 1e-3 * sum(jnp.sum(w ** 2) for w in jax.tree.leaves(p))

    def user_loss(p, b):
        return pipe.loss(p, b) + penalty(p)

    def both(p, b):
        return jax.value_and_grad(user_loss)(p, b), pipe.loss(p, b)

    with jax.set_mesh(mesh):
        (value, grads), forward_only = jax.jit(both)(params(), batch())
    loss = mean_token_loss(MODEL)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(lambda p, b: loss(p, b) + penalty(p)))(params(), batch())
    assert abs(float(value) - float(ref_value)) <= TOL * abs(float(ref_value)), (float(value), float(ref_value))
    assert abs(float(forward_only) - reference()[0]) <= TOL * reference()[0], \
        f"forward-only pipelined loss {float(forward_only)} vs {reference()[0]}"
    assert_trees_close(host(grads), host(ref_grads), TOL, "gradients through custom_vjp")


@pytest.mark.slow
def test_accumulation_passes_compose_and_reduce_over_data_once():
    """train.microbatches=2 with pipeline microbatches=8: two pipelined passes, the same gradients,
    twice the sends, and the data-axis reduction still happens once per step, outside every loop."""
    single = pipelined("1f1b", 2, 8, "data=2")
    double = pipelined("1f1b", 2, 8, "data=2", passes=2)
    check_against_reference(*double, "1f1b p=2 m=8 data=2, 2 accumulation passes")
    reports = []
    for label, case, passes in (("1 pass", single, 1), ("2 passes", double, 2)):
        sends, sizes, report = permutes(*case)
        assert sends == passes * 2 * 8 * (2 - 1), f"{label}: {sends} sends per pipeline\n{report.table()}"
        assert sizes == {activation_bytes("data=2", 8, passes=passes)}, f"{label}: permutes of {sizes} B"
        in_loop = report.select("all-reduce", in_loop=True, axis="data")
        assert not in_loop, f"{label}: data all-reduce inside a loop:\n{report.table()}"
        reports.append(report)
    assert reports[0].bytes("all-reduce", axis="data") == reports[1].bytes("all-reduce", axis="data"), (
        "data all-reduce bytes change with the number of accumulation passes:\n"
        f"{reports[0].table()}\n{reports[1].table()}")


def instructions(compiled) -> int:
    return sum(1 for line in compiled.as_text().splitlines() if " = " in line)


def test_1f1b_memory_and_program_are_flat_in_microbatches():
    """Fixed microbatch size (4 rows, 2 per data shard), m = 4p -> 16p (the batch grows 4x): 1F1B's
    temporaries grow < 10 %, by no more than the batch's own rows (no stage input kept per
    microbatch, as GPipe keeps), and its program does not grow (loops, not unrolled Python)."""
    p = 2
    stage_input = 2 * SEQ * D_MODEL * 4  # [2 rows per data shard, S, D] f32: 1 KiB
    batch_rows = 2 * SEQ * (4 + 4 + 4)  # one microbatch's inputs, targets (int32) and mask (f32) on a device
    small = pipelined("1f1b", p, 4 * p, "data=2", rows=4 * 4 * p)
    large = pipelined("1f1b", p, 16 * p, "data=2", rows=4 * 16 * p)
    temps = [memory(compiled).temporaries for _, compiled in (small, large)]
    per_microbatch = (temps[1] - temps[0]) / (12 * p)
    assert temps[1] / temps[0] < 1.10 and per_microbatch <= batch_rows + stage_input / 4, (
        f"1F1B temporaries grew {temps[1] / temps[0]:.2f}x from m={4 * p} to m={16 * p} ({temps}), "
        f"{per_microbatch:.0f} B per added microbatch; its rows are {batch_rows} B, a stage input {stage_input} B")
    sizes = [instructions(compiled) for _, compiled in (small, large)]
    assert sizes[1] <= 1.05 * sizes[0], f"1F1B HLO instructions grow with m: {sizes}"


@pytest.mark.slow
def test_gpipe_memory_grows_by_one_stage_input_per_microbatch():
    """GPipe keeps every tick's stage input for its backward: temporaries grow by about one stage
    input per added microbatch (the 1F1B test above is the contrast)."""
    p = 2
    stage_input = 2 * SEQ * D_MODEL * 4  # [2 rows per data shard, S, D] f32
    temps = {m: memory(pipelined("gpipe", p, m, "data=2", rows=4 * m)[1]).temporaries for m in (4 * p, 16 * p)}
    per_microbatch = (temps[16 * p] - temps[4 * p]) / (12 * p)
    assert 0.9 <= per_microbatch / stage_input <= 2.0, (
        f"GPipe temp memory grows {per_microbatch:.0f} B per microbatch, a stage input is {stage_input} B: {temps}")


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_program_size_is_flat_in_microbatches(schedule):
    """Loops, not unrolled Python: the compiled program for m = 64 is the size of the one for m = 8."""
    sizes = {m: instructions(pipelined(schedule, 2, m, "alone", rows=m)[1]) for m in (8, 64)}
    assert sizes[64] <= 1.05 * sizes[8], f"{schedule}: HLO instructions grow with m: {sizes}"


BF16 = poisoned(transformer(dataclasses.replace(CFG, dtype="bfloat16"), SEQ))


@functools.cache
def bf16_reference():
    value, grads = jax.jit(jax.value_and_grad(mean_token_loss(BF16)))(params(), batch())
    return float(value), host(grads)


# GPipe sends the cotangents through the 16-bit permute's custom VJP (1F1B sends them explicitly).
@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_bf16_activations_cross_stages_as_16_bit_words(schedule):
    """XLA:CPU runs a bf16 permute in f32 (twice the bytes); the pipeline sends raw 16-bit words
    instead: 2·m·(p−1) sends of 2 bytes per element. Gradients still match the unpipelined bf16
    model (to bf16 rounding: a cotangent sent back the wrong way would be far off)."""
    m = 4
    trainer, compiled = pipelined(schedule, 2, m, "data=2", model=BF16)
    sends, sizes, report = permutes(trainer, compiled)
    assert sends == 2 * m * (2 - 1), f"{schedule}: {sends} sends\n{report.table()}"
    assert sizes == {activation_bytes("data=2", m, itemsize=2)}, \
        f"{schedule}: bf16 permutes of {sizes} B, 16-bit words would be {activation_bytes('data=2', m, itemsize=2)}" \
        f"\n{report.table()}"
    grads, loss, _ = gradients(trainer, compiled)
    ref_loss, ref_grads = bf16_reference()
    assert abs(loss - ref_loss) <= 1e-2 * abs(ref_loss), f"{schedule}: bf16 loss {loss} vs unpipelined {ref_loss}"
    assert_trees_close(grads, ref_grads, 5e-2, f"{schedule}: bf16 gradients vs the unpipelined bf16 model")


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_bf16_words_are_bitwise_a_plain_ppermute(schedule, monkeypatch):
    """The 16-bit-word permute (and its custom VJP) gives bitwise the loss and gradients of ``ppermute``."""
    trainer, compiled = pipelined(schedule, 2, 4, "data=2", model=BF16)
    grads, loss, _ = gradients(trainer, compiled)
    monkeypatch.setattr(pipeline_lib, "_permute", lambda x, pairs: jax.lax.ppermute(x, "pipeline", list(pairs)))
    plain = pipelined.__wrapped__(schedule, 2, 4, "data=2", model=BF16)
    plain_grads, plain_loss, _ = gradients(*plain)
    assert loss == plain_loss, f"{schedule}: loss {loss} with 16-bit words vs {plain_loss} with ppermute"
    assert_bitwise_equal(grads, plain_grads, f"{schedule}: gradients with 16-bit-word sends vs ppermute")


def test_periodic_window_finds_the_steady_state():
    signatures = ["a", "b", "c", "d", "c", "d", "c", "d", "e"]
    assert _periodic_window(signatures, 2) == (2, 3)
    circular = Schedule("circular", 4, 16, 2)
    start, reps = _periodic_window([circular.sends(t) for t in range(circular.ticks)], circular.period())
    assert reps * circular.period() >= circular.ticks - 4 * circular.stages, (start, reps, circular.ticks)


def test_bad_pipeline_arguments_are_refused():
    with pytest.raises(ConfigError, match="not a multiple of stages=4"):
        Schedule("circular", 4, 6, 2)
    with pytest.raises(ConfigError, match="needs schedule=circular"):
        Schedule("1f1b", 2, 4, 2)
    with pytest.raises(ConfigError, match="is not a schedule"):
        Schedule("zigzag", 2, 4)
    six_layers = transformer(dataclasses.replace(CFG, layers=6), SEQ)
    with pytest.raises(ConfigError, match="layers=6 is not divisible by pipeline x repeats"):
        Pipeline(six_layers, make_mesh({"pipeline": 4}, jax.devices()[:4]), Schedule("gpipe", 4, 4))


# The pipelined tiny run of the command line: circular (v = 2) on pipeline=2 x data=2 x fsdp=2, 2 pipeline
# microbatches per pass, 2 passes per step. tests/test_plan.py plans the same step (PIPELINED there),
# so the compilation cache serves both.
CLI_PIPELINED = ["mesh.pipeline=2", "mesh.fsdp=2", "pipeline.schedule=circular", "pipeline.repeats=2",
                 "pipeline.microbatches=2", "train.microbatches=2", "train.steps=4"]


@pytest.mark.slow
def test_cli_pipelined_training_equals_an_independent_update(tmp_path, capsys):
    """`shardml train tiny mesh.pipeline=2 mesh.fsdp=2 pipeline.schedule=circular ...` (in-process): the
    full train step (optimizer state in the [v, layers/v] layout, sharded over fsdp too) logs the
    losses and validation loss of plain ``jax.value_and_grad`` + the run's optimizer on one device,
    on the run's own batches, and saves its parameters."""
    from shardml.run import cli
    from shardml.run.checkpoint import load_params
    from shardml.run.config import load_config
    from shardml.run.recipe import build

    out = tmp_path / "pipelined"
    code = cli.main(["train", "tiny", *CLI_PIPELINED, "train.log_every=1", "train.eval_batches=1", f"out_dir={out}"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr[-3000:]
    assert "pipeline: circular, 2 stages x 2 repeats, 2 microbatches per pass, 2 pass(es)" in stdout, \
        f"the pipeline schedule is not reported:\n{stdout}"
    assert "data=2" in stdout and "fsdp=2" in stdout, stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r["loss"] for r in records]
    # The saved layers are in the circular layout [v, layers / v, ...]; the model's is [layers, ...].
    saved = load_params(str(out))
    saved["layers"] = {k: w.reshape(-1, *w.shape[2:]) for k, w in saved["layers"].items()}

    cfg = load_config("tiny", ["mesh.data=1", "train.steps=4", "train.eval_batches=1"])
    parts = build(cfg, jax.devices()[:1])  # the run's data, model and initial parameters; nothing compiled
    p = host(parts.trainer.init(cfg.train.seed).params)
    optimizer = default_optimizer(cfg.optim, cfg.train.steps)
    loss = mean_token_loss(parts.model)

    @jax.jit
    def update(p, opt_state, b):
        value, grads = jax.value_and_grad(loss)(p, b)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, value

    opt_state, expected = optimizer.init(p), []
    for step in range(cfg.train.steps):
        p, opt_state, value = update(p, opt_state, parts.data.batch(step))
        expected.append(float(value))
    np.testing.assert_allclose(logged, expected, rtol=TOL, err_msg="pipelined CLI losses vs the independent update")
    (val_batch,) = parts.eval_batches()
    val = float(jax.jit(loss)(p, val_batch))
    assert abs(records[-1]["val_loss"] - val) <= TOL * val, f"val loss {records[-1]['val_loss']} vs {val}"
    # Adam normalises each element's update, so f32 rounding of differently ordered sums moves
    # elements whose gradient is ~0 by up to ~2e-5 of a leaf's largest value after these 4 steps
    # (measured); a layout error (a chunk's moments on another chunk's layers, say) moves them by O(1).
    assert_trees_close(saved, host(p), 1e-4, "saved parameters after 4 steps vs the independent update")
