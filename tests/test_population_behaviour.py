"""What populations do, not what they record: after a PBT exploit every copied member holds its
source's parameters and optimizer state and the worst members copied the best; a sweep's pruning
stops its worst members and their parameters stop moving; ensemble metrics (member losses and
entropies, mutual information, ECE binning) equal NumPy written here.

Small stacked states built here (no model to compile): the functions under test take any state
with stacked ``params`` and an ``opt_state`` of an injected optax optimizer.
"""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_bitwise_equal, host
from shardml.core.step import TrainState
from shardml.parallel.inference import classifier_metrics, ensemble
from shardml.parallel.members import GATE, gated, hyperparams_of
from shardml.parallel.population import ECE_BINS, EnsembleMetrics, active, exploit_explore
from shardml.run.population import PopulationPolicy

N = 8


def optimizer():
    return gated(optax.inject_hyperparams(optax.adam)(learning_rate=1e-2))


def population_state(n=N):
    """n members with distinct parameters, distinct Adam moments (two steps on member-specific
    gradients) and distinct learning rates."""
    opt = optimizer()
    params = {"w": jnp.arange(n * 6, dtype=jnp.float32).reshape(n, 2, 3) / 7.0, "b": jnp.linspace(-1, 1, n)}
    opt_state = jax.vmap(opt.init)(params)
    opt_state = optax.tree_utils.tree_set(opt_state, learning_rate=jnp.linspace(1e-3, 8e-3, n))
    for k in range(2):
        grads = jax.tree.map(lambda p: jnp.sin(p * (k + 2)) + 0.1 * k, params)
        updates, opt_state = jax.vmap(opt.update)(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    zero = jnp.zeros((n,), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=opt_state, rng=jnp.zeros((n, 2), jnp.uint32),
                      bad_steps=zero, bad_streak=zero)


def member(tree, i):
    return jax.tree.map(lambda x: np.asarray(x)[i], tree)


def without_hyperparams(opt_state):
    """The optimizer state's arrays that are not injected hyperparameters (the moments, counts)."""
    hyper_ids = {id(v) for v in jax.tree.leaves(hyperparams_of(opt_state))}
    return [x for x in jax.tree.leaves(opt_state) if id(x) not in hyper_ids]


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_pbt_exploit_copies_the_best_members_parameters_and_optimizer_state_into_the_worst(fraction):
    state = population_state()
    before = host(state)
    hyper_before = host(hyperparams_of(state.opt_state))
    scores = jnp.asarray([0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.2, 0.4])  # loss: lower is better
    new, sources = jax.jit(exploit_explore, static_argnames=("fraction", "names"))(
        state, scores, jax.random.key(3), fraction=fraction, names=("learning_rate",))
    sources = np.asarray(sources)
    q = int(fraction * N)
    order = np.argsort(np.asarray(scores))
    best, worst = set(order[:q].tolist()), set(order[N - q:].tolist())
    replaced = {i for i in range(N) if sources[i] != i}
    assert replaced == worst, f"members {sorted(replaced)} were replaced; the worst by score are {sorted(worst)}"
    assert all(sources[i] in best for i in worst), f"the worst copied {sources[sorted(worst)]}, not the best {best}"
    moments_before = without_hyperparams(before.opt_state)
    moments_after = without_hyperparams(host(new.opt_state))
    hyper = host(hyperparams_of(new.opt_state))
    for i in range(N):
        s = sources[i]
        assert_bitwise_equal(member(new.params, i), member(before.params, s), f"member {i}'s parameters vs member {s}'s")
        for a, b in zip(moments_after, moments_before):
            np.testing.assert_array_equal(a[i], b[s], err_msg=f"member {i}'s optimizer state vs member {s}'s")
        ratio = hyper["learning_rate"][i] / hyper_before["learning_rate"][s]
        if i in worst:
            assert np.isclose(ratio, 0.8) or np.isclose(ratio, 1.2), f"member {i}: lr x{ratio}, not x0.8 or x1.2"
        else:
            assert ratio == 1.0, f"member {i} kept its place but its lr changed by x{ratio}"
        assert hyper[GATE][i] == hyper_before[GATE][i]


def test_pbt_members_differ_before_the_exploit():
    """The check above means something only if members' parameters and moments all differ."""
    state = host(population_state())
    for leaf in [*jax.tree.leaves(state.params), *without_hyperparams(state.opt_state)]:
        if leaf.ndim and leaf.shape[0] == N and leaf.dtype.kind == "f":  # counts are alike
            assert len({leaf[i].tobytes() for i in range(N)}) == N


def policy(kind="sweep", prune_every=2, prune_fraction=0.5, steps=10):
    trainer = types.SimpleNamespace(state_shardings=None, mesh=None)
    return PopulationPolicy(trainer, kind, ("learning_rate",), seed=0, steps=steps, max_bad_steps=3,
                            prune_every=prune_every, prune_fraction=prune_fraction)


def test_sweep_pruning_stops_the_worst_members_and_freezes_their_parameters():
    pruning = policy()
    assert [s for s in range(10) if pruning.due(s)] == [1, 3, 5, 7], "prune_every=2 over 10 steps: after 2, 4, 6, 8"
    state = population_state()
    losses = np.asarray([0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.2, 0.4])
    state = pruning.at(1, state, {"loss": losses})
    assert active(state).tolist() == [not (x >= 0.5) for x in losses], "the worst half (highest loss) is stopped"
    # A second pruning chooses among the members still training only.
    state = pruning.at(3, state, {"loss": losses[::-1].copy()})
    alive = np.flatnonzero(active(state))
    assert alive.tolist() == [1, 6], f"left training: {alive.tolist()}"
    # A stopped member's update is zero: its parameters stay as they are.
    opt = optimizer()
    grads = jax.tree.map(jnp.ones_like, state.params)
    updates, _ = jax.vmap(opt.update)(grads, state.opt_state, state.params)
    for i in range(N):
        moved = any(np.any(np.asarray(u)[i] != 0) for u in jax.tree.leaves(updates))
        assert moved == (i in (1, 6)), f"member {i}: updated={moved}, active={i in (1, 6)}"


def test_pruning_never_stops_the_last_member_and_ensembles_never_prune():
    state = population_state(2)
    state = policy(prune_fraction=1.0).at(1, state, {"loss": np.asarray([0.2, 0.1])})
    assert active(state).tolist() == [False, True]
    assert not policy(kind="ensemble").due(1)


# ----------------------------------------------------------------------------- ensemble metrics


def softmax(z):
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def entropy(p):
    return -(p * np.log(p)).sum(-1)


def ece(probs, targets, weight):
    """Expected calibration error over 15 equal-width confidence bins, with a loop over the bins."""
    confidence, correct = probs.max(-1), (probs.argmax(-1) == targets)
    total = 0.0
    for b in range(ECE_BINS):
        lo, hi = b / ECE_BINS, (b + 1) / ECE_BINS
        inside = (confidence >= lo) & ((confidence < hi) if b < ECE_BINS - 1 else (confidence <= hi))
        total += abs(np.sum(weight * confidence * inside) - np.sum(weight * correct * inside))
    return total / weight.sum()


def logits_and_targets(seed, members=3, rows=40, classes=4):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(members, rows, classes)) * rng.uniform(0.3, 3.0, size=(members, rows, 1))
    return logits, rng.integers(0, classes, rows)


def test_ensemble_metrics_equal_numpy_written_here():
    (l1, t1), (l2, t2) = logits_and_targets(0), logits_and_targets(1)
    mask2 = (np.arange(len(t2)) % 3 != 0).astype(np.float64)
    metrics = EnsembleMetrics()
    metrics.add(l1, t1)
    metrics.add(l2, t2, mask2)
    got = metrics.result()
    logits, targets = np.concatenate([l1, l2], 1), np.concatenate([t1, t2])
    weight = np.concatenate([np.ones(len(t1)), mask2])
    probs = softmax(logits)  # [M, T, C]
    mean = probs.mean(0)
    n, rows = weight.sum(), np.arange(len(targets))
    want = {
        "loss": -np.sum(weight * np.log(mean[rows, targets])) / n,
        "accuracy": np.sum(weight * (mean.argmax(-1) == targets)) / n,
        "entropy": np.sum(weight * entropy(mean)) / n,
        "member_entropy": np.sum(weight * np.mean([entropy(p) for p in probs], 0)) / n,
        "ece": ece(mean, targets, weight),
        "disagreement": np.sum(weight * (probs.argmax(-1) != mean.argmax(-1)).mean(0)) / n,
    }
    want["mutual_information"] = want["entropy"] - want["member_entropy"]
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-9, err_msg=name)
    assert want["mutual_information"] > 0.01, "the test needs members that disagree"
    member_loss = [-np.sum(weight * np.log(p[rows, targets])) / n for p in probs]
    member_accuracy = [np.sum(weight * (p.argmax(-1) == targets)) / n for p in probs]
    member_ece = [ece(p, targets, weight) for p in probs]
    np.testing.assert_allclose(got["member_loss"], member_loss, rtol=1e-9)
    np.testing.assert_allclose(got["member_accuracy"], member_accuracy, rtol=1e-9)
    np.testing.assert_allclose(got["member_ece"], member_ece, rtol=1e-9)
    np.testing.assert_allclose(got["mean_member_ece"], np.mean(member_ece), rtol=1e-9)
    np.testing.assert_allclose(got["mean_member_loss"], np.mean(member_loss), rtol=1e-9)


def test_ece_bins_confidence_exactly_as_equal_width_bins():
    """Confidences on both sides of bin edges: a bin off by one moves them to another bin."""
    confidence = np.asarray([0.30, 0.395, 0.405, 0.465, 0.47, 0.66, 0.67, 0.93, 0.999])
    # Two classes cannot give confidence < 0.5, so use 10 classes with the rest spread evenly.
    classes = 10
    probs = np.stack([np.r_[c, np.full(classes - 1, (1 - c) / (classes - 1))] for c in confidence])
    targets = np.asarray([0, 1, 0, 0, 2, 0, 1, 0, 0])
    metrics = EnsembleMetrics()
    metrics.add(np.log(probs)[None], targets)
    np.testing.assert_allclose(metrics.result()["ece"], ece(softmax(np.log(probs)), targets, np.ones(len(targets))),
                               rtol=1e-9)


def test_per_example_ensemble_and_classifier_metrics_equal_numpy_written_here():
    logits, targets = logits_and_targets(2)
    probs = softmax(logits)
    mean = probs.mean(0)
    got = ensemble(logits)
    np.testing.assert_allclose(got["entropy"], entropy(mean), rtol=1e-9)
    np.testing.assert_allclose(got["mutual_information"], entropy(mean) - np.mean([entropy(p) for p in probs], 0),
                               rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(got["disagreement"], (probs.argmax(-1) != mean.argmax(-1)).mean(0))
    one = classifier_metrics(logits[0], targets)
    np.testing.assert_allclose(one["ece"], ece(probs[0], targets, np.ones(len(targets))), rtol=1e-9)
    np.testing.assert_allclose(one["entropy"], entropy(probs[0]).mean(), rtol=1e-9)
    both = classifier_metrics(logits, targets, members=True)
    np.testing.assert_allclose(both["mutual_information"], np.mean(got["mutual_information"]), rtol=1e-9)


def test_a_member_with_a_nan_loss_is_pruned_first():
    state = population_state(4)
    state = policy(prune_fraction=0.25).at(1, state, {"loss": np.asarray([0.2, np.nan, 0.9, 0.1])})
    assert active(state).tolist() == [True, False, True, True], "a diverged member must be the first stopped"


def test_pbt_policy_records_who_copied_whom():
    from shardml.core.mesh import make_mesh

    pbt = policy(kind="pbt")
    pbt.trainer.mesh = make_mesh({"data": 1}, jax.devices()[:1])
    pbt.exploit_fraction = 0.25
    losses = np.asarray([0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.2, 0.4])
    state = pbt.at(1, population_state(), {"loss": losses})
    assert sorted(e["member"] for e in pbt.lineage) == [0, 5], f"the worst two copied: {pbt.lineage}"
    for entry in pbt.lineage:
        assert entry["step"] == 2 and entry["copied_from"] in (1, 6), entry
        lr = float(np.asarray(hyperparams_of(state.opt_state)["learning_rate"])[entry["member"]])
        assert entry["hyperparams"]["learning_rate"] == pytest.approx(lr)
