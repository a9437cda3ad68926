"""Supervised fine-tuning data against references written here: the loss mask against a hand count
of completion tokens; packed rows (several examples, document-aware attention, positions restarting)
against the same examples padded alone, through a loss written with plain jax.grad; the trainer on
data x fsdp x tensor against one device.

The loss's normalisation: the sum of the completion tokens' cross-entropy over the global batch,
divided by their number (a token mean, not a mean of per-example means).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tokenizers

import shardml
from shardml.run.cli import main
from shardml.core.errors import DataError, ModelError
from shardml.core.losses import token_cross_entropy
from shardml.core.mesh import make_mesh
from shardml.core.sft import SFTBatches, chat_template_of, pack_examples, pad_examples, read_sft
from shardml.models.transformer import TransformerConfig, transformer

SEQ = 16
MARKERS = ["<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")
CFG = TransformerConfig(vocab=64, layers=2, d_model=32, heads=4, kv_heads=2, d_ff=64, dtype="float32", remat="none",
                        layer_loop="scan")


def words(rng, n):
    return " ".join(f"w{i}" for i in rng.integers(0, 50, n))


def chat(user1, assistant1, user2, assistant2):
    return {"messages": [{"role": "user", "content": user1}, {"role": "assistant", "content": assistant1},
                         {"role": "user", "content": user2}, {"role": "assistant", "content": assistant2}]}


@pytest.fixture(scope="session")
def tok():
    vocab = {w: i for i, w in enumerate(["[UNK]", *MARKERS, *(f"w{i}" for i in range(50))])}
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return t


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    """Eight examples of different lengths, prompt/completion and chat mixed, that pack 2-3 per row."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(8):
        if i % 2:
            lines.append(chat(words(rng, 1), words(rng, 1 + i % 3), words(rng, 1), words(rng, 2)))
        else:
            lines.append({"prompt": words(rng, 2 + i % 4), "completion": words(rng, 1 + i % 3)})
    path = tmp_path_factory.mktemp("sft") / "train.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return str(path), lines


@pytest.fixture(scope="session")
def examples(data_file, tok):
    return read_sft(data_file[0], tok, SEQ, chat_template=TEMPLATE)


def test_the_mask_counts_exactly_the_completion_tokens(data_file, examples):
    """Prompt/completion: the completion's words; chat: each assistant message's words and its <|end|>
    (the template's marker after it). The mask sits on the *targets*: inputs[j] predicts tokens[j+1]."""
    _, lines = data_file
    want = [len(x["completion"].split()) if "completion" in x else
            sum(len(m["content"].split()) + 1 for m in x["messages"] if m["role"] == "assistant") for x in lines]
    padded = pad_examples(examples, SEQ)
    assert padded["mask"].sum(axis=1).tolist() == want
    first = lines[0]
    n_prompt = len(first["prompt"].split())
    assert padded["mask"][0, :n_prompt - 1].sum() == 0 and padded["mask"][0, n_prompt - 1] == 1
    packed = pack_examples(examples, SEQ)
    assert packed["mask"].sum() == sum(want) and len(packed["targets"]) < len(lines)  # 2-3 a row


def test_packed_rows_restart_positions_and_number_segments(examples):
    packed = pack_examples(examples, SEQ)["inputs"]
    lengths = [len(t) - 1 for t in examples.tokens]
    row0 = packed["segments"][0]
    first = int((row0 == 1).sum())
    assert first == lengths[0] and packed["positions"][0, first] == 0
    assert packed["positions"][0, :first].tolist() == list(range(first))


@pytest.fixture(scope="session")
def packed_vs_alone(examples):
    """Loss, gradients and logits of the packed rows through the library's loss, and of each example
    padded alone through a loss written here (one compile each)."""
    model = transformer(CFG, SEQ)
    params = model.init(jax.random.key(1))
    packed, alone = pack_examples(examples, SEQ), pad_examples(examples, SEQ)

    def library(p):
        logits = model.apply(p, packed["inputs"])
        sums = token_cross_entropy(logits, packed)
        return sums["loss"] / sums["count"], logits

    def reference(p):  # each example alone: a plain log-softmax, masked, summed, over every completion token
        logits = model.apply(p, alone["inputs"])
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, alone["targets"][..., None], -1)[..., 0]
        return -(picked * alone["mask"]).sum() / alone["mask"].sum(), logits

    (loss, packed_logits), grads = jax.jit(jax.value_and_grad(library, has_aux=True))(params)
    (want_loss, alone_logits), want_grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(params)
    got, want = (loss, grads), (want_loss, want_grads)
    logits = np.asarray(packed_logits), np.asarray(alone_logits)
    return got, want, logits, packed, alone


def test_packed_loss_and_gradients_equal_the_examples_padded_alone(packed_vs_alone):
    (loss, grads), (want_loss, want_grads), _, _, _ = packed_vs_alone
    assert abs(loss - want_loss) < 1e-5 * abs(want_loss)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        w = np.asarray(want_grads[path[0].key] if len(path) == 1 else want_grads[path[0].key][path[1].key])
        err = np.abs(np.asarray(g) - w).max() / np.abs(w).max()
        assert err < 1e-5, f"{jax.tree_util.keystr(path)}: packed gradient differs by {err:.1e} of its largest"


def test_no_token_of_a_packed_row_sees_another_example(packed_vs_alone):
    """Every real position's logits equal those of its example alone (attention and RoPE positions)."""
    _, _, (packed_logits, alone_logits), packed, _ = packed_vs_alone
    segments = packed["inputs"]["segments"]
    i = 0
    for r in range(len(segments)):
        for s in range(1, segments[r].max() + 1):
            where = np.flatnonzero(segments[r] == s)
            np.testing.assert_allclose(packed_logits[r, where], alone_logits[i, :len(where)], atol=1e-5, rtol=0)
            i += 1


def test_the_loss_is_the_token_mean_over_the_batch(packed_vs_alone):
    """Normalisation: the sum over completion tokens / their number in the batch, which differs from
    the mean of per-example means when examples have different numbers of completion tokens."""
    (loss, _), _, (_, alone_logits), _, alone = packed_vs_alone
    logp = jax.nn.log_softmax(alone_logits, axis=-1)
    nll = -np.take_along_axis(np.asarray(logp), alone["targets"][..., None], -1)[..., 0] * alone["mask"]
    token_mean = nll.sum() / alone["mask"].sum()
    example_mean = np.mean(nll.sum(1) / alone["mask"].sum(1))
    assert abs(loss - token_mean) < 1e-5 * token_mean and abs(token_mean - example_mean) > 1e-4


def write(tmp_path, lines):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines))
    return str(path)


def test_bad_lines_name_the_file_and_line(tmp_path, tok):
    path = write(tmp_path, [{"prompt": "w1", "completion": "w2"}, '{"prompt": "w1", "completion"'])
    with pytest.raises(DataError, match=r"d\.jsonl:2: malformed"):
        read_sft(path, tok, SEQ)
    path = write(tmp_path, [{"prompt": "w1 w2", "completion": ""}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: the example has no completion tokens"):
        read_sft(path, tok, SEQ)
    path = write(tmp_path, [chat("w1", "w2", "w3", "w4")])
    with pytest.raises(DataError, match=r"d\.jsonl:1: chat data needs the checkpoint's chat template"):
        read_sft(path, tok, SEQ)
    strict = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message first') }}{% endif %}"
    with pytest.raises(DataError, match=r"d\.jsonl:1: malformed SFT example: the chat template refused it: a system"):
        read_sft(path, tok, SEQ, chat_template=strict)


def test_a_long_example_is_refused_or_truncated_and_counted(tmp_path, tok):
    path = write(tmp_path, [{"prompt": "w1", "completion": "w2"}, {"prompt": "w1 " * 10, "completion": "w2 " * 10}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: 20 tokens, more than seq_len \+ 1 = 17.*truncate=True"):
        read_sft(path, tok, SEQ)
    cut = read_sft(path, tok, SEQ, truncate=True)
    assert cut.truncated == 1 and len(cut.tokens[1]) == SEQ + 1 and len(cut.tokens[0]) == 2
    path = write(tmp_path, [{"prompt": "w1 " * 20, "completion": "w2"}])
    with pytest.raises(DataError, match=r"no completion token is left within seq_len=16"):
        read_sft(path, tok, SEQ, truncate=True)


def test_the_chat_template_comes_from_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "default", "template": TEMPLATE}], "eos_token": {"content": "<|end|>"}}))
    template, special = chat_template_of(str(tmp_path))
    assert template == TEMPLATE and special["eos_token"] == "<|end|>"


def test_packed_rows_through_a_pipeline_are_refused_before_compiling(examples):
    mesh = make_mesh({"pipeline": 2, "data": 2}, jax.devices()[:4])
    schedule = shardml.Schedule("gpipe", 2, 2)
    trainer = shardml.build_trainer(transformer(CFG, SEQ), mesh, optax.sgd(1.0), schedule=schedule)
    batch = SFTBatches(pack_examples(examples, SEQ), batch_size=4).batch(0)
    with pytest.raises(ModelError, match=r"packed inputs .* are not pipelined yet"):
        trainer.trace_step(trainer.abstract_state(), batch)


@pytest.mark.slow
def test_full_fine_tuning_on_data_fsdp_tensor_equals_one_device(examples):
    """Two SGD steps on packed SFT batches: the updates (lr x gradients) on data x fsdp x tensor equal
    one device's within 1e-5 of their largest."""
    source = SFTBatches(pack_examples(examples, SEQ), batch_size=4)
    model = transformer(CFG, SEQ)

    def updates(sizes, devices):
        mesh = make_mesh(sizes, devices)
        trainer = shardml.build_trainer(model, mesh, optax.sgd(1.0))
        state = trainer.init(seed=0)
        out = []
        for step in range(2):
            before = jax.device_get(trainer.natural(state.params))
            state, _ = trainer.step(state, trainer.put(source.batch(step)))
            out.append(jax.tree.map(np.subtract, jax.device_get(trainer.natural(state.params)), before))
        return out

    got = updates({"data": 2, "fsdp": 2, "tensor": 2}, None)
    want = updates({"data": 1}, jax.devices()[:1])
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.abs(w).max() > 0
        assert np.abs(g - w).max() <= 1e-5 * np.abs(w).max()


@pytest.fixture(scope="session")
def tokenizer_dir(tok, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return directory


def cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_command_line_names_bad_sft_data_before_compiling(capsys, tmp_path, tokenizer_dir):
    long = write(tmp_path, [{"prompt": "w1 " * 10, "completion": "w2 " * 10}])
    code, _, err = cli(capsys, "train", "tiny", f"data.sft={long}", f"data.sft_tokenizer={tokenizer_dir}",
                       f"data.seq_len={SEQ}", f"out_dir={tmp_path / 'r'}")
    assert code == 2 and "d.jsonl:1: 20 tokens" in err and "data.truncate=true" in err.replace("True", "true")
    assert "Traceback" not in err
    (tokenizer_dir.parent / "bare").mkdir(exist_ok=True)
    (tokenizer_dir.parent / "bare" / "tokenizer.json").write_text((tokenizer_dir / "tokenizer.json").read_text())
    chats = write(tmp_path, [chat("w1", "w2", "w3", "w4")])
    bare = tokenizer_dir.parent / "bare"
    code, _, err = cli(capsys, "train", "tiny", f"data.sft={chats}", f"data.sft_tokenizer={bare}",
                       f"out_dir={tmp_path / 'r'}")
    assert code == 2 and "d.jsonl:1: chat data" in err and "no chat_template" in err


@pytest.mark.slow
def test_the_command_line_fine_tunes_on_packed_sft_data(capsys, tmp_path, data_file, tokenizer_dir):
    code, out, err = cli(capsys, "train", "tiny", f"data.sft={data_file[0]}", f"data.sft_tokenizer={tokenizer_dir}",
                         f"data.seq_len={SEQ}", "train.batch_size=4", "train.steps=2", "mesh.data=2", "mesh.fsdp=2",
                         "mesh.tensor=2", f"out_dir={tmp_path / 'run'}")
    assert code == 0, err[-3000:]
    assert "SFT data" in out and "(0 truncated), 6 packed rows, 31 completion tokens" in out
    code, out, err = cli(capsys, "plan", "tiny", f"data.sft={data_file[0]}", f"data.sft_tokenizer={tokenizer_dir}",
                         f"data.seq_len={SEQ}", "train.batch_size=4", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    assert code == 0 and "estimated peak" in out, err[-3000:]
