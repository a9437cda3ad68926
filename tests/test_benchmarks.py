"""The benchmark scripts' own logic, without timing anything: README sections and FLOP counts."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))

import _readme
import bench_collectives
import bench_hf
import bench_lora
import bench_maxtext
import bench_mfu
import profile_steps

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


def test_bench_maxtext_moe_race_gives_both_systems_the_same_experts_and_layout():
    shape = bench_maxtext.race_shape("race", experts=8, top_k=2)
    sizes = bench_maxtext.parse_layout("expert=4,fsdp=2")
    mt = bench_maxtext.maxtext_command("py", "base.yml", sizes, 5, "full", "out", shape=shape, cache_dir="/c")
    for key in ("num_experts=8", "num_experts_per_tok=2", "sparse_matmul=false", "megablox=false", "capacity_factor=-1",
                "ici_expert_parallelism=4", "ici_fsdp_parallelism=2", "ici_tensor_parallelism=1", "jax_cache_dir=/c",
                "base_moe_mlp_dim=1024",
                "decoder_block=mixtral"):
        assert key in mt
    sm = bench_maxtext.shardml_command("py", "d.yaml", sizes, 5, [], "out", shape=shape)
    for key in ("model.experts=8", "model.top_k=2", "model.capacity_factor=0", "mesh.expert=4", "mesh.fsdp=2"):
        assert key in sm
    # shardml's own config accepts the race's MoE overrides on that layout (no compile)
    cfg = load_config(None, [*bench_maxtext.shardml_overrides([], shape), "mesh.expert=4", "mesh.fsdp=2"])
    shardml.validate(cfg, 8)
    assert (cfg.model.experts, cfg.model.top_k) == (8, 2)
    dense = bench_maxtext.maxtext_command("py", "base.yml", sizes, 5, "full", "out", shape=bench_maxtext.SHAPES["4x"])
    assert "base_emb_dim=512" in dense and not any(a.startswith(("num_experts", "jax_cache_dir")) for a in dense)
    no_ep = bench_maxtext.maxtext_command("py", "base.yml", {"fsdp": 8}, 5, "full", "out", shape=shape)
    assert "sparse_matmul=true" in no_ep  # without an expert axis MaxText runs ragged_dot, as shardml
    assert bench_maxtext.maxtext_moe_path(sizes).startswith("dense")


def test_bench_maxtext_rejects_bad_shapes_and_layouts():
    with pytest.raises(SystemExit, match="--top-k 3: must be between 1 and --experts 2"):
        bench_maxtext.race_shape("race", experts=2, top_k=3)
    with pytest.raises(SystemExit, match="--experts 3"):
        bench_maxtext.race_shape("race", experts=3, top_k=1)
    with pytest.raises(SystemExit, match="axis=size pairs over data, fsdp, expert, tensor"):
        bench_maxtext.parse_layout("experts=8")
    assert bench_maxtext.readme_section("race", False) == "bench_maxtext"
    assert bench_maxtext.readme_section("4x", True) == "bench_maxtext_4x_moe"


def test_bench_maxtext_reads_maxtext_resolved_settings_and_cache_state(tmp_path):
    log = tmp_path / "mt.log"
    log.write_text("I1206 Config param scan_layers: True\nI1206 Config param remat_policy: full\n"
                   "Config param jax_cache_dir: ~/jax_cache\nConfig param num_experts: 1\nConfig param megablox: True\n")
    assert bench_maxtext.maxtext_settings(str(log)) == "remat_policy=full, scan_layers=True, jax_cache_dir=~/jax_cache"
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "entry").write_bytes(b"x" * 2_000_000)
    assert bench_maxtext.cache_state(str(tmp_path / "cache")).endswith(": 1 files, 2.0 MB")
    assert bench_maxtext.cache_state(str(tmp_path / "none")).endswith(": 0 files, 0.0 MB")


def test_bench_maxtext_table_rates_shardml_against_each_maxtext_variant():
    import argparse
    systems = [bench_maxtext.System(n, None, None, {}) for n in ("shardml", "maxtext", "maxtext[env1]")]
    one = {"wall": [1.0], "cpu": [2.0], "loop": [1.0], "startup": [5.0], "loss": 6.0, "warmup": [], "resolved": ""}
    results = {"fsdp=8": {"shardml": one, "maxtext": {**one, "wall": [2.0]}, "maxtext[env1]": {**one, "wall": [1.6]}}}
    args = argparse.Namespace(shape="race", rounds=1, long=8, short=3, warmup=False, set=[], maxtext_remat="full")
    system_info = {"python": "3.12", "jax": "0.12", "package": "p", "executable": "x", "xla_env": "", "cache": "-"}
    info = {"shardml": {**system_info, "settings": "remat=none"},
            "maxtext": {**system_info, "variants": {"maxtext[env1]": {"MALLOC_ARENA_MAX": "1"}}}}
    text = bench_maxtext.table(["fsdp=8"], results, systems, args, info, comparable=True)
    assert "| ratio shardml/maxtext | ratio shardml/maxtext[env1] |" in text
    assert "| fsdp=8 | whole process | 4096 | 2048 | 2560 | 2.00 | 1.60 |" in text
    assert "maxtext[env1]: MaxText as above, its environment also MALLOC_ARENA_MAX=1" in text


_HLO = """HloModule jit_train_step

FileNames
1 "/site-packages/optax/_src/transform.py"
2 "/shardml/core/losses.py"
3 "/shardml/models/transformer_layers.py"

FunctionNames
1 "update_fn"
2 "cross_entropy"
3 "project"

FileLocations
1 {file_name_id=1 function_name_id=1 line=3 end_line=3 column=1 end_column=1}
2 {file_name_id=2 function_name_id=2 line=5 end_line=5 column=1 end_column=1}
3 {file_name_id=3 function_name_id=3 line=7 end_line=7 column=1 end_column=1}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=1}
3 {file_location_id=3 parent_frame_id=3}

%fused_dot (p0: bf16[4,4], p1: bf16[4,4]) -> bf16[4,4] {
  %p0 = bf16[4,4]{1,0} parameter(0)
  %p1 = bf16[4,4]{1,0} parameter(1)
  ROOT %d = bf16[4,4]{1,0} dot(bf16[4,4]{1,0} %p0, bf16[4,4]{1,0} %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_cvt (p0.1: f32[4]) -> bf16[4] {
  %p0.1 = f32[4]{0} parameter(0)
  ROOT %c = bf16[4]{0} convert(f32[4]{0} %p0.1)
}

ENTRY %main.1 (a: bf16[4,4], b: f32[4]) -> f32[4] {
  %a = bf16[4,4]{1,0} parameter(0)
  %b = f32[4]{0} parameter(1)
  %dot_fusion = bf16[4,4]{1,0} fusion(%a, %a), kind=kOutput, calls=%fused_dot, metadata={op_name="jit(f)/dot_general" stack_frame_id=3}
  %convert_fusion = bf16[4]{0} fusion(%b), kind=kLoop, calls=%fused_cvt
  %all-reduce.1 = f32[4]{0} all-reduce(f32[4]{0} %b), replica_groups={}, to_apply=%add
  %lse = f32[4]{0} exponential(f32[4]{0} %b), metadata={op_name="jit(f)/exp" stack_frame_id=2}
  %ag-start = f32[8]{0} all-gather-start(f32[4]{0} %b), dimensions={0}
  ROOT %upd = f32[4]{0} multiply(f32[4]{0} %b, f32[4]{0} %b), metadata={op_name="jit(f)/mul" stack_frame_id=1}
}
"""


def test_profile_steps_puts_each_hlo_op_in_its_category():
    instrs = profile_steps.parse_hlo(_HLO)
    got = {name: profile_steps.category(instrs[name], instrs)
           for name in ("dot_fusion", "convert_fusion", "all-reduce.1", "lse", "ag-start", "upd")}
    assert got == {"dot_fusion": "matrix products", "convert_fusion": "converts", "all-reduce.1": "all-reduce",
                   "lse": "loss", "ag-start": "all-gather", "upd": "optimizer update"}
    assert instrs["lse"]["source"] == "/shardml/core/losses.py:cross_entropy"  # a root frame: parent printed as 1
    assert instrs["dot_fusion"]["source"] == (  # frame 3's parent: printed 3, frame 2
        "/shardml/models/transformer_layers.py:project < /shardml/core/losses.py:cross_entropy")


def test_profile_steps_self_times_and_steady_steps():
    events = [(0, 10, "r", "while"), (1, 4, "r", "dot"), (6, 2, "r", "add"), (20, 5, "r", "copy")]
    assert profile_steps.self_times(events) == [(0, "r", "while", 4), (1, "r", "dot", 4), (6, "r", "add", 2),
                                                (20, "r", "copy", 5)]
    runs = {"jit_train_step": [{"dot": 100.0}, {"dot": 4.0}, {"dot": 6.0}], "jit_init": [{"rng": 50.0}]}
    per_step, spread = profile_steps.steady_steps(runs, steps=3, skip=1)
    assert per_step == {("jit_train_step", "dot"): 5.0} and spread == [4.0, 6.0]
    # shardml train's last evaluation runs as often as the step: --config keeps the step's program only
    runs["jit_eval_step"] = [{"dot": 1.0}] * 3
    assert ("jit_eval_step", "dot") in profile_steps.steady_steps(runs, steps=3, skip=1)[0]
    assert profile_steps.steady_steps(runs, steps=3, skip=1, only="train_step")[0] == per_step
    table = profile_steps.side_by_side("fsdp=8", {"a": {c: 0.0 for c in profile_steps.CATEGORIES} | {"loss": 2.0},
                                                  "b": {c: 0.0 for c in profile_steps.CATEGORIES} | {"loss": 1.0}})
    assert "| loss | 2.0 | 100 % | 1.0 | 100 % |" in table


def test_bench_collectives_compares_programs_that_compute_the_same():
    """Its rival programs are timed against each other, so each pair must give the same result:
    the gradients' reductions the same sums, the two ways of gathering the same words."""
    mesh = jax.make_mesh((2, 2, 2), bench_collectives.ALL)
    spec = P(bench_collectives.ALL)

    def outputs(programs, x):
        x = jax.device_put(x, NamedSharding(mesh, spec))
        return [np.asarray(jax.jit(jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec))(x))
                for f in programs.values()]

    layers, n = bench_collectives.LAYERS, 8
    grads = jnp.arange(8 * layers * n, dtype=jnp.float32).reshape(8 * layers, n) % 7
    first, *rest = outputs(bench_collectives.gradient_reductions(n), grads)
    for other in rest:
        np.testing.assert_array_equal(first, other)
    summed = grads.reshape(2, 2, 2, layers, n).sum((0, 1))  # [tensor, layers, n]: over data and fsdp
    np.testing.assert_array_equal(first[:layers], summed[0, :, : n // 2])  # block 0 (data 0, fsdp 0, tensor 0): half 0
    np.testing.assert_array_equal(first[2 * layers:3 * layers], summed[0, :, n // 2:])  # block 2 (fsdp 1): half 1
    words = jnp.arange(8 * layers * bench_collectives.WEIGHTS * n, dtype=jnp.uint16).reshape(-1, n)
    first, other = outputs(bench_collectives.gathers(n), words)
    np.testing.assert_array_equal(first, other)


def test_profile_steps_takes_another_device_count_for_a_config_only():
    assert profile_steps.parse_args(["--config", "100m", "--devices", "1"]).devices == 1
    assert profile_steps.parse_args([]).devices == bench_maxtext.DEVICES
    with pytest.raises(SystemExit, match="only with --config"):
        profile_steps.parse_args(["--devices", "1"])
