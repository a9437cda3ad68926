"""``shardml train`` from Python: a config in, a trained run out (a thin caller of the loop).

    from shardml import load_config, train
    summary = train(load_config("tiny", ["train.steps=20"]))
    summary.val_loss
"""

from __future__ import annotations

import math

from shardml.core.mesh import describe
from shardml.run import config as config_lib
from shardml.run.loop import LoopSettings, TrainSummary, run_loop
from shardml.run.recipe import Parts, build


def loop_settings(cfg: config_lib.Config, fresh: bool = False, verbose: bool = True) -> LoopSettings:
    """The loop settings of a config's ``train`` and ``checkpoint`` sections."""
    t, c = cfg.train, cfg.checkpoint
    return LoopSettings(steps=t.steps, seed=t.seed, log_every=t.log_every, eval_every=t.eval_every,
                        out_dir=cfg.out_dir, checkpoint_every=c.every, checkpoint_keep=c.keep,
                        async_checkpoint=c.async_save, resume=t.resume, fresh=fresh, max_bad_steps=t.max_bad_steps,
                        verbose=verbose)


def describe_parts(parts: Parts) -> list[str]:
    """The lines ``shardml train`` prints before training: config, mesh, pipeline, model, data."""
    cfg = parts.cfg
    lines = [config_lib.dump_yaml(cfg).rstrip(), f"mesh: {describe(parts.trainer.mesh)}"]
    s = parts.schedule
    if s is not None:
        lines.append(f"pipeline: {s.name}, {s.stages} stages x {s.repeats} repeats, {s.microbatches} microbatches "
                     f"per pass, {cfg.train.microbatches} pass(es) per step; bubble {s.bubble:.1%}")
    data = parts.data
    what = (f"corpus '{data.tokens.name}': {len(data.tokens.train):,} train tokens, {len(data.tokens.val):,} "
            f"validation tokens" if hasattr(data, "tokens") else
            f"dataset '{data.examples.name}': {len(data.examples.x_train):,} train examples, "
            f"{len(data.examples.x_val):,} validation examples")
    lines.append(f"model: {parts.model.name}, {parts.model.num_params:,} parameters; {what}")
    return lines


def train(cfg: config_lib.Config, verbose: bool = True, fresh: bool = False) -> TrainSummary:
    """Trains the reference model ``cfg`` describes; returns the run's :class:`TrainSummary`.

    Writes ``out_dir/config.yaml``, ``out_dir/run.json``, ``out_dir/metrics.jsonl`` (plus
    TensorBoard events when tensorboardX is installed) and checkpoints in ``out_dir/checkpoints``.
    Everything is validated before anything compiles. With ``train.resume=auto`` a run found in
    ``out_dir`` is resumed; ``fresh`` moves it to ``out_dir/previous/`` and starts over instead.

    Raises:
      ConfigError: invalid config, or ``out_dir`` holds a run it must not overwrite.
      CheckpointError: ``out_dir`` has checkpoints and none is usable.
      NonFiniteError: ``train.max_bad_steps`` non-finite steps in a row.
    """
    parts = build(cfg)
    say = print if verbose else (lambda *a, **k: None)
    for line in describe_parts(parts):
        say(line)
    summary = run_loop(parts.trainer, parts.data, loop_settings(cfg, fresh, verbose), parts.eval_batches(),
                       config=config_lib.to_dict(cfg))
    if summary.val is not None and summary.records:
        final = summary.records[-1]
        baseline = (f" (uniform baseline ln {cfg.model.vocab} = {math.log(cfg.model.vocab):.4f})"
                    if cfg.model.kind == "transformer" else "")
        extra = f", validation accuracy {summary.val['accuracy']:.4f}" if "accuracy" in summary.val else ""
        say(f"done: {cfg.train.steps} steps in {summary.seconds:.1f}s (first step incl. compile "
            f"{summary.compile_seconds:.1f}s); final loss {final['loss']:.4f}, validation loss "
            f"{summary.val['loss']:.4f}{baseline}{extra}")
    return summary
