"""Optuna over architectures: a sweep with ``population.sampler=optuna`` whose ``model.*`` keys are
lists (Optuna's categorical choice) or integer ranges (``uniform(16,128)``, ``loguniform(16,128)``:
``suggest_int``, both ends included).

    shardml train tiny model.kind=mlp data.corpus=digits population.kind=sweep population.size=4 \\
        population.sampler=optuna 'model.d_ff=loguniform(16,128)' population.generations=3 \\
        population.pruner=median train.eval_every=10

Each generation Optuna (TPE, seeded by ``train.seed``) proposes ``population.size`` trials; trials
of one shape share a group (stacked as members, member i from ``init_seed + i``), and every
group trains at once on its own devices (:func:`shardml.train_groups`); each trial is told its
validation loss. A proposed shape the layout cannot split (a width ``mesh.tensor`` does not divide)
is told FAIL, logged, and another is asked. The study lives in ``OUT_DIR/optuna.db`` (a rerun
continues it, skipping told generations); ``OUT_DIR/gen-<g>/`` holds each generation's
``metrics.jsonl`` and ``population.json``, ``OUT_DIR/population.json`` every trial: its
``overrides`` (appended to the command without the population keys, they train exactly that
trial as a plain run), value, steps trained and whether it was pruned.

Pruning (``population.pruner=median``, Optuna's MedianPruner once a generation's worth of trials
completed): every ``train.eval_every`` steps each live trial reports its validation loss. A pruned
trial whose group holds no other live trial stops its group: the group is no longer dispatched and
its devices idle until the generation ends (a generation's groups are fixed when it compiles, so
they are not given to another trial). A pruned trial sharing its group with live ones is frozen
(its update gate 0) while they train on.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import jax
import numpy as np

from shardml.core.errors import ShardmlError
from shardml.core.mesh import layout_name
from shardml.parallel.groups import GroupsHook, GroupsRun, group_program, train_groups
from shardml.parallel.population import freeze
from shardml.run import config as config_lib
from shardml.run import distributed
from shardml.run.config import Config
from shardml.run.engine import evaluate, notice
from shardml.run.errors import ConfigError, config_errors
from shardml.run.groups import architecture_spec, build_groups_of, claim, of_member
from shardml.run.metrics import MetricsWriter
from shardml.run.population import optuna_study, write_report
from shardml.run.recipe import data_source
from shardml.run.rules import validate
from shardml.run.run_dir import Identity, RunDir, trained_keys
from shardml.run.search import model_space

MAX_ASKS = 20  # proposals per trial before a space that the layout mostly cannot split is refused


def model_distributions(models: dict) -> dict:
    """Optuna's distribution of each searched ``model.*`` key: a list is categorical, a range an
    integer distribution (log-scaled for ``loguniform``)."""
    import optuna

    out = {}
    for name, spec in sorted(models.items()):
        space = model_space(name, spec)
        if isinstance(space, list):
            out[name] = optuna.distributions.CategoricalDistribution(space)
        else:
            out[name] = optuna.distributions.IntDistribution(space[0], space[1], log=space[2])
    return out


def architecture_of(params: dict) -> list[str]:
    """A trial's ``model.*`` overrides.

    Example:
      >>> architecture_of({"layers": 2, "d_ff": 37})
      ['model.d_ff=37', 'model.layers=2']
    """
    return [f"model.{name}={value}" for name, value in sorted(params.items())]


def pruner_of(kind: str, size: int):
    """``median``: Optuna's MedianPruner, judging from the first ``size`` completed trials on."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=size) if kind == "median" else optuna.pruners.NopPruner()


def fits(cfg: Config, data, devices) -> Callable[[list[str]], str | None]:
    """``arch -> None``, or why its group's smallest layout cannot hold it (checked, not compiled)."""

    def check(arch: list[str]) -> str | None:
        try:
            _, spec = architecture_spec(cfg, data, arch, 1)
            group_program(spec, devices[:spec.quantum()])
        except ShardmlError as err:
            return str(err)
        return None

    return check


def generation_trials(study, generation: int, size: int, distributions: dict, fit, say):
    """The trials of one generation: those asked before (a rerun trains them again unless all were
    told), else ``size`` new ones whose shapes fit (a misfit is told FAIL and another asked)."""
    import optuna

    stored = sorted((t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("generation") == generation),
                    key=lambda t: t.user_attrs["member"])
    if stored:
        return stored, all(t.state.is_finished() for t in stored)
    numbers = []
    for member in range(size):
        for _ in range(MAX_ASKS):
            trial = study.ask(distributions)
            why = fit(architecture_of(trial.params))
            if why is None:
                break
            say(f"optuna: trial {trial.number} ({' '.join(architecture_of(trial.params))}) cannot train on this "
                f"layout, told FAIL: {why}")
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        else:
            raise ConfigError(f"optuna: {MAX_ASKS} proposals in a row do not fit the layout; narrow the model.* "
                              "ranges to sizes the mesh divides", subject="population.models", value=None)
        trial.set_user_attr("generation", generation)
        trial.set_user_attr("member", member)
        numbers.append(trial.number)
    trials = study.get_trials(deepcopy=False)
    return [trials[n] for n in numbers], False


def plan_groups(trials) -> list[tuple[list[str], list[int]]]:
    """``(architecture, trial positions)`` per group: trials of one shape share a group, in the
    order their shapes first appear.

    Example:
      >>> plan_groups([FrozenTrial(params={"d_ff": 16}), ..{"d_ff": 32}, ..{"d_ff": 16}])  # doctest: +SKIP
      [(['model.d_ff=16'], [0, 2]), (['model.d_ff=32'], [1])]
    """
    plan: dict[tuple, list[int]] = {}
    for position, trial in enumerate(trials):
        plan.setdefault(tuple(architecture_of(trial.params)), []).append(position)
    return [(list(arch), positions) for arch, positions in plan.items()]


def pruning_hook(study, trials, plan, groups, eval_batches, pruned: dict, every: int, steps: int,
                 say=notice) -> GroupsHook:
    """The :func:`shardml.train_groups` hook: every ``every`` steps (before the last) each live trial
    reports its validation loss; a pruned one is recorded in ``pruned`` (position -> step), its
    group stopped when no live trial is left in it, else the trial frozen."""
    import optuna

    handles = [optuna.trial.Trial(study, trial._trial_id) for trial in trials]

    def act(done: int, run: GroupsRun) -> list[int]:
        step, states, stop = done - 1, run.states, []
        for index, (_, positions) in enumerate(plan):
            live = [p for p in positions if p not in pruned]
            if not live:
                continue
            loss = evaluate(groups[index].trainer, states[index].params, eval_batches)["loss"]
            out = []
            for p in live:
                handles[p].report(float(of_member(loss, positions.index(p), len(positions))), step + 1)
                if handles[p].should_prune():
                    pruned[p] = step + 1
                    out.append(p)
            k = len(groups[index].devices)
            what = f"its {k} device{'s' * (k > 1)} idle until the generation ends" if out == live else \
                "frozen in its group, whose other trials train on"
            for p in out:
                say(f"optuna: trial {trials[p].number} pruned at step {step + 1}; {what}")
            if out == live:
                stop.append(index)
            elif out:
                states[index] = freeze(states[index], [positions.index(p) for p in out])
        return stop

    return GroupsHook(due=lambda done: done % every == 0 and done < steps, act=act)


def trial_entries(cfg: Config, trials, plan, groups, run, val: list[dict], pruned: dict) -> list[dict]:
    """``population.json``'s trials of one generation, in the order they were asked."""
    t, entries = cfg.train, []
    base = t.init_seed if t.init_seed >= 0 else t.seed
    for index, (arch, positions) in enumerate(plan):
        history, n = run.metrics[index], len(positions)
        for slot, p in enumerate(positions):
            steps = pruned.get(p, len(history))
            entry = {"trial": trials[p].number, "generation": trials[p].user_attrs["generation"],
                     "member": trials[p].user_attrs["member"], "group": index, "devices": len(groups[index].devices),
                     "params": dict(trials[p].params), "overrides": [*arch, f"train.init_seed={base + slot}"],
                     "steps": steps, "pruned": p in pruned,
                     "train_loss": of_member(history[steps - 1]["loss"], slot, n) if steps else None,
                     **{f"val_{k}": of_member(v, slot, n) for k, v in val[index].items()}}
            entry["value"] = entry.get("val_loss", entry["train_loss"])
            entries.append(entry)
    return sorted(entries, key=lambda e: e["member"])


def tell(study, entries: list[dict]) -> None:
    """Each trial's value (pruned ones as PRUNED; a non-finite one as FAIL)."""
    import optuna

    for entry in entries:
        value = entry["value"]
        if entry["pruned"]:
            study.tell(entry["trial"], state=optuna.trial.TrialState.PRUNED)
        elif value is None or not np.isfinite(value):
            study.tell(entry["trial"], state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(entry["trial"], float(value))


def write_trial_metrics(cfg: Config, entries: list[dict], run) -> None:
    """``metrics.jsonl``: one record per trial per logged step it trained (a pruned trial's stop early)."""
    t = cfg.train
    writer = MetricsWriter(cfg.out_dir, start_step=-1)
    members = {}
    for entry in entries:
        members.setdefault(entry["group"], []).append(entry)
    for step in range(t.steps):
        if not (step in (0, t.steps - 1) or (step + 1) % t.log_every == 0):
            continue
        for group, history in enumerate(run.metrics):
            for m, entry in enumerate(members[group]):
                if step < entry["steps"]:
                    writer.write(step, {"trial": entry["trial"], "group": group, "member": entry["member"],
                                        **{k: of_member(v, m, len(members[group])) for k, v in history[step].items()
                                           if k in ("loss", "accuracy")}})
    writer.close()


def train_generation(cfg: Config, data, study, trials, devices, say):
    """Trains one generation's trials at once (see the module docstring); returns the run and the
    trials' entries, told to the study and written to ``OUT_DIR/gen-<g>``."""
    t, pop = cfg.train, cfg.population
    plan = plan_groups(trials)
    _, groups = build_groups_of(cfg, data, [arch for arch, _ in plan], [len(ps) for _, ps in plan], devices)
    claim(cfg, True, lambda line: say(f"optuna: an earlier try of this generation: {line}"))
    for index, ((arch, positions), group) in enumerate(zip(plan, groups)):
        say(f"  group {index} [{' '.join(arch)}]: {len(group.devices)} devices ({layout_name(group.trainer.mesh.shape)})"
            f", {group.trainer.model.num_params:,} parameters, trials {[trials[p].number for p in positions]}")
    eval_batches = data.eval_batches(t.eval_batches)
    pruned: dict[int, int] = {}
    hook = (pruning_hook(study, trials, plan, groups, eval_batches, pruned, t.eval_every, t.steps)
            if pop.pruner != "none" else None)
    run = train_groups(groups, data.batch, t.steps, seed=t.init_seed if t.init_seed >= 0 else t.seed,
                       hook=hook)
    val = [evaluate(g.trainer, s.params, eval_batches) for g, s in zip(groups, run.states)]
    entries = trial_entries(cfg, trials, plan, groups, run, val, pruned)
    tell(study, entries)
    if distributed.primary():
        write_trial_metrics(cfg, entries, run)
        write_report(cfg.out_dir, {"kind": "sweep", "sampler": "optuna", "trials": entries})
    return run, entries


def earlier_entries(out_dir: str, generation: int) -> list[dict]:
    """A told generation's trials, as its ``population.json`` recorded them (none if it is gone)."""
    path = os.path.join(out_dir, f"gen-{generation}", "population.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f).get("trials", [])


@config_errors
def train_architecture_trials(cfg: Config, verbose: bool = True, fresh: bool = False, header: list[str] = ()):
    """Optuna's generations of architectures (see the module docstring); returns the last
    generation's :class:`shardml.GroupsRun` (None when every generation was told before).

    Raises:
      ConfigError: before anything compiles (a space, the layout, a missing ``optuna``, ``out_dir``).
    """
    say = print if verbose and distributed.primary() else (lambda *a, **k: None)
    devices = list(jax.devices())
    validate(cfg, len(devices))
    data = data_source(cfg)
    config = config_lib.to_dict(cfg)
    RunDir(cfg.out_dir, fresh=fresh, notice=notice).claim(
        Identity("groups-optuna", {}, None, trained_keys(config), config), config)
    for line in header:
        say(line)
    pop = cfg.population
    study = optuna_study(cfg.out_dir, cfg.train.seed, pruner_of(pop.pruner, pop.size))
    distributions, fit = model_distributions(pop.models), fits(cfg, data, devices)
    run, entries = None, []
    for generation in range(pop.generations):
        trials, done = generation_trials(study, generation, pop.size, distributions, fit, say)
        if done:
            say(f"optuna: generation {generation} already told ({len(trials)} trials); skipped")
            entries += earlier_entries(cfg.out_dir, generation)
            continue
        say(f"optuna: generation {generation}: trials {[trial.number for trial in trials]}")
        gen_cfg = dataclasses.replace(cfg, out_dir=os.path.join(cfg.out_dir, f"gen-{generation}"))
        run, told = train_generation(gen_cfg, data, study, trials, devices, say)
        entries += told
        if distributed.primary():
            write_report(cfg.out_dir, {"kind": "sweep", "sampler": "optuna", "trials": entries})
    done = [e for e in entries if e["value"] is not None and not e["pruned"]]
    if done:
        best = min(done, key=lambda e: e["value"])
        say(f"optuna: best trial {best['trial']}: {' '.join(best['overrides'][:-1])}, value {best['value']:.4f}; "
            f"{os.path.join(cfg.out_dir, 'population.json')}")
    return run
