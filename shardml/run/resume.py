"""Where a run starts: the latest valid checkpoint of ``out_dir``, a given checkpoint, or step 0.

``resume="auto"`` (the default) makes re-running the same command resume the run, so a job that
died (preempted, killed, OOM) is restarted by running it again. What is never done silently:

- an ``out_dir`` holding a run of another model (other parameter shapes) is an error, and so is
  resuming with another data stream (another corpus, seed, batch size, sequence length): the
  batches after the checkpoint would not be the run's;
- nothing is deleted: ``fresh=True`` (``shardml train --fresh``) moves the previous run's files to
  ``out_dir/previous/<time>/``, and damaged checkpoints go to ``checkpoints-damaged/``.

A run is identified by :func:`identity`: its model's parameter shapes, its data source's
fingerprint and (for config runs) its config; ``out_dir/run.json`` and every checkpoint keep it.

    claim_out_dir(out_dir, ident, resume="auto")     # before anything is written to out_dir
    start = resume_point(out_dir, "auto", trainer, ident)
    state = start.state if start.state is not None else trainer.init(seed)
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from shardml.core.errors import ConfigError
from shardml.run import checkpoint as ckpt
from shardml.run.config import flat_dict

# What a run writes into out_dir (moved aside together by a fresh start); shell patterns.
RUN_FILES = ("checkpoints", "checkpoints-damaged", "metrics.jsonl", "config.yaml", "run.json", "tb", "samples.txt",
             "tokenizer.json", "population.json", "federated.json", "predictions.npz", "optuna.db", "gen-*")
# Config keys that may differ on resume without a note.
_QUIET_KEYS = ("out_dir", "train.resume")


@dataclasses.dataclass(frozen=True)
class Start:
    """Where the loop starts. ``state`` is None for a new run (step 0)."""

    state: Any
    step: int
    source: str | None  # the checkpoint restored from
    data_state: dict | None  # the data source's position, as saved


def identity(trainer, fingerprint: dict | None, config: dict | None = None) -> dict:
    """What makes a run this run: the model's parameter shapes, the data stream, the config."""
    params = ckpt.describe(trainer.abstract_state().params)
    return {"model": trainer.model.name, "params": params, "data": fingerprint, "config": config}


def checkpoint_meta(ident: dict, step: int, data_state: dict | None, mesh_shape: dict) -> dict:
    """What a checkpoint records beside the arrays: the run, the data position, the mesh."""
    return {"run": ident, "data": {"position": int(step), "state": data_state},
            "mesh": {name: int(size) for name, size in mesh_shape.items()}}


def _other_model(saved: dict | None, ident: dict) -> str | None:
    if not saved or saved.get("params") == ident["params"]:
        return None
    old, new = saved.get("params") or {}, ident["params"]
    differ = sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
    return (f"{saved.get('model')} with {len(old)} parameter arrays, {len(differ)} differing from this "
            f"{ident['model']}'s (first: {differ[0]} {old.get(differ[0])} -> {new.get(differ[0])})")


def _other_data(saved: dict | None, ident: dict) -> str | None:
    old, new = (saved or {}).get("data"), ident["data"]
    if old is None or new is None or old == new:
        return None
    return "; ".join(f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
                     if old.get(key) != new.get(key))


def _read_run(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, "run.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_run(out_dir: str, ident: dict) -> None:
    """Writes ``out_dir/run.json`` atomically (a reader never sees half of it)."""
    path = os.path.join(out_dir, "run.json")
    with open(path + ".tmp", "w") as f:
        json.dump(ident, f, indent=1)
    os.replace(path + ".tmp", path)


def move_aside(out_dir: str) -> str | None:
    """Moves the files of the run in ``out_dir`` to ``out_dir/previous/<time>/``; returns it."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    present = [name for name in names if any(fnmatch.fnmatch(name, pattern) for pattern in RUN_FILES)]
    if not present:
        return None
    dest = base = os.path.join(out_dir, "previous", time.strftime("%Y%m%d-%H%M%S"))
    n = 1
    while os.path.exists(dest):
        dest, n = f"{base}.{n}", n + 1
    os.makedirs(dest)
    for name in present:
        shutil.move(os.path.join(out_dir, name), os.path.join(dest, name))
    return dest


_FRESH_HINT = "use another out_dir, or start over with --fresh (resume='never' from Python; the old run is moved " \
              "to out_dir/previous/)"


def claim_out_dir(out_dir: str, ident: dict, resume: str = "auto", fresh: bool = False,
                  notice: Callable[[str], None] = print, primary: bool = True) -> None:
    """Refuses an ``out_dir`` whose run this one must not continue or overwrite; with ``fresh``,
    moves that run aside instead. Call it before anything is written to ``out_dir``.

    On several processes every process runs the checks (they read the same files, so all refuse
    together) and only the ``primary`` one moves files.

    Raises:
      ConfigError: ``out_dir`` is a file, holds a run of another model, of another data stream
        while resuming, or any run while ``resume="never"``.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"out_dir={out_dir} is an existing file, not a directory; it was not touched: give a "
                          "directory for the run (it is created if missing)")
    if fresh:
        if not primary:
            return
        moved = move_aside(out_dir)
        if moved:
            notice(f"fresh start: moved the previous run in {out_dir} to {moved}")
        return
    saved = _read_run(out_dir)
    own_steps = ckpt.steps(os.path.join(out_dir, "checkpoints"))
    other = _other_model(saved, ident)
    if other:
        raise ConfigError(f"out_dir {out_dir} holds a run of another model ({other}); it was not touched: "
                          f"{_FRESH_HINT}")
    if resume == "never" and (own_steps or os.path.exists(os.path.join(out_dir, "metrics.jsonl"))):
        held = f"checkpoints up to step {own_steps[-1]}" if own_steps else "metrics"
        raise ConfigError(f"resume=never, but out_dir {out_dir} already holds a run ({held}): {_FRESH_HINT}")
    data = _other_data(saved, ident) if own_steps else None
    if resume == "auto" and data:
        raise ConfigError(f"cannot resume the run in {out_dir}: the data stream differs ({data}), so the batches "
                          f"after step {own_steps[-1]} would not be the run's; keep those values, or {_FRESH_HINT}")


def _check_resumable(ident: dict, where: str) -> Callable[[dict], None]:
    def check(meta: dict) -> None:
        run = meta.get("run") or {}
        other = _other_model(run, ident)
        if other:
            raise ConfigError(f"{where} holds checkpoints of another model ({other}); they were not touched. "
                              f"{_FRESH_HINT[0].upper()}{_FRESH_HINT[1:]}")
        if (meta.get("data") or {}).get("position") != meta.get("step"):
            raise ckpt.CheckpointError(f"its data position {(meta.get('data') or {}).get('position')} is not "
                                       f"its step {meta.get('step')}")
        data = _other_data(run, ident)
        if data:
            raise ConfigError(f"cannot resume from {where}: the data stream differs ({data}), so the batches after "
                              f"step {meta.get('step')} would not be the run's. Keep those values, or {_FRESH_HINT}")
    return check


def _config_notes(saved: dict | None, ident: dict) -> list[str]:
    if not saved or not ident.get("config"):
        return []
    old, new = flat_dict(saved), flat_dict(ident["config"])
    return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in sorted(set(old) & set(new))
            if old[key] != new[key] and key not in _QUIET_KEYS]


def resume_point(out_dir: str, resume: str, trainer, ident: dict, notice: Callable[[str], None] = print,
                 primary: bool = True) -> Start:
    """Where the run starts: restores the checkpoint ``resume`` asks for (``auto``: the latest valid
    one of ``out_dir``; or a path) onto ``trainer``'s mesh, or step 0. Damaged checkpoints of
    ``out_dir`` are reported and moved to ``checkpoints-damaged/`` (by the ``primary`` process);
    a damaged one named explicitly is an error.

    Raises:
      ConfigError: the checkpoint holds another model or data stream, ``resume`` names no
        checkpoint, or resuming would overwrite later checkpoints of ``out_dir``.
      CheckpointError: checkpoints exist but none is usable.
    """
    out_dir = os.path.abspath(out_dir)
    own_dir = os.path.join(out_dir, "checkpoints")
    if resume == "never":
        return Start(state=None, step=0, source=None, data_state=None)
    directory, step = ckpt.resolve(own_dir if resume == "auto" else resume)
    check = _check_resumable(ident, out_dir if resume == "auto" else resume)
    target = trainer.abstract_state()
    if step is not None:  # one named checkpoint: it must be usable
        step_dir = os.path.join(directory, str(step))
        try:
            check(ckpt.read_meta(step_dir))
            state, meta = ckpt.restore(step_dir, target)
        except ckpt.CheckpointError as err:
            raise ckpt.CheckpointError(f"resume={resume}: {err}") from None
        found = (state, meta, step)
    if directory != own_dir:
        for tmp in ckpt.unfinished(own_dir):
            notice(f"ignoring an unfinished checkpoint write (the process stopped while saving): {tmp}")
    if step is None:
        if resume != "auto" and not ckpt.steps(directory):
            raise ConfigError(f"resume={resume}: no checkpoint there; give a run directory, its checkpoints "
                              "directory or one step directory (e.g. runs/x/checkpoints/100)")
        found = ckpt.restore_latest(directory, target, check, report=notice,
                                    set_aside=directory == own_dir and primary)
    if found is None:
        if os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
            notice(f"no checkpoint in {own_dir}; starting the run in {out_dir} from step 0")
        return Start(state=None, step=0, source=None, data_state=None)

    state, meta, step = found
    source = os.path.join(directory, str(step))
    later = [s for s in ckpt.steps(own_dir) if s > step]
    if later:
        raise ConfigError(f"out_dir {out_dir} already has checkpoints after step {step} (up to {later[-1]}), "
                          f"which resuming from {source} would overwrite; use another out_dir or --fresh")
    saved_mesh = " x ".join(f"{k}={v}" for k, v in (meta.get("mesh") or {}).items() if v > 1) or "one device"
    notice(f"resuming from step {step}: {source} (saved on {saved_mesh})")
    notes = _config_notes((meta.get("run") or {}).get("config"), ident)
    if notes:
        notice(f"config differs from the checkpoint's: {'; '.join(notes)}")
    return Start(state=state, step=step, source=source, data_state=(meta.get("data") or {}).get("state"))
