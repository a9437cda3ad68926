"""Mixtures of experts with the other axes: stacked members (each member of a sweep on
members x expert x data equals its own plain step), the pipeline's three schedules (the experts'
auxiliary losses added on the stage that runs their layers), all-gathered context attention
inside the pipeline's stages; each against one SGD step of plain ``jax.grad`` + optax on one
device written here: the loss, the load-balancing loss and every parameter (1e-5, f32)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from shardml.core.mesh import make_mesh
from shardml.core.pipeline import Schedule
from shardml.core.step import build_trainer
from shardml.models.grouped_matmul import grouped_matmul
from shardml.models.transformer import TransformerConfig, transformer
from shardml.parallel.members import build_population

CFG = TransformerConfig(vocab=32, layers=2, d_model=16, heads=2, d_ff=32, dtype="float32", experts=4, top_k=2,
                        shared_experts=1, remat="none", layer_loop="scan")
S = 8


def batch_of(rows, seed=0):
    tokens = np.random.default_rng(seed).integers(0, CFG.vocab, (rows, S + 1))
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}


def plain_step(model, params, batch, lr):
    """One device, no mesh: the mean token cross-entropy (optax) plus the experts' weighted
    auxiliary losses, ``jax.grad``, one ``optax.sgd(lr)`` update. Returns (loss, moe_aux, params)."""
    def objective(p):
        logits, extra = model.outputs_and_sums(p, batch["inputs"])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
        return (jnp.sum(nll) + extra["loss"]) / nll.size, extra["moe_aux"] / nll.size

    def step(p):
        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(p)
        sgd = optax.sgd(lr)
        updates, _ = sgd.update(grads, sgd.init(p), p)
        return loss, aux, optax.apply_updates(p, updates)

    return jax.device_get(jax.jit(step)(params))


def assert_same_step(got, want, what):
    """``got``, ``want``: (loss, moe_aux, params) of one step."""
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, err_msg=f"{what}: loss")
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, err_msg=f"{what}: moe_aux")
    for path, g in jax.tree_util.tree_leaves_with_path(got[2]):
        w = want[2]
        for key in path:
            w = w[key.key]
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"{what}: {jax.tree_util.keystr(path)}")


def test_grouped_products_under_two_vmaps_equal_a_per_row_loop_values_and_gradients():
    """Members (2) x shards (3) of rows sorted by group, the weights shared or per member: the
    values and both gradients equal each row times its group's matrix written here (NumPy loop)."""
    r = np.random.default_rng(0)
    L, M, A, D, F, N = 2, 3, 10, 4, 5, 4
    x, g = r.normal(size=(L, M, A, D)), r.normal(size=(L, M, A, F))
    w = r.normal(size=(L, N, D, F))
    sizes = np.array([r.multinomial(A - m, np.ones(N) / N) for m in range(L * M)]).reshape(L, M, N)  # some rows spare

    def loss(x, w, sizes, g):  # per member: its shards' products against a fixed cotangent
        return jnp.sum(jax.vmap(grouped_matmul, (0, None, 0))(x, w, sizes) * g)

    val, (dx, dw) = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1))))(
        *(jnp.asarray(a, jnp.float32) for a in (x, w)), jnp.asarray(sizes, jnp.int32), jnp.asarray(g, jnp.float32))
    want_val, want_dx, want_dw = np.zeros(L), np.zeros_like(x), np.zeros_like(w)
    for i in range(L):
        for m in range(M):
            group = np.repeat(np.arange(N + 1), [*sizes[i, m], A - sizes[i, m].sum()])  # N: a spare row (zero)
            for a in range(A):
                if group[a] < N:
                    want_val[i] += x[i, m, a] @ w[i, group[a]] @ g[i, m, a]
                    want_dx[i, m, a] = w[i, group[a]] @ g[i, m, a]
                    want_dw[i, group[a]] += np.outer(x[i, m, a], g[i, m, a])
    for name, got, want in (("values", val, want_val), ("dx", dx, want_dx), ("dw", dw, want_dw)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5, err_msg=name)


def test_each_moe_member_of_a_sweep_equals_its_own_plain_step():
    """Two members with their own initialisations and learning rates on members x expert x data
    (the accumulator's vmap over data inside the members' vmap: the grouped products batch twice)."""
    model, lrs = transformer(CFG, S), (0.5, 1.0)
    trainer = build_population(model, make_mesh({"members": 2, "expert": 2, "data": 2}),
                               optax.inject_hyperparams(optax.sgd)(learning_rate=1.0), 2,
                               hyperparams={"learning_rate": lrs})
    batch = batch_of(8)
    state = trainer.init(0)
    before = jax.device_get(state.params)
    state, metrics = trainer.step(state, trainer.put(batch))
    after, metrics = jax.device_get((state.params, metrics))
    assert np.abs(before["layers"]["router"][0] - before["layers"]["router"][1]).max() > 0, "members start alike"
    for i, lr in enumerate(lrs):
        member = jax.tree.map(lambda x, i=i: x[i], (metrics["loss"], metrics["moe_aux"], after))
        assert_same_step(member, plain_step(model, jax.tree.map(lambda x, i=i: x[i], before), batch, lr),
                         f"member {i} (lr={lr})")


def pipelined_step(cfg, sizes, schedule, batch):
    """One SGD(1) step of a pipelined trainer: its initial parameters (natural layout) and
    (loss, moe_aux, parameters after)."""
    devices = jax.devices()[:int(np.prod(list(sizes.values())))]
    trainer = build_trainer(transformer(cfg, S), make_mesh(sizes, devices), optax.sgd(1.0), schedule=schedule)
    state = trainer.init(0)
    before = jax.device_get(trainer.natural(state.params))
    state, metrics = trainer.step(state, trainer.put(batch))
    return before, jax.device_get((metrics["loss"], metrics["moe_aux"], trainer.natural(state.params)))


def test_moe_1f1b_with_allgathered_context_equals_one_device():
    """1F1B over pipeline x context: each stage adds its experts' auxiliary losses and seeds their
    gradients itself; the sequence is split over context inside the stages."""
    cfg = dataclasses.replace(CFG, context_attention="allgather")
    batch = batch_of(4)
    before, got = pipelined_step(cfg, {"pipeline": 2, "context": 2}, Schedule("1f1b", 2, 2), batch)
    assert_same_step(got, plain_step(transformer(cfg, S), before, batch, 1.0), "1f1b on pipeline x context")


@pytest.mark.slow
@pytest.mark.parametrize("schedule,sizes", [
    (Schedule("gpipe", 2, 2), {"pipeline": 2, "expert": 2, "data": 2}),
    (Schedule("circular", 2, 2, repeats=2), {"pipeline": 2, "expert": 2}),
])
def test_moe_gpipe_and_circular_equal_one_device(schedule, sizes):
    cfg = dataclasses.replace(CFG, layers=4)  # circular: 2 stages x 2 repeats
    batch = batch_of(8)
    before, got = pipelined_step(cfg, sizes, schedule, batch)
    assert_same_step(got, plain_step(transformer(cfg, S), before, batch, 1.0), f"{schedule.name} on {sizes}")


@pytest.mark.slow
def test_cli_sweep_of_experts_trains_each_member(tmp_path):
    """``shardml train tiny model.experts=4 ... population.kind=sweep`` on members x expert x data:
    it runs, and the members' learning rates make their losses part (that each member equals its
    own plain step: the cheap test above)."""
    import json

    from shardml.run.cli import main

    out = tmp_path / "sweep"
    code = main(["train", "tiny", "model.experts=4", "model.top_k=2", "population.kind=sweep", "population.size=2",
                 "optim.lr=[1e-3,3e-2]", "mesh.members=2", "mesh.expert=2", "mesh.data=2", "train.steps=3",
                 "train.log_every=1", "train.eval_batches=0", "checkpoint.every=0", f"out_dir={out}"])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = {r["member"]: r for r in records if r.get("member") is not None}
    assert set(last) == {0, 1} and all(r["step"] == 3 and np.isfinite(r["loss"]) for r in last.values()), last
    assert abs(last[0]["loss"] - last[1]["loss"]) > 1e-4, "the two learning rates trained alike"
