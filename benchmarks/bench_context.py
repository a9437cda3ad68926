"""Context parallelism: ring attention vs all-gathered keys/values as the sequence grows.

For each sequence length, attention variant and ``context`` size: the training step's compiled
memory per device (XLA's memory analysis: temporaries, i.e. activations and their gradients, and
the peak estimate) beside the closed-form theory's activation estimate (what ``shardml plan``
prints), and its measured step time; then, for a per-device memory budget, the longest sequence
(doubling) that fits by the theory (f32 parameters and their gradients plus the activation
estimate), checked by compiling the step at that length and at twice it (and, where the plan was
optimistic, at halves of it until one fits).

    python benchmarks/bench_context.py                       # small: seq 256..1024, context 1, 2, 4
    python benchmarks/bench_context.py --seq-lens 1024 4096 --budget 64MiB

On emulated CPU devices the times say little about accelerators (8 fake devices share the host's
cores); the memory figures are what XLA plans per device.
"""

import shardml

shardml.emulate_cpu_devices(8)  # before any other JAX use

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from shardml.analysis import Workload, compiled_step, format_bytes, layout_theory, memory, parse_bytes  # noqa: E402

CFG = shardml.TransformerConfig(vocab=256, layers=2, d_model=64, heads=4, d_ff=128, dtype="float32", remat="none",
                                layer_loop="scan")


def step_for(seq_len: int, attention: str, context: int, rows: int):
    """The trainer of CFG with ``context_attention=attention`` on ``context`` devices, and a batch."""
    cfg = dataclasses.replace(CFG, context_attention=attention)
    mesh = shardml.make_mesh({"context": context, "data": 1}, devices=jax.devices()[:context])
    trainer = shardml.build_trainer(shardml.transformer(cfg, seq_len), mesh, optax.sgd(0.1),
                                    loss=shardml.token_cross_entropy)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab, (rows, seq_len + 1))
    batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32)}
    return trainer, batch


def theory(seq_len: int, attention: str, context: int, rows: int):
    """The closed-form theory of CFG's step on ``context`` devices (nothing compiled)."""
    work = Workload(d_model=CFG.d_model, heads=CFG.heads, kv_heads=CFG.kv_heads, d_ff=CFG.d_ff, vocab=CFG.vocab,
                    layers=CFG.layers, dtype=CFG.dtype, remat=CFG.remat, seq_len=seq_len, batch_size=rows,
                    head_dim=CFG.head_dim, context_attention=attention)
    sizes = {"members": 1, "pipeline": 1, "data": 1, "fsdp": 1, "expert": 1, "context": context, "tensor": 1}
    return layout_theory(work, sizes)


def planned_bytes(seq_len: int, attention: str, context: int, rows: int) -> int:
    """What the theory says one device needs: f32 parameters, their gradients (SGD: no moments), activations."""
    t = theory(seq_len, attention, context, rows)
    return 2 * t.params_bytes + t.activation_bytes


def measure(seq_len: int, attention: str, context: int, rows: int, steps: int) -> dict:
    """Compiled memory per device and the median step time (``steps`` timed after one warm-up)."""
    trainer, batch = step_for(seq_len, attention, context, rows)
    mem = memory(compiled_step(trainer, batch).compiled)
    times = []
    if steps:
        state, placed = trainer.init(0), trainer.put(batch)
        state, metrics = trainer.step(state, placed)
        jax.block_until_ready(metrics)
        for _ in range(steps):
            start = time.perf_counter()
            state, metrics = trainer.step(state, placed)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    return {"temp": mem.temporaries, "peak": mem.peak_estimate, "ms": 1e3 * float(np.median(times)) if times else 0,
            "theory": theory(seq_len, attention, context, rows).activation_bytes}


def longest_planned(attention: str, context: int, rows: int, budget: int, start: int, limit: int) -> int:
    """The longest power-of-two multiple of ``start`` (up to ``limit``) the theory fits in ``budget`` (0: none)."""
    best, seq = 0, start
    while seq <= limit and planned_bytes(seq, attention, context, rows) <= budget:
        best, seq = seq, seq * 2
    return best


def compiled_peak(seq_len: int, attention: str, context: int, rows: int) -> int:
    trainer, batch = step_for(seq_len, attention, context, rows)
    return memory(compiled_step(trainer, batch).compiled).peak_estimate


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per row (0: memory only)")
    parser.add_argument("--budget", default="16MiB", help="per-device memory for the longest-sequence table")
    parser.add_argument("--fit-start", type=int, default=256)
    parser.add_argument("--fit-limit", type=int, default=8192)
    args = parser.parse_args()
    print(f"{CFG.layers} layers, d_model {CFG.d_model}, {CFG.heads} heads, f32, {args.rows} rows; "
          f"{len(jax.devices())} emulated {jax.devices()[0].platform} devices\n")
    print(f"{'seq':>6} {'attention':>10} {'context':>7} {'temp/device':>12} {'peak/device':>12} "
          f"{'theory act':>12} {'step ms':>8}")
    for seq in args.seq_lens:
        for attention in ("allgather", "ring"):
            for context in args.contexts:
                if attention == "ring" and context == 1:
                    continue  # one shard: ring attention is the plain attention
                r = measure(seq, attention, context, args.rows, args.steps)
                print(f"{seq:>6} {attention:>10} {context:>7} {format_bytes(r['temp']):>12} "
                      f"{format_bytes(r['peak']):>12} {format_bytes(r['theory']):>12} {r['ms']:>8.1f}")
    budget = parse_bytes(args.budget)
    print(f"\nlongest sequence (powers of 2 from {args.fit_start}, up to {args.fit_limit}) that fits {args.budget} "
          "per device by the theory, and the compiled peak there and at twice it")
    for attention in ("allgather", "ring"):
        for context in args.contexts:
            if attention == "ring" and context == 1:
                continue
            seq = longest_planned(attention, context, args.rows, budget, args.fit_start, args.fit_limit)
            checks = [(n, compiled_peak(n, attention, context, args.rows)) for n in (seq, 2 * seq)
                      if n and n % (2 * context) == 0]
            while checks and checks[0][1] > budget and checks[0][0] // 2 >= max(args.fit_start, 2 * context):
                half = checks[0][0] // 2  # the theory was optimistic: halve until the compiled step fits
                checks.insert(0, (half, compiled_peak(half, attention, context, args.rows)))
            print(f"  {attention:>10} context={context}: plan {seq:>6}; " + ", ".join(
                f"compiled at {n}: {format_bytes(peak)} ({'fits' if peak <= budget else 'does not fit'})"
                for n, peak in checks))


if __name__ == "__main__":
    main()
