"""``shardml train`` from Python: a config in, a trained run out (a thin caller of the loop).

    from shardml import load_config, train
    summary = train(load_config("tiny", ["train.steps=20"]))
    summary.val_loss
"""

from __future__ import annotations

import math

import jax

from shardml.core.mesh import describe
from shardml.run import config as config_lib
from shardml.run.loop import LoopSettings, TrainSummary, run_loop
from shardml.run.errors import config_errors
from shardml.run.recipe import Parts, build


def loop_settings(cfg: config_lib.Config, fresh: bool = False, verbose: bool = True) -> LoopSettings:
    """The loop settings of a config's ``train`` and ``checkpoint`` sections."""
    t, c = cfg.train, cfg.checkpoint
    seed = t.init_seed if t.init_seed >= 0 else t.seed
    return LoopSettings(steps=t.steps, seed=seed, log_every=t.log_every, eval_every=t.eval_every,
                        out_dir=cfg.out_dir, checkpoint_every=c.every, checkpoint_keep=c.keep,
                        async_checkpoint=c.async_save, resume=t.resume, fresh=fresh, max_bad_steps=t.max_bad_steps,
                        verbose=verbose, workers=cfg.data.workers)


def describe_parts(parts: Parts) -> list[str]:
    """The lines ``shardml train`` prints before training: config, mesh, pipeline, model, data."""
    cfg = parts.cfg
    lines = [config_lib.dump_yaml(cfg).rstrip(), f"mesh: {describe(parts.trainer.mesh)}"]
    s = parts.schedule
    if s is not None:
        lines.append(f"pipeline: {s.name}, {s.stages} stages x {s.repeats} repeats, {s.microbatches} microbatches "
                     f"per pass, {cfg.train.microbatches} pass(es) per step; bubble {s.bubble:.1%}")
    data = parts.data.sources[0] if hasattr(parts.data, "sources") else parts.data
    what = (f"corpus '{data.tokens.name}': {len(data.tokens.train):,} train tokens, {len(data.tokens.val):,} "
            f"validation tokens" if hasattr(data, "tokens") else
            f"dataset '{data.examples.name}': {len(data.examples.x_train):,} train examples, "
            f"{len(data.examples.x_val):,} validation examples")
    lines.append(f"model: {parts.model.name}, {parts.model.num_params:,} parameters; {what}")
    if parts.members:
        pop = cfg.population
        lines.append(f"population: {pop.kind} of {pop.size} members, {pop.size // parts.sizes['members']} per device "
                     f"group of mesh.members={parts.sizes['members']}" + (", bootstrap data" if pop.bootstrap else ""))
    return lines


@config_errors
def train(cfg: config_lib.Config, verbose: bool = True, fresh: bool = False) -> TrainSummary:
    """Trains the reference model ``cfg`` describes; returns the run's :class:`TrainSummary`.

    Writes ``out_dir/config.yaml``, ``out_dir/run.json``, ``out_dir/metrics.jsonl`` (plus
    TensorBoard events when tensorboardX is installed) and checkpoints in ``out_dir/checkpoints``;
    a byte-level language model that finished also prints a few samples and writes them to
    ``out_dir/samples.txt``.
    Everything is validated before anything compiles. With ``train.resume=auto`` a run found in
    ``out_dir`` is resumed; ``fresh`` moves it to ``out_dir/previous/`` and starts over instead.

    Raises:
      ConfigError: invalid config, or ``out_dir`` holds a run it must not overwrite.
      CheckpointError: ``out_dir`` has checkpoints and none is usable.
      NonFiniteError: ``train.max_bad_steps`` non-finite steps in a row.
    """
    from shardml.run.distributed import primary, start

    start()  # a cluster jax.distributed detects, before JAX's backend starts (no-op once started)
    parts = build(cfg)
    if cfg.federated.algorithm != "none":  # train.steps counts rounds
        from shardml.run.federated import train_federated

        return train_federated(parts, verbose, fresh)
    say = print if verbose and primary() else (lambda *a, **k: None)  # process 0 prints
    for line in describe_parts(parts):
        say(line)
    if parts.members and cfg.population.sampler == "optuna":
        return _train_optuna(cfg, say, fresh, verbose)
    if parts.members:
        return _train_population(parts, cfg, say, fresh, verbose)
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
    # Samples are decoded on one process (generate reads whole arrays; not yet across processes).
    if summary.val is not None and not summary.preempted and cfg.model.kind == "transformer" and \
            cfg.data.tokenizer == "byte" and jax.process_count() == 1:
        from shardml.run.inference import write_samples

        write_samples(parts, summary.state.params, int(summary.state.step), say)
    return summary


def _train_population(parts: Parts, cfg: config_lib.Config, say, fresh: bool, verbose: bool,
                      report_to: list | None = None) -> TrainSummary:
    from shardml.run.population import PopulationPolicy, final_ensemble, member_report, summary_lines, write_report

    pop, t = cfg.population, cfg.train
    policy = PopulationPolicy(parts.trainer, pop.kind, sorted(pop.search), t.seed, t.steps, t.max_bad_steps,
                              pop.ready_every, pop.exploit_fraction, pop.prune_every, pop.prune_fraction)
    eval_batches = parts.eval_batches()
    summary = run_loop(parts.trainer, parts.data, loop_settings(cfg, fresh, verbose), eval_batches,
                       config=config_lib.to_dict(cfg), policy=policy)
    if summary.preempted or summary.val is None:
        return summary
    report = member_report(parts.members, summary, policy, final_ensemble(parts.trainer, summary, eval_batches,
                                                                          pop.kind))
    path = write_report(cfg.out_dir, report)
    if report_to is not None:
        report_to.append(report)
    say(f"done: {t.steps} steps of {pop.size} members in {summary.seconds:.1f}s (first step incl. compile "
        f"{summary.compile_seconds:.1f}s); {path}")
    for line in summary_lines(report, sorted(pop.search)):
        say(line)
    return summary


def _train_optuna(cfg: config_lib.Config, say, fresh: bool, verbose: bool) -> TrainSummary:
    """``population.sampler=optuna``: per generation, Optuna's TPE proposes ``population.size``
    trials, which train together as one population in ``OUT_DIR/gen-<g>``; their validation losses
    are told back. The study lives in ``OUT_DIR/optuna.db``: a rerun continues it."""
    import dataclasses
    import os

    from shardml.parallel.population import Member
    from shardml.run.population import generation_trials, optuna_distributions, optuna_study, tell
    from shardml.run.resume import move_aside

    pop, t = cfg.population, cfg.train
    if fresh:
        move_aside(cfg.out_dir)  # the study and the generations' runs too
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
        summary = _train_population(build(gen_cfg, members=members), gen_cfg, say, False, verbose, reports)
        if summary.preempted or not reports:
            return summary
        tell(study, trials, reports[0])
    best = study.best_trial if any(tr.value is not None for tr in study.get_trials(deepcopy=False)) else None
    if best is not None:
        say(f"optuna: best trial {best.number}: {best.params}, value {best.value:.4f} (study in "
            f"{os.path.join(cfg.out_dir, 'optuna.db')})")
    return summary
