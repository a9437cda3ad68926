"""Train-step throughput: shardml's trainer vs. a plain hand-written Flax NNX + optax jit step.

Both train the same byte-level transformer (shardml's reference architecture: RMSNorm, rotary,
SwiGLU, causal attention, untied embeddings, f32 params / bf16 compute) on the same global batches
on 8 emulated CPU devices. The baseline is what a user would write without shardml: an nnx.Module,
params replicated, batch sharded over a 1-D 'data' mesh, one jax.jit with the state donated.
Timed rounds alternate between the two so machine noise hits both alike; medians are reported.

    python benchmarks/bench_step.py                                  # data=8 (pure data parallel)
    python benchmarks/bench_step.py --layout data=2,fsdp=2,tensor=2  # shardml on a 3-D mesh
"""

import shardml

shardml.emulate_cpu_devices(8)  # before any other JAX use; also avoids an XLA:CPU collective deadlock

import argparse
import dataclasses
import importlib.metadata
import math
import statistics
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from shardml import ShardmlError, TextBatches, TransformerConfig, layout_config, load_config, load_tokens, run_parts

import _readme  # benchmarks/ (this script's folder) is on sys.path

VOCAB = 256


# ----------------------------------------------------------------------------- baseline: plain NNX
def _init(std):
    return nnx.initializers.truncated_normal(stddev=std)  # same init as shardml's ParamSpec "normal"


def rotary(x, base=10000.0):  # x: [B, S, H, E]; rotates channel pairs (i, i + E/2)
    S, E = x.shape[1], x.shape[-1]
    inv_freq = base ** (-jnp.arange(0, E // 2, dtype=jnp.float32) * 2 / E)
    ang = jnp.arange(S, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Block(nnx.Module):
    def __init__(self, d, heads, d_ff, layers, dtype, rngs):
        out = 1.0 / math.sqrt(2 * layers)
        lin = partial(nnx.Linear, use_bias=False, dtype=dtype, rngs=rngs)
        self.heads = heads
        self.attn_norm = nnx.RMSNorm(d, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.wq, self.wk, self.wv = (lin(d, d, kernel_init=_init(d ** -0.5)) for _ in range(3))
        self.wo = lin(d, d, kernel_init=_init(out / math.sqrt(d)))
        self.mlp_norm = nnx.RMSNorm(d, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.w_gate = lin(d, d_ff, kernel_init=_init(d ** -0.5))
        self.w_up = lin(d, d_ff, kernel_init=_init(d ** -0.5))
        self.w_down = lin(d_ff, d, kernel_init=_init(out / math.sqrt(d_ff)))

    def __call__(self, x):
        B, S, D = x.shape
        h = self.attn_norm(x)
        q, k, v = (w(h).reshape(B, S, self.heads, D // self.heads) for w in (self.wq, self.wk, self.wv))
        o = jax.nn.dot_product_attention(rotary(q), rotary(k), v, is_causal=True)
        x = x + self.wo(o.reshape(B, S, D))
        h = self.mlp_norm(x)
        return x + self.w_down(jax.nn.silu(self.w_gate(h)) * self.w_up(h))


class Transformer(nnx.Module):
    def __init__(self, layers, d, heads, d_ff, dtype, rngs):
        self.embed = nnx.Embed(VOCAB, d, dtype=dtype, embedding_init=_init(1.0), rngs=rngs)
        self.blocks = nnx.List([Block(d, heads, d_ff, layers, dtype, rngs) for _ in range(layers)])
        self.final_norm = nnx.RMSNorm(d, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.unembed = nnx.Linear(d, VOCAB, use_bias=False, dtype=dtype, kernel_init=_init(d ** -0.5),
                                  preferred_element_type=jnp.float32, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.final_norm(x))


def build_baseline(args, ocfg, devices):
    model = Transformer(args.layers, args.d_model, args.heads, args.d_ff, jnp.dtype(args.dtype), nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    warmup = min(ocfg.warmup, args.total_steps - 1)
    schedule = optax.warmup_cosine_decay_schedule(ocfg.lr / (warmup + 1), ocfg.lr, warmup,
                                                  max(args.total_steps, warmup + 1), ocfg.lr * ocfg.min_lr_ratio)
    tx = optax.chain(optax.clip_by_global_norm(ocfg.clip_norm),
                     optax.adamw(schedule, b1=ocfg.b1, b2=ocfg.b2, weight_decay=ocfg.weight_decay))
    mesh = Mesh(np.array(devices), ("data",))
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    params = jax.device_put(params, repl)
    opt_state = jax.device_put(tx.init(params), repl)

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(batch["inputs"]).astype(jnp.float32)
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
            return jnp.sum(nll * batch["mask"]) / jnp.maximum(jnp.sum(batch["mask"]), 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, (params, opt_state), data


# ----------------------------------------------------------------------------- harness
def choices(field: str) -> tuple[str, ...]:
    """The values ``TransformerConfig.<field>`` accepts, as its field metadata declares them."""
    return next(f for f in dataclasses.fields(TransformerConfig) if f.name == field).metadata["shardml"]["choices"]


def shardml_config(args, grad_dtype: str):
    """The benchmark's transformer as a run config on ``--layout`` (a fresh mesh: ``data`` fills the
    devices unless given, the other axes are 1), with the default optimizer (``shardml.OptimConfig``)
    scheduled over the whole run."""
    base = load_config(None, [
        f"model.vocab={VOCAB}", f"model.layers={args.layers}", f"model.d_model={args.d_model}",
        f"model.heads={args.heads}", f"model.d_ff={args.d_ff}", f"model.dtype={args.dtype}",
        f"model.remat={args.remat}", f"model.layer_loop={args.layer_loop}", f"model.grad_dtype={grad_dtype}",
        f"data.seq_len={args.seq_len}",
        f"train.batch_size={args.batch_size}", f"train.steps={args.total_steps}", "train.microbatches=1"])
    return layout_config(base, ",".join(f"mesh.{part.strip()}" for part in args.layout.split(",")))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-ff", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--layout", default="data=8", help="shardml mesh, e.g. data=2,fsdp=2,tensor=2")
    ap.add_argument("--remat", default=TransformerConfig().remat, choices=choices("remat"),
                    help=f"shardml model.remat (default: shardml's, {TransformerConfig().remat})")
    ap.add_argument("--layer-loop", default=TransformerConfig().layer_loop, choices=choices("layer_loop"),
                    help=f"shardml model.layer_loop (default: shardml's, {TransformerConfig().layer_loop})")
    default_grad = TransformerConfig().grad_dtype
    ap.add_argument("--grad-dtype", default=[default_grad], type=_readme.comma_list(choices("grad_dtype")),
                    help=f"shardml model.grad_dtype (default: shardml's, {default_grad}: weight-gradient products in "
                         "bf16, as the baseline); a comma list (compute,float32) times each in the same rounds")
    ap.add_argument("--readme", default=None, help="also write the printed report as this file's bench_step section")
    args = ap.parse_args()
    args.total_steps = 1 + args.warmup + args.rounds * args.steps  # schedule length, same for both
    devices = jax.devices()
    assert len(devices) == 8, f"expected 8 emulated CPU devices, got {len(devices)}"

    source = TextBatches(load_tokens("pydoc"), args.batch_size, args.seq_len)  # the same batches for both
    host = [source.batch(s) for s in range(args.steps)]
    try:  # `shardml train`'s trainer per --grad-dtype, every one checked before anything compiles
        built = {g: run_parts(shardml_config(args, g)) for g in args.grad_dtype}
    except ShardmlError as err:
        raise SystemExit(f"--layout {args.layout}: {err}") from None
    ocfg = built[args.grad_dtype[0]].cfg.optim  # the baseline's optimizer settings: shardml's

    # shardml, once per --grad-dtype
    def shardml_runner(grad_dtype):
        tr = built[grad_dtype].trainer
        sm = {"state": tr.init(built[grad_dtype].cfg.train.seed), "batches": [tr.put(b) for b in host]}

        def sm_step(i):
            sm["state"], metrics = tr.step(sm["state"], sm["batches"][i % len(host)])
            return metrics["loss"], sm["state"]

        return sm_step

    shardml_names = {g: "shardml" if len(args.grad_dtype) == 1 else f"shardml[{g}]" for g in args.grad_dtype}

    # baseline
    bl_step_fn, bl_state, bl_sharding = build_baseline(args, ocfg, devices)
    bl = {"state": bl_state, "batches": [jax.device_put(b, bl_sharding) for b in host]}

    def bl_step(i):
        params, opt_state, loss = bl_step_fn(*bl["state"], bl["batches"][i % len(host)])
        bl["state"] = (params, opt_state)
        return loss, bl["state"]

    runners = {**{shardml_names[g]: shardml_runner(g) for g in args.grad_dtype}, "baseline": bl_step}
    first_loss, compile_s = {}, {}
    for name, run in runners.items():  # compile + first step (sanity: loss ~ ln 256 = 5.55)
        t0 = time.perf_counter()
        first_loss[name] = float(run(0)[0])
        compile_s[name] = time.perf_counter() - t0
        for i in range(args.warmup):
            jax.block_until_ready(run(i + 1))

    times = {name: [] for name in runners}
    for r in range(args.rounds):
        order = list(runners) if r % 2 == 0 else list(runners)[::-1]
        for name in order:
            run = runners[name]
            t0 = time.perf_counter()
            for i in range(args.steps):
                out = run(i)
            jax.block_until_ready(out)
            times[name].append(time.perf_counter() - t0)

    tokens = args.steps * args.batch_size * args.seq_len
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    print(f"model: layers={args.layers} d_model={args.d_model} heads={args.heads} d_ff={args.d_ff} "
          f"seq={args.seq_len} batch={args.batch_size} dtype={args.dtype}; "
          f"{args.rounds} rounds x {args.steps} steps, 8 cpu devices, ln(256)={math.log(VOCAB):.3f}")
    resolved = {g: built[g].cfg.model for g in args.grad_dtype}  # "auto" as run_parts() chose it here
    layouts = {shardml_names[g]: f"{args.layout} remat={resolved[g].remat} {resolved[g].layer_loop} grad={g}"
               for g in args.grad_dtype}
    layouts["baseline"] = "data=8 (params replicated)"
    print(f"{'':16} {'layout':32} {'first loss':>10} {'compile+1 s':>11} {'ms/step':>9} {'tokens/s':>10}")
    for name in runners:
        ms = 1e3 * statistics.median(times[name]) / args.steps
        print(f"{name:16} {layouts[name]:32} {first_loss[name]:10.4f} {compile_s[name]:11.2f} "
              f"{ms:9.2f} {tps[name]:10.0f}")
    for name in shardml_names.values():
        print(f"ratio {name}/baseline (tokens/s): {tps[name] / tps['baseline']:.3f}")
    print("per-round seconds: " + "; ".join(f"{n} " + " ".join(f"{t:.3f}" for t in ts) for n, ts in times.items()))


if __name__ == "__main__":
    # One README section per JAX minor version: the figures differ between them (benchmarks/README.md).
    jax_minor = ".".join(importlib.metadata.version("jax").split(".")[:2])
    with _readme.printed_section(_readme.option(sys.argv, "--readme"), f"bench_step-jax{jax_minor}",
                                 "benchmarks/bench_step.py", sys.argv[1:]):
        main()
