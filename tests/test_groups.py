"""Groups of devices, one architecture each: every member equals the same architecture trained alone
on a mesh of its group's size and the plain jax.grad + optax update written here; a slow group does
not hold back the dispatch of a fast one; bad splits fail before compiling; a heterogeneous
ensemble's metrics equal NumPy's."""

import dataclasses
import time

import jax
import numpy as np
import optax
import pytest

from conftest import host
from shardml.core.errors import LayoutError, SettingError
from shardml.core.losses import classification, token_cross_entropy
from shardml.core.mesh import make_mesh
from shardml.core.step import build_trainer
from shardml.models import TransformerConfig, mlp_classifier, transformer
from shardml.parallel import groups as groups_module
from shardml.parallel.groups import (GroupSpec, Groups, balanced_sizes, build_groups, dispatch, group_ensemble_metrics,
                                     group_sizes, split_devices, train_groups)

LR, STEPS, FEATURES, CLASSES, SEQ = 0.1, 3, 16, 4, 8
MLP32 = mlp_classifier(FEATURES, 32, CLASSES)
MLP64 = mlp_classifier(FEATURES, 64, CLASSES)
LM = transformer(TransformerConfig(vocab=32, layers=1, d_model=16, heads=2, d_ff=32, dtype="float32"), SEQ)


def mlp_batch(step):
    rng = np.random.default_rng(step)
    return {"inputs": rng.normal(size=(8, FEATURES)).astype(np.float32),
            "targets": rng.integers(0, CLASSES, 8).astype(np.int32)}


def token_batch(step):
    tokens = np.random.default_rng(100 + step).integers(0, 32, (8, SEQ + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


# Three architectures on 4 + 2 + 2 devices: two MLP members stacked (members x tensor), a wider MLP
# on fsdp, a tiny transformer on data. Each member alone: the same per-member layout on other devices.
SPECS = [
    GroupSpec(MLP32, optax.sgd(LR), loss=classification, layout={"members": 2, "tensor": 2}, members=2, name="mlp32"),
    GroupSpec(MLP64, optax.sgd(LR), loss=classification, layout={"fsdp": 2}, name="mlp64"),
    GroupSpec(LM, optax.sgd(LR), layout={"data": 2}, name="lm"),
]
DATA = [mlp_batch, mlp_batch, token_batch]
ALONE = [({"tensor": 2}, (0, 1)), ({"fsdp": 2}, (0,)), ({"data": 2}, (0,))]  # (layout, members) per group


@pytest.fixture(scope="module")
def trained():
    groups = build_groups(SPECS)
    init = [host(state.params) for state in groups.init(seed=0)]
    one = train_groups(groups, DATA, 1, seed=0)
    run = train_groups(groups, DATA, STEPS, seed=0)
    return groups, init, one, run


def member(tree, group, index):
    """Member ``index`` of a group's host tree (a group of one model has no member axis)."""
    return jax.tree.map(lambda x: x[index], tree) if SPECS[group].members > 1 else tree


def reference(spec, params, data, steps):
    """Plain jax.grad + optax.sgd on one device: the losses, the first gradient and the final params."""
    def mean_loss(p, batch):
        sums = spec.loss(spec.model(p, batch["inputs"]), batch)
        return sums["loss"] / sums["count"]

    grad_fn, opt = jax.jit(jax.value_and_grad(mean_loss)), optax.sgd(LR)
    opt_state, losses, first = opt.init(params), [], None
    for step in range(steps):
        loss, grads = grad_fn(params, data(step))
        first = grads if first is None else first
        updates, opt_state = opt.update(grads, opt_state, params)
        params, losses = optax.apply_updates(params, updates), [*losses, float(loss)]
    return losses, host(first), host(params)


def assert_trees_close(got, want, what):
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(w).max())),
                                   err_msg=f"{what}: {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("group", [0, 1, 2], ids=[s.name for s in SPECS])
def test_every_member_equals_the_plain_update_of_its_architecture(trained, group):
    groups, init, one, run = trained
    spec, data = SPECS[group], DATA[group]
    for index in ALONE[group][1]:
        start = member(init[group], group, index)
        losses, grad, params = reference(spec, start, data, STEPS)
        got_losses = [np.atleast_1d(loss)[index] for loss in run.loss(group)]
        np.testing.assert_allclose(got_losses, losses, rtol=1e-5, err_msg=f"{spec.name} member {index} losses")
        got_grad = jax.tree.map(lambda a, b: (a - b) / LR, start, member(host(one.states[group].params), group, index))
        assert_trees_close(got_grad, grad, f"{spec.name} member {index}: first gradient")
        assert_trees_close(member(host(run.states[group].params), group, index), params,
                           f"{spec.name} member {index}: params after {STEPS} SGD steps")


@pytest.mark.parametrize("group", [0, 1], ids=[s.name for s in SPECS[:2]])
def test_every_member_equals_its_architecture_trained_alone_on_a_mesh_of_its_share(trained, group):
    _, _, _, run = trained
    spec, (layout, members) = SPECS[group], ALONE[group]
    size = int(np.prod(list(layout.values())))
    alone = build_trainer(spec.model, make_mesh(layout, jax.devices()[-size:]), optax.sgd(LR), loss=spec.loss)
    for index in members:
        state = alone.init(seed=index)  # member i of a group initialises from seed + i
        for step in range(STEPS):
            state, _ = alone.step(state, alone.put(DATA[group](step)))
        assert_trees_close(member(host(run.states[group].params), group, index), host(state.params),
                           f"{spec.name} member {index} in its group vs alone on {layout}")


def test_groups_own_disjoint_devices_of_their_sizes(trained):
    groups = trained[0]
    assert [len(g.devices) for g in groups] == [4, 2, 2]
    seen = [d for g in groups for d in g.devices]
    assert sorted(seen, key=lambda d: d.id) == jax.devices(), f"groups do not partition the devices: {seen}"
    for g in groups:
        assert set(g.trainer.mesh.devices.flat) == set(g.devices), f"{g.name}'s mesh is not its devices"


def slow_model(seconds):
    """MLP32 whose forward pass sleeps on the host (a callback), so its step takes ``seconds`` longer."""
    def apply(params, x):
        jax.debug.callback(lambda: time.sleep(seconds))
        return MLP32.apply(params, x)

    return dataclasses.replace(MLP32, apply=apply, name="slow")


def test_a_slow_group_does_not_delay_the_dispatch_of_a_fast_one():
    sleep = 1.0
    groups = build_groups([GroupSpec(slow_model(sleep), optax.sgd(LR), loss=classification, devices=4),
                           GroupSpec(MLP32, optax.sgd(LR), loss=classification, devices=4)])
    states = train_groups(groups, mlp_batch, 1).states  # compiled and warm
    start = time.perf_counter()
    states, metrics = dispatch(groups, states, [mlp_batch(1)] * 2)  # the slow group first
    dispatched = time.perf_counter()
    jax.block_until_ready(metrics[0])
    slow_done = time.perf_counter()
    assert dispatched < slow_done - sleep / 2, (
        f"dispatching both groups took {dispatched - start:.3f} s and the slow one finished at "
        f"{slow_done - start:.3f} s: the fast group's step waited for the slow one")
    assert np.isfinite(jax.device_get(metrics[1]["loss"]))


# ----------------------------------------------------------------------------- splits and bad input


def test_sizes_are_given_fixed_by_the_layout_or_balanced_by_cost():
    assert balanced_sizes([range(1, 9)] * 2, [3.0, 1.0], 8) == [6, 2]
    assert balanced_sizes([range(2, 9, 2), range(1, 9)], [1.0, 1.0], 8) == [4, 4]
    assert balanced_sizes([[1, 2, 4, 8]] * 2, [1.0, 2.0], 8) == [4, 4]  # 3 + 5 would not divide a batch of 32
    spec = GroupSpec(MLP32, optax.sgd(LR), layout={"tensor": 2, "data": -1}, batch_size=12)
    assert spec.allowed(8) == [2, 4, 6, 8] and dataclasses.replace(spec, batch_size=8).allowed(8) == [2, 4, 8]
    specs = [GroupSpec(MLP32, optax.sgd(LR), layout={"tensor": 2, "data": 2}),  # fixed: 4
             GroupSpec(MLP64, optax.sgd(LR), devices=1),
             GroupSpec(MLP32, optax.sgd(LR), cost=1.0), GroupSpec(MLP32, optax.sgd(LR), cost=2.0)]
    assert group_sizes(specs, 8) == [4, 1, 1, 2]
    assert split_devices(list(range(8)), [4, 1, 1, 2]) == [(0, 1, 2, 3), (4,), (5,), (6, 7)]


def never_compile(program, *args, **kwargs):
    raise AssertionError("a group was compiled before every group was checked")


@pytest.mark.parametrize("specs,match", [
    ([GroupSpec(MLP32, optax.sgd(LR), devices=3), GroupSpec(MLP32, optax.sgd(LR), devices=4)],
     r"groups of \[3, 4\] devices add up to 7, but there are 8"),
    ([GroupSpec(MLP32, optax.sgd(LR), devices=6), GroupSpec(MLP32, optax.sgd(LR), layout={"data": 4}, devices=2)],
     r"group 'mlp_classifier-1' \(2 devices\): mesh sizes \(data=4\) multiply to 4 but 2"),
    ([GroupSpec(MLP32, optax.sgd(LR), devices=4),
      GroupSpec(mlp_classifier(FEATURES, 30, CLASSES), optax.sgd(LR), layout={"tensor": 4}, name="odd")],
     r"group 'odd' \(4 devices\): parameter '.*' has size 30 .* tensor=4"),
    ([GroupSpec(MLP32, optax.sgd(LR), devices=4), GroupSpec(MLP32, optax.sgd(LR), layout={"members": 2, "data": 2},
                                                            members=3, name="three")],
     r"group 'three' \(4 devices\): members=3 is not divisible by the 2"),
    ([GroupSpec(MLP32, optax.sgd(LR), layout={"tensor": 4, "data": -1}),
      GroupSpec(MLP32, optax.sgd(LR), layout={"fsdp": 8, "data": -1})],
     r"the groups need at least \[4, 8\] devices"),
], ids=["not-a-partition", "layout-vs-group", "model-vs-group", "members-vs-group", "too-big"])
def test_bad_groups_fail_before_anything_compiles(no_compile, monkeypatch, specs, match):
    monkeypatch.setattr(groups_module, "compile_trainer", never_compile)
    with pytest.raises(LayoutError, match=match):
        build_groups(specs)


def test_a_device_twice_a_bad_layout_and_a_data_source_per_group_are_checked():
    for layout in ({"data": 0}, {"date": 2}, {"data": -1, "tensor": -1}):
        with pytest.raises(SettingError, match="each a positive size"):
            build_groups([GroupSpec(MLP32, optax.sgd(LR), layout=layout)])
    with pytest.raises(LayoutError, match="listed twice"):
        split_devices([0, 1, 1, 2], [2, 2])
    with pytest.raises(SettingError, match="2 data sources for 3 groups"):
        groups_module.batches_of([mlp_batch, mlp_batch], 3)


# ----------------------------------------------------------------------------- heterogeneous ensembles


def numpy_logits(params, x):
    return np.maximum(x @ params["w_in"] + params["b_in"], 0) @ params["w_out"] + params["b_out"]


def numpy_ensemble(logits, targets):
    """The ensemble metrics of logits [N, B, C], written out in NumPy."""
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    mean = probs.mean(0)
    rows = np.arange(len(targets))
    pred = mean.argmax(-1)
    entropy = -(mean * np.log(mean)).sum(-1).mean()
    member_entropy = -(probs * np.log(probs)).sum(-1).mean()
    confidence, correct = mean.max(-1), pred == targets
    bins = np.minimum((confidence * 15).astype(int), 14)
    ece = sum(abs(confidence[bins == b].sum() - correct[bins == b].sum()) for b in range(15)) / len(targets)
    return {"loss": -np.log(mean[rows, targets]).mean(), "accuracy": correct.mean(), "ece": ece,
            "entropy": entropy, "mutual_information": entropy - member_entropy,
            "disagreement": (probs.argmax(-1) != pred).mean(),
            "member_accuracy": (probs.argmax(-1) == targets).mean(-1)}


def test_a_heterogeneous_ensemble_is_the_mean_of_its_members_probabilities(trained):
    groups, _, _, run = trained
    mlps = Groups(groups.groups[:2])  # two MLP32 members and one MLP64: different architectures
    params = [host(run.states[0].params), host(run.states[1].params)]
    batches = [mlp_batch(50 + i) for i in range(2)]
    got = group_ensemble_metrics(mlps, [run.states[0].params, run.states[1].params], batches)
    members = [member(params[0], 0, 0), member(params[0], 0, 1), params[1]]
    x = np.concatenate([b["inputs"] for b in batches]).astype(np.float64)
    targets = np.concatenate([b["targets"] for b in batches])
    want = numpy_ensemble(np.stack([numpy_logits(jax.tree.map(np.float64, p), x) for p in members]), targets)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=f"ensemble {name}")
    assert len(got["member_accuracy"]) == 3
