"""An open-weights checkpoint into shardml against ``transformers``, side by side in one run: a
~0.5B-parameter random-weight Llama-shaped checkpoint written here (``transformers.LlamaConfig``,
``save_pretrained`` as sharded safetensors with their index), then

- **Load**: ``shardml.load_hf`` onto ``--layout`` (default fsdp=8 on 8 emulated CPU devices)
  against ``transformers.AutoModelForCausalLM.from_pretrained`` of the same files; each load in
  its own fresh process, so neither inherits the other's memory. Seconds (the call until every
  array is ready), GB/s (checkpoint bytes on disk / seconds; the files were just written, so both
  read from the page cache) and peak host memory: the process's peak resident memory after the
  load minus its peak once it has imported everything and started its backend (Linux: ``VmHWM``,
  the process's own high-water mark; ``ru_maxrss`` would carry the parent's over). Both load to
  float32 (what shardml trains in), so both end up holding the same 4 bytes per parameter; on
  emulated CPU devices the devices' memory is the process's too, so the column "over the model"
  (peak minus the float32 model) is what loading staged beyond the result.
- **Eval**: tokens/s of the next-token loss over the same ``--batches`` batches of random tokens,
  shardml's ``evaluate`` (compiled, on the same layout) against transformers' PyTorch forward
  (``torch.no_grad``, float32) plus its cross-entropy; one batch each first as warm-up (shardml's
  compiles). The two losses must agree (printed beside, a check that both ran the same model).

On CPU, 8 emulated devices and PyTorch share the machine's cores: the figures are ratios measured
in one run on one machine, not what an accelerator gives.

    python benchmarks/bench_hf.py                        # ~0.48B parameters, bf16 on disk; a few minutes
    python benchmarks/bench_hf.py --layers 4             # quicker (same width, fewer layers)
    python benchmarks/bench_hf.py --readme benchmarks/README.md
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import _readme  # benchmarks/ (this script's folder) is on sys.path


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=4608)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="the checkpoint's on disk")
    ap.add_argument("--shard-size", default="200MB", help="save_pretrained's max_shard_size")
    ap.add_argument("--layout", default="fsdp=8", help="shardml's mesh, 'axis=size,...'")
    ap.add_argument("--rows", type=int, default=8, help="sequences per eval batch")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--batches", type=int, default=3, help="timed eval batches (after one warm-up)")
    ap.add_argument("--dir", default=None, help="write (or reuse) the checkpoint here instead of a temp dir")
    ap.add_argument("--load-only", choices=("shardml", "transformers"), help=argparse.SUPPRESS)  # the subprocess
    ap.add_argument("--readme", default=None, help="also write the printed report into this README section")
    return ap.parse_args(argv)


def sizes_of(layout: str) -> dict[str, int]:
    return {axis: int(size) for axis, size in (part.split("=") for part in layout.split(","))}


def write_checkpoint(args, directory: str) -> None:
    """A random-weight Llama of the given shape, saved as sharded safetensors (skipped if there)."""
    if os.path.isfile(os.path.join(directory, "config.json")):
        return
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    model.save_pretrained(directory, max_shard_size=args.shard_size)


def checkpoint_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors"))


def max_rss_bytes() -> int:
    """This process's peak resident memory so far: on Linux its own high-water mark (``VmHWM``),
    since ``ru_maxrss`` also holds the parent's peak, carried over through fork and exec; elsewhere
    ``ru_maxrss`` (bytes on macOS)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):  # pragma: no cover - not Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def load_here(args) -> dict:
    """One load in this (fresh) process: seconds and peak RSS over the baseline after imports."""
    if args.load_only == "shardml":
        import shardml

        shardml.emulate_cpu_devices(8)
        import jax

        mesh = shardml.make_mesh(sizes_of(args.layout), jax.devices()[:8])
        baseline = max_rss_bytes()
        start = time.perf_counter()
        _, params = shardml.load_hf(args.dir, mesh=mesh, dtype="float32")
        jax.block_until_ready(params)
    else:
        import torch
        import transformers

        transformers.LlamaForCausalLM  # noqa: B018  (transformers imports its model classes lazily: here, not timed)
        baseline = max_rss_bytes()
        start = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32)
        assert next(model.parameters()).dtype == torch.float32
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_bytes": max_rss_bytes() - baseline, "baseline_bytes": baseline}


def load_in_subprocess(args, which: str) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--load-only", which, "--dir", args.dir,
            "--layout", args.layout]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def eval_batches(args):
    import numpy as np
    import shardml

    tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batches + 1) * args.rows * args.seq + 1)
    return list(shardml.held_out_batches(tokens, args.seq, args.rows))


def eval_shardml(args, batches) -> tuple[float, float]:
    """(tokens/s, mean loss) of shardml.evaluate on the layout, compiled on the first batch."""
    import jax
    import optax
    import shardml

    mesh = shardml.make_mesh(sizes_of(args.layout), jax.devices()[:8])
    model, params = shardml.load_hf(args.dir, mesh=mesh, dtype="float32")
    trainer = shardml.build_trainer(model, mesh, optax.sgd(0.0))  # for its compiled eval; nothing trains
    shardml.evaluate(trainer, params, batches[:1])  # warm-up: compiles
    start = time.perf_counter()
    loss = shardml.evaluate(trainer, params, batches[1:])["loss"]
    return args.batches * args.rows * args.seq / (time.perf_counter() - start), float(loss)


def eval_transformers(args, batches) -> tuple[float, float]:
    """(tokens/s, mean loss) of transformers' float32 forward and cross-entropy on the same batches."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32).eval()

    def loss_of(batch):
        logits = model(torch.tensor(batch["inputs"])).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 torch.tensor(batch["targets"]).reshape(-1).long())

    with torch.no_grad():
        loss_of(batches[0])  # warm-up
        start = time.perf_counter()
        losses = [float(loss_of(batch)) for batch in batches[1:]]
    return args.batches * args.rows * args.seq / (time.perf_counter() - start), sum(losses) / len(losses)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:  # pragma: no cover - no uptime binary
        return f"load average {_readme.load_average():.2f}"


def report(args, size: int, params: int, loads: dict, evals: dict) -> None:
    shards = len([f for f in os.listdir(args.dir) if f.endswith(".safetensors")])
    print(f"checkpoint: Llama-shaped, {params / 1e9:.3f}B parameters (layers={args.layers} hidden={args.hidden} "
          f"heads={args.heads} kv_heads={args.kv_heads} intermediate={args.intermediate} vocab={args.vocab}, "
          f"untied), random weights, {args.dtype} on disk: {size / 1e9:.2f} GB in "
          f"{shards} safetensors file{'s and their index' if shards > 1 else ''}\n")
    print(f"### Load to float32 (each in a fresh process; shardml onto {args.layout}, 8 emulated CPU devices)\n")
    model = 4 * params
    print("| loader | seconds | GB/s (on disk) | peak host memory over baseline (GB) | over the model (GB) "
          "| baseline after imports (GB) |\n|---|---|---|---|---|---|")
    for name, row in loads.items():
        print(f"| {name} | {row['seconds']:.1f} | {size / 1e9 / row['seconds']:.2f} | {row['peak_bytes'] / 1e9:.2f} "
              f"| {(row['peak_bytes'] - model) / 1e9:.2f} | {row['baseline_bytes'] / 1e9:.2f} |")
    print(f"\nfloat32 model: {model / 1e9:.2f} GB; one device's share {model / 8 / 1e9:.2f} GB; its largest "
          f"tensor {4 * hf_largest(args) / 1e9:.2f} GB\n")
    print(f"### Eval, float32: {args.batches} batches of {args.rows} x {args.seq} random tokens after 1 warm-up\n")
    print("| model | tokens/s | mean loss |\n|---|---|---|")
    for name, (rate, loss) in evals.items():
        print(f"| {name} | {rate:,.0f} | {loss:.5f} |")
    (r_s, _), (r_t, _) = evals.values()
    print(f"\nratio shardml / transformers (eval tokens/s): {r_s / r_t:.2f}")


def main(args) -> None:
    import shardml

    shardml.emulate_cpu_devices(8)  # before any JAX use in this process
    print(f"uptime at the start: {uptime()}")
    with tempfile.TemporaryDirectory() as tmp:
        args.dir = args.dir or os.path.join(tmp, "llama")
        start = time.perf_counter()
        write_checkpoint(args, args.dir)
        written = time.perf_counter() - start
        hf_config = json.load(open(os.path.join(args.dir, "config.json")))
        size = checkpoint_bytes(args.dir)
        loads = {"shardml.load_hf": load_in_subprocess(args, "shardml"),
                 "transformers.from_pretrained": load_in_subprocess(args, "transformers")}
        batches = eval_batches(args)
        evals = {f"shardml.evaluate ({args.layout})": eval_shardml(args, batches),
                 "transformers forward (torch.no_grad)": eval_transformers(args, batches)}
        report(args, size, count_params(hf_config), loads, evals)
    print(f"(checkpoint written in {written:.0f} s)")
    print(f"uptime at the end: {uptime()}")


def hf_largest(args) -> int:
    """Elements of the checkpoint's largest tensor (an embedding or an MLP matrix)."""
    return max(args.vocab * args.hidden, args.intermediate * args.hidden)


def count_params(hf: dict) -> int:
    """Parameters of a Llama config.json (untied): embeddings, per-layer projections and norms."""
    d, f, v, layers = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"], hf["num_hidden_layers"]
    e = hf.get("head_dim") or d // hf["num_attention_heads"]
    attn = d * e * (2 * hf["num_attention_heads"] + 2 * hf["num_key_value_heads"])
    return layers * (attn + 3 * d * f + 2 * d) + d + v * d * (1 if hf.get("tie_word_embeddings") else 2)


if __name__ == "__main__":
    if "--load-only" in sys.argv:
        print(json.dumps(load_here(parse_args())))
        sys.exit(0)
    with _readme.printed_section(_readme.option(sys.argv, "--readme"), "bench_hf", "benchmarks/bench_hf.py",
                                 sys.argv[1:]):
        main(parse_args())
