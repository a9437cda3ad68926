"""LoRA: a sweep of adapters in one step against the same runs one after another, LoRA against full
fine-tuning, and a learning demo on data nobody here wrote (the Python standard library).

Speed and memory. A Llama-shaped transformer (shardml's own: RMSNorm, RoPE, SwiGLU, grouped-query
attention; ``--d-model``, ``--layers``, ``--seq``) with LoRA on ``--targets``. (a) ``--members``
adapters, each with its own seed and learning rate, trained in one step over one shared base
(``shardml.build_population`` on ``members`` = N: the base stored once, only the adapters stacked)
against the same N adapters trained one after another on ``data`` = 8 (one compiled step reused,
the best a sequential user can do). (b) LoRA against full fine-tuning (AdamW on every weight) of the
same model on the same ``data`` = 8 layout. Steps are timed after one compiling step, with
``block_until_ready``; memory is the compiled step's per-device peak from XLA's memory analysis
(``shardml.memory``: arguments + outputs + temporaries - aliased). ``uptime`` is printed before and
after: on a shared machine the load moves both sides alike only within one run.

Learning demo (``--demo``). An instruction set built at run time from the standard library with
``inspect``: prompt = the first line of a function's docstring, completion = the function's name;
held-out functions (by name) are never trained on. Byte-level tokens (no downloads). A random
base cannot name functions, so a tiny base is first pretrained on standard-library source text
(files holding any held-out docstring line are left out); then LoRA adapters are fine-tuned on the
training functions. Reported before and after LoRA: held-out loss on the completion tokens and
exact match of greedy completions (``shardml.generate`` on the merged weights).

    python benchmarks/bench_lora.py                          # both parts, a few minutes on 2 cores
    python benchmarks/bench_lora.py --steps 3 --d-model 64 --layers 2 --seq 32 --demo none
    python benchmarks/bench_lora.py --readme benchmarks/README.md
"""

import shardml

shardml.emulate_cpu_devices(8)  # before any other JAX use

import argparse
import inspect
import json
import pathlib
import subprocess
import sys
import sysconfig
import tempfile
import time
import types

import jax
import numpy as np
import optax

from shardml import build_population, build_trainer, lora, lora_optimizer, make_mesh, memory, with_hyperparams

import _readme  # benchmarks/ (this script's folder) is on sys.path

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
# Modules whose functions make the instruction set (the demo); their own source files are left out of
# the pretraining text where they hold a held-out docstring line.
MODULES = ("os", "os.path", "shutil", "string", "textwrap", "math", "cmath", "statistics", "random", "json", "re",
           "functools", "itertools", "operator", "inspect", "fnmatch", "glob", "heapq", "bisect", "copy", "calendar",
           "base64", "binascii", "zlib", "colorsys", "difflib", "keyword", "tempfile", "zipfile", "tarfile",
           "urllib.parse", "html", "unicodedata", "codecs", "locale", "platform", "sysconfig", "time", "struct",
           "socket", "select", "signal", "subprocess", "gzip", "bz2", "lzma", "csv", "pickle", "pprint", "reprlib",
           "decimal", "fractions", "numbers", "ast", "dis", "tokenize", "token", "linecache", "traceback", "warnings",
           "contextlib", "abc", "types", "typing", "weakref", "gc", "sys", "builtins", "posixpath", "genericpath",
           "ntpath", "stat", "filecmp", "secrets", "hashlib", "hmac", "uuid", "ipaddress", "email.utils",
           "http.cookies", "mimetypes", "quopri", "uu", "wave", "colorsys", "imghdr", "sndhdr", "shlex", "cmd",
           "getpass", "getopt", "optparse", "argparse", "logging", "threading", "queue", "sched", "asyncio")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (after one compiling step)")
    parser.add_argument("--members", type=int, default=8, help="adapters in the population")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8, help="query heads; key/value heads are half (GQA)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences) per step")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q,k,v,o", type=_readme.comma_list(ROLES))
    parser.add_argument("--remat", default="none,full", type=_readme.comma_list(("none", "dots", "full")),
                        help="model.remat settings: the first is timed, every one's memory is compiled")
    parser.add_argument("--demo", default="stdlib", choices=("stdlib", "none"), help="the learning demo, or none")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="demo: base pretraining steps")
    parser.add_argument("--lora-steps", type=int, default=300, help="demo: LoRA fine-tuning steps")
    parser.add_argument("--lora-lr", type=float, default=3e-3, help="demo: LoRA learning rate (AdamW)")
    parser.add_argument("--readme", default=None, help="rewrite this README's bench_lora section")
    return parser.parse_args(argv)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def llama(args, remat: str) -> shardml.Model:
    cfg = shardml.TransformerConfig(vocab=args.vocab, layers=args.layers, d_model=args.d_model, heads=args.heads,
                                    kv_heads=max(1, args.heads // 2), d_ff=(8 * args.d_model) // 3 // 8 * 8,
                                    dtype=args.dtype, remat=remat, layer_loop="unroll")
    return shardml.transformer(cfg, args.seq)


def token_batches(args, count: int) -> list[dict]:
    rng = np.random.default_rng(0)
    tokens = [rng.integers(0, args.vocab, (args.batch, args.seq + 1)) for _ in range(count)]
    return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


def peak_bytes(trainer, batch: dict) -> int:
    """The compiled step's per-device peak (XLA's memory analysis), compiled from abstract shapes."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=trainer.batch_sharding), batch)
    return memory(trainer.lower_step(trainer.abstract_state(), abstract).compile()).peak_estimate


def timed(trainer, state, batches):
    """(seconds of the steps after the first, which compiles, the state after them, the last metrics)."""
    placed = [trainer.put(b) for b in batches]
    state, metrics = trainer.step(state, placed[0])
    jax.block_until_ready(state)
    start = time.perf_counter()
    for batch in placed[1:]:
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready(state)
    return time.perf_counter() - start, state, jax.device_get(metrics)


def lr_optimizer():
    return optax.inject_hyperparams(lambda learning_rate: lora_optimizer(optax.adamw(learning_rate)))(
        learning_rate=1e-3)


def trainers(args, remat: str) -> dict:
    """The four trainers of one ``remat`` setting, over the same base weights (seed 0)."""
    base = llama(args, remat)
    model = lora(base, jax.device_get(base.init(jax.random.key(0))), rank=args.rank, alpha=2.0 * args.rank,
                 targets=args.targets)
    n, data8 = args.members, make_mesh({"data": 8})
    rates = [float(r) for r in np.geomspace(1e-4, 1e-2, n)]
    return {"rates": rates, "base": base,
            "population": build_population(model, make_mesh({"members": n, "data": -1}), lr_optimizer(), n,
                                           hyperparams={"learning_rate": rates}),
            "alone": build_trainer(model, data8, lr_optimizer()),
            "lora": build_trainer(model, data8, lora_optimizer(optax.adamw(1e-3))),
            "full": build_trainer(base, data8, optax.adamw(1e-3))}


def population_vs_sequential(args, built: dict, batches) -> dict:
    """(a): N adapters in one step on members=N against N LoRA runs one after another on data=8,
    member i with seed i and its own learning rate on both sides."""
    pop, alone = built["population"], built["alone"]
    pop_s, _, pop_metrics = timed(pop, pop.init(0), batches)
    seq_s, seq_losses = 0.0, []
    for i, rate in enumerate(built["rates"]):
        seconds, _, metrics = timed(alone, with_hyperparams(alone.init(i), {"learning_rate": rate}), batches)
        seq_s, seq_losses = seq_s + seconds, seq_losses + [float(metrics["loss"])]
    return {"pop_ms": 1e3 * pop_s / args.steps, "seq_ms": 1e3 * seq_s / args.steps,
            "pop_losses": [float(v) for v in np.asarray(pop_metrics["loss"])], "seq_losses": seq_losses}


def lora_vs_full(args, built: dict, batches) -> dict:
    """(b): one LoRA run against full fine-tuning (AdamW on every weight), both on data=8."""
    one, full = built["lora"], built["full"]
    lora_s, _, _ = timed(one, one.init(0), batches)
    full_s, _, _ = timed(full, full.init(0), batches)
    return {"lora_ms": 1e3 * lora_s / args.steps, "full_ms": 1e3 * full_s / args.steps}


def speed_report(args) -> list[str]:
    batches = token_batches(args, args.steps + 1)
    built = trainers(args, args.remat[0])
    a, b = population_vs_sequential(args, built, batches), lora_vs_full(args, built, batches)
    cfg, n = built["base"].config, args.members
    lines = [
        f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} devices; Llama-shaped transformer: "
        f"d_model {cfg.d_model}, {cfg.layers} layers, {cfg.heads} heads / {cfg.kv_heads} kv heads, d_ff {cfg.d_ff}, "
        f"vocab {cfg.vocab}, seq {args.seq}, batch {args.batch}, {cfg.dtype}; LoRA rank {args.rank} on "
        f"{','.join(args.targets)}; AdamW; {args.steps} timed steps per run after one compiling step, "
        f"remat={args.remat[0]}", "",
        "| step time | ms per step | ratio |", "|---|---:|---:|",
        f"| (a) {n} adapters in one step (members={n}, base once) | {a['pop_ms']:.0f} | |",
        f"| (a) {n} LoRA runs one after another (data=8 each), all {n} | {a['seq_ms']:.0f} | "
        f"**population speed-up {a['seq_ms'] / a['pop_ms']:.2f}x** |",
        f"| (b) one LoRA run (data=8) | {b['lora_ms']:.0f} | |",
        f"| (b) full fine-tuning (data=8) | {b['full_ms']:.0f} | LoRA speed-up {b['full_ms'] / b['lora_ms']:.2f}x |",
        "", f"last-step loss per member (same seeds, rates and batches): population {_fmt(a['pop_losses'])}; "
        f"alone {_fmt(a['seq_losses'])}", "", *memory_table(args, built, batches[0])]
    return lines


def memory_table(args, first: dict, batch: dict) -> list[str]:
    """Per-device peak of each compiled step, for every ``--remat`` setting."""
    mib, n = 2 ** 20, args.members
    lines = ["| per-device peak, compiled (MiB) | " + " | ".join(f"remat={r}" for r in args.remat) + " |",
             "|---|" + "---:|" * len(args.remat)]
    peaks = {k: [] for k in ("population", "alone", "full")}
    for remat in args.remat:
        built = first if remat == args.remat[0] else trainers(args, remat)
        for key in peaks:
            peaks[key].append(peak_bytes(built[key], batch))
    rows = [(f"(a) {n} adapters in one step", peaks["population"]), ("(a, b) one LoRA run", peaks["alone"]),
            ("(b) full fine-tuning", peaks["full"])]
    lines += [f"| {label} | " + " | ".join(f"{v / mib:.1f}" for v in values) + " |" for label, values in rows]
    lines.append(f"| (a) {n} adapters / one LoRA run | " + " | ".join(
        f"**{p / o:.2f}x**" for p, o in zip(peaks["population"], peaks["alone"])) + " |")
    lines.append("| (b) LoRA / full fine-tuning | " + " | ".join(
        f"**{o / f:.2f}x**" for o, f in zip(peaks["alone"], peaks["full"])) + " |")
    return lines


def _fmt(values) -> str:
    return " ".join(f"{v:.4f}" for v in values)


# ----------------------------------------------------------------------------- the learning demo


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary 256), with the ``encode(...).ids`` of a ``tokenizers.Tokenizer``."""

    def encode(self, text: str, add_special_tokens: bool = False):
        return types.SimpleNamespace(ids=list(text.encode("utf-8")))


def stdlib_pairs(modules=MODULES) -> dict[str, str]:
    """Function name -> the first line of its docstring, for the public functions of ``modules``
    (the first module to define a name wins; names with no usable docstring are skipped)."""
    import importlib
    import warnings

    pairs = {}
    for module_name in modules:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(module_name)
        except ImportError:  # modules removed in newer Pythons (imghdr, uu, ...)
            continue
        for name, fn in inspect.getmembers(module, callable):
            doc = (inspect.getdoc(fn) or "").strip().split("\n")[0].strip()
            if (name.startswith("_") or name in pairs or inspect.isclass(fn) or not doc.isascii()
                    or not 12 <= len(doc) <= 90 or name in doc or "(" in doc[:len(name) + 1]):
                continue  # a docstring that names the function (builtins' signatures) would give it away
            pairs[name] = doc
    return pairs


def prompt_of(doc: str) -> str:
    return f"Q: {doc}\nA: "


def pretraining_text(held_out_docs: list[str], limit: int = 4_000_000) -> bytes:
    """Standard-library source files (ASCII), without any file that holds a held-out docstring line."""
    root, text = pathlib.Path(sysconfig.get_paths()["stdlib"]), []
    for path in sorted(root.glob("*.py")):
        source = path.read_text(errors="ignore")
        if source.isascii() and not any(doc in source for doc in held_out_docs):
            text.append(source)
        if sum(map(len, text)) > limit:
            break
    return "\n".join(text).encode("ascii")


def text_batches(text: bytes, seq: int, batch: int, steps: int, seed: int = 0):
    data, rng = np.frombuffer(text, np.uint8).astype(np.int32), np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(data) - seq - 1, batch)
        rows = np.stack([data[s:s + seq + 1] for s in starts])
        yield {"inputs": rows[:, :-1], "targets": rows[:, 1:]}


def sft_rows(pairs: dict[str, str], seq: int, directory: str, name: str) -> dict:
    path = pathlib.Path(directory) / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"prompt": prompt_of(doc), "completion": f"{fn}\n"}) + "\n"
                            for fn, doc in pairs.items()))
    return shardml.read_sft(str(path), ByteTokenizer(), seq, truncate=True)


def padded_batches(rows: dict, size: int) -> list[dict]:
    """Rows in batches of ``size``, the last one filled with rows of mask 0 (they count nothing)."""
    count, out = len(rows["targets"]), []
    for start in range(0, count, size):
        batch = {k: v[start:start + size] for k, v in rows.items()}
        missing = size - len(batch["targets"])
        out.append({k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) for k, v in batch.items()})
    return out


def exact_match(base, params, pairs: dict[str, str], mesh) -> float:
    """The share of ``pairs`` whose greedy completion is exactly the function's name."""
    prompts = [list(prompt_of(doc).encode()) for doc in pairs.values()]
    out = shardml.generate(base, params, prompts, mesh=mesh, max_new_tokens=32, stop_tokens=[ord("\n")])
    said = [bytes(int(t) for t in tokens).decode("utf-8", "replace").strip() for tokens in out.tokens]
    return float(np.mean([s == name for s, name in zip(said, pairs)]))


def split_by_name(pairs: dict[str, str], held_out: float = 0.2, seed: int = 0) -> tuple[dict, dict]:
    """(train, held-out) pairs: a seeded ``held_out`` share of the function names, never trained on."""
    names = sorted(pairs)
    np.random.default_rng(seed).shuffle(names)
    cut = int(len(names) * held_out)
    return ({n: pairs[n] for n in sorted(names[cut:])}, {n: pairs[n] for n in sorted(names[:cut])})


def demo(args) -> list[str]:
    pairs = stdlib_pairs()
    train_pairs, held = split_by_name(pairs)
    seq, mesh = 128, make_mesh({"data": 8})
    base = shardml.transformer(shardml.TransformerConfig(vocab=256, layers=2, d_model=128, heads=4, kv_heads=2,
                                                         d_ff=384, dtype="float32", remat="none",
                                                         layer_loop="unroll"), seq)
    text = pretraining_text(list(held.values()))
    schedule = optax.warmup_cosine_decay_schedule(0, 3e-3, min(20, args.pretrain_steps // 2),
                                                  max(2, args.pretrain_steps))
    pre = build_trainer(base, mesh, optax.adamw(schedule))
    state, start = pre.init(0), time.perf_counter()
    for batch in text_batches(text, seq, 32, args.pretrain_steps):
        state, metrics = pre.step(state, pre.put(batch))
    pre_loss, pre_s = float(jax.device_get(metrics["loss"])), time.perf_counter() - start
    base_params = pre.natural(state.params)
    results, lines = lora_phase(args, base, base_params, train_pairs, held, mesh, seq), []
    lines += [f"Instruction set from {len(MODULES)} standard-library modules (Python "
              f"{sys.version.split()[0]}): {len(pairs)} functions, {len(train_pairs)} trained, {len(held)} held out "
              f"by name; byte tokens; a Llama-shaped base (d_model 128, 2 layers, seq {seq}) pretrained "
              f"{args.pretrain_steps} steps x 32 rows on {len(text) / 1e6:.1f} MB of standard-library source "
              f"(final loss {pre_loss:.3f}, {pre_s:.0f} s), then LoRA rank 8 on every projection, AdamW "
              f"{args.lora_lr:g}, {args.lora_steps} steps x 16 packed rows ({results['seconds']:.0f} s)", "",
              f"| | held-out completion loss | held-out exact match | train completion loss | train exact match "
              f"(first {len(held)}) |",
              "|---|---:|---:|---:|---:|"]
    for when in ("before", "after"):
        r = results[when]
        lines.append(f"| {when} LoRA | {r['held_loss']:.3f} | {r['held_em']:.1%} ({round(r['held_em'] * len(held))}"
                     f"/{len(held)}) | {r['train_loss']:.3f} | {r['train_em']:.1%} |")
    return lines


def lora_phase(args, base, base_params, train_pairs, held, mesh, seq) -> dict:
    """LoRA fine-tuning on ``train_pairs``: losses and exact match before and after, on both splits."""
    model = lora(base, base_params, rank=8, alpha=16.0, targets=ROLES)
    trainer = build_trainer(model, mesh, lora_optimizer(optax.adamw(args.lora_lr)))
    with tempfile.TemporaryDirectory() as directory:
        train_ex, held_ex = sft_rows(train_pairs, seq, directory, "train"), sft_rows(held, seq, directory, "held")
    batches = shardml.SFTBatches(shardml.pack_examples(train_ex, seq), batch_size=16, seed=0)
    evals = {"held": padded_batches(shardml.pad_examples(held_ex, seq), 64),
             "train": padded_batches(shardml.pad_examples(train_ex, seq), 64)}
    plain = build_trainer(base, mesh, optax.sgd(0.0))  # places merged weights as generate expects

    def measure(state) -> dict:
        merged = jax.device_put(shardml.merge_lora(model, trainer.natural(state.params))[1],
                                plain.state_shardings.params)
        out = {f"{k}_loss": shardml.evaluate(trainer, state.params, v)["loss"] for k, v in evals.items()}
        return {**out, "held_em": exact_match(base, merged, held, mesh),
                "train_em": exact_match(base, merged, dict(list(train_pairs.items())[:len(held)]), mesh)}

    state = trainer.init(0)
    results, start = {"before": measure(state)}, time.perf_counter()
    for step in range(args.lora_steps):
        state, _ = trainer.step(state, trainer.put(batches.batch(step)))
    jax.block_until_ready(state)
    return {**results, "seconds": time.perf_counter() - start, "after": measure(state)}


def main(argv=None) -> str:
    args = parse_args(argv)
    lines = [f"uptime before: {uptime()}", ""]
    lines += speed_report(args)
    if args.demo != "none":
        lines += ["", *demo(args)]
    lines += ["", f"uptime after: {uptime()}"]
    print("\n".join(lines))
    return "\n".join(lines)


if __name__ == "__main__":
    readme = _readme.option(sys.argv, "--readme")
    if readme is None:
        main()
    else:
        load_start = _readme.load_average()
        text = main()
        _readme.write_section(readme, "bench_lora", f"{text}\n\n{_readme.machine_line(load_start)}",
                              _readme.shown_command("benchmarks/bench_lora.py", sys.argv[1:]))
