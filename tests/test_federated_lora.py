"""Federated LoRA: clients train and send only adapters over one frozen base stored once.

Independent references written here: each client's local adapter training by plain ``jax.grad`` +
``optax.sgd`` on its own batches (the same ``ClientBatches`` split the round reads), FedProx's
proximal gradient ``mu (a - a_global)`` on the adapters, and the example-weighted mean of the
clients' adapters; the base must come back bitwise unchanged and never be stacked per client.
From the command line (a tiny random Llama through ``model.from``): ``federated.json``'s bytes are
the adapters' (counted here from their shapes), the base is the checkpoint's, bad input exits 2.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import shardml
from conftest import assert_bitwise_equal, assert_trees_close, host
from shardml.core.mesh import make_mesh
from shardml.models.lora import lora
from shardml.parallel.federated import build_federated, fedavg, fedprox
from shardml.parallel.partition import ClientBatches

LR, MU, H = 0.5, 0.7, 2
SIZES = (6, 12, 9, 13)  # unequal clients: the mean must weigh them by examples
CFG = shardml.TransformerConfig(vocab=32, layers=1, d_model=16, heads=2, d_ff=32, dtype="float32")


@functools.lru_cache(maxsize=None)
def model():
    return lora(shardml.transformer(CFG, 8), rank=4, alpha=8.0, targets=("q", "v", "down"))


@functools.lru_cache(maxsize=None)
def trainer(name: str):
    algorithm = fedavg(LR) if name == "fedavg" else fedprox(LR, mu=MU)
    mesh = make_mesh({"members": 4, "data": 2})
    return build_federated(model(), mesh, algorithm, clients=len(SIZES), local_steps=H)


def clients(slots: int) -> ClientBatches:
    tokens = np.random.default_rng(0).integers(0, CFG.vocab, (sum(SIZES), 9))
    cuts = np.concatenate([[0], np.cumsum(SIZES)])
    parts = [np.arange(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    return ClientBatches.from_arrays(tokens[:, :-1], tokens[:, 1:], parts, batch_size=4, local_steps=H, slots=slots,
                                     seed=3)


@functools.lru_cache(maxsize=None)
def one_round(name: str):
    """(parameters before, after, the round's data) of one round from the trainer's init."""
    tr = trainer(name)
    data = clients(tr.slots)
    state = tr.init(0)
    before = host(state.params)
    state, _ = tr.step(state, tr.put(data.batch(0)))
    return before, host(state.params), data


@jax.jit
def adapter_grad(adapters, base, inputs, targets, mask):
    """The gradient, in the adapters only, of the mean token cross-entropy over the masked tokens."""
    def loss(a):
        logits = model().apply({"base": base, "adapters": a}, inputs)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
        return jnp.sum(ce * mask) / jnp.sum(mask)

    return jax.grad(loss)(adapters)


def reference_adapters(before, data, mu=0.0):
    """The example-weighted mean of every client's adapters after H plain SGD steps on its batches
    (+ mu (a − a_global), FedProx's proximal gradient, on the adapters)."""
    base, start = before["base"], before["adapters"]
    finals, weights = [], []
    for k in data.cohort_of(0):
        batches, a = data.client_batches(int(k), 0), start
        opt = optax.sgd(LR)
        opt_state = opt.init(a)
        for h in range(H):
            g = adapter_grad(a, base, batches["inputs"][h], batches["targets"][h], batches["mask"][h])
            g = jax.tree.map(lambda g_, p, p0: g_ + mu * (p - p0), g, a, start)
            updates, opt_state = opt.update(g, opt_state, a)
            a = optax.apply_updates(a, updates)
        finals.append(a)
        weights.append(float(data.sizes[k]))
    return jax.tree.map(lambda *xs: sum(w * np.asarray(x) for w, x in zip(weights, xs)) / sum(weights), *finals)


# FedProx runs in the default suite (its mu = 0 is FedAvg's code path); FedAvg itself with the slow ones.
@pytest.mark.parametrize("name,mu", [pytest.param("fedavg", 0.0, marks=pytest.mark.slow), ("fedprox", MU)])
def test_a_round_averages_the_clients_adapters_trained_by_plain_sgd_and_leaves_the_base(name, mu):
    before, after, data = one_round(name)
    assert_trees_close(after["adapters"], reference_adapters(before, data, mu), 1e-5,
                       f"{name}: the round's adapters vs the weighted mean of clients trained here")
    assert_bitwise_equal(after["base"], before["base"], f"{name}: the frozen base after a round")
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(after["adapters"]),
                                                               jax.tree.leaves(before["adapters"])))
    assert moved > 1e-3, "the adapters did not train"


@pytest.mark.slow
def test_fedprox_pulls_towards_the_global_adapters():
    """The proximal term matters here: FedProx's round differs from FedAvg's by more than the tolerance."""
    (_, avg, _), (_, prox, _) = one_round("fedavg"), one_round("fedprox")
    gap = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(avg["adapters"]),
                                                           jax.tree.leaves(prox["adapters"])))
    assert gap > 1e-4, gap


def _carried(jaxpr, out):
    """Shapes of everything the loops (the clients' local steps: a ``lax.scan``) carry in and out."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            out.update(tuple(v.aval.shape) for v in (*eqn.invars, *eqn.outvars) if hasattr(v.aval, "shape"))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _carried(sub, out)
    return out


def test_the_base_is_stored_once_and_never_stacked_per_client():
    """The state holds one base and no optimizer state for it; the clients' local loop carries
    their adapters stacked per slot, not the base (every client reads the one copy)."""
    tr = trainer("fedprox")  # its clients' optimizer holds state (the proximal anchor): none may be the base's
    state = tr.init(0)
    base_shapes = [tuple(x.shape) for x in jax.tree.leaves(model().abstract_params["base"])]
    assert [tuple(x.shape) for x in jax.tree.leaves(state.params["base"])] == base_shapes
    assert not jax.tree.leaves(state.opt_state), "the server's sgd keeps no state; clients start theirs each round"
    batch = tr.put(clients(tr.slots).batch(0))
    with jax.set_mesh(tr.mesh):
        carried = _carried(jax.make_jaxpr(tr.program.step)(state, batch).jaxpr, set())
    stacked = [s for s in base_shapes if (tr.slots, *s) in carried]
    assert not stacked, f"base leaves {stacked} are carried per client slot through the local steps"
    adapters = [tuple(x.shape) for x in jax.tree.leaves(model().abstract_params["adapters"])]
    assert all((tr.slots, *s) in carried for s in adapters), "the adapters should be carried per slot"


def test_the_bytes_sent_are_the_adapters_counted_from_their_shapes():
    from shardml.run.federated import communication_of

    rank, layers, d, heads, head, ff = 4, CFG.layers, CFG.d_model, CFG.heads, CFG.d_model // CFG.heads, CFG.d_ff
    adapters = layers * ((d * rank + rank * heads * head) * 2 + (ff * rank + rank * d))  # q, v (A, B); down (A, B)
    comm = communication_of(model(), cohort=3, rounds=5, local_steps=H)
    assert comm["values"] == adapters and comm["bytes_per_round_per_client"] == 2 * 4 * adapters, comm
    assert comm["bytes_total"] == 2 * 4 * adapters * 3 * 5, comm
    assert comm["model_bytes_per_round_per_client"] == 2 * 4 * model().num_params, comm
    assert comm["model_bytes_per_round_per_client"] > 8 * comm["bytes_per_round_per_client"], comm
    assert comm["sent"].startswith("adapters only"), comm


# ----------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory of a tiny random Llama, byte-level token file)."""
    import torch
    import transformers

    root = tmp_path_factory.mktemp("fedlora")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "llama")
    text = "Clients send adapters; the base stays where it is. " * 40
    np.save(root / "corpus.npy", np.frombuffer(text.encode(), np.uint8).astype(np.uint16))
    return str(root / "llama"), str(root / "corpus.npy")


def fed_args(checkpoint_dir, corpus, out_dir, *extra):
    return ["train", f"model.from={checkpoint_dir}", f"data.corpus={corpus}", "model.dtype=float32", "lora.rank=4",
            "lora.targets=q,v", "mesh.members=4", "mesh.data=2", "mesh.fsdp=1", "mesh.tensor=1",
            "federated.algorithm=fedavg", "federated.clients=4",
            "federated.local_steps=2", "data.seq_len=16", "train.batch_size=4", "train.steps=2",
            "train.eval_batches=1", "checkpoint.async_save=false", f"out_dir={out_dir}", "--quiet", *extra]


@pytest.mark.slow
def test_federated_lora_from_a_checkpoint_sends_adapter_bytes_and_keeps_the_checkpoint_as_base(checkpoint, tmp_path):
    from shardml.models.hf_io import load_hf
    from shardml.run import inference
    from shardml.run.cli import main

    directory, corpus = checkpoint
    assert main(fed_args(directory, corpus, str(tmp_path / "run"))) == 0
    report = json.loads((tmp_path / "run" / "federated.json").read_text())
    comm = report["communication"]
    layers, d, kv = 2, 32, 2 * 8  # q: 32 -> 4 heads x 8, v: 32 -> 2 kv heads x 8
    adapters = layers * ((d * 4 + 4 * d) + (d * 4 + 4 * kv))  # A [in, r] and B [r, out] of q and v per layer
    assert comm["values"] == adapters and comm["bytes_per_round_per_client"] == 2 * 4 * adapters, comm
    assert comm["bytes_total"] == comm["bytes_per_round_per_client"] * 4 * 2, comm
    assert comm["model_bytes_per_round_per_client"] > 20 * comm["bytes_per_round_per_client"], comm
    assert "adapters only" in comm["sent"], comm
    run = inference.load_run(str(tmp_path / "run"))
    params = run.trainer.natural(run.params)
    _, loaded = load_hf(directory)
    assert_bitwise_equal(host(params["base"]), host(loaded), "the base after federated rounds vs the checkpoint")


@pytest.mark.parametrize("extra,message", [
    (("federated.algorithm=fedopt",), "federated.algorithm=fedopt: federated LoRA runs fedavg or fedprox"),
    (("federated.algorithm=diloco",), "federated.algorithm=diloco: federated LoRA runs fedavg or fedprox"),
    (("federated.update_clip=1",), "federated.update_clip=1.0: differential privacy is not supported"),
    (("federated.example_clip=1",), "federated.example_clip=1.0: differential privacy is not supported"),
])
def test_bad_federated_lora_input_exits_2_before_compiling(extra, message, capsys, tmp_path):
    from shardml.run.cli import main

    args = ["train", "tiny", "lora.rank=4", "mesh.members=4", "mesh.data=2", "federated.algorithm=fedavg",
            "federated.clients=4", *extra, f"out_dir={tmp_path / 'bad'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir()), "it wrote before refusing"
