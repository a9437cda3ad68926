"""``shardml train`` from Python: a config in, a trained run out. One driver for plain, population
(grid and Optuna generations) and federated runs: describe, print, run the loop, report; the
mode-specific parts are a :class:`~shardml.run.engine.Mode` (what is printed, the policy between
steps, the report). Only process 0 prints.

    from shardml import load_config, train
    summary = train(load_config("tiny", ["train.steps=20"]))
    summary.val_loss
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable

import jax

from shardml.core.mesh import describe
from shardml.parallel.population import Member
from shardml.run import config as config_lib
from shardml.run import distributed
from shardml.run.errors import config_errors
from shardml.run.engine import LoopSettings, Mode, TrainSummary, notice, run_loop
from shardml.run.federated import federated_mode
from shardml.run.group_trials import train_architecture_trials
from shardml.run.groups import train_architectures
from shardml.run.hf import from_checkpoint
from shardml.run.inference import write_samples
from shardml.run.population import (generation_trials, optuna_distributions, optuna_study, population_mode,
                                    tell)
from shardml.run.recipe import Parts, build
from shardml.run.run_dir import RunDir, default_out_dir, identity

Say = Callable[[str], None]


def loop_settings(cfg: config_lib.Config, fresh: bool = False, verbose: bool = True) -> LoopSettings:
    """The loop settings of a config's ``train`` and ``checkpoint`` sections."""
    t, c = cfg.train, cfg.checkpoint
    seed = t.init_seed if t.init_seed >= 0 else t.seed
    return LoopSettings(steps=t.steps, seed=seed, log_every=t.log_every, eval_every=t.eval_every,
                        out_dir=cfg.out_dir, checkpoint_every=c.every, checkpoint_keep=c.keep,
                        async_checkpoint=c.async_save, resume=t.resume, fresh=fresh, max_bad_steps=t.max_bad_steps,
                        verbose=verbose, workers=cfg.data.workers)


def config_lines(cfg: config_lib.Config, full: bool = False) -> list[str]:
    """The run header's first lines: what is trained and where, and where the full resolved config
    is (``OUT_DIR/config.yaml``); ``full`` (``shardml train --verbose``) prints the config itself.

        config_lines(load_config("tiny"))   # ["train: 10 steps of batch 16, optim.lr=0.003; ...", "config: ..."]
    """
    t, path = cfg.train, os.path.join(cfg.out_dir, "config.yaml")
    lines = [config_lib.dump_yaml(cfg).rstrip()] if full else []
    lines.append(f"train: {t.steps} steps of batch {t.batch_size}, optim.lr={cfg.optim.lr:g}; out_dir {cfg.out_dir}")
    lines.append(f"config: {path} holds the full resolved config" + ("" if full else " (--verbose prints it)"))
    return lines


def lora_lines(parts: Parts) -> list[str]:
    """``lora.rank`` > 0: what trains (the adapters' count) and what the frozen base is."""
    lo = parts.cfg.lora
    if not lo.rank:
        return []
    adapters = sum(math.prod(x.shape) for x in jax.tree.leaves(parts.model.abstract_params["adapters"]))
    base = f"model.from={parts.cfg.model.from_}" if parts.cfg.model.from_ else "a random base (fixed seed)"
    own = parts.model.config.per_member  # searched: each member's value is in population.json
    alpha = "per member" if "lora_alpha" in own else f"{lo.alpha:g}"
    dropout = "per member" if "lora_dropout" in own else f"{lo.dropout:g}"
    return [f"lora: rank {lo.rank} on {lo.targets} (alpha {alpha}, dropout {dropout}): {adapters:,} "
            f"adapter parameters train; {base} is frozen"]


def describe_parts(parts: Parts) -> list[str]:
    """The lines ``shardml train`` prints before training after :func:`config_lines`: mesh,
    pipeline, model, data, population."""
    cfg = parts.cfg
    lines = [f"mesh: {describe(parts.trainer.mesh)}"]
    s = parts.schedule
    if s is not None:
        lines.append(f"pipeline: {s.name}, {s.stages} stages x {s.repeats} repeats, {s.microbatches} microbatches "
                     f"per pass, {cfg.train.microbatches} pass(es) per step; bubble {s.bubble:.1%}")
    data = parts.data.sources[0] if hasattr(parts.data, "sources") else parts.data
    what = (data.describe() if hasattr(data, "describe") else
            f"corpus '{data.tokens.name}': {len(data.tokens.train):,} train tokens, {len(data.tokens.val):,} "
            f"validation tokens" if hasattr(data, "tokens") else
            f"dataset '{data.examples.name}': {len(data.examples.x_train):,} train examples, "
            f"{len(data.examples.x_val):,} validation examples")
    lines.append(f"model: {parts.model.name}, {parts.model.num_params:,} parameters; {what}")
    lines += lora_lines(parts)
    if parts.members:
        pop = cfg.population
        lines.append(f"population: {pop.kind} of {pop.size} members, {pop.size // parts.sizes['members']} per device "
                     f"group of mesh.members={parts.sizes['members']}" + (", bootstrap data" if pop.bootstrap else ""))
    return lines


def plain_mode(parts: Parts, say: Say) -> Mode:
    """One model: the final losses after training, and a few samples of a byte-level language model."""
    cfg = parts.cfg

    def report(summary: TrainSummary) -> list[str]:
        if summary.val is None or not summary.records:
            return []
        final = summary.records[-1]
        baseline = (f" (uniform baseline ln {cfg.model.vocab} = {math.log(cfg.model.vocab):.4f})"
                    if cfg.model.kind == "transformer" else "")
        extra = f", validation accuracy {summary.val['accuracy']:.4f}" if "accuracy" in summary.val else ""
        say(f"done: {cfg.train.steps} steps in {summary.seconds:.1f}s (first step incl. compile "
            f"{summary.compile_seconds:.1f}s); final loss {final['loss']:.4f}, validation loss "
            f"{summary.val['loss']:.4f}{baseline}{extra}")
        # Samples are decoded on one process (generate reads whole arrays; not yet across processes).
        # (not of SFT data or an imported checkpoint's: their tokens are a checkpoint tokenizer's, not bytes)
        byte_text = cfg.data.tokenizer == "byte" and not cfg.data.sft and not cfg.model.from_
        if cfg.model.kind == "transformer" and byte_text and jax.process_count() == 1:
            write_samples(parts, summary.state.params, int(summary.state.step), say)
        return []

    return Mode(describe_parts(parts), report)


def mode_of(parts: Parts, say: Say) -> Mode:
    """The mode a config's run takes: federated, population or plain."""
    if parts.cfg.federated.algorithm != "none":
        return federated_mode(parts)
    if parts.members:
        return population_mode(parts, describe_parts(parts))
    return plain_mode(parts, say)


def drive(cfg: config_lib.Config, parts: Parts, mode: Mode, settings: LoopSettings, say: Say) -> TrainSummary:
    """The one driver: prints ``mode.lines``, runs the loop, prints the report of a finished run."""
    for line in mode.lines:
        say(line)
    summary = run_loop(parts.trainer, parts.data, settings, parts.eval_batches(), config=config_lib.to_dict(cfg),
                       policy=mode.policy, init=parts.initial, frozen=parts.frozen)
    if not summary.preempted:
        for line in mode.report(summary):
            say(line)
    return summary


def _say(verbose: bool) -> Say:
    return print if verbose and distributed.primary() else (lambda *a, **k: None)  # process 0 prints


def with_default_out_dir(cfg: config_lib.Config) -> config_lib.Config:
    """``cfg`` with ``{experiment}`` in ``out_dir`` filled in (see :func:`shardml.run.run_dir.default_out_dir`)."""
    out_dir = default_out_dir(cfg.out_dir, config_lib.to_dict(cfg))
    return cfg if out_dir == cfg.out_dir else dataclasses.replace(cfg, out_dir=out_dir)


@config_errors
def train(cfg: config_lib.Config, verbose: bool = True, fresh: bool = False,
          full_config: bool = False) -> TrainSummary:
    """Trains the reference model ``cfg`` describes; returns the run's :class:`TrainSummary`.

    Prints (``verbose``) a short header - what is trained and where, the mesh, the model and data -
    then a progress bar; ``full_config`` prints the whole resolved config too (``--verbose``).

    Writes ``out_dir/config.yaml``, ``out_dir/run.json``, ``out_dir/metrics.jsonl`` (plus
    TensorBoard events when tensorboardX is installed) and checkpoints in ``out_dir/checkpoints``;
    a byte-level language model that finished also prints a few samples and writes them to
    ``out_dir/samples.txt``; a population ``population.json``, a federated run ``federated.json``.
    Everything is validated before anything compiles. With ``train.resume=auto`` a run found in
    ``out_dir`` is resumed when it trains the same thing; ``fresh`` moves it to
    ``out_dir/previous/`` and starts over instead.

    Raises:
      ConfigError: invalid config, or ``out_dir`` holds a run it must not continue or overwrite
        (another model, population kind, federated algorithm or data: the keys are named).
      CheckpointError: ``out_dir`` has checkpoints and none is usable.
      NonFiniteError: ``train.max_bad_steps`` non-finite steps in a row.

    With ``model.*`` lists (``population.models``) every architecture trains at once on its own
    group of devices and this returns a :class:`shardml.GroupsRun` (:mod:`shardml.run.groups`).
    """
    distributed.start()  # a cluster jax.distributed detects, before JAX's backend starts (no-op once started)
    cfg = from_checkpoint(with_default_out_dir(cfg))  # config.yaml records model.from's shape
    if cfg.population.models and cfg.population.sampler == "optuna":
        return train_architecture_trials(cfg, verbose, fresh, config_lines(cfg, full_config))
    if cfg.population.models:
        return train_architectures(cfg, verbose, fresh, config_lines(cfg, full_config))
    parts = build(cfg)
    say = _say(verbose)
    for line in config_lines(cfg, full_config):
        say(line)
    if parts.members and cfg.population.sampler == "optuna":
        return train_optuna(cfg, parts, say, fresh, verbose)
    return drive(cfg, parts, mode_of(parts, say), loop_settings(cfg, fresh, verbose), say)


def train_optuna(cfg: config_lib.Config, parts: Parts, say: Say, fresh: bool, verbose: bool) -> TrainSummary | None:
    """``population.sampler=optuna``: per generation, Optuna's TPE proposes ``population.size``
    trials, which train together as one population in ``OUT_DIR/gen-<g>``; their validation losses
    are told back. The study lives in ``OUT_DIR/optuna.db``: a rerun continues it, a rerun that
    trains something else is refused like any run."""
    pop, t = cfg.population, cfg.train
    run_dir = RunDir(cfg.out_dir, fresh=fresh, notice=notice)  # the study's directory; fresh moves it all aside
    run_dir.claim(identity(parts.trainer, getattr(parts.data, "fingerprint", None), config_lib.to_dict(cfg)),
                  config_lib.to_dict(cfg))
    for line in describe_parts(parts):
        say(line)
    study = optuna_study(cfg.out_dir, t.seed)
    distributions = optuna_distributions(pop.search)
    base = t.init_seed if t.init_seed >= 0 else t.seed
    summary = None
    for generation in range(pop.generations):
        trials, done = generation_trials(study, generation, pop.size, distributions)
        if done:
            say(f"optuna: generation {generation} already told ({len(trials)} trials); skipped")
            continue
        members = [Member(i, base + i, dict(trial.params)) for i, trial in enumerate(trials)]
        gen_cfg = dataclasses.replace(cfg, out_dir=os.path.join(cfg.out_dir, f"gen-{generation}"))
        say(f"optuna: generation {generation}: trials {[trial.number for trial in trials]}")
        reports: list = []
        gen = build(gen_cfg, members=members)
        summary = drive(gen_cfg, gen, population_mode(gen, (), reports), loop_settings(gen_cfg, False, verbose), say)
        if summary.preempted or not reports:
            return summary
        tell(study, trials, reports[0])
    best = study.best_trial if any(tr.value is not None for tr in study.get_trials(deepcopy=False)) else None
    if best is not None:
        say(f"optuna: best trial {best.number}: {best.params}, value {best.value:.4f} (study in "
            f"{os.path.join(cfg.out_dir, 'optuna.db')})")
    return summary
