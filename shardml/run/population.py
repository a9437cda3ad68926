"""Population runs from a config: the loop's policy for PBT, early stopping and diverged members,
``population.json``, and Optuna generations.

    shardml train tiny population.kind=ensemble population.size=8 mesh.members=2
    shardml train tiny population.kind=sweep population.size=4 'optim.lr=[1e-3,3e-3,1e-2,3e-2]'
    shardml train tiny population.kind=pbt population.size=8 'optim.lr=loguniform(1e-4,1e-2)' \\
        population.ready_every=20

``OUT_DIR/population.json`` has one entry per member: its index, the ``overrides`` that train
exactly that member alone on the same devices (the population's command with them appended;
for PBT, until its first exploit), its hyperparameters at the end, final training and validation loss (and
accuracy), whether it was still training, and its PBT lineage; for ensembles also the ensemble's
metrics. ``metrics.jsonl`` holds one record per member per logged step, with a ``member`` field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from shardml.core.step import TrainState
from shardml.models.lora import member_settings_of
from shardml.parallel.members import GATE, hyperparams_of
from shardml.parallel.population import (Distribution, Member, active, ensemble_metrics, exploit_explore, freeze,
                                        parse_space)
from shardml.run import distributed
from shardml.run.engine import Mode, NonFiniteError, Policy, TrainSummary, notice
from shardml.run.search import member_overrides, search_key


class PopulationPolicy(Policy):
    """Between steps: PBT's exploit/explore every ``ready_every`` steps, a sweep's early stopping of
    its worst members every ``prune_every`` steps, and freezing (not stopping the run for) a member
    that had ``max_bad_steps`` non-finite steps in a row. Records PBT's lineage."""

    def __init__(self, trainer, kind: str, names: Sequence[str], seed: int, steps: int, max_bad_steps: int,
                 ready_every: int = 0, exploit_fraction: float = 0.25, prune_every: int = 0,
                 prune_fraction: float = 0.25):
        self.trainer, self.kind, self.names, self.seed, self.steps = trainer, kind, tuple(names), seed, steps
        self.max_bad_steps = max_bad_steps
        self.every = ready_every if kind == "pbt" else prune_every if kind == "sweep" else 0
        self.exploit_fraction, self.prune_fraction = exploit_fraction, prune_fraction
        self.lineage: list[dict] = []
        self.last_loss: np.ndarray | None = None
        shardings = trainer.state_shardings
        self._exploit = jax.jit(exploit_explore, static_argnames=("fraction", "names"),
                                out_shardings=(shardings, None))

    def due(self, step: int) -> bool:
        return bool(self.every) and (step + 1) % self.every == 0 and step + 1 < self.steps

    def _scores(self, val: dict | None) -> np.ndarray:
        if val and "loss" in val:
            return np.asarray(val["loss"], np.float64)
        return np.asarray(self.last_loss, np.float64)

    def at(self, step: int, state: TrainState, val: dict | None) -> TrainState:
        scores = np.nan_to_num(self._scores(val), nan=np.inf)
        if self.kind == "pbt":
            key = jax.random.fold_in(jax.random.key(self.seed), step)
            with jax.set_mesh(self.trainer.mesh):
                state, sources = self._exploit(state, scores, key, fraction=self.exploit_fraction, names=self.names)
            hyper = jax.device_get(hyperparams_of(state.opt_state))
            for member, source in enumerate(np.asarray(sources)):
                if source != member:
                    self.lineage.append({"step": step + 1, "member": member, "copied_from": int(source),
                                         "hyperparams": {n: float(hyper[n][member]) for n in self.names}})
            return state
        alive = np.flatnonzero(active(state))
        stop = max(0, min(int(self.prune_fraction * len(alive)), len(alive) - 1))
        if stop:
            worst = alive[np.argsort(scores[alive])[::-1][:stop]]
            notice(f"step {step + 1}: stopping members {sorted(worst.tolist())} (the worst {stop} of {len(alive)} "
                   "by validation loss)")
            state = freeze(state, worst.tolist())
        return state

    def on_metrics(self, step: int, metrics: dict, state: TrainState, saved) -> TrainState:
        self.last_loss = np.asarray(metrics["loss"])
        streak = np.asarray(metrics["bad_streak"])
        alive = active(state)
        diverged = np.flatnonzero((streak >= self.max_bad_steps) & alive)
        if len(diverged):
            notice(f"step {step + 1}: members {diverged.tolist()} had {self.max_bad_steps} non-finite steps in a row; "
                   "they are frozen, the others train on")
            state = freeze(state, diverged.tolist())
            if not active(state).any():
                raise NonFiniteError(f"step {step + 1}: every member of the population diverged (non-finite loss or "
                                     "gradients); lower optim.lr")
        return state


def member_report(members: Sequence[Member], summary: TrainSummary, policy: PopulationPolicy | None,
                  ensemble: dict | None) -> dict:
    """What ``population.json`` holds (see the module docstring)."""
    state = summary.state
    hyper = jax.device_get({**hyperparams_of(state.opt_state), **member_settings_of(state.params)})
    last = {}
    for record in summary.records:
        last[record.get("member", 0)] = record
    val = summary.val or {}
    entries = []
    for m in members:
        entry = {"member": m.index, "overrides": member_overrides(m, summary.mesh, summary.out_dir),
                 "init_seed": m.init_seed,
                 "hyperparams": {n: float(v[m.index]) for n, v in hyper.items() if n != GATE},
                 "train_loss": last.get(m.index, {}).get("loss"), "active": bool(hyper[GATE][m.index] > 0)}
        for key in ("loss", "accuracy"):
            if key in val:
                entry[f"val_{key}"] = float(val[key][m.index])
        if policy is not None and policy.lineage:
            entry["lineage"] = [e for e in policy.lineage if e["member"] == m.index]
        entries.append(entry)
    report: dict[str, Any] = {"members": entries}
    if ensemble is not None:
        report["ensemble"] = ensemble
    best = [e for e in entries if e.get("val_loss") is not None]
    if best:
        report["best"] = min(best, key=lambda e: e["val_loss"])["member"]
    return report


def population_mode(parts, lines: Sequence[str], reports: list | None = None) -> Mode:
    """What the driver plugs in for a population run ``parts`` describes: the policy between steps
    (:class:`PopulationPolicy`), and after training ``OUT_DIR/population.json`` (written by
    process 0; the report also appended to ``reports``) and the members' summary lines."""
    cfg = parts.cfg
    pop, t = cfg.population, cfg.train
    policy = PopulationPolicy(parts.trainer, pop.kind, sorted(pop.search), t.seed, t.steps, t.max_bad_steps,
                              pop.ready_every, pop.exploit_fraction, pop.prune_every, pop.prune_fraction)

    def report(summary: TrainSummary) -> list[str]:
        if summary.val is None:
            return []
        ensemble = final_ensemble(parts.trainer, summary, parts.eval_batches(), pop.kind)
        out = member_report(parts.members, summary, policy, ensemble)
        path = write_report(cfg.out_dir, out) if distributed.primary() else os.path.join(cfg.out_dir,
                                                                                         "population.json")
        if reports is not None:
            reports.append(out)
        return [f"done: {t.steps} steps of {pop.size} members in {summary.seconds:.1f}s (first step incl. compile "
                f"{summary.compile_seconds:.1f}s); {path}", *summary_lines(out, sorted(pop.search))]

    return Mode(lines, report, policy)


def write_report(out_dir: str, report: dict) -> str:
    path = os.path.join(out_dir, "population.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def final_ensemble(trainer, summary: TrainSummary, eval_batches: list[dict], kind: str) -> dict | None:
    """The ensemble's metrics on the evaluation data (ensembles only)."""
    if kind != "ensemble" or not eval_batches or summary.val is None:
        return None
    return ensemble_metrics(trainer, summary.state.params, eval_batches)


def summary_lines(report: dict, searched: Sequence[str]) -> list[str]:
    """What ``shardml train`` prints at the end of a population run."""
    lines = []
    for e in report["members"]:
        hyper = ", ".join(f"{k}={v:.3g}" for k, v in sorted(e["hyperparams"].items()) if k in searched)
        hyper = hyper or f"init_seed={e['init_seed']}"
        val = f", val loss {e['val_loss']:.4f}" if "val_loss" in e else ""
        acc = f", val accuracy {e['val_accuracy']:.4f}" if "val_accuracy" in e else ""
        lines.append(f"  member {e['member']}: {hyper}{val}{acc}{'' if e['active'] else ' (stopped)'}")
    if "ensemble" in report:
        ens = report["ensemble"]
        lines.append(f"  ensemble: val loss {ens['loss']:.4f}, accuracy {ens['accuracy']:.4f} (mean member "
                     f"{ens['mean_member_accuracy']:.4f}), ECE {ens['ece']:.4f}, entropy {ens['entropy']:.3f}, "
                     f"disagreement {ens['disagreement']:.3f}")
    if "best" in report:
        lines.append(f"  best member: {report['best']}")
    return lines


# ----------------------------------------------------------------------------- Optuna


def optuna_distributions(search: dict) -> dict:
    """Optuna's distribution of each searched hyperparameter: a list is categorical, a
    ``loguniform``/``uniform`` range a float distribution."""
    import optuna

    out = {}
    for name, spec in sorted(search.items()):
        space = parse_space(search_key(name), spec)
        if isinstance(space, Distribution):
            out[name] = optuna.distributions.FloatDistribution(space.low, space.high, log=space.kind == "loguniform")
        else:
            out[name] = optuna.distributions.CategoricalDistribution(space)
    return out


def optuna_study(out_dir: str, seed: int, pruner=None):
    """The run's study, stored in ``OUT_DIR/optuna.db`` so a rerun continues it (TPE sampler;
    ``pruner`` Optuna's, default none)."""
    import optuna

    os.makedirs(out_dir, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{os.path.abspath(os.path.join(out_dir, 'optuna.db'))}"
    return optuna.create_study(study_name="shardml", storage=storage, load_if_exists=True, direction="minimize",
                               sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner)


def generation_trials(study, generation: int, size: int, distributions: dict):
    """The trials of one generation: those asked before (a rerun continues them), else ``size`` new ones."""
    import optuna

    trials = sorted((t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("generation") == generation),
                    key=lambda t: t.user_attrs["member"])
    if trials:
        return trials, all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    asked = []
    for member in range(size):
        trial = study.ask(distributions)
        trial.set_user_attr("generation", generation)
        trial.set_user_attr("member", member)
        asked.append(trial)
    return [study.get_trials(deepcopy=False)[t.number] for t in asked], False


def tell(study, trials, report: dict) -> None:
    """Each trial's validation loss (its training loss without evaluation data); a stopped or
    diverged member is a failed trial."""
    import optuna

    for trial, entry in zip(trials, report["members"]):
        value = entry.get("val_loss", entry.get("train_loss"))
        if value is None or not np.isfinite(value) or not entry["active"]:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial.number, value)
