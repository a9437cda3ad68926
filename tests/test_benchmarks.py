"""The benchmark scripts' own logic, without timing anything: README sections and FLOP counts."""

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))

import _readme
import bench_hf
import bench_lora
import bench_mfu

import shardml
from shardml import load_config
from shardml.analysis.flops import inventory_flops
from shardml.run.recipe import build


def test_write_section_replaces_its_own_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# B\n\nprose\n\n<!-- a:begin -->\nold a\n<!-- a:end -->\n\n"
                      "<!-- b:begin -->\nold b\n<!-- b:end -->\n")
    _readme.write_section(str(readme), "a", "new table", "python x.py")
    text = readme.read_text()
    assert "old a" not in text and "new table" in text and "`python x.py`" in text, text
    assert "old b" in text and text.startswith("# B\n\nprose\n"), text
    _readme.write_section(str(readme), "c", "appended", "python c.py")
    assert readme.read_text().rstrip().endswith("<!-- c:end -->"), "a missing section is appended at the end"


def test_shown_command_hides_the_readme_flag():
    argv = ["--configs", "tiny", "--readme", "benchmarks/README.md", "--steps=2", "--readme=x.md"]
    assert _readme.shown_command("benchmarks/b.py", argv) == "python benchmarks/b.py --configs tiny --steps=2"


def test_printed_section_writes_what_the_run_printed(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("prose\n<!-- s:begin -->\nold\n<!-- s:end -->\n")
    argv = ["--rounds", "2", "--readme", str(readme)]
    assert _readme.option(argv, "--readme") == str(readme) and _readme.option(["--readme=r.md"], "--readme") == "r.md"
    with _readme.printed_section(_readme.option(argv, "--readme"), "s", "benchmarks/s.py", argv):
        print("| table | 1.00 |")
    text = readme.read_text()
    assert "| table | 1.00 |" in capsys.readouterr().out, "the report is still printed"
    assert "old" not in text and "```\n| table | 1.00 |\nmachine:" in text, text
    assert "`python benchmarks/s.py --rounds 2`" in text and text.startswith("prose\n"), text


@pytest.mark.parametrize("kv_heads, head_dim", [(0, 0), (2, 0), (2, 24)], ids=["mha", "gqa", "gqa-head_dim-set"])
def test_flops_formula_equals_the_step_matmuls_but_the_embedding(kv_heads, head_dim):
    """Model.flops_per_example counts every matmul of a no-remat train step except the embedding's
    one-hot product (forward + weight gradient, 4 x vocab x d_model per token), and equals PaLM's
    6 x matmul parameters + 12 x layers x heads x head dim x seq per token, written out here (also
    with a head dimension apart from d_model / heads, as Qwen3 and Gemma set it)."""
    cfg = load_config("tiny", ["model.remat=none", "model.layers=2", f"model.kv_heads={kv_heads}",
                               f"model.head_dim={head_dim}"])
    parts = build(cfg)
    m, seq, batch = cfg.model, cfg.data.seq_len, cfg.train.batch_size
    tokens = batch * seq
    head_dim, kv = head_dim or m.d_model // m.heads, m.kv_heads or m.heads
    matmul_params = (m.layers * (2 * m.d_model * m.heads * head_dim + 2 * m.d_model * kv * head_dim
                                 + 3 * m.d_model * m.d_ff) + m.d_model * m.vocab)
    palm = (6 * matmul_params + 12 * m.layers * m.heads * head_dim * seq) * tokens
    formula = parts.model.flops_per_example * batch
    assert formula == palm, f"Model.flops_per_example x batch {formula:,.0f} != PaLM's count {palm:,}"
    counted = inventory_flops(bench_mfu.step_dots(parts))
    embedding = 4 * m.vocab * m.d_model * tokens
    assert counted == palm + embedding, (
        f"jaxpr matmul FLOPs {counted:,} != PaLM's count {palm:,} + embedding one-hot {embedding:,}")


@pytest.mark.slow
def test_compiled_step_multiplies_each_matmul_once_across_devices():
    """The dots of the partitioned program (per-device shapes x trips x devices) add up to the traced
    step's matmul FLOPs: no product is repeated on several devices, and `audit.dots` misses none."""
    import jax

    parts = build(load_config("tiny", ["model.layers=2", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]))
    traced = inventory_flops(bench_mfu.step_dots(parts))
    compiled = bench_mfu.compiled_dots(parts)
    total = inventory_flops(compiled) * jax.device_count()
    assert total == traced, f"compiled dots {total:,} FLOPs x devices vs traced {traced:,}: {compiled}"


def test_comma_list_option_checks_each_choice():
    import argparse

    parse = _readme.comma_list(("dots", "full"))
    assert parse("dots,full") == ["dots", "full"] and parse("full") == ["full"]
    with pytest.raises(argparse.ArgumentTypeError, match="'ful': use dots, full"):
        parse("dots,ful")


def test_bench_hf_counts_the_parameters_transformers_builds():
    """bench_hf's parameter count (its GB figures' base) against a tiny Llama that transformers
    builds from the same config.json; its default shape is the ~0.5B the issue asks for."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    assert bench_hf.count_params(config.to_dict()) == transformers.LlamaForCausalLM(config).num_parameters()
    args = bench_hf.parse_args([])
    default = {"hidden_size": args.hidden, "intermediate_size": args.intermediate, "vocab_size": args.vocab,
               "num_hidden_layers": args.layers, "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads}
    assert 0.4e9 < bench_hf.count_params(default) < 0.6e9


def test_bench_lora_demo_holds_functions_out_by_name_and_learns_only_their_names(tmp_path):
    """The stdlib instruction set: held-out names never trained on, their docstring lines absent from
    the pretraining text, and the loss mask on exactly the completion's bytes (the name and a newline)."""
    pairs = bench_lora.stdlib_pairs(("math", "os.path", "textwrap", "string"))
    train, held = bench_lora.split_by_name(pairs)
    assert len(held) == int(0.2 * len(pairs)) > 0 and not set(train) & set(held) and {**train, **held} == pairs
    assert all(name not in doc for name, doc in pairs.items()), "a docstring that names its function gives it away"
    text = bench_lora.pretraining_text(list(held.values()), limit=300_000).decode()
    assert len(text) > 300_000 and not [doc for doc in held.values() if doc in text]
    examples = bench_lora.sft_rows(held, 128, str(tmp_path), "held")
    rows = shardml.pad_examples(examples, 128)
    for row, (name, doc) in enumerate(held.items()):
        learned = bytes(rows["targets"][row][rows["mask"][row] > 0].tolist()).decode()
        assert learned == f"{name}\n", (row, learned, doc)
        shown = bytes(rows["inputs"][row][:len(bench_lora.prompt_of(doc))].tolist()).decode()
        assert shown == bench_lora.prompt_of(doc)


@pytest.mark.slow
def test_bench_lora_adapters_in_one_step_train_as_the_runs_one_after_another():
    """The speed race compares like with like: each of the population's members ends with the
    loss of the same adapter (seed, learning rate, batches) trained alone on data=8."""
    args = bench_lora.parse_args(["--steps", "1", "--members", "2", "--d-model", "32", "--layers", "1", "--heads",
                                  "2", "--seq", "16", "--vocab", "64", "--remat", "none"])
    built = bench_lora.trainers(args, "none")
    result = bench_lora.population_vs_sequential(args, built, bench_lora.token_batches(args, args.steps + 1))
    np.testing.assert_allclose(result["pop_losses"], result["seq_losses"], rtol=1e-5)
    assert len(set(np.round(result["seq_losses"], 6))) > 1, "the members differ (seeds and learning rates)"
