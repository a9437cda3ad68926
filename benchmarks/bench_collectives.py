"""What XLA:CPU's collectives cost on emulated devices, against a plain pass over memory.

Each figure is a jitted program timed alone (``--repeats`` runs after one warm-up, all printed),
at the 100m config's sizes (``bench_mfu.py --configs 100m``: 114 M parameters; on the preset's
data=2 x fsdp=2 x tensor=2 mesh each device holds 57 M of them gathered over fsdp, in 12 layers):

- memory: an AdamW-like update of 114 M f32 parameters (reads 4 arrays, writes 3: 28 bytes each),
  on all devices at once, as GB/s;
- one collective: ``psum``, ``psum_scatter`` and ``all_gather`` of ``--elements`` f32 per device
  over all devices;
- the gradients' reduction: 12 layers of 57 M / 12 f32 per device reduced over fsdp and then data,
  the way the partitioner writes it on XLA:CPU (an all-reduce of the whole gathered gradient, one
  per layer or all combined into one, then a slice) and as a reduce-scatter;
- the weights' gathers: 84 all-gathers of one weight each (7 per layer; the step gathers the two
  embeddings too) against one per layer of the same 16-bit words.

    python benchmarks/bench_collectives.py
    python benchmarks/bench_collectives.py --repeats 10 --elements 20000000
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardml import emulate_cpu_devices

PARAMS = 114_000_000  # the 100m config's parameters
LAYERS, WEIGHTS = 12, 7  # its layers, and the weights of each (q, k, v, o, gate, up, down)
GATHERED = 57_000_000  # parameters per device gathered over fsdp on data=2 x fsdp=2 x tensor=2
ALL = ("data", "fsdp", "tensor")


def timed(fn, *args, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` runs of ``fn(*args)`` after one warm-up run."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def adamw_like(p, g, m, v):
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    return p - 1e-3 * m / (jnp.sqrt(v) + 1e-8), m, v


def memory_pass(mesh, repeats: int) -> list[float]:
    n = mesh.size
    sharding = NamedSharding(mesh, P(ALL))
    arrays = [jax.device_put(jnp.full((PARAMS // n * n,), i + 1.0), sharding) for i in range(4)]
    fn = jax.jit(adamw_like, in_shardings=sharding, out_shardings=sharding)
    return timed(fn, *arrays, repeats=repeats)


def per_device(mesh, fn, shape, dtype, repeats: int) -> list[float]:
    """``fn`` on every device's own [shape] block, manual over every axis."""
    spec = P(ALL)
    x = jax.device_put(jnp.ones((mesh.size * shape[0], *shape[1:]), dtype), NamedSharding(mesh, spec))
    return timed(jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec)), x, repeats=repeats)


def one_collective(n: int):
    """name -> f(block [1, n]) of the single collectives over all devices."""
    return {
        "psum": lambda x: jax.lax.psum(x, ALL),
        "psum_scatter": lambda x: jax.lax.psum_scatter(x, ALL, scatter_dimension=1, tiled=True),
        "all_gather": lambda x: jax.lax.all_gather(x[:, : n // 8], ALL, axis=1, tiled=True),
    }


def _slice_own(g, n: int):
    k = jax.lax.axis_index("fsdp")
    return jax.lax.dynamic_slice_in_dim(g, k * (n // 2), n // 2)


def gradient_reductions(n: int):
    """name -> f(block [LAYERS, n]): each layer's gathered gradient reduced over fsdp into this
    device's half, then over data."""
    def each(x):
        return jnp.stack([jax.lax.psum(_slice_own(jax.lax.psum(x[i], "fsdp"), n), "data") for i in range(LAYERS)])

    def combined(x):
        halves = [_slice_own(g, n) for g in jax.lax.psum([x[i] for i in range(LAYERS)], "fsdp")]
        return jnp.stack(jax.lax.psum(halves, "data"))

    def scattered(x):
        halves = [jax.lax.psum_scatter(x[i], "fsdp", tiled=True) for i in range(LAYERS)]
        return jnp.stack(jax.lax.psum(halves, "data"))

    return {"all-reduce and slice, per layer": each, "all-reduce and slice, combined": combined,
            "reduce-scatter": scattered}


def gathers(n: int):
    """name -> f(block [LAYERS * WEIGHTS, n] of uint16 words): gathered over fsdp, each weight
    alone or a layer's weights at once."""
    def each(x):
        return jnp.stack([jax.lax.all_gather(x[i], "fsdp", tiled=True)[:n] + 1 for i in range(LAYERS * WEIGHTS)])

    def per_layer(x):
        out = []
        for layer in range(LAYERS):
            words = jax.lax.all_gather(x[layer * WEIGHTS:(layer + 1) * WEIGHTS].reshape(-1), "fsdp", tiled=True)
            out += [words[i * n:(i + 1) * n] + 1 for i in range(WEIGHTS)]
        return jnp.stack(out)

    return {f"{LAYERS * WEIGHTS} all-gathers": each, f"{LAYERS} all-gathers, one per layer": per_layer}


def _row(name: str, times: list[float], extra: str = "") -> str:
    return f"| {name} | {min(times):.3f} | {', '.join(f'{t:.3f}' for t in times)} |{extra}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--elements", type=int, default=46_000_000, help="f32 per device of the single collectives")
    args = ap.parse_args()
    emulate_cpu_devices(8)
    mesh = jax.make_mesh((2, 2, 2), ALL)
    print(f"jax {jax.__version__}, {mesh.size} emulated CPU devices on {os.cpu_count()} cores, 1-minute load "
          f"{os.getloadavg()[0]:.1f} at the start\n")
    print("| program | best, s | runs, s |\n|---|---:|---|")
    times = memory_pass(mesh, args.repeats)
    print(_row("AdamW-like pass, 114 M f32", times) + f" {28 * PARAMS / min(times) / 1e9:.1f} GB/s at best")
    n = args.elements // 8 * 8
    for name, fn in one_collective(n).items():
        print(_row(f"{name}, {n / 1e6:.0f} M f32 per device", per_device(mesh, fn, (1, n), jnp.float32, args.repeats)))
    layer = GATHERED // LAYERS // 2 * 2
    for name, fn in gradient_reductions(layer).items():
        print(_row(f"gradients, {name}", per_device(mesh, fn, (LAYERS, layer), jnp.float32, args.repeats)))
    weight = GATHERED // (LAYERS * WEIGHTS) // 2
    for name, fn in gathers(weight).items():
        print(_row(f"weights, {name}", per_device(mesh, fn, (LAYERS * WEIGHTS, weight), jnp.uint16, args.repeats)))
    print(f"\n1-minute load {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    sys.exit(main())
