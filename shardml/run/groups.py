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
``metrics.jsonl`` has one record per member per logged step (``group``, ``member``). Such runs
write no checkpoints yet.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time

import jax

from shardml.core.checks import check_batch
from shardml.core.mesh import layout_name
from shardml.core.optim import default_optimizer
from shardml.parallel.groups import GroupSpec, Groups, GroupsRun, build_groups, group_ensemble_metrics, train_groups
from shardml.run import config as config_lib
from shardml.run import distributed
from shardml.run.config import Config
from shardml.run.engine import evaluate
from shardml.run.errors import ConfigError, config_errors, keyed
from shardml.run.metrics import MetricsWriter
from shardml.run.population import write_report
from shardml.run.recipe import data_source, model_of
from shardml.run.rules import validate
from shardml.run.run_dir import FRESH_HINT, Identity, RunDir, trained_keys


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
    configs, groups = build_groups_of(cfg, data, overrides, [members] * len(overrides), devices)
    return GroupParts(cfg, data, overrides, configs, groups)


def architecture_spec(cfg: Config, data, arch: list[str], members: int) -> tuple[Config, GroupSpec]:
    """One architecture's plain config and its group's spec (nothing built on devices yet)."""
    acfg = architecture_config(cfg, arch)
    with keyed(acfg):
        model, loss = model_of(acfg, data)
    return acfg, GroupSpec(model, default_optimizer(acfg.optim, cfg.train.steps), loss=loss, layout=group_layout(cfg),
                           members=members, microbatches=cfg.train.microbatches, name=" ".join(arch),
                           batch_size=cfg.train.batch_size)


def build_groups_of(cfg: Config, data, overrides: list[list[str]], members: list[int],
                    devices) -> tuple[list[Config], Groups]:
    """The groups of the architectures ``overrides`` (``members[i]`` members of the i-th), built and
    checked on ``devices`` (nothing compiled), with each architecture's plain config."""
    configs, specs = [], []
    for arch, count in zip(overrides, members):
        acfg, spec = architecture_spec(cfg, data, arch, count)
        configs.append(acfg)
        specs.append(spec)
    groups = build_groups(specs, devices)
    for group in groups:
        with keyed(cfg):
            check_batch(cfg.train.batch_size, dict(group.trainer.mesh.shape), cfg.train.microbatches)
    return configs, groups


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
            entries.append({"index": len(entries), "group": index, "devices": len(group.devices),
                            "overrides": [*arch, f"train.init_seed={base + m}"],
                            "final_loss": of_member(last["loss"], m, parts.members) if last else None,
                            **{f"val_{k}": of_member(v, m, parts.members) for k, v in val[index].items()}})
    return entries


def write_metrics(parts: GroupParts, run: GroupsRun) -> None:
    """``metrics.jsonl``: one record per member per logged step (the steps a plain run logs)."""
    t = parts.cfg.train
    writer = MetricsWriter(parts.cfg.out_dir, start_step=-1)  # a rerun starts over: no records kept
    for step in range(t.steps):
        if not (step in (0, t.steps - 1) or (step + 1) % t.log_every == 0):
            continue
        for index, history in enumerate(run.metrics):
            values = history[step]
            for m in range(parts.members):
                writer.write(step, {"group": index, "member": index * parts.members + m,
                                    **{k: of_member(v, m, parts.members) for k, v in values.items()
                                       if k in ("loss", "accuracy")}})
    writer.close()


def claim(cfg: Config, fresh: bool, notice) -> None:
    """Claims ``out_dir`` as a plain run does; a groups run keeps no checkpoints, so it cannot continue
    one it finds there: that is refused (``fresh`` moves it aside), never overwritten."""
    config = config_lib.to_dict(cfg)
    if not fresh and os.path.exists(os.path.join(cfg.out_dir, "metrics.jsonl")):
        raise ConfigError(f"out_dir {cfg.out_dir} already holds a run, and groups runs (model.* lists) do not resume "
                          f"yet: {FRESH_HINT}")
    RunDir(cfg.out_dir, fresh=fresh, notice=notice).claim(
        Identity("groups", {}, None, trained_keys(config), config), config)


@config_errors
def train_architectures(cfg: Config, verbose: bool = True, fresh: bool = False,
                        header: list[str] = ()) -> GroupsRun:
    """Trains every architecture of ``cfg`` at once, each on its group (see the module docstring);
    writes ``config.yaml``, ``run.json``, ``metrics.jsonl`` and ``population.json`` to ``out_dir``,
    after printing ``header`` and the groups.

    Raises:
      ConfigError: before anything compiles, also when ``out_dir`` holds a run (``fresh`` moves it aside).
    """
    say = print if verbose and distributed.primary() else (lambda *a, **k: None)
    parts = build_architectures(cfg)
    claim(cfg, fresh, say)
    for line in [*header, *describe_groups(parts)]:
        say(line)
    t = cfg.train
    start = time.perf_counter()
    run = train_groups(parts.groups, parts.data.batch, t.steps, seed=t.init_seed if t.init_seed >= 0 else t.seed)
    seconds = time.perf_counter() - start
    eval_batches = parts.data.eval_batches(t.eval_batches)
    params = [state.params for state in run.states]
    val = [evaluate(g.trainer, p, eval_batches) for g, p in zip(parts.groups, params)]
    report = {"kind": cfg.population.kind, "architectures": parts.overrides,
              "members": member_entries(parts, run, val)}
    if cfg.population.kind == "ensemble":
        report["ensemble"] = group_ensemble_metrics(parts.groups, params, eval_batches)
    if distributed.primary():
        write_metrics(parts, run)
        say(f"done: {t.steps} steps of {len(parts.groups)} groups in {seconds:.1f}s (incl. compile); "
            f"{write_report(cfg.out_dir, report)} (no checkpoints: groups runs do not write them yet)")
    return run
