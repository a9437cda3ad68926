"""Architecture sweeps and heterogeneous ensembles from a config: ``model.*`` keys given a list train
every combination at once, each architecture on its own group of devices
(:mod:`shardml.parallel.groups`), ``population.size`` / architectures members each.

    shardml train tiny model.kind=mlp data.corpus=digits population.kind=sweep population.size=2 \\
        'model.d_ff=[16,64]'
    shardml plan tiny population.kind=ensemble population.size=2 'model.layers=[1,2]'   # one column per group

The devices are shared out by each architecture's cost (FLOPs per example); inside its group an
architecture takes ``mesh.members``, ``mesh.fsdp`` and ``mesh.tensor`` as given, ``data`` fills
the rest. ``OUT_DIR/population.json`` lists every member with its group, devices and the
``overrides`` that train exactly that member as a plain run; with ``population.kind=ensemble``
also the ensemble's metrics over every architecture (the mean of their probabilities).
``metrics.jsonl`` has one record per member per logged step (``group``, ``member``).
A sweep may also search ``optim.*`` (``'optim.lr=[1e-3,1e-2]'``): every group then holds the
search's members (its grid, or samples), so each architecture meets each optimizer setting.
Every group is checkpointed at the same steps (``checkpoint.every`` and the last step, and on
SIGTERM / SIGINT: :mod:`shardml.run.group_checkpoints`), so running the same command again
resumes a stopped or killed run where it was saved; a run of other ``model.*`` lists (or anything
else that changes what is trained) in the same ``out_dir`` is refused, ``--fresh`` moves it aside.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time

import jax

from shardml.core.checks import check_batch
from shardml.core.errors import SettingError
from shardml.core.mesh import layout_name
from shardml.core.optim import default_optimizer
from shardml.parallel.groups import (GroupSpec, Groups, GroupsHook, GroupsRun, build_groups, group_ensemble_metrics,
                                     train_groups)
from shardml.parallel.population import Member, hyperparam_arrays, plan_members
from shardml.run import config as config_lib
from shardml.run import distributed
from shardml.run.config import Config
from shardml.run.engine import evaluate
from shardml.run.errors import ConfigError, config_errors, keyed
from shardml.run.group_checkpoints import GroupCheckpoints
from shardml.run.metrics import MetricsWriter
from shardml.run.population import write_report
from shardml.run.recipe import data_source, model_of
from shardml.run.rules import validate
from shardml.run.run_dir import Identity, RunDir, trained_keys


def architectures(cfg: Config) -> list[list[str]]:
    """The ``model.*`` overrides of every architecture: the grid of ``population.models``.

    Example:
      >>> architectures(load_config("tiny", ["model.layers=[1,2]"]))   # doctest: +SKIP
      [['model.layers=1'], ['model.layers=2']]
    """
    names = sorted(cfg.population.models)
    grid = itertools.product(*(cfg.population.models[name] for name in names))
    return [[f"model.{name}={value}" for name, value in zip(names, combo)] for combo in grid]


def architecture_config(cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` as the plain config of one architecture (its model keys set, no population)."""
    plain = dataclasses.replace(cfg, population=dataclasses.replace(cfg.population, models={}, size=1,
                                                                    kind="ensemble"))
    return config_lib.apply_overrides(plain, overrides)


def group_layout(cfg: Config) -> dict[str, int]:
    """The layout inside every group: the config's members, fsdp and tensor, data filling the group."""
    m = cfg.mesh
    return {"members": m.members, "fsdp": m.fsdp, "tensor": m.tensor, "data": -1}


@dataclasses.dataclass(frozen=True)
class GroupParts:
    """A groups run of ``cfg``, built and checked (nothing compiled): its data, every
    architecture's overrides and config, and the groups."""

    cfg: Config
    data: object
    overrides: list[list[str]]
    configs: list[Config]
    groups: Groups
    plan: tuple[Member, ...] = ()  # each group's members (their seeds and optim values) when optim.* is searched

    @property
    def members(self) -> int:
        return self.cfg.population.size // len(self.overrides)


@config_errors
def build_architectures(cfg: Config, devices=None) -> GroupParts:
    """Validates ``cfg``, then builds every architecture's model and its group's trainer.

    Raises:
      ConfigError: before anything compiles, naming the keys (and the group) of what cannot work.
    """
    devices = list(devices if devices is not None else jax.devices())
    validate(cfg, len(devices))
    if cfg.population.sampler == "optuna":  # only the grid is known before training
        raise ConfigError("population.sampler=optuna picks the architectures while training, so they cannot be "
                          "built ahead; list the ones to plan with population.sampler=grid (model.d_ff=[16,64])",
                          subject="population.sampler", value="optuna")
    data = data_source(cfg)
    overrides = architectures(cfg)
    members = cfg.population.size // len(overrides)
    plan = group_members(cfg, len(overrides))
    configs, groups = build_groups_of(cfg, data, overrides, [members] * len(overrides), devices,
                                      hyperparam_arrays(plan) if plan else None)
    return GroupParts(cfg, data, overrides, configs, groups, tuple(plan))


def architecture_spec(cfg: Config, data, arch: list[str], members: int,
                      hyperparams: dict | None = None) -> tuple[Config, GroupSpec]:
    """One architecture's plain config and its group's spec (nothing built on devices yet)."""
    acfg = architecture_config(cfg, arch)
    with keyed(acfg):
        model, loss = model_of(acfg, data)
    return acfg, GroupSpec(model, default_optimizer(acfg.optim, cfg.train.steps), loss=loss, layout=group_layout(cfg),
                           members=members, hyperparams=hyperparams, microbatches=cfg.train.microbatches,
                           name=" ".join(arch), batch_size=cfg.train.batch_size)


def build_groups_of(cfg: Config, data, overrides: list[list[str]], members: list[int], devices,
                    hyperparams: dict | None = None) -> tuple[list[Config], Groups]:
    """The groups of the architectures ``overrides`` (``members[i]`` members of the i-th, every group
    with the members' ``hyperparams`` when given), built and checked on ``devices`` (nothing
    compiled), with each architecture's plain config."""
    configs, specs = [], []
    for arch, count in zip(overrides, members):
        acfg, spec = architecture_spec(cfg, data, arch, count, hyperparams)
        configs.append(acfg)
        specs.append(spec)
    groups = build_groups(specs, devices)
    for group in groups:
        with keyed(cfg):
            check_batch(cfg.train.batch_size, dict(group.trainer.mesh.shape), cfg.train.microbatches)
    return configs, groups


def group_members(cfg: Config, architectures: int) -> list[Member]:
    """The members every group holds when ``optim.*`` is searched (the same in every group: the
    sweep's grid, or its samples, over each architecture); none otherwise.

    Raises:
      ConfigError: a group's share of ``population.size`` that the grid does not divide.
    """
    pop, t = cfg.population, cfg.train
    if not pop.search:
        return []
    members = pop.size // architectures
    if members < 2:  # one model per group: nothing to spread the values over
        raise ConfigError(f"population.size={pop.size} with {architectures} architectures gives each group one member, "
                          f"so the optim.* search has nobody to spread over; use population.size="
                          f"{2 * architectures} or more (a multiple of {architectures})",
                          subject="population.size", value=pop.size)
    try:
        return plan_members(pop.kind, members, pop.search, t.seed, t.init_seed)
    except SettingError as err:
        raise ConfigError(f"population.size={pop.size} with {architectures} architectures gives each group "
                          f"{members} members, and the optim.* search cannot be spread over them ({err}); use "
                          f"population.size={architectures} x a multiple of the grid's points",
                          subject="population.size", value=pop.size) from None


def describe_groups(parts: GroupParts) -> list[str]:
    """One line per group: its architecture, devices, layout, parameters and members."""
    lines = [f"groups: {len(parts.groups)} architectures of {parts.members} member(s) each, "
             f"{parts.cfg.population.kind}"]
    for index, group in enumerate(parts.groups):
        trainer = group.trainer
        lines.append(f"  group {index} [{group.name}]: {len(group.devices)} devices "
                     f"({layout_name(trainer.mesh.shape)}), {trainer.model.num_params:,} parameters")
    return lines


def of_member(value, member: int, members: int):
    """A group's value for one member (a group of one model has no member axis)."""
    return value[member] if members > 1 else value


def member_entries(parts: GroupParts, run: GroupsRun, val: list[dict]) -> list[dict]:
    """``population.json``'s members: group by group, each with its plain-run overrides."""
    t, entries = parts.cfg.train, []
    base = t.init_seed if t.init_seed >= 0 else t.seed
    for index, (group, arch) in enumerate(zip(parts.groups, parts.overrides)):
        last = run.metrics[index][-1] if run.metrics[index] else {}
        for m in range(parts.members):
            hyper = parts.plan[m].hyperparams if parts.plan else {}
            entries.append({"index": len(entries), "group": index, "devices": len(group.devices),
                            "overrides": [*arch, *(f"optim.{k}={float(v)!r}" for k, v in sorted(hyper.items())),
                                          f"train.init_seed={base + m}"],
                            **({"hyperparams": {k: float(v) for k, v in hyper.items()}} if parts.plan else {}),
                            "final_loss": of_member(last["loss"], m, parts.members) if last else None,
                            **{f"val_{k}": of_member(v, m, parts.members) for k, v in val[index].items()}})
    return entries


def write_metrics(parts: GroupParts, run: GroupsRun) -> None:
    """``metrics.jsonl``: one record per member per logged step (the steps a plain run logs),
    rewritten whole from the run's history (a resumed run's history holds the steps before it)."""
    t, steps = parts.cfg.train, len(run.metrics[0])
    writer = MetricsWriter(parts.cfg.out_dir, start_step=-1)  # every record is written again
    for step in range(steps):
        if not (step in (0, t.steps - 1, steps - 1) or (step + 1) % t.log_every == 0):
            continue
        for index, history in enumerate(run.metrics):
            values = history[step]
            for m in range(parts.members):
                writer.write(step, {"group": index, "member": index * parts.members + m,
                                    **{k: of_member(v, m, parts.members) for k, v in values.items()
                                       if k in ("loss", "accuracy")}})
    writer.close()


def identity_of(cfg: Config) -> tuple[Identity, dict]:
    """The run's identity (what it trains: every ``model.*`` list included) and its config dict."""
    config = config_lib.to_dict(cfg)
    return Identity("groups", {}, None, trained_keys(config), config), config


def claim(cfg: Config, fresh: bool, notice) -> Identity:
    """Claims ``out_dir`` as a plain run does: the same experiment continues (its checkpoints are
    resumed), another one is refused naming the keys that differ, ``fresh`` moves it aside.

    Raises:
      ConfigError: before anything compiles.
    """
    if cfg.train.resume not in ("auto", "never"):
        raise ConfigError(f"train.resume={cfg.train.resume}: a groups run (model.* lists) resumes only its own "
                          "out_dir; use train.resume=auto (or never), and out_dir=THAT_RUN to continue it")
    ident, config = identity_of(cfg)
    RunDir(cfg.out_dir, resume=cfg.train.resume, fresh=fresh, notice=notice).claim(ident, config)
    return ident


def checkpoint_hook(cfg: Config, ckpts: GroupCheckpoints, stop) -> GroupsHook:
    """Saves every group each ``checkpoint.every`` steps, at the last step and when a stop is
    asked for (then stops)."""
    every, steps, stopping = cfg.checkpoint.every, cfg.train.steps, {}

    def due(done: int) -> bool:
        stopping[done] = stop.requested(done - 1)  # asked every step: processes agree on the same one
        return stopping[done] or done == steps or bool(every and done % every == 0)

    def act(done: int, run: GroupsRun) -> range:
        ckpts.save(done, run)
        return range(len(run.groups)) if stopping[done] and done < steps else range(0)

    return GroupsHook(due, act)


def run_groups(cfg: Config, parts: GroupParts, ident: Identity, say) -> tuple[GroupsRun, str | None, int]:
    """Resumes (or starts) every group and trains to ``train.steps``, checkpointing; returns the
    run, the stop signal if one stopped it, and the step it started from."""
    t, c = cfg.train, cfg.checkpoint
    ckpts = GroupCheckpoints(cfg.out_dir, parts.groups, ident, c.keep, c.async_save, say, distributed.primary())
    start, states, metrics = ckpts.resume(search=t.resume != "never")
    if states is not None:
        say(f"resuming every group from step {start}: {os.path.join(cfg.out_dir, 'checkpoints')}/group-*/{start}")
    if start >= t.steps and states is not None:
        say(f"nothing to train: the run in {cfg.out_dir} is at step {start} and steps={t.steps}")
    with distributed.stop_request() as stop:
        try:
            run = train_groups(parts.groups, parts.data.batch, max(t.steps, start), start=start, states=states,
                               metrics=metrics, seed=t.init_seed if t.init_seed >= 0 else t.seed,
                               hook=checkpoint_hook(cfg, ckpts, stop))
        finally:
            ckpts.close()  # waits for the last save
    done = len(run.metrics[0])
    return run, stop.signal if done < t.steps else None, start


@config_errors
def train_architectures(cfg: Config, verbose: bool = True, fresh: bool = False,
                        header: list[str] = ()) -> GroupsRun:
    """Trains every architecture of ``cfg`` at once, each on its group (see the module docstring);
    writes ``config.yaml``, ``run.json``, checkpoints, ``metrics.jsonl`` and ``population.json`` to
    ``out_dir``, after printing ``header`` and the groups. Running it again resumes the run.

    Raises:
      ConfigError: before anything compiles, also when ``out_dir`` holds another experiment
        (``fresh`` moves it aside).
    """
    say = print if verbose and distributed.primary() else (lambda *a, **k: None)
    parts = build_architectures(cfg)
    ident = claim(cfg, fresh, say)
    for line in [*header, *describe_groups(parts)]:
        say(line)
    began = time.perf_counter()
    run, stopped, start = run_groups(cfg, parts, ident, say)
    seconds = time.perf_counter() - began
    if distributed.primary():
        write_metrics(parts, run)
    if stopped:
        say(f"stopped by {stopped} after step {len(run.metrics[0])} of {cfg.train.steps}; saved every group's "
            f"checkpoint in {os.path.join(cfg.out_dir, 'checkpoints')}: run the same command again to resume")
        return run
    report = finish(parts, run)
    say(f"done: steps {start}..{cfg.train.steps} of {len(parts.groups)} groups in {seconds:.1f}s (incl. compile); "
        f"{report}; checkpoints of every group in {os.path.join(cfg.out_dir, 'checkpoints')}")
    return run


def finish(parts: GroupParts, run: GroupsRun) -> str | None:
    """Evaluates every group and writes ``population.json`` (process 0); returns its path."""
    cfg, t = parts.cfg, parts.cfg.train
    eval_batches = parts.data.eval_batches(t.eval_batches)
    params = [state.params for state in run.states]
    val = [evaluate(g.trainer, p, eval_batches) for g, p in zip(parts.groups, params)]
    report = {"kind": cfg.population.kind, "architectures": parts.overrides,
              "members": member_entries(parts, run, val)}
    if cfg.population.kind == "ensemble":
        report["ensemble"] = group_ensemble_metrics(parts.groups, params, eval_batches)
    return write_report(cfg.out_dir, report) if distributed.primary() else None
