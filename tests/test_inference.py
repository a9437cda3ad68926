"""Sharded inference from checkpoints: evaluation over the whole held-out set equals a one-device
computation written here, predictions come back in order (every population member and the
ensemble), greedy decoding with the KV cache equals a plain decode that recomputes the whole
sequence each step on every layout, many prompts of different lengths stop one by one; and the
command line (in-process) with its errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_transformer, trainer_for

from shardml.core.data import load_digits, load_tokens
from shardml.models import TransformerConfig, mlp_classifier, transformer
from shardml.parallel.inference import generate, predict
from shardml.run import run_dir
from shardml.run.checkpoint import load_params
from shardml.run.cli import main
from shardml.run.config import load_config
from shardml.run.inference import SAMPLE_PROMPTS, SAMPLE_TEMPERATURE, evaluate_run
from shardml.run.train import train

# The tiny preset as test_cli trains it (the same compiled programs): 4 layers, d_model 32, seq 32, data=8.
LM_RUN = ["train.steps=4", "train.log_every=1"]
LM_MODEL = TransformerConfig(layers=4, d_model=32, heads=4, d_ff=64, dtype="float32")  # the tiny preset's, written out
SEQ = 32
POPULATION_RUN = ["model.kind=mlp", "data.corpus=digits", "model.d_ff=32", "model.dtype=float32", "optim.lr=1e-2",
                  "train.steps=2", "train.batch_size=32", "train.eval_batches=0", "checkpoint.every=0",
                  "population.kind=ensemble", "population.size=4", "mesh.members=2", "mesh.data=2", "mesh.tensor=2"]
PROMPTS = [[7], [200, 13, 55, 1, 99, 42, 17, 250, 3, 64, 128, 9, 31], [100, 101, 102, 103, 104]]  # lengths 1, 13, 5
# The last: the KV cache's slots split over context (KV_CACHE_LOGICAL's act_seq), decoding gathers what it needs.
LAYOUTS = [{"data": 1}, {"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 2, "tensor": 4},
           {"context": 2, "data": 2, "tensor": 2}]
MIXED = LAYOUTS[2]


def shardml(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("inference") / "tiny"
    train(load_config("tiny", [*LM_RUN, f"out_dir={out}"]), verbose=False)
    return out


@pytest.fixture(scope="module")
def population_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("inference") / "ensemble"
    train(load_config("tiny", [*POPULATION_RUN, f"out_dir={out}"]), verbose=False)
    return out


# ----------------------------------------------------------------------------- eval


def one_device_lm_eval(params, tokens, seq):
    """Mean next-token NLL over every prediction of the stream, on one device: the full windows
    in one batch, the last (shorter) window alone, each token counted once."""
    model = transformer(LM_MODEL, seq)
    device = jax.devices()[0]
    params = jax.device_put(params, device)

    def nll_sum(inputs, targets):
        logp = jax.nn.log_softmax(model.apply(params, inputs).astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)
        return -np.asarray(picked, np.float64).sum()

    predicted = len(tokens) - 1
    full = predicted // seq
    windows = np.asarray(tokens[:full * seq + 1])
    total = nll_sum(windows[:-1].reshape(full, seq), windows[1:].reshape(full, seq))
    rest = predicted - full * seq
    tail = np.asarray(tokens[full * seq:])
    total += nll_sum(tail[None, :-1], tail[None, 1:])
    return total / predicted, predicted, rest


@pytest.fixture(scope="module")
def one_device_eval(lm_run):
    loss, count, rest = one_device_lm_eval(load_params(str(lm_run)), load_tokens("pydoc").val, SEQ)
    assert 0 < rest < SEQ, "the stream should end in a partial window, to test its padding"
    return loss, count


def test_eval_over_the_whole_held_out_set_equals_one_device(lm_run, one_device_eval):
    want_loss, want_count = one_device_eval
    rows = 40
    assert -(-want_count // SEQ) % rows, f"{rows} rows divide the windows: no partial last batch"
    report = evaluate_run(str(lm_run), ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], rows)
    assert report["tokens"] == want_count, f"counted {report['tokens']} tokens of {want_count}"
    assert report["rows"] == rows and report["mesh"] == "data=2 x fsdp=2 x tensor=2", report
    np.testing.assert_allclose(report["loss"], want_loss, rtol=1e-6,
                               err_msg="sharded eval vs the one-device mean over every token")
    assert math.isclose(report["perplexity"], math.exp(want_loss), rel_tol=1e-5)
    assert math.isclose(report["bits_per_byte"], want_loss / math.log(2), rel_tol=1e-5)
    assert report["tokens_per_s"] > 0


def test_eval_through_the_command_line(lm_run, one_device_eval, capsys):
    want_loss, want_count = one_device_eval
    code, out, err = shardml(capsys, "eval", str(lm_run), "mesh.tensor=4", "--batch-size", "63")
    assert code == 0, err[-3000:]
    assert "data=2 x tensor=4, batches of 64 rows" in out, out  # 63 rounded up to a multiple of the 2 batch shards
    assert f"loss: {want_loss:.4f}" in out and f"bits_per_byte: {want_loss / math.log(2):.4f}" in out, out
    assert f"held-out: {want_count:,} tokens" in out and "tokens/s" in out, out


# ----------------------------------------------------------------------------- predict


def test_predict_returns_every_example_in_order():
    digits = load_digits()
    model = mlp_classifier(digits.features, 32, digits.classes)
    trainer = trainer_for(model, {"data": 2, "fsdp": 2, "tensor": 2})
    host = jax.device_get(model.init(jax.random.key(3)))
    params = jax.device_put(host, trainer.state_shardings.params)
    x = digits.x_val
    want = np.asarray(model.apply(host, jnp.asarray(x)))  # no mesh: one device
    got = predict(trainer, params, x, rows=56)  # 360 rows: 6 batches of 56 and a last one of 24
    assert got.shape == want.shape, f"{got.shape} vs {want.shape}: padding rows kept or examples dropped"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg="predictions vs one device, row by row")
    order = np.random.default_rng(0).permutation(len(x))
    np.testing.assert_allclose(predict(trainer, params, x[order], rows=56), want[order], rtol=1e-5, atol=1e-6,
                               err_msg="a shuffled dataset's predictions are not shuffled alike")


def one_device_member_logits(run):
    params = load_params(str(run))  # host numpy, every leaf [members, ...]
    digits = load_digits()
    model = mlp_classifier(digits.features, 32, digits.classes)
    members = [jax.tree.map(lambda p, m=m: p[m], params) for m in range(4)]
    return np.stack([np.asarray(model.apply(member, jnp.asarray(digits.x_val))) for member in members]), digits.y_val


def test_predict_a_population_gives_every_member_and_the_ensemble(population_run, capsys, tmp_path):
    path = tmp_path / "preds.npz"
    code, out, err = shardml(capsys, "predict", str(population_run), "mesh.members=4", "mesh.data=2",
                             "--batch-size", "48", "--output", str(path))
    assert code == 0, err[-3000:]
    got = dict(np.load(path))
    logits, targets = one_device_member_logits(population_run)
    np.testing.assert_allclose(got["member_logits"], logits, rtol=1e-5, atol=1e-6,
                               err_msg="each member's predictions vs the member alone on one device")
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(got["probs"], probs.mean(0), rtol=1e-5, atol=1e-7, err_msg="ensemble mean")
    np.testing.assert_allclose(got["std"], probs.std(0), rtol=1e-4, atol=1e-7, err_msg="members' spread")
    np.testing.assert_array_equal(got["prediction"], probs.mean(0).argmax(-1))
    np.testing.assert_array_equal(got["targets"], targets)
    assert not np.allclose(logits[0], logits[1]), "members are equal: the test cannot tell them apart"
    assert f"{len(targets):,} predictions written to {path}" in out and "4 members" in out, out


def test_eval_of_a_population_reports_members_ensemble_and_calibration(population_run, capsys):
    code, out, err = shardml(capsys, "eval", str(population_run))
    assert code == 0, err[-3000:]
    logits, y = one_device_member_logits(population_run)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    mean = probs.mean(0)
    loss = -np.mean(np.log(mean[np.arange(len(y)), y]))
    conf, hit = mean.max(-1), mean.argmax(-1) == y
    bins = np.minimum((conf * 15).astype(int), 14)
    ece = sum(abs(conf[bins == b].sum() - hit[bins == b].sum()) for b in range(15)) / len(y)
    for name, value in (("loss", loss), ("accuracy", hit.mean()), ("ece", ece)):
        assert f"ensemble {name}: {value:.4f}" in out, f"{name} {value:.4f} not in\n{out}"
    member_acc = [float(np.mean(p.argmax(-1) == y)) for p in probs]
    assert "member_accuracy: [" + ", ".join(f"{a:.4f}" for a in member_acc) + "]" in out, out


# ----------------------------------------------------------------------------- generate


def plain_decode(model, params, prompts, new_tokens, stop=None, first_logits=False, temperature=0.0, seed=0):
    """Decoding on one device that runs the whole sequence through the model at every step (a
    fixed-length buffer: causal attention makes the padding after the cursor irrelevant): greedy,
    or with a temperature drawing with generate's documented keys (prompt r, new token i:
    ``fold_in(fold_in(key(seed), r), i)``); ``first_logits`` also returns each prompt's
    next-token logits."""
    params = jax.device_put(jax.device_get(params), jax.devices()[0])
    forward = jax.jit(model.apply)
    buffer = np.zeros((len(prompts), max(map(len, prompts)) + new_tokens), np.int32)
    cursor = [len(p) for p in prompts]
    for row, prompt in enumerate(prompts):
        buffer[row, :len(prompt)] = prompt
    out, first = [[] for _ in prompts], None
    for _ in range(new_tokens):
        logits = np.asarray(forward(params, buffer))
        if first is None:
            first = logits[np.arange(len(prompts)), np.array(cursor) - 1]
        for row in range(len(prompts)):
            if out[row] and stop is not None and out[row][-1] == stop:
                continue
            if temperature:
                key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), row), len(out[row]))
                token = int(jax.random.categorical(key, logits[row, cursor[row] - 1] / np.float32(temperature)))
            else:
                token = int(np.argmax(logits[row, cursor[row] - 1]))
            out[row].append(token)
            buffer[row, cursor[row]] = token
            cursor[row] += 1
    return (out, first) if first_logits else out


def random_params(model, seed):
    """Random weights drawn with NumPy (norm scales 1): greedy continuations that depend on every
    position of the prompt (a model trained for 4 steps mostly predicts spaces)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: np.ones(leaf.shape, np.float32) if "norm" in jax.tree_util.keystr(path) else
        rng.normal(0.0, 0.3, leaf.shape).astype(np.float32), model.abstract_params)


@pytest.fixture(scope="module")
def random_lm():
    model = tiny_transformer()
    return model, random_params(model, 5)


def place(model, params, sizes):
    trainer = trainer_for(model, sizes)
    return jax.device_put(params, trainer.state_shardings.params), trainer.mesh


def test_greedy_decoding_equals_the_plain_decode_on_every_layout(random_lm):
    model, params = random_lm
    cfg = TransformerConfig(layers=2, d_model=32, heads=4, d_ff=64, dtype="float32")  # conftest.TINY, written out
    want = plain_decode(model, params, PROMPTS, 10)
    assert len({tuple(w) for w in want}) == 3 and len(set(want[1])) > 2, f"uninformative reference: {want}"
    for sizes in LAYOUTS:
        placed, mesh = place(model, params, sizes)
        gen = generate(cfg, placed, PROMPTS, mesh=mesh, max_new_tokens=10)
        assert [g.tolist() for g in gen.tokens] == want, f"{sizes}: KV-cache decode vs plain decode"
        assert gen.decode_steps == 9 and gen.new_tokens == 30 and gen.prompt_tokens == 19


def test_grouped_query_attention_decodes_like_the_plain_decode():
    model = tiny_transformer(kv_heads=2)
    params = random_params(model, 6)
    want = plain_decode(model, params, PROMPTS, 8)
    placed, mesh = place(model, params, MIXED)
    cfg = TransformerConfig(layers=2, d_model=32, heads=4, kv_heads=2, d_ff=64, dtype="float32")
    gen = generate(cfg, placed, PROMPTS, mesh=mesh, max_new_tokens=8)
    assert [g.tolist() for g in gen.tokens] == want, "grouped-query KV-cache decode vs plain decode"


def test_each_sequence_stops_at_its_own_stop_token(random_lm):
    model, params = random_lm
    cfg = TransformerConfig(layers=2, d_model=32, heads=4, d_ff=64, dtype="float32")
    free = plain_decode(model, params, PROMPTS, 10)
    stop = free[1][2]  # the third token of the second prompt's continuation
    want = plain_decode(model, params, PROMPTS, 10, stop=stop)
    assert [len(w) for w in want] != [10, 10, 10], f"the stop token {stop} stops no row: {free}"
    placed, mesh = place(model, params, MIXED)
    gen = generate(cfg, placed, PROMPTS, mesh=mesh, max_new_tokens=10, stop_tokens=[stop])
    assert [g.tolist() for g in gen.tokens] == want, f"stop token {stop}: per-sequence stop vs the plain decode"
    assert gen.decode_steps == max(len(w) for w in want) - 1, "the loop did not end when the last row stopped"


def test_sampling_is_seeded_and_top_k_1_or_a_tiny_top_p_is_greedy(random_lm):
    model, params = random_lm
    cfg = TransformerConfig(layers=2, d_model=32, heads=4, d_ff=64, dtype="float32")
    greedy, logits = plain_decode(model, params, PROMPTS, 6, first_logits=True)
    placed, mesh = place(model, params, MIXED)
    runs = {}
    everything = {"top_k": 256}  # keeps every token, in the same (filtered) program as the rest
    for name, kwargs in (("seed 1", {"seed": 1, **everything}), ("seed 1 again", {"seed": 1, **everything}),
                         ("seed 2", {"seed": 2, **everything}),
                         ("top-k 1", {"seed": 1, "top_k": 1}), ("top-p tiny", {"seed": 1, "top_p": 1e-6}),
                         ("top-k 3 top-p 0.5", {"seed": 1, "top_k": 3, "top_p": 0.5})):
        gen = generate(cfg, placed, PROMPTS, mesh=mesh, max_new_tokens=6, temperature=1.0, **kwargs)
        runs[name] = [g.tolist() for g in gen.tokens]
    assert runs["seed 1"] == runs["seed 1 again"], "the same seed drew other tokens"
    assert runs["seed 1"] != runs["seed 2"], "two seeds drew the same tokens"
    assert runs["seed 1"] != greedy, "temperature 1 drew the greedy tokens"
    for name in ("top-k 1", "top-p tiny"):
        assert runs[name] == greedy, f"{name} at temperature 1 is not greedy"
    for row, prompt in enumerate(PROMPTS):
        allowed = set(np.argsort(-logits[row])[:3].tolist())
        assert runs["top-k 3 top-p 0.5"][row][0] in allowed, f"row {row}: a token outside the top 3 was drawn"


def test_generate_names_its_arguments_in_errors_before_compiling():
    """A Python caller's bad input to generate is refused by typed errors naming the argument."""
    from shardml.core.errors import DataError, LayoutError, SettingError
    from shardml.core.mesh import make_mesh
    from shardml.parallel.inference import check_decoding_mesh, check_generation, check_sampling

    for call, error, subject, message in (
            (lambda: check_generation([], 4, None), DataError, "prompts", "prompts is empty"),
            (lambda: check_generation([3], 0, None), SettingError, "max_new_tokens", "max_new_tokens=0 must be >= 1"),
            (lambda: check_generation([3, 40], 4, 32), DataError, "prompts", "prompt 1 is 40 tokens long"),
            (lambda: check_generation([30], 4, 32), SettingError, "max_new_tokens", "ask for at most 2 new tokens"),
            (lambda: check_sampling(-1.0, 0, 1.0), SettingError, "temperature", "temperature=-1.0 is out of range"),
            (lambda: check_sampling(1.0, 0, 0.0), SettingError, "top_p", "top_p=0.0 is out of range"),
            (lambda: check_sampling(0.0, 0, 1.0, list(range(9))), SettingError, "stop_tokens", "at most 8"),
            (lambda: check_decoding_mesh(make_mesh({"pipeline": 2, "data": 4})), LayoutError, "mesh", "pipeline=2")):
        with pytest.raises(error, match=message) as caught:
            call()
        assert caught.value.subject == subject, (message, caught.value.subject)
        assert "inference." not in str(caught.value) and "--" not in str(caught.value), caught.value


def test_train_writes_samples_and_generate_continues_prompts(lm_run, capsys):
    """samples.txt holds continuations of the fixed prompts at temperature 0.7 (a plain decode of
    the saved parameters with the same keys, here); `shardml generate` with that temperature and
    seed on another layout draws the same tokens."""
    lines = (lm_run / "samples.txt").read_text().splitlines()
    assert lines[0].startswith(f"# samples of step 4: 25 new tokens per prompt, temperature {SAMPLE_TEMPERATURE}"), lines
    new = SEQ - max(len(p) for p in SAMPLE_PROMPTS)
    prompts = [list(p.encode()) for p in SAMPLE_PROMPTS]
    want = plain_decode(transformer(LM_MODEL, SEQ), load_params(str(lm_run)), prompts, new,
                        temperature=SAMPLE_TEMPERATURE, seed=0)
    assert len({tuple(w) for w in want}) == 3, f"uninformative reference: {want}"

    def text(tokens):
        return bytes(tokens).decode("utf-8", errors="replace")

    assert lines[1:] == [f"{p!r} -> {p + text(w)!r}" for p, w in zip(SAMPLE_PROMPTS, want)], lines
    flags = [item for p in SAMPLE_PROMPTS for item in ("--prompt", p)]
    code, out, err = shardml(capsys, "generate", str(lm_run), *flags, "--max-tokens", "8", "--temperature",
                             str(SAMPLE_TEMPERATURE), "--seed", "0", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    assert code == 0, err[-3000:]
    for prompt, tokens in zip(SAMPLE_PROMPTS, want):
        assert f"--- {prompt!r}\n{prompt}{text(tokens[:8])}\n" in out, f"{prompt!r}: {text(tokens[:8])!r} not in\n{out}"
    assert "prefill: 15 tokens" in out and "tokens/s" in out and "KV cache" in out, out


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def no_compile(monkeypatch):
    """Every XLA compilation (jit calls and ahead-of-time ones) and every read of a checkpoint's
    parameters fails: bad input must be refused before either."""
    from jax._src import compiler

    def refuse_compile(*args, **kwargs):
        raise AssertionError("compiled before rejecting the input")

    def refuse_load(*args, **kwargs):
        raise AssertionError("read the checkpoint's parameters before rejecting the input")

    monkeypatch.setattr(compiler, "compile_or_get_cached", refuse_compile)
    monkeypatch.setattr(run_dir, "load_params", refuse_load)
    with pytest.raises(AssertionError, match="compiled before"):  # the hook is on the path jit takes
        jax.jit(lambda x: x * 3.0 + 1.0)(np.float32(np.random.default_rng().random()))


@pytest.mark.parametrize("args,message", [
    (["generate", "{run}", "--prompt", "x" * 40], "prompt 0 is 40 tokens long, longer than the model's context of 32"),
    (["generate", "{run}", "--prompt", "abc", "--max-tokens", "30"], "exceeds the model's context of 32 tokens"),
    (["eval", "{run}", "mesh.tensor=8"], "has size 4 along"),
    (["eval", "{run}", "mesh.data=3"], "multiply to 3 but 8 devices"),
    (["eval", "{run}", "model.d_ff=128"], "holds parameters of other shapes"),
    (["generate", "{run}", "--prompt", "a", "mesh.pipeline=2"], "set mesh.pipeline=1"),
    (["predict", "{run}"], "is a language-model run"),
    (["eval", "{empty}"], "holds no checkpoint"),
    (["eval", "{empty}/nowhere"], "does not exist"),
    (["eval"], "needs RUN_DIR"),
])
def test_bad_input_exits_2_before_compiling(lm_run, tmp_path, capsys, no_compile, args, message):
    args = [a.format(run=lm_run, empty=tmp_path) for a in args]
    code, _, err = shardml(capsys, *args)
    assert code == 2, err[-3000:]
    assert message in err and "Traceback" not in err, err


def test_a_classifier_run_cannot_generate(population_run, capsys, no_compile):
    code, _, err = shardml(capsys, "generate", str(population_run), "--prompt", "a")
    assert code == 2 and "this run is a classifier" in err, err

