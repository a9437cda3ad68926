"""The training loop: config in, metrics out. Thin on purpose; the work is in :mod:`shardml.step`.

    from shardml import load_config, train
    summary = train(load_config("tiny", ["train.steps=20"]))
    summary["val_loss"]
"""

from __future__ import annotations

import math
import os
import time

import jax
import numpy as np

from shardml import config as config_lib
from shardml.data import load_corpus, train_batch, val_batches
from shardml.mesh import describe, make_mesh
from shardml.metrics import MetricsWriter, peak_flops, progress
from shardml.models import transformer
from shardml.pipeline import Schedule
from shardml.step import build_trainer, default_optimizer, put_batch


def evaluate(trainer, params, batches) -> float:
    """Mean loss per token over ``batches``: sums first, one division at the end."""
    totals = [trainer.evaluate(params, put_batch(b, trainer.batch_sharding)) for b in batches]
    loss_sum = sum(float(t["loss_sum"]) for t in totals)
    tokens = sum(float(t["tokens"]) for t in totals)
    return loss_sum / max(tokens, 1.0)


def train(cfg: config_lib.Config, verbose: bool = True) -> dict:
    """Trains the reference transformer as ``cfg`` says; returns a summary of the run.

    Writes ``out_dir/config.yaml`` and ``out_dir/metrics.jsonl`` (plus TensorBoard events when
    tensorboardX is installed). Everything is validated before anything compiles.
    """
    say = print if verbose else (lambda *a, **k: None)
    sizes = config_lib.validate(cfg, jax.device_count())
    if cfg.model.kind != "transformer":
        raise config_lib.ConfigError(f"shardml train runs model.kind=transformer; got '{cfg.model.kind}'")
    corpus = load_corpus(cfg.data.corpus, cfg.data.val_fraction)
    mesh = make_mesh(config_lib.MeshConfig(**sizes))
    model = transformer(cfg.model, cfg.data.seq_len)
    t = cfg.train
    say(config_lib.dump_yaml(cfg).rstrip())
    say(f"mesh: {describe(mesh)}")
    if sizes["pipeline"] > 1:
        pc = cfg.pipeline
        schedule = Schedule(pc.schedule, sizes["pipeline"], config_lib.pipeline_microbatches(cfg, sizes["pipeline"]),
                            pc.repeats)
        say(f"pipeline: {schedule.name}, {schedule.stages} stages x {schedule.repeats} repeats, "
            f"{schedule.microbatches} microbatches per pass, {t.microbatches} pass(es) per step; "
            f"bubble {schedule.bubble:.1%}")
    say(f"model: {model.num_params:,} parameters; corpus '{corpus.name}': {len(corpus.train):,} train bytes, "
        f"{len(corpus.val):,} validation bytes")

    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "config.yaml"), "w") as f:
        f.write(config_lib.dump_yaml(cfg))
    trainer = build_trainer(model, mesh, default_optimizer(cfg.optim, t.steps), microbatches=t.microbatches,
                            pipeline=cfg.pipeline)
    peak, peak_source = peak_flops(cfg.model.dtype)
    val_set = val_batches(corpus, t.batch_size, cfg.data.seq_len, t.eval_batches)
    writer = MetricsWriter(cfg.out_dir)
    bar = progress(t.steps, enabled=verbose)

    def batch_of(step):
        return put_batch(train_batch(corpus, step, t.batch_size, cfg.data.seq_len, t.seed), trainer.batch_sharding)

    start = time.perf_counter()
    state = trainer.init(t.seed)
    clock = {"time": None, "step": 0}
    compile_s = 0.0
    records = []

    def log(step, metrics, val_loss):
        """Writes the record of ``step`` (0-based) if it is a logging step."""
        last = step == t.steps - 1
        if not (last or step == 0 or (step + 1) % t.log_every == 0 or val_loss is not None):
            return
        values = {k: float(np.asarray(v)) for k, v in metrics.items()}
        record = {"loss": values["loss"], "grad_norm": values["grad_norm"], "tokens_per_s": 0.0, "mfu": 0.0}
        now, done = time.perf_counter(), step + 1 - clock["step"]
        if done > 0 and clock["time"] is not None:  # step 0 is compile time, never counted
            examples_per_s = done * t.batch_size / (now - clock["time"])
            record["tokens_per_s"] = examples_per_s * model.tokens_per_example
            record["mfu"] = examples_per_s * model.flops_per_example / peak
            clock["time"], clock["step"] = now, step + 1
        if val_loss is not None:
            record["val_loss"] = val_loss
        writer.write(step + 1, record)
        records.append({"step": step + 1, **record})
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.3g}",
                            mfu=f"{100 * record['mfu']:.1f}%")

    # The loop never waits on the device before queueing the next step: the metrics of step s are
    # read after step s + 1 has been dispatched (evaluation steps are the exception: they block).
    pending = None
    for step in range(t.steps):
        state, metrics = trainer.step(state, batch_of(step))
        if step == 0:
            jax.block_until_ready(metrics)
            compile_s = time.perf_counter() - start
            clock["time"], clock["step"] = time.perf_counter(), 1
        val_loss = None
        if step == t.steps - 1 or (t.eval_every and (step + 1) % t.eval_every == 0):
            jax.block_until_ready(state)  # training time ends here; evaluation time is not counted
            eval_start = time.perf_counter()
            val_loss = evaluate(trainer, state.params, val_set)
            clock["time"] += time.perf_counter() - eval_start  # evaluation is not training throughput
        if pending is not None:
            log(*pending)
        pending = (step, metrics, val_loss)
        if bar is not None:
            bar.update(1)
    log(*pending)
    if bar is not None:
        bar.close()
    writer.close()
    final = records[-1]
    say(f"done: {t.steps} steps in {time.perf_counter() - start:.1f}s (first step incl. compile {compile_s:.1f}s); "
        f"final loss {final['loss']:.4f}, validation loss {final['val_loss']:.4f} "
        f"(uniform baseline ln 256 = {math.log(256):.4f}); MFU against {peak_source}")
    return {"state": state, "records": records, "val_loss": final["val_loss"], "out_dir": cfg.out_dir,
            "mesh": dict(mesh.shape)}
