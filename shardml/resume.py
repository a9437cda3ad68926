"""Where a run starts: the latest valid checkpoint of ``out_dir``, a given checkpoint, or step 0.

``train.resume=auto`` (the default) makes re-running the same command resume the run, so a job
that died (preempted, killed, OOM) is restarted by running it again. What is never done silently:

- an ``out_dir`` holding a run of another model (other parameter shapes) is an error, and so is
  resuming with another data stream (corpus, seed, batch size, sequence length): the batches
  after the checkpoint would not be the run's;
- nothing is deleted: ``fresh=True`` (``shardml train --fresh``) moves the previous run's files to
  ``out_dir/previous/<time>/``, and damaged checkpoints go to ``checkpoints-damaged/``.

    claim_out_dir(cfg, fresh=False)          # before anything is written to out_dir
    start = resume_point(cfg, trainer)       # restores onto trainer's mesh
    state = start.state if start.state is not None else trainer.init(cfg.train.seed)
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import yaml

from shardml import checkpoint as ckpt
from shardml.config import Config, ConfigError, to_dict

# Config keys that fix the shapes of the train state, and those that fix the batch of every step.
SHAPE_KEYS = ("model.kind", "model.vocab", "model.layers", "model.d_model", "model.heads", "model.kv_heads",
              "model.d_ff")
DATA_KEYS = ("data.corpus", "data.seq_len", "data.val_fraction", "train.batch_size", "train.seed")
# What a run writes into out_dir (moved aside together by a fresh start).
RUN_FILES = ("checkpoints", "checkpoints-damaged", "metrics.jsonl", "config.yaml", "tb")
# Keys that may differ on resume without a note.
_QUIET_KEYS = ("out_dir", "train.resume")


@dataclasses.dataclass(frozen=True)
class Start:
    """Where the loop starts. ``state`` is None for a new run (step 0)."""

    state: Any
    step: int
    counters: dict
    source: str | None  # the checkpoint restored from


def checkpoint_meta(cfg: Config, step: int, counters: dict, mesh_shape: dict) -> dict:
    """What a checkpoint records beside the arrays: config, data position, counters, mesh."""
    return {"config": to_dict(cfg), "data": data_position(cfg, step), "counters": dict(counters),
            "mesh": {name: int(size) for name, size in mesh_shape.items()}}


def data_position(cfg: Config, step: int) -> dict:
    """The data stream and the position in it: the batch of step s is a pure function of these."""
    stream = {key: _flat(to_dict(cfg))[key] for key in DATA_KEYS}
    return {**stream, "position": int(step)}


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _differences(saved: dict, cfg: Config, keys=None) -> list[str]:
    old, new = _flat(saved), _flat(to_dict(cfg))
    keys = keys if keys is not None else sorted(set(old) | set(new))
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in keys
            if key in new and key in old and old[key] != new[key]]


def _check_resumable(cfg: Config, where: str) -> Callable[[dict], None]:
    def check(meta: dict) -> None:
        saved = meta.get("config") or {}
        shapes = _differences(saved, cfg, SHAPE_KEYS)
        if shapes:
            raise ConfigError(f"{where} holds checkpoints of another model ({'; '.join(shapes)}); they were "
                              "not touched. Use another out_dir, or start over with --fresh (the old run "
                              "is moved to out_dir/previous/)")
        if (meta.get("data") or {}).get("position") != meta.get("step"):
            raise ckpt.CheckpointError(f"its data position {(meta.get('data') or {}).get('position')} is not "
                                       f"its step {meta.get('step')}")
        data = _differences(saved, cfg, DATA_KEYS)
        if data:
            raise ConfigError(f"cannot resume from {where}: the data stream differs ({'; '.join(data)}), so the "
                              f"batches after step {meta.get('step')} would not be the run's. Keep those "
                              "values, use another out_dir, or start over with --fresh")
    return check


def _read_config(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, "config.yaml")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return yaml.safe_load(f) or {}


def move_aside(out_dir: str) -> str | None:
    """Moves the files of the run in ``out_dir`` to ``out_dir/previous/<time>/``; returns it."""
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
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


def claim_out_dir(cfg: Config, fresh: bool = False, notice: Callable[[str], None] = print) -> None:
    """Refuses an ``out_dir`` whose run ``cfg`` must not continue or overwrite; with ``fresh``,
    moves that run aside instead. Call it before anything is written to ``out_dir``.

    Raises:
      ConfigError: ``out_dir`` holds a run of another model, or of another data stream while
        resuming, or any run while ``train.resume=never``.
    """
    out_dir = os.path.abspath(cfg.out_dir)
    if fresh:
        moved = move_aside(out_dir)
        if moved:
            notice(f"--fresh: moved the previous run in {cfg.out_dir} to {moved}")
        return
    previous = _read_config(out_dir)
    own_steps = ckpt.steps(os.path.join(out_dir, "checkpoints"))
    fresh_hint = ("use another out_dir, or start over with --fresh (the old run is moved to "
                  "out_dir/previous/)")
    shapes = _differences(previous, cfg, SHAPE_KEYS) if previous is not None else []
    if shapes:
        raise ConfigError(f"out_dir {cfg.out_dir} holds a run of another model ({'; '.join(shapes)}); it was "
                          f"not touched: {fresh_hint}")
    if cfg.train.resume == "never" and (own_steps or os.path.exists(os.path.join(out_dir, "metrics.jsonl"))):
        held = f"checkpoints up to step {own_steps[-1]}" if own_steps else "metrics"
        raise ConfigError(f"train.resume=never, but out_dir {cfg.out_dir} already holds a run ({held}): "
                          f"{fresh_hint}")
    data = _differences(previous, cfg, DATA_KEYS) if previous is not None and own_steps else []
    if cfg.train.resume == "auto" and data:
        raise ConfigError(f"cannot resume the run in {cfg.out_dir}: the data stream differs ({'; '.join(data)}), "
                          f"so the batches after step {own_steps[-1]} would not be the run's; keep those values, "
                          f"or {fresh_hint}")


def resume_point(cfg: Config, trainer, notice: Callable[[str], None] = print) -> Start:
    """Where the run starts: restores the checkpoint ``train.resume`` asks for (onto ``trainer``'s
    mesh), or step 0. Damaged checkpoints of ``out_dir`` are reported and moved to
    ``checkpoints-damaged/``; a damaged one named explicitly is an error.

    Raises:
      ConfigError: the checkpoint holds another model or data stream, ``train.resume`` names no
        checkpoint, or resuming would overwrite later checkpoints of ``out_dir``.
      CheckpointError: checkpoints exist but none is usable.
    """
    out_dir = os.path.abspath(cfg.out_dir)
    own_dir = os.path.join(out_dir, "checkpoints")
    mode = cfg.train.resume
    if mode == "never":
        return Start(state=None, step=0, counters={}, source=None)
    directory, step = ckpt.resolve(own_dir if mode == "auto" else mode)
    check = _check_resumable(cfg, cfg.out_dir if mode == "auto" else mode)
    target = trainer.abstract_state()
    if step is not None:  # one named checkpoint: it must be usable
        step_dir = os.path.join(directory, str(step))
        try:
            check(ckpt.read_meta(step_dir))
            state, meta = ckpt.restore(step_dir, target)
        except ckpt.CheckpointError as err:
            raise ckpt.CheckpointError(f"train.resume={mode}: {err}") from None
        found = (state, meta, step)
    if directory != own_dir:
        for tmp in ckpt.unfinished(own_dir):
            notice(f"ignoring an unfinished checkpoint write (the process stopped while saving): {tmp}")
    if step is None:
        if mode != "auto" and not ckpt.steps(directory):
            raise ConfigError(f"train.resume={mode}: no checkpoint there; give a run directory, its "
                              "checkpoints directory or one step directory (e.g. runs/x/checkpoints/100)")
        found = ckpt.restore_latest(directory, target, check, report=notice, set_aside=directory == own_dir)
    if found is None:
        if os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
            notice(f"no checkpoint in {own_dir}; starting the run in {cfg.out_dir} from step 0")
        return Start(state=None, step=0, counters={}, source=None)

    state, meta, step = found
    source = os.path.join(directory, str(step))
    later = [s for s in ckpt.steps(own_dir) if s > step]
    if later:
        raise ConfigError(f"out_dir {cfg.out_dir} already has checkpoints after step {step} (up to {later[-1]}), "
                          f"which resuming from {source} would overwrite; use another out_dir or --fresh")
    notes = [d for d in _differences(meta.get("config") or {}, cfg) if d.split(":")[0] not in _QUIET_KEYS]
    saved_mesh = " x ".join(f"{k}={v}" for k, v in (meta.get("mesh") or {}).items() if v > 1) or "one device"
    notice(f"resuming from step {step}: {source} (saved on {saved_mesh})")
    if notes:
        notice(f"config differs from the checkpoint's: {'; '.join(notes)}")
    return Start(state=state, step=step, counters=dict(meta.get("counters") or {}), source=source)
