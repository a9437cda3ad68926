"""The training loop: config in, metrics out. Thin on purpose; the work is in :mod:`shardml.step`.

    from shardml import load_config, train
    summary = train(load_config("tiny", ["train.steps=20"]))
    summary["val_loss"]

Checkpoints (:mod:`shardml.checkpoint`) are saved every ``checkpoint.every`` steps, at the end, and
when SIGTERM / SIGINT asks the run to stop; running the same config again resumes from the latest
valid one (:mod:`shardml.resume`), exactly: the batch of step s is a pure function of (seed, s).
"""

from __future__ import annotations

import math
import os
import sys
import time

import jax
import numpy as np

from shardml import config as config_lib
from shardml.checkpoint import Checkpointer
from shardml.data import load_corpus, train_batch, val_batches
from shardml.mesh import describe, make_mesh
from shardml.metrics import MetricsWriter, peak_flops, progress
from shardml.models import transformer
from shardml.pipeline import Schedule
from shardml.preemption import StopRequest
from shardml.resume import checkpoint_meta, claim_out_dir, resume_point
from shardml.step import build_trainer, default_optimizer, put_batch


class NonFiniteError(RuntimeError):
    """``train.max_bad_steps`` steps in a row had a non-finite loss or gradients."""


def notice(message: str) -> None:
    """Run events (resume, preemption, damaged checkpoints): stderr, also when not verbose."""
    print(f"shardml: {message}", file=sys.stderr, flush=True)


def evaluate(trainer, params, batches) -> float:
    """Mean loss per token over ``batches``: sums first, one division at the end."""
    totals = [trainer.evaluate(params, put_batch(b, trainer.batch_sharding)) for b in batches]
    loss_sum = sum(float(t["loss_sum"]) for t in totals)
    tokens = sum(float(t["tokens"]) for t in totals)
    return loss_sum / max(tokens, 1.0)


def train(cfg: config_lib.Config, verbose: bool = True, fresh: bool = False) -> dict:
    """Trains the reference transformer as ``cfg`` says; returns a summary of the run.

    Writes ``out_dir/config.yaml``, ``out_dir/metrics.jsonl`` (plus TensorBoard events when
    tensorboardX is installed) and checkpoints in ``out_dir/checkpoints``. Everything is validated
    before anything compiles. With ``train.resume=auto`` a run found in ``out_dir`` is resumed;
    ``fresh`` moves it to ``out_dir/previous/`` and starts over instead.

    Returns:
      ``state``, ``records`` (every metrics record of the run, also those written before a
      resume), ``val_loss`` (None if stopped early), ``out_dir``, ``mesh``, ``resumed_from`` (a
      step or None), ``preempted`` (the signal's name or None), ``bad_steps``, ``checkpoint``
      (the last one saved or restored).

    Raises:
      ConfigError: invalid config, or ``out_dir`` holds a run it must not overwrite.
      CheckpointError: ``out_dir`` has checkpoints and none is usable.
      NonFiniteError: ``train.max_bad_steps`` non-finite steps in a row (the last checkpoint is
        left as it was).
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
    claim_out_dir(cfg, fresh=fresh, notice=notice)  # refuses to overwrite another run, before any write

    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "config.yaml"), "w") as f:
        f.write(config_lib.dump_yaml(cfg))
    trainer = build_trainer(model, mesh, default_optimizer(cfg.optim, t.steps), microbatches=t.microbatches,
                            pipeline=cfg.pipeline)
    peak, peak_source = peak_flops(cfg.model.dtype)
    val_set = val_batches(corpus, t.batch_size, cfg.data.seq_len, t.eval_batches)
    start = time.perf_counter()
    begin = resume_point(cfg, trainer, notice=notice)  # the latest valid checkpoint, on this mesh
    writer = MetricsWriter(cfg.out_dir, start_step=begin.step)
    if writer.dropped:
        notice(f"metrics.jsonl: dropped {writer.dropped} record(s) after step {begin.step}; they are written again")
    bar = progress(t.steps, enabled=verbose)
    if bar is not None and begin.step:
        bar.update(min(begin.step, t.steps))
    checkpointer = Checkpointer(os.path.join(cfg.out_dir, "checkpoints"), keep=cfg.checkpoint.keep,
                                async_save=cfg.checkpoint.async_save)

    def batch_of(step):
        return put_batch(train_batch(corpus, step, t.batch_size, cfg.data.seq_len, t.seed), trainer.batch_sharding)

    state = begin.state if begin.state is not None else trainer.init(t.seed)
    clock = {"time": None, "step": begin.step}
    compile_s = 0.0
    records = list(writer.records)
    # Host-side counters of skipped (non-finite) steps; saved in every checkpoint.
    counters = {"bad_steps": 0, "bad_in_a_row": 0, **begin.counters}
    saved = {"step": begin.step, "path": begin.source}

    def log(step, metrics, val_loss):
        """Writes the record of ``step`` (0-based) if it is a logging step."""
        last = step == t.steps - 1
        if not (last or step == 0 or (step + 1) % t.log_every == 0 or val_loss is not None):
            return
        values = {k: float(np.asarray(v)) for k, v in metrics.items()}
        record = {"loss": values["loss"], "grad_norm": values["grad_norm"], "tokens_per_s": 0.0, "mfu": 0.0,
                  "bad_steps": counters["bad_steps"]}
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

    def finish(step, metrics, val_loss):
        """Counts a skipped step, logs, and stops after max_bad_steps non-finite steps in a row."""
        if int(np.asarray(metrics["skipped"])):
            counters["bad_steps"] += 1
            counters["bad_in_a_row"] += 1
        else:
            counters["bad_in_a_row"] = 0
        log(step, metrics, val_loss)
        if counters["bad_in_a_row"] >= t.max_bad_steps:
            last = (f"the last checkpoint, {saved['path']} (step {saved['step']}), is left as it was"
                    if saved["path"] else "no checkpoint had been saved")
            raise NonFiniteError(
                f"steps {step + 2 - counters['bad_in_a_row']}-{step + 1}: {counters['bad_in_a_row']} steps in a row "
                f"(train.max_bad_steps={t.max_bad_steps}) had a non-finite loss or gradients and were skipped; "
                f"stopping. {last[0].upper() + last[1:]}; lower optim.lr or check the data, then run again "
                "to resume from it")

    # The loop never waits on the device before queueing the next step: the metrics of step s are
    # read after step s + 1 has been dispatched (evaluation and checkpoint steps are the exceptions).
    pending, stop_signal = None, None
    with StopRequest() as stop:  # also covers the final wait for the last save
        try:
            for step in range(begin.step, t.steps):
                state, metrics = trainer.step(state, batch_of(step))
                if step == begin.step:
                    jax.block_until_ready(metrics)
                    compile_s = time.perf_counter() - start
                    clock["time"], clock["step"] = time.perf_counter(), step + 1
                val_loss = None
                if step == t.steps - 1 or (t.eval_every and (step + 1) % t.eval_every == 0):
                    jax.block_until_ready(state)  # training time ends here; evaluation time is not counted
                    eval_start = time.perf_counter()
                    val_loss = evaluate(trainer, state.params, val_set)
                    clock["time"] += time.perf_counter() - eval_start  # evaluation is not training throughput
                if pending is not None:
                    finish(*pending)
                pending = (step, metrics, val_loss)
                if bar is not None:
                    bar.update(1)
                every = cfg.checkpoint.every
                if step + 1 == t.steps or (every and (step + 1) % every == 0) or stop.signal:
                    finish(*pending)  # the counters saved must include this step
                    pending = None
                    # Returns once the state is on the host: the next step may take (donate) it.
                    saved["path"] = checkpointer.save(step + 1, state, checkpoint_meta(cfg, step + 1, counters,
                                                                                       mesh.shape))
                    saved["step"] = step + 1
                if stop.signal and step + 1 < t.steps:
                    stop_signal = stop.signal
                    break
            if pending is not None:
                finish(*pending)
        finally:
            checkpointer.close()  # waits until the last save is written and finalized
            if bar is not None:
                bar.close()
            writer.close()
    if stop_signal:
        notice(f"stopped by {stop_signal} after step {saved['step']} of {t.steps}; saved checkpoint {saved['path']}; "
               "run the same command again to resume")
    elif begin.step >= t.steps:
        notice(f"nothing to train: the run in {cfg.out_dir} is at step {begin.step} and train.steps={t.steps}")
    final = records[-1] if records else {}
    if not stop_signal and "val_loss" in final:
        say(f"done: {t.steps} steps in {time.perf_counter() - start:.1f}s (first step incl. compile {compile_s:.1f}s); "
            f"final loss {final['loss']:.4f}, validation loss {final['val_loss']:.4f} "
            f"(uniform baseline ln 256 = {math.log(256):.4f}); MFU against {peak_source}")
    return {"state": state, "records": records, "val_loss": None if stop_signal else final.get("val_loss"),
            "out_dir": cfg.out_dir, "mesh": dict(mesh.shape), "resumed_from": begin.step if begin.source else None,
            "preempted": stop_signal, "bad_steps": counters["bad_steps"], "checkpoint": saved["path"]}
