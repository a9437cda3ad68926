"""Federated rounds against independent references: FedAvg with one SGD step is one large-batch SGD
step; every round equals a client loop written here with plain jax.grad (unequal clients weighted by
examples, empty slots and padded rows counting nothing, FedProx's term, DP clipping); DiLoCo's outer
Nesterov step by hand; the sharded round equals one device; Flower's own server and FedAvg strategy
with shardml's clients give the simulated global model; partitions, privacy accounting, bytes, the
command line."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_bitwise_equal, assert_trees_close, host
from shardml.core.data import load_digits
from shardml.core.errors import ConfigError
from shardml.core.losses import classification
from shardml.core.mesh import make_mesh
from shardml.models import mlp_classifier
from shardml.parallel.federated import Privacy, build_federated, diloco, fedavg, fedprox
from shardml.parallel.partition import (ClientBatches, dirichlet, iid, label_counts, label_report, natural,
                                        sample_cohort)

LR = 0.5
MIXED = [40, 25, 33, 18, 50, 21, 36, 29]  # client sizes, most above the batch of 16: each step sees other rows
SHARDED = {"members": 4, "data": 2}
ONE = {"data": 1}


@functools.lru_cache(maxsize=None)
def digits():
    return load_digits()


@functools.lru_cache(maxsize=None)
def model():
    return mlp_classifier(64, 16, 10)


@functools.lru_cache(maxsize=None)
def trainer(name: str, sizes: tuple = tuple(SHARDED.items()), clients: int = 8, local_steps: int = 1,
            cohort: int | None = None, microbatches: int = 1, privacy: Privacy = Privacy()):
    """The session's compiled round of one algorithm on one layout."""
    algorithm = {"fedavg": lambda: fedavg(LR), "fedprox0": lambda: fedprox(LR, mu=0.0),
                 "fedprox": lambda: fedprox(LR, mu=0.5),
                 "diloco_sgd": lambda: diloco(optax.sgd(LR), outer_lr=1.0, momentum=0.0),
                 "diloco_nesterov": lambda: diloco(optax.sgd(LR), outer_lr=0.7, momentum=0.9),
                 "diloco": lambda: diloco(steps=20)}[name]()
    sizes = dict(sizes)
    mesh = make_mesh(sizes, jax.devices()[:1] if sizes == ONE else None)
    return build_federated(model(), mesh, algorithm, clients=clients, local_steps=local_steps, cohort=cohort,
                           loss=classification, microbatches=microbatches, privacy=privacy)


def clients_of(sizes, local_steps=1, batch_size=16, cohort=0, slots=8, offset=0):
    """Clients holding consecutive digits examples, ``sizes[k]`` each."""
    ex = digits()
    cuts = offset + np.concatenate([[0], np.cumsum(sizes)])
    parts = [np.arange(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    return ClientBatches.from_arrays(ex.x_train, ex.y_train, parts, batch_size=batch_size, local_steps=local_steps,
                                     cohort=cohort, slots=slots, seed=3)


def rounds(trainer_, data, count, seed=0):
    state = trainer_.init(seed)
    start = host(state.params)
    metrics = []
    for r in range(count):
        state, m = trainer_.step(state, trainer_.put(data.batch(r)))
        metrics.append(host(m))
    return start, state, metrics


# ----------------------------------------------------------------------------- written here


def nll(params, x, y):
    """Per-example cross-entropy of the model's logits, written here."""
    logits = model().apply(params, jnp.asarray(x))
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, jnp.asarray(y)[:, None], -1)[:, 0]


@jax.jit
def mean_grad(params, x, y, mask):
    """The gradient of the mean loss over the rows with mask 1."""
    return jax.grad(lambda p: jnp.sum(nll(p, x, y) * mask) / jnp.sum(mask))(params)


@functools.partial(jax.jit, static_argnums=4)
def clipped_mean_grad(params, x, y, mask, clip):
    """The mean of the per-example gradients of the real rows, each clipped to L2 norm ``clip``."""
    grads = jax.vmap(lambda xi, yi: jax.grad(lambda p: nll(p, xi[None], yi[None])[0])(params))(x, y)
    norms = jnp.sqrt(sum(jnp.sum(jnp.square(g).reshape(len(x), -1), axis=1) for g in jax.tree.leaves(grads)))
    factor = jnp.minimum(1.0, clip / norms) * mask
    return jax.tree.map(lambda g: jnp.tensordot(factor, g, axes=1) / jnp.sum(mask), grads)


def union_step(w, rows):
    ex = digits()
    return sub(w, scale(mean_grad(w, ex.x_train[rows], ex.y_train[rows], np.ones(len(rows), np.float32)), LR))


def sub(a, b):
    return jax.tree.map(lambda x, y: np.asarray(x) - np.asarray(y), a, b)


def scale(tree, s):
    return jax.tree.map(lambda x: np.asarray(x) * s, tree)


def leaf_diffs(a, b):
    """Every entry of a − b, flattened."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
    return np.concatenate([np.ravel(np.asarray(x) - np.asarray(y)) for x, y in pairs])


def norm(tree):
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))))


def client_delta(w, batches, local_steps, mu=0.0):
    """One client's update w_t − w_t^k: plain SGD at LR on its real rows (+ mu (w − w_t))."""
    wk = w
    for h in range(local_steps):
        g = mean_grad(wk, batches["inputs"][h], batches["targets"][h], batches["mask"][h])
        g = jax.tree.map(lambda g_, p, a: np.asarray(g_) + mu * (p - a), g, wk, w)
        wk = sub(wk, scale(g, LR))
    return sub(w, wk)


def reference_deltas(w, data, round_, local_steps, mu=0.0):
    ids = data.cohort_of(round_)
    return [client_delta(w, data.client_batches(int(k), round_), local_steps, mu) for k in ids], data.sizes[ids]


def weighted_mean(deltas, weights):
    total = float(np.sum(weights))
    return jax.tree.map(lambda *d: sum(float(n) * x for n, x in zip(weights, d)) / total, *deltas)


# ----------------------------------------------------------------------------- exact rounds


def test_fedavg_round_with_one_sgd_step_equals_one_large_batch_sgd_step():
    data = clients_of([16] * 8)
    w0, state, _ = rounds(trainer("fedavg"), data, 1)
    want = union_step(w0, np.arange(128))
    assert_trees_close(host(state.params), want, 1e-5, "FedAvg round vs one SGD step on the union of the batches")
    assert norm(sub(want, w0)) > 1e-2, "the step moved nothing: the comparison would hold trivially"


def test_unequal_clients_weigh_by_examples_and_empty_slots_count_nothing():
    # 6 clients in 8 slots (2 empty), sizes 1..16 in batches of 16 (padded rows masked): one round of
    # one full-batch SGD step per client is one SGD step on the union of all their examples.
    sizes = [3, 16, 7, 11, 1, 14]
    data = clients_of(sizes, cohort=6)
    trainer_ = trainer("fedavg")
    batch = data.batch(0)
    assert batch["weight"].tolist() == [*sizes, 0, 0] and batch["mask"][:, 0].sum(axis=1).tolist() == [*sizes, 0, 0]
    w0, state, metrics = rounds(trainer_, data, 1)
    want = union_step(w0, np.arange(sum(sizes)))
    assert_trees_close(host(state.params), want, 1e-5, "unequal clients vs SGD on the union")
    deltas, _ = reference_deltas(w0, data, 0, 1)
    uniform = weighted_mean(deltas, np.ones(6))
    assert norm(sub(sub(w0, uniform), want)) > 1e-3, "equal client weights would pass too: the test cannot fail"
    assert metrics[0]["clients"] == 6 and metrics[0]["count"] == sum(sizes), metrics[0]


def test_rounds_with_local_steps_and_sampling_equal_the_client_loop_written_here():
    data = clients_of([20, 5, 33, 12, 9, 16, 27, 8, 14, 30], local_steps=2, cohort=5, slots=8)
    trainer_ = trainer("fedavg", clients=10, local_steps=2, cohort=5)
    w = host(trainer_.init(0).params)
    for r in range(2):
        w = sub(w, weighted_mean(*reference_deltas(w, data, r, 2)))
    _, state, _ = rounds(trainer_, data, 2)
    assert data.cohort_of(0).tolist() != data.cohort_of(1).tolist(), "the cohort is not resampled per round"
    assert_trees_close(host(state.params), w, 1e-5, "two sampled rounds of 2 local steps vs the loop written here")


def test_fedprox_with_mu_0_is_fedavg_and_with_mu_adds_the_proximal_gradient():
    data = clients_of(MIXED, local_steps=2)
    _, avg, _ = rounds(trainer("fedavg", local_steps=2), data, 1)
    _, prox0, _ = rounds(trainer("fedprox0", local_steps=2), data, 1)
    assert_trees_close(host(prox0.params), host(avg.params), 1e-6, "FedProx mu=0 vs FedAvg")
    w0, prox, _ = rounds(trainer("fedprox", local_steps=2), data, 1)
    want = sub(w0, weighted_mean(*reference_deltas(w0, data, 0, 2, mu=0.5)))
    assert_trees_close(host(prox.params), want, 1e-5, "FedProx mu=0.5 vs the proximal client loop written here")
    assert norm(sub(host(prox.params), host(avg.params))) > 1e-4, "mu=0.5 changed nothing: the test cannot fail"


def test_diloco_with_outer_sgd_lr_1_is_fedavg_and_its_nesterov_step_is_the_formula():
    data = clients_of(MIXED, local_steps=2)
    _, avg, _ = rounds(trainer("fedavg", local_steps=2), data, 2)
    _, plain, _ = rounds(trainer("diloco_sgd", local_steps=2), data, 2)
    assert_trees_close(host(plain.params), host(avg.params), 1e-6, "DiLoCo (outer SGD lr 1, no momentum) vs FedAvg")
    # Outer SGD lr 0.7 with Nesterov momentum 0.9 on the pseudo-gradient: m = 0.9 m + Δ; w -= 0.7 (Δ + 0.9 m).
    w, m = host(trainer("diloco_nesterov", local_steps=2).init(0).params), None
    for r in range(2):
        delta = weighted_mean(*reference_deltas(w, data, r, 2))
        m = delta if m is None else jax.tree.map(lambda a, d: 0.9 * a + d, m, delta)
        w = sub(w, scale(jax.tree.map(lambda d, a: d + 0.9 * a, delta, m), 0.7))
    _, nesterov, _ = rounds(trainer("diloco_nesterov", local_steps=2), data, 2)
    assert_trees_close(host(nesterov.params), w, 1e-5, "DiLoCo's outer Nesterov step vs the formula")


def test_a_non_finite_round_is_skipped_by_the_guard_every_step_shares():
    """A NaN client weight makes the round's pseudo-gradient NaN: the round ends in the train step's
    guard (shardml.core.update.advance), so the server weights and the server's and clients' optimizer
    states stay as they were, the round still counts, and the next finite round trains."""
    trainer_ = trainer("diloco_nesterov")
    data = clients_of([16] * 8)
    state = trainer_.init(0)
    before = host(state)
    batch = data.batch(0)
    batch["weight"] = np.where(np.arange(len(batch["weight"])) == 2, np.nan, batch["weight"]).astype(np.float32)
    state, m = trainer_.step(state, trainer_.put(batch))
    assert int(m["skipped"]) == 1 and int(state.step) == 1, m
    assert (int(state.bad_steps), int(state.bad_streak)) == (1, 1), (state.bad_steps, state.bad_streak)
    assert_bitwise_equal((host(state.params), host(state.opt_state)), (before.params, before.opt_state),
                         "a skipped round changed the state")
    state, m = trainer_.step(state, trainer_.put(data.batch(1)))
    assert int(m["skipped"]) == 0 and (int(state.bad_steps), int(state.bad_streak)) == (1, 0), m
    assert norm(sub(host(state.params), before.params)) > 1e-3, "the finite round after it trained nothing"


def test_sharded_round_equals_one_device():
    # DiLoCo: inner AdamW whose state every client keeps across rounds, outer Nesterov momentum.
    data = clients_of(MIXED, local_steps=2)
    _, sharded, m_sharded = rounds(trainer("diloco", local_steps=2), data, 3)
    _, alone, m_alone = rounds(trainer("diloco", sizes=tuple(ONE.items()), local_steps=2), data, 3)
    assert trainer("diloco", local_steps=2).mesh.shape["members"] == 4
    assert_trees_close(host(sharded.params), host(alone.params), 1e-5, "sharded vs one-device global model")
    assert_trees_close(host(sharded.opt_state), host(alone.opt_state), 1e-5, "server and kept client optimizer states")
    np.testing.assert_allclose([m["loss"] for m in m_sharded], [m["loss"] for m in m_alone], rtol=1e-5)


# ----------------------------------------------------------------------------- privacy


def per_example_clipped_delta(w, batches, clip):
    """One SGD step on the mean of per-example gradients clipped to ``clip`` (DP-SGD without noise)."""
    return scale(clipped_mean_grad(w, batches["inputs"][0], batches["targets"][0], batches["mask"][0], clip), LR)


def test_dp_sgd_clips_every_example_before_the_microbatch_sums():
    # Per-example clipping inside each of 2 microbatches on a data=2 mesh: the step is the mean of the
    # clipped per-example gradients (clipping a microbatch or a shard sum would give another one).
    data = clients_of([16, 16, 16, 16, 16, 16, 16, 16])
    trainer_ = trainer("fedavg", microbatches=2, privacy=Privacy(example_clip=0.05))
    w0, state, metrics = rounds(trainer_, data, 1)
    deltas = [per_example_clipped_delta(w0, data.client_batches(k, 0), 0.05) for k in range(8)]
    want = sub(w0, weighted_mean(deltas, np.ones(8)))
    assert_trees_close(host(state.params), want, 1e-5, "DP-SGD round vs per-example clipping written here")
    assert metrics[0]["clipped_examples"] > 0.5, f"the clip is not active, the test cannot fail: {metrics[0]}"
    per_client = [norm(d) / LR for d in deltas]
    assert max(per_client) <= 0.05 + 1e-6, f"a client's clipped mean gradient exceeds the clip: {per_client}"


def test_dp_sgd_adds_noise_once_per_logical_batch():
    # sigma·C noise on the sum of a client's 16 clipped gradients, once per local step (not once per
    # each of the 4 microbatches, which would double its std): the update differs from the noiseless
    # one by LR·N(0, (sigma C)²)/16 per client, averaged over 8 clients.
    data = clients_of([16] * 8)
    sigma, clip = 1.0, 0.05
    w0, state, _ = rounds(trainer("fedavg", microbatches=4, privacy=Privacy(example_clip=clip, example_noise=sigma)),
                          data, 1)
    clean = sub(w0, weighted_mean([per_example_clipped_delta(w0, data.client_batches(k, 0), clip) for k in range(8)],
                                  np.ones(8)))
    diff = leaf_diffs(host(state.params), clean)
    want = LR * sigma * clip / 16 / np.sqrt(8)
    ratio = np.std(diff) / want
    assert 0.9 < ratio < 1.1, f"noise std {np.std(diff):.3g}, want {want:.3g} (ratio {ratio:.3f})"
    assert abs(np.mean(diff)) < 4 * want / np.sqrt(diff.size), f"the noise is biased: mean {np.mean(diff):.3g}"


def test_dp_fedavg_clips_client_updates_weighs_clients_equally_and_adds_noise_once():
    data = clients_of([16, 4, 16, 9, 16, 14, 16, 10])
    sigma, clip = 0.5, 0.02
    w0, state, metrics = rounds(trainer("fedavg", privacy=Privacy(update_clip=clip, update_noise=sigma)), data, 1)
    deltas, _ = reference_deltas(w0, data, 0, 1)
    assert min(norm(d) for d in deltas) > 2 * clip, "some update is under the clip: the test cannot fail"
    clipped = [scale(d, clip / norm(d)) for d in deltas]
    assert all(abs(norm(d) - clip) < 1e-6 for d in clipped)
    clean = sub(w0, weighted_mean(clipped, np.ones(8)))
    diff = leaf_diffs(host(state.params), clean)
    want = sigma * clip / 8
    assert 0.9 < np.std(diff) / want < 1.1, f"noise std {np.std(diff):.3g}, want sigma*clip/cohort = {want:.3g}"
    assert abs(np.mean(diff)) < 4 * want / np.sqrt(diff.size), f"the aggregate is biased: mean {np.mean(diff):.3g}"
    assert metrics[0]["clipped_clients"] == 8, metrics[0]


def test_epsilon_comes_from_dp_accounting_with_the_runs_sampling():
    import dp_accounting

    from shardml.run.config import load_config
    from shardml.run.federated import privacy_report

    cfg = load_config("tiny", ["model.kind=mlp", "data.corpus=digits", "federated.algorithm=fedavg", "train.steps=50",
                               "federated.clients=20", "federated.fraction=0.25", "federated.local_steps=4",
                               "federated.update_clip=0.1", "federated.update_noise=1.2", "federated.example_clip=1",
                               "federated.example_noise=0.8", "federated.delta=1e-6", "train.batch_size=8"])
    data = clients_of([30, 12, 40, 25, 9] * 4, local_steps=4, batch_size=8, cohort=5)
    report = privacy_report(cfg, data)

    def epsilon(sigma, q, steps):
        accountant = dp_accounting.rdp.RdpAccountant()
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
        return accountant.get_epsilon(1e-6)

    assert report["dp_fedavg"]["epsilon"] == pytest.approx(epsilon(1.2, 5 / 20, 50), rel=1e-9)
    assert report["dp_sgd"]["epsilon"] == pytest.approx(epsilon(0.8, 8 / 9, 200), rel=1e-9)
    assert report["dp_fedavg"]["epsilon"] < epsilon(0.6, 5 / 20, 50), "more noise must spend less privacy"


# ----------------------------------------------------------------------------- Flower


@pytest.mark.parametrize("name", ["fedavg", "diloco"])
def test_flower_server_and_strategy_with_shardml_clients_give_the_simulated_global_model(name):
    # Flower's own Server (round loop, client manager) and strategy (FedAvg; for DiLoCo, FedAvg's
    # weighted mean handed to shardml's server optimizer), the clients in this process (no network, no
    # Ray), each running the client update compiled by shardml for one device.
    from shardml.parallel.flower import run_in_process, to_arrays

    data = clients_of(MIXED, local_steps=2)
    trainer_ = trainer(name, local_steps=2)
    _, simulated, _ = rounds(trainer_, data, 3)
    params, _ = run_in_process(trainer_, data, rounds=3, seed=0)
    assert len(to_arrays(params)) == 4
    assert_trees_close(params, host(simulated.params), 1e-5, f"{name}: Flower's global model vs shardml's simulation")
    start = host(trainer_.init(0).params)
    assert norm(sub(params, start)) > 1e-2, "three rounds moved nothing: the comparison would hold trivially"


def test_flower_client_starts_from_the_simulations_weights_and_evaluates_its_own_data():
    from shardml.parallel.flower import flower_client, to_arrays

    data = clients_of(MIXED, local_steps=2)
    trainer_ = trainer("fedavg", local_steps=2)
    client = flower_client(trainer_, data, 2, seed=0)
    start = host(trainer_.init(0).params)
    for got, want in zip(client.get_parameters({}), to_arrays(start)):
        np.testing.assert_array_equal(got, want, err_msg="a Flower client's initial weights")
    loss, n, metrics = client.evaluate(to_arrays(start), {})
    rows = np.arange(sum(MIXED[:2]), sum(MIXED[:3]))  # client 2's examples (33: three batches, the last padded)
    ex = digits()
    want = float(jnp.mean(nll(start, ex.x_train[rows], ex.y_train[rows])))
    correct = np.argmax(np.asarray(model().apply(start, ex.x_train[rows])), axis=-1) == ex.y_train[rows]
    assert n == 33 and loss == pytest.approx(want, rel=1e-5), (loss, want)
    assert metrics["accuracy"] == pytest.approx(float(np.mean(correct))), metrics


# ----------------------------------------------------------------------------- partitions


def test_partitions_dirichlet_skew_minimum_size_iid_and_natural():
    y = digits().y_train
    effective = []
    for alpha in (0.1, 1.0, 100.0):
        parts = dirichlet(y, 20, alpha, seed=1, min_size=5)
        assert sorted(np.concatenate(parts).tolist()) == list(range(len(y))), "examples lost or duplicated"
        assert min(len(p) for p in parts) >= 5
        effective.append(label_report(label_counts(parts, y, 10))["effective_classes"]["mean"])
    assert effective[0] < effective[1] < effective[2] and effective[2] > 9.0, effective
    parts = iid(len(y), 7, seed=2)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1 and sum(map(len, parts)) == len(y)
    field = np.array([0, 2, 1, 2, 0, 3, 1, 3, 3])
    assert [p.tolist() for p in natural(field)] == [[0, 4], [2, 6], [1, 3], [5, 7, 8]]
    assert [p.tolist() for p in natural(field, 2)] == [[0, 2, 4, 6], [1, 3, 5, 7, 8]]
    with pytest.raises(ConfigError, match="at most 4 clients"):
        natural(field, 5)
    with pytest.raises(ConfigError, match="min_size=30"):
        dirichlet(y, 50, 0.05, min_size=30, max_tries=5)


def test_client_batches_sampling_padding_and_epochs():
    cohorts = [sample_cohort(0, r, 50, 10) for r in range(3)]
    assert all(len(set(c.tolist())) == 10 and c.tolist() == sorted(c.tolist()) for c in cohorts)
    assert cohorts[0].tolist() == sample_cohort(0, 0, 50, 10).tolist() and cohorts[0].tolist() != cohorts[1].tolist()
    data = clients_of([5, 40], local_steps=4, batch_size=8, slots=4)
    small = data.client_batches(0, 0)
    assert small["mask"].sum(axis=1).tolist() == [5, 5, 5, 5], "a client smaller than the batch uses all its rows"
    assert sorted(small["targets"][0][:5].tolist()) == sorted(digits().y_train[:5].tolist())
    seen = np.concatenate([data.client_batches(1, r)["inputs"].reshape(-1, 64) for r in range(2)])[:40]
    assert len({row.tobytes() for row in seen}) == 40, "an epoch of a client repeats or skips examples"
    batch = data.batch(0)
    assert batch["inputs"].shape == (4, 4, 8, 64) and batch["client"].tolist() == [0, 1, -1, -1]
    assert batch["weight"].tolist() == [5, 40, 0, 0] and batch["mask"][2:].sum() == 0


# ----------------------------------------------------------------------------- runs from a config


def test_shardml_train_federated_digits_writes_report_and_resumes(capsys, tmp_path):
    from shardml.run.checkpoint import load_params
    from shardml.run.cli import main

    out = tmp_path / "fed"
    args = ["train", "tiny", "model.kind=mlp", "data.corpus=digits", "model.d_ff=16", "mesh.members=4", "mesh.data=2",
            "federated.algorithm=fedavg", "federated.clients=16", "federated.fraction=0.5", "federated.local_steps=4",
            "federated.partition=dirichlet", "federated.alpha=1", "federated.client_lr=0.5", "train.batch_size=8",
            "train.eval_batches=0", "train.log_every=1", "checkpoint.every=2", "--quiet"]
    assert main([*args, f"out_dir={out}", "train.steps=3"]) == 0
    assert main([*args, f"out_dir={out}", "train.steps=6"]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "resum" in err, err
    assert main([*args, f"out_dir={tmp_path / 'straight'}", "train.steps=6"]) == 0
    assert_trees_close(load_params(str(out)), load_params(str(tmp_path / "straight")), 1e-6,
                       "a federated run resumed after round 3 vs the same run straight through")
    report = json.loads((out / "federated.json").read_text())
    params = 64 * 16 + 16 + 16 * 10 + 10
    comm = report["communication"]
    assert comm["bytes_per_round_per_client"] == 2 * params * 4 and comm["bytes_total"] == 2 * params * 4 * 8 * 6
    assert comm["sync_bytes_equal_compute"] == 4 * comm["bytes_total"], comm
    assert report["cohort"] == 8 and report["slots"] == 8 and report["partition"]["examples"] == len(digits().y_train)
    assert sum(sum(c["labels"]) for c in report["partition"]["per_client"]) == len(digits().y_train)
    assert report["val"]["accuracy"] > 0.5, f"the global model did not learn: {report['val']}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6], records


@pytest.mark.parametrize("overrides,message", [
    (["federated.algorithm=diloco", "federated.fraction=0.5"], "federated.fraction=1"),
    (["federated.algorithm=fedavg", "federated.update_noise=1"], "needs federated.update_clip"),
    (["federated.algorithm=fedavg", "population.size=2"], "leave population.size at 1"),
    (["federated.algorithm=fedavg", "mesh.pipeline=2", "mesh.data=4"], "mesh.pipeline=1"),
    (["federated.algorithm=fedx"], "federated.algorithm='fedx' is not one of"),
])
def test_federated_config_errors_before_compiling(overrides, message):
    from shardml.run.config import load_config, validate

    with pytest.raises(ConfigError, match=message):
        validate(load_config("tiny", overrides), 8)


def test_readme_federated_example_runs():
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"## Federated learning.*?```python\n(.*?)```", readme, re.S).group(1)
    assert "range(30)" in code
    scope: dict = {}
    exec(compile(code.replace("range(30)", "range(2)"), "README.md", "exec"), scope)  # noqa: S102
    assert int(scope["state"].step) == 2 and float(scope["metrics"]["clients"]) == 64, scope["metrics"]
    assert type(scope["app"]).__name__ == "ClientApp"


@pytest.mark.slow
def test_sharded_round_with_fsdp_tensor_microbatches_and_both_privacies_equals_one_device():
    privacy = Privacy(example_clip=0.5, example_noise=0.3, update_clip=0.5, update_noise=0.2)
    data = clients_of(MIXED, local_steps=2)
    sizes = (("members", 2), ("fsdp", 2), ("tensor", 2))
    _, sharded, _ = rounds(trainer("fedprox", sizes=sizes, local_steps=2, microbatches=2, privacy=privacy), data, 2)
    _, alone, _ = rounds(trainer("fedprox", sizes=tuple(ONE.items()), local_steps=2, microbatches=2, privacy=privacy),
                         data, 2)
    assert_trees_close(host(sharded.params), host(alone.params), 1e-5, "fsdp x tensor inside clients vs one device")


@pytest.mark.slow
def test_fedavg_on_64_non_iid_clients_reaches_90_percent_held_out_accuracy(tmp_path):
    from shardml.run.config import load_config
    from shardml.run.train import train

    common = ["model.kind=mlp", "data.corpus=digits", "model.d_ff=64", "train.batch_size=16", "train.eval_batches=0",
              "checkpoint.every=0"]
    fed = train(load_config("tiny", [*common, "mesh.members=8", "federated.algorithm=fedavg", "federated.clients=64",
                                     "federated.local_steps=8", "federated.partition=dirichlet", "federated.alpha=0.3",
                                     "federated.client_lr=0.3", "train.steps=30", f"out_dir={tmp_path / 'fed'}"]),
                verbose=False)
    assert fed.val["accuracy"] > 0.9, fed.val


@pytest.mark.slow
def test_shardml_train_federated_on_the_text_corpus(tmp_path):
    from shardml.run.config import load_config
    from shardml.run.train import train

    summary = train(load_config("tiny", ["mesh.members=4", "mesh.data=2", "federated.algorithm=diloco",
                                         "federated.clients=8", "federated.local_steps=4",
                                         "federated.partition=natural", "train.steps=6",
                                         f"out_dir={tmp_path / 'text'}"]), verbose=False)
    report = json.loads((tmp_path / "text" / "federated.json").read_text())
    counts = np.array([c["labels"] for c in report["partition"]["per_client"]])
    spans = [np.flatnonzero(row) for row in counts]  # a client's sections of the text: a few, in a row
    assert all(len(s) <= 3 and np.all(np.diff(s) == 1) for s in spans), f"a text client is not contiguous: {counts}"
    first = summary.records[0]["loss"]
    assert summary.val["loss"] < first - 1.0, f"validation loss {summary.val['loss']} vs first round {first}"
