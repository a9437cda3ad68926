"""Inference throughput: sharded evaluation and KV-cache generation across layouts, generation
against a plain decode that recomputes the whole sequence every step, the KV cache's memory per
device against its closed form, and (on an accelerator) decoding's achieved memory bandwidth.

- **Eval** (``shardml.evaluate`` over ``shardml.held_out_batches``): the first
  ``--eval-tokens`` tokens of the held-out Python documentation, every next-token prediction once,
  in batches of ``--rows`` windows of ``--seq`` tokens; tokens/s of a whole pass once compiled (the
  first batch, which compiles, is timed apart).
  The loss must be the same on every layout (printed beside, a check of the sharding).
- **Generate vs plain** (``shardml.generate``, greedy): ``--batch`` prompts of ``--prompt-len``
  held-out bytes, ``--new-tokens`` new tokens each (256: the issue's goal is >= 10x). The plain
  decode, written here, jits one step that runs the whole [batch, prompt + new] buffer through
  ``model.apply`` (static shapes, causal attention makes the unwritten tail irrelevant), takes the
  argmax after the cursor and writes it into the buffer, on the same mesh and parameters. Its
  step costs the same at every cursor, so ``--plain-steps`` (default: all) times the first steps
  only and the rate holds for the rest. Both are compiled before timing; decoding tokens/s counts
  the tokens of the decode loop (the prefill's first token apart), and the match column is the
  fraction of tokens both decodes agree on (bf16 rounding can split near-ties).
- **KV cache per device**: the bytes of one device's shard of the cache that ``generate`` built,
  against the closed form 2 (keys, values) x layers x batch x (prompt + new) x kv heads x head dim x
  bytes / (data x fsdp x tensor) (the prompt length is a multiple of 8, the slots generate pads to).
- **Memory bandwidth** (accelerators only): bytes one device reads per decode step (its parameter
  shards, f32, and its whole cache shard: attention reads every slot) / seconds per step, against
  the chip's datasheet peak and a measured streaming copy on that device.

Each layout (``--layouts``, ';'-separated ``axis=size`` lists) that does not fit the devices or
the model is skipped with the reason.

    python benchmarks/bench_inference.py                        # the default preset's model, 8 CPU devices
    python benchmarks/bench_inference.py --model 100m --batch 16 # on a GPU / TPU
    python benchmarks/bench_inference.py --readme benchmarks/README.md
"""

import argparse
import dataclasses
import math
import os
import sys
import time

import _readme  # benchmarks/ (this script's folder) is on sys.path


MODELS = {  # the default preset's transformer, and larger ones of the same shape
    "tiny": {"layers": 4, "d_model": 32, "heads": 4, "d_ff": 64},
    "default": {"layers": 4, "d_model": 128, "heads": 4, "d_ff": 512},
    "100m": {"layers": 12, "d_model": 768, "heads": 12, "d_ff": 3072},
}
LAYOUTS = "data=8;fsdp=8;data=2,fsdp=2,tensor=2;data=2,tensor=4;data=1"
# Datasheet HBM bandwidth per chip, bytes/s.
PEAK_BANDWIDTH = {"NVIDIA H200": 4.8e12, "NVIDIA H100": 3.35e12, "NVIDIA A100": 2.0e12, "TPU v6": 1.64e12,
                  "TPU v5p": 2.76e12, "TPU v5 lite": 8.19e11, "TPU v5e": 8.19e11, "TPU v4": 1.2e12}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", choices=sorted(MODELS))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--layouts", default=LAYOUTS, help="';'-separated layouts, each 'axis=size,...'")
    ap.add_argument("--seq", type=int, default=128, help="evaluation window (the default preset's data.seq_len)")
    ap.add_argument("--rows", type=int, default=64, help="evaluation windows per batch")
    ap.add_argument("--eval-tokens", type=int, default=2**16, help="held-out tokens evaluated per layout")
    ap.add_argument("--batch", type=int, default=8, help="prompts decoded at once")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (a multiple of 8)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--plain-steps", type=int, default=0, help="plain-decode steps timed (0: all)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each measurement (best)")
    ap.add_argument("--cpu-devices", type=int, default=None)
    ap.add_argument("--readme", default=None, help="rewrite this file's bench_inference section")
    args = ap.parse_args()
    if args.prompt_len % 8:
        ap.error("--prompt-len must be a multiple of 8 (generate pads prompts to a multiple of 8 slots)")
    return args


def setup_devices(count):
    """``count`` emulated CPU devices (default: JAX_NUM_CPU_DEVICES, else 8, as the CLI makes them on a
    CPU-only machine); call before any JAX use. On an accelerator the CPU devices go unused."""
    import shardml

    shardml.emulate_cpu_devices(count or int(os.environ.get("JAX_NUM_CPU_DEVICES") or 8))


def parse_layout(text):
    return {axis.strip(): int(size) for axis, size in (item.split("=") for item in text.split(",") if item.strip())}


def best(fn, repeats):
    """The fastest of ``repeats`` runs of ``fn() -> (seconds, result)``."""
    runs = [fn() for _ in range(repeats)]
    return min(runs, key=lambda r: r[0])


class Setup:
    """One layout: mesh, trainer (for its shardings and compiled eval), random parameters."""

    def __init__(self, shardml, cfg, sizes, seq):
        import jax

        self.sizes = sizes
        devices = jax.devices()[:math.prod(sizes.values())]
        self.mesh = shardml.make_mesh(sizes, devices)
        self.model = shardml.transformer(cfg, seq)
        optimizer = shardml.default_optimizer(shardml.OptimConfig(), 10)  # unused: the trainer gives shardings
        self.trainer = shardml.build_trainer(self.model, self.mesh, optimizer)
        self.params = self.trainer.init(seed=0).params
        self.name = shardml.layout_name(self.mesh.shape)


def eval_row(shardml, setup, args, val):
    tokens = val[:args.eval_tokens + 1]
    shards = setup.mesh.shape["data"] * setup.mesh.shape["fsdp"]
    rows = -(-args.rows // shards) * shards  # padding rows would be masked, but cost time
    batches = list(shardml.held_out_batches(tokens, args.seq, rows))
    predictions = sum(float(batch["mask"].sum()) for batch in batches)  # real (unmasked) tokens
    start = time.perf_counter()
    shardml.evaluate(setup.trainer, setup.params, batches[:1])  # compiles
    compile_s = time.perf_counter() - start
    seconds, loss = best(lambda: timed_eval(shardml, setup, batches), args.repeats)
    return f"| {setup.name} | {rows} | {predictions / seconds:,.0f} | {compile_s:.2f} | {loss:.6f} |"


def timed_eval(shardml, setup, batches):
    """(seconds, mean loss) of one evaluation pass over ``batches``."""
    start = time.perf_counter()
    loss = shardml.evaluate(setup.trainer, setup.params, batches)["loss"]
    return time.perf_counter() - start, loss


def plain_decode(setup, prompts, new_tokens, steps):
    """Greedy decoding that recomputes the whole sequence each step (see the module docstring);
    returns (seconds per step, tokens [B, new], compile seconds)."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    B, P = len(prompts), len(prompts[0])
    buffer = np.zeros((B, P + new_tokens), np.int32)
    buffer[:, :P] = np.asarray(prompts)
    sharding = jax.sharding.NamedSharding(setup.mesh, setup.trainer.rules.spec(("batch", None)))
    model = setup.model

    @functools.partial(jax.jit, donate_argnums=1)
    def step(params, buffer, cursor):
        logits = model.apply(params, buffer)
        token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, cursor - 1, axis=1, keepdims=False), axis=-1)
        return jax.lax.dynamic_update_index_in_dim(buffer, token.astype(buffer.dtype), cursor, axis=1)

    with jax.set_mesh(setup.mesh):
        start = time.perf_counter()
        compiled = step.lower(setup.params, jax.device_put(buffer, sharding), jnp.int32(P)).compile()
        compile_s = time.perf_counter() - start
        state = jax.device_put(buffer, sharding)
        start = time.perf_counter()
        for cursor in range(P, P + steps):
            state = compiled(setup.params, state, jnp.int32(cursor))
        state = jax.block_until_ready(state)
        seconds = time.perf_counter() - start
    return seconds / steps, np.asarray(state)[:, P:P + steps], compile_s


def generate_rows(shardml, setup, cfg, args, prompts):
    import numpy as np

    def run():
        gen = shardml.generate(cfg, setup.params, prompts, mesh=setup.mesh, max_new_tokens=args.new_tokens)
        return gen.decode_seconds, gen

    _, gen = best(run, args.repeats)
    per_step = gen.decode_seconds / max(gen.decode_steps, 1)
    steps = args.plain_steps or args.new_tokens
    plain_step, plain_tokens, _ = plain_decode(setup, prompts, args.new_tokens, steps)
    kv = np.stack([t[:steps] for t in gen.tokens])
    match = float(np.mean(kv == plain_tokens))
    kv_rate = len(prompts) / per_step
    plain_rate = len(prompts) / plain_step
    speed = (f"| {setup.name} | {gen.prefill_tokens_per_s:,.0f} | {gen.decode_tokens_per_s:,.0f} | "
             f"{gen.compile_seconds:.2f} | {plain_rate:,.1f} ({steps} steps) | {kv_rate / plain_rate:.1f}x | "
             f"{match:.3f} |")
    return speed, gen, per_step


def cache_row(setup, cfg, args, gen):
    import jax.numpy as jnp

    kv = cfg.kv_heads or cfg.heads
    head_dim = cfg.d_model // cfg.heads
    shards = math.prod(setup.mesh.shape[a] for a in ("data", "fsdp"))
    batch = -(-args.batch // shards) * shards
    tensor = setup.mesh.shape["tensor"]
    closed = (2 * cfg.layers * batch * (args.prompt_len + args.new_tokens) * kv * head_dim
              * jnp.dtype(cfg.dtype).itemsize / (shards * tensor))
    got = gen.cache_bytes_per_device
    return f"| {setup.name} | {got:,} | {closed:,.0f} | {got / closed:.3f} |"


def measured_copy_bandwidth(device, megabytes=1024, repeats=5):
    import jax
    import jax.numpy as jnp

    x = jax.device_put(jnp.ones((megabytes * 2**20 // 4,), jnp.float32), device)
    double = jax.jit(lambda a: a * 2)
    double(x).block_until_ready()
    fastest = min(_timed(lambda: double(x).block_until_ready()) for _ in range(repeats))
    return 2 * x.nbytes / fastest  # read and write


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bandwidth_row(setup, gen, per_step):
    import jax

    device = setup.mesh.devices.flat[0]
    params = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(setup.params))
    achieved = (params + gen.cache_bytes_per_device) / per_step
    peak = next((bw for name, bw in PEAK_BANDWIDTH.items() if device.device_kind.startswith(name)), float("nan"))
    copy = measured_copy_bandwidth(device)
    return (f"| {setup.name} | {params + gen.cache_bytes_per_device:,} | {per_step * 1e3:.3f} | "
            f"{achieved / 1e9:,.1f} | {achieved / peak:.1%} of {peak / 1e12:.2f} TB/s | "
            f"{achieved / copy:.1%} of {copy / 1e9:,.0f} GB/s |")


def main(args):
    import jax

    import shardml

    accelerator = jax.devices()[0].platform != "cpu"
    cfg = shardml.TransformerConfig(**MODELS[args.model], dtype=args.dtype)
    tokens = shardml.load_tokens("pydoc")
    prompts = [tokens.val[i * 997:i * 997 + args.prompt_len].tolist() for i in range(args.batch)]
    print(f"model {args.model} ({dataclasses.asdict(cfg)}), {jax.device_count()} {jax.devices()[0].device_kind} "
          f"device(s)")
    setups = []
    for layout in args.layouts.split(";"):
        sizes = parse_layout(layout)
        if math.prod(sizes.values()) != jax.device_count():
            print(f"skipped {layout}: {math.prod(sizes.values())} devices, this machine has {jax.device_count()}")
            continue
        try:
            setups.append(Setup(shardml, cfg, sizes, args.seq))
        except shardml.ShardmlError as err:
            print(f"skipped {layout}: {err}")
    if not setups:
        sys.exit("no layout fits; give --layouts")

    print(f"\n### Eval: {args.eval_tokens:,} held-out tokens, windows of {args.seq}\n")
    print("| layout | rows | tokens/s | first batch (compile) s | loss |\n|---|---|---|---|---|")
    for setup in setups:
        print(eval_row(shardml, setup, args, tokens.val))

    print(f"\n### Generate: {args.batch} prompts of {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy\n")
    print("| layout | prefill tokens/s | decode tokens/s | compile s | plain recompute tokens/s | KV / plain | "
          "match |\n|---|---|---|---|---|---|---|")
    gens = []
    for setup in setups:
        row, gen, per_step = generate_rows(shardml, setup, cfg, args, prompts)
        gens.append((setup, gen, per_step))
        print(row)

    print("\n### KV cache per device\n")
    print("| layout | measured bytes | closed form | ratio |\n|---|---|---|---|")
    for setup, gen, _ in gens:
        print(cache_row(setup, cfg, args, gen))

    if accelerator:
        print("\n### Decode memory bandwidth (bytes one device reads per step / step time)\n")
        print("| layout | bytes per step | ms per step | GB/s | of datasheet peak | of measured copy |\n"
              "|---|---|---|---|---|---|")
        for setup, gen, per_step in gens:
            print(bandwidth_row(setup, gen, per_step))


if __name__ == "__main__":
    arguments = parse_args()
    setup_devices(arguments.cpu_devices)  # before JAX starts
    with _readme.printed_section(arguments.readme, "bench_inference", "benchmarks/bench_inference.py", sys.argv[1:]):
        main(arguments)
