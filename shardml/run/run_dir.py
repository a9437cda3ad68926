"""A run directory: claiming an ``out_dir``, the run's identity, checkpoint metadata, saving,
restoring and resuming. The one module that writes and reads what a checkpoint records.

    run = RunDir("runs/x", resume="auto", fresh=False)
    run.claim(identity(trainer, source.fingerprint, config))  # refuses a run that trains something else
    start = run.start(trainer)                                # the latest valid checkpoint, or step 0
    state = start.state if start.state is not None else trainer.init(seed)
    run.save(step, state, data_state, iterator_state, trainer.mesh.shape)
    run.close()                                               # waits for the last save

    step_dir, meta = RunDir.latest("runs/x")                  # read-only (inference)

``resume="auto"`` makes re-running the same command resume the run, so a job that died
(preempted, killed, OOM) is restarted by running it again. What is never done silently:

- an ``out_dir`` holding a run that trains something else (another model, other parameter
  shapes, another population kind or federated algorithm, other data: :func:`trained_keys`) is
  refused, naming the keys that differ and the flag that starts fresh; settings that do not change
  what is trained (steps, logging, evaluation, the mesh) continue the run, with a note;
- nothing is deleted: ``fresh`` (``shardml train --fresh``, ``fresh=True`` from Python) moves the
  previous run's files to ``out_dir/previous/<time>/``; damaged checkpoints go to
  ``checkpoints-damaged/`` and the previous one is restored.

A checkpoint (Orbax items written by :mod:`shardml.run.store`) carries a :class:`Meta`: the
run's :class:`Identity`, the data stream's position and state, the mesh it was saved on, and the
shape, dtype and checksum of every array. On several processes process 0 writes the run's files.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
import yaml

from shardml.core.errors import ConfigError
from shardml.core.step import TrainState
from shardml.core.trees import nest
from shardml.run import distributed, store
from shardml.run.config import flat_dict
from shardml.run.schema import field_key
from shardml.run.library_log import handled
from shardml.run.store import CheckpointError

VERSION = 2  # of Meta's JSON (the key "format"); another one is refused, never taken for damage
# What a run writes into out_dir (moved aside together by a fresh start); shell patterns.
RUN_FILES = ("checkpoints", "checkpoints-damaged", "metrics.jsonl", "config.yaml", "run.json", "tb", "samples.txt",
             "library*.log", "tokenizer.json", "population.json", "federated.json", "predictions.npz", "optuna.db", "gen-*")
# Config keys that decide what is trained; the rest (steps, logging, evaluation, mesh, optimizer
# schedule, checkpointing) may change when a run continues.
TRAINED = ("model.", "data.", "population.", "federated.", "lora.", "train.batch_size", "train.seed",
           "train.init_seed")
NOT_TRAINED = ("model.remat", "model.layer_loop", "data.workers", "population.generations", "federated.delta")
# keys added after runs were saved, at the value that means "off": a run that records none is the same run
ADDED_OFF = {"model.from": "", "lora.rank": 0, "lora.alpha": 16.0, "lora.dropout": 0.0, "lora.targets": "q,v"}
_QUIET_KEYS = ("out_dir", "train.resume")  # differ on resume without a note
FRESH_HINT = ("use another out_dir, or start over with --fresh (fresh=True from Python; the old run is moved to "
              "out_dir/previous/)")


# ----------------------------------------------------------------------------- identity and metadata


def trained_keys(config: dict) -> dict[str, Any]:
    """The flat config keys (``population.kind``: value) that decide what a run trains."""
    # keyed as the config keys also when ``config`` is a plain dataclasses.asdict (``model.from_``)
    flat = {".".join(map(field_key, key.split("."))): value for key, value in flat_dict(config).items()}
    return {key: value for key, value in flat.items()
            if key.startswith(TRAINED) and not key.startswith(NOT_TRAINED)
            and not (key in ADDED_OFF and ADDED_OFF[key] == value)}


@dataclasses.dataclass(frozen=True)
class Identity:
    """What makes a run this run: the model and its parameter shapes (``{name: [shape, dtype]}``),
    the data source's fingerprint, what is trained (:func:`trained_keys` of the config, or the
    trainer's population form for runs without one) and the full config (for notes)."""

    model: str
    params: dict
    data: dict | None
    trained: dict
    config: dict | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict | None) -> Identity | None:
        if not raw:
            return None
        config = raw.get("config")
        trained = raw.get("trained") or (trained_keys(config) if config else {})
        return cls(raw.get("model", "?"), raw.get("params") or {}, raw.get("data"), trained, config)


def identity(trainer, fingerprint: dict | None, config: dict | None = None) -> Identity:
    """The identity of a run of ``trainer`` on data of ``fingerprint``, from ``config`` if any."""
    params = store.describe(trainer.abstract_state().params)
    trained = trained_keys(config) if config else {"members": trainer.members, "batch_axes": trainer.batch_axes}
    return Identity(trainer.model.name, params, fingerprint, trained, config)


@dataclasses.dataclass(frozen=True)
class Meta:
    """What a checkpoint records beside its arrays (``version``: of this record's JSON)."""

    version: int
    step: int
    run: Identity | None
    data_position: int | None  # the data stream's step; must equal ``step``
    data_state: dict | None
    mesh: dict[str, int]
    arrays: dict[str, list]  # name -> [shape, dtype]
    checksums: dict[str, int]
    frozen: dict | None = None  # parameters left out and where they are read from (:func:`frozen_record`)

    def to_json(self) -> dict:
        out = {"format": self.version, "step": self.step, "run": self.run.to_json() if self.run else None,
               "data": {"position": self.data_position, "state": self.data_state}, "mesh": self.mesh,
               "arrays": self.arrays, "checksums": self.checksums}
        return {**out, "frozen": self.frozen} if self.frozen else out

    @classmethod
    def from_json(cls, raw: Any, where: str) -> Meta:
        if not isinstance(raw, dict) or "format" not in raw:
            raise CheckpointError(f"{where}: not a shardml checkpoint")
        if raw["format"] != VERSION:  # not damage: nothing is moved aside, the user decides
            raise ConfigError(f"{where} was written by another shardml version (checkpoint format {raw['format']}, "
                              f"this one reads {VERSION}); it was not touched: use another out_dir, or --fresh to "
                              "move the old run to out_dir/previous/")
        data = raw.get("data") or {}
        return cls(VERSION, int(raw["step"]), Identity.from_json(raw.get("run")), data.get("position"),
                   data.get("state"), raw.get("mesh") or {}, raw.get("arrays") or {}, raw.get("checksums") or {},
                   raw.get("frozen"))

    def params(self, values: dict) -> dict:
        """The ``params/`` entries of ``arrays`` or ``checksums``, without the prefix."""
        return {name[len("params/"):]: v for name, v in values.items() if name.startswith("params/")}


# ----------------------------------------------------------------------------- frozen parameters


@dataclasses.dataclass(frozen=True)
class Frozen:
    """Parameters that checkpoints leave out because they never change and can be read again from
    where they came from: a LoRA run's base, from ``model.from``. Each checkpoint records ``source``
    and the entries' fingerprint (:func:`frozen_record`); a restore reads them with ``load`` and
    refuses them when their fingerprint is not the recorded one.

        frozen = Frozen(("base",), {"model.from": "/ckpt"}, read_base)   # read_base(source, abstract)
        Checkpointer("runs/x/checkpoints", frozen=frozen).save(step, state)  # no base arrays written
        state, meta = restore(step_dir, trainer.abstract_state(), frozen)    # the base read again

    Attributes:
      entries: the top-level ``params`` keys left out.
      source: JSON naming where they are read from (recorded in every checkpoint).
      load: ``(source as recorded, {entry: abstract arrays with shardings}) -> {entry: arrays}`` in
        those shardings; raises a ConfigError naming the source when it cannot read them.
    """

    entries: tuple[str, ...]
    source: dict
    load: Callable[[dict, Any], Any]


def held(params: Any, entries) -> Any:
    """``params`` less the top-level ``entries``: what a checkpoint that leaves them out holds."""
    return {k: v for k, v in params.items() if k not in entries} if entries else params


def _held_state(state, entries):
    return dataclasses.replace(state, params=held(state.params, entries)) if entries else state


def fingerprint(tree: Any) -> tuple[dict, dict, str]:
    """``(shapes, checksums, sha256)`` of a tree of arrays: :func:`shardml.run.store.describe`,
    :func:`shardml.run.store.checksums` (exact, the same on every layout; any one changed element
    changes its array's) and a sha256 hex digest over both."""
    arrays, sums = store.describe(tree), store.checksums(tree)
    return arrays, sums, hashlib.sha256(json.dumps([arrays, sums], sort_keys=True).encode()).hexdigest()


def frozen_record(state: TrainState, frozen: Frozen) -> dict:
    """What a checkpoint records of the parameters it leaves out: their ``source``, and the
    :func:`fingerprint` of the arrays as the run holds them (in the compute dtype)."""
    arrays, sums, digest = fingerprint({k: state.params[k] for k in frozen.entries})
    return {"entries": list(frozen.entries), "source": frozen.source, "arrays": arrays, "checksums": sums,
            "fingerprint": digest}


def _entries(meta: Meta) -> tuple[str, ...]:
    return tuple(meta.frozen["entries"]) if meta.frozen else ()


def read_frozen(meta: Meta, target_params: Any, frozen: Frozen | None, step_dir: str) -> dict:
    """The entries ``meta`` left out, read by ``frozen.load`` from the recorded source onto the
    shardings of ``target_params``, once their fingerprint is the recorded one.

    Raises:
      ConfigError: no reader (the message names the source and how to restore), or entries that
        changed since the checkpoint was saved (naming the source, the first array and the fix).
    """
    record, names = meta.frozen, _entries(meta)
    where = ", ".join(f"{key}={value}" for key, value in record["source"].items())
    if frozen is None:
        raise ConfigError(f"checkpoint {step_dir} holds no {', '.join(names)} parameters: they are read from "
                          f"{where}. Restore it through its run (shardml eval / generate / export, or train to "
                          "resume), or pass the run's Frozen reader")
    loaded = frozen.load(record["source"], {name: target_params[name] for name in names})
    arrays, sums, digest = fingerprint(loaded)
    if digest != record["fingerprint"]:
        saved = {name: (record["arrays"].get(name), record["checksums"].get(name)) for name in record["arrays"]}
        differ = sorted(n for n in set(arrays) | set(saved) if (arrays.get(n), sums.get(n)) != saved.get(n))
        raise ConfigError(f"{where} has changed since checkpoint {step_dir} was saved: {len(differ)} of its arrays "
                          f"differ from the fingerprint recorded there (first: {differ[0] if differ else '?'}), and "
                          f"the checkpoint holds only what was trained on the old {', '.join(names)}. Put the "
                          f"original files back ({where}), or train anew from the new ones: {FRESH_HINT}")
    return loaded


def differing(saved: dict, expected: dict) -> list[str]:
    """Names whose ``[shape, dtype]`` differ between two :func:`store.describe` results: the one
    comparison of shapes against a checkpoint or a run."""
    return sorted(name for name in set(saved) | set(expected) if saved.get(name) != expected.get(name))


def _first(differ: list[str], saved: dict, expected: dict, saved_as: str, here: str) -> str:
    name = differ[0]
    return f"first: {name} {saved_as} {saved.get(name)}, {here} {expected.get(name)}"


def read_meta(step_dir: str) -> Meta:
    """The :class:`Meta` of a checkpoint, without touching its arrays."""
    return Meta.from_json(store.read_json(step_dir), step_dir)


def check_params(meta: Meta, target: Any, step_dir: str) -> None:
    """Refuses a checkpoint whose parameters have other shapes than ``target``'s (before reading any)."""
    saved, expected = meta.params(meta.arrays), store.describe(held(target, _entries(meta)))
    differ = differing(saved, expected)
    if differ:
        raise ConfigError(f"checkpoint {step_dir} holds parameters of other shapes than this layout's model "
                          f"({len(differ)} differ; {_first(differ, saved, expected, 'saved as', 'here')}); "
                          "keep the run's model.* settings (a circular pipeline run needs its pipeline.repeats)")


# ----------------------------------------------------------------------------- restore


def restore(step_dir: str, target: TrainState, frozen: Frozen | None = None) -> tuple[TrainState, Meta]:
    """Restores one checkpoint onto the shardings of ``target`` (ShapeDtypeStructs, e.g.
    ``trainer.abstract_state()``), whatever mesh it was saved on, and verifies it. Parameters the
    checkpoint left out (a LoRA run's base) are read by ``frozen`` (:func:`read_frozen`).

    Raises:
      CheckpointError: if it is unfinished, unreadable, or an array does not match its checksum.
      ConfigError: if it holds a state of other shapes than ``target`` (another model), or left out
        parameters that cannot be read again unchanged.
    """
    step_dir = os.path.abspath(step_dir)
    meta = read_meta(step_dir)
    held_target = _held_state(target, _entries(meta))
    expected = store.describe(held_target)
    differ = differing(meta.arrays, expected)
    if differ:
        raise ConfigError(f"checkpoint {step_dir} holds a state of other shapes than this model ({len(differ)} "
                          f"arrays differ; {_first(differ, meta.arrays, expected, 'saved as', 'this model has')})")
    state = store.read_state(step_dir, held_target)
    store.verify(state, meta.checksums)
    steps_held = np.unique(np.asarray(state.step))  # a population holds one step per member
    if steps_held.tolist() != [meta.step]:
        raise CheckpointError(f"its state is at step {steps_held.tolist()}, not {meta.step}")
    if meta.frozen:
        state = dataclasses.replace(state, params={**state.params,
                                                   **read_frozen(meta, target.params, frozen, step_dir)})
    return state, meta


def latest(path: str) -> tuple[str, Meta]:
    """``(step directory, meta)`` of the newest checkpoint of a run directory, its checkpoints
    directory, or one step directory.

    Raises:
      ConfigError: no such directory, or no checkpoint in it.
    """
    if not os.path.isdir(path):
        raise ConfigError(f"run directory {path} does not exist; give the out_dir of a run (e.g. runs/tiny)")
    directory, step = store.resolve(path)
    if step is None:
        found = store.steps(directory)
        if not found:
            raise ConfigError(f"{path} holds no checkpoint (looked in {directory}); train it first "
                              f"(shardml train ... out_dir={path}) or give the directory of a run that saved one")
        step = found[-1]
    step_dir = os.path.join(directory, str(step))
    return step_dir, read_meta(step_dir)


def load_params(path: str, target: Any = None, frozen: Frozen | None = None) -> Any:
    """The parameters of a checkpoint, for evaluation or fine-tuning; verified against checksums.
    A checkpoint that left parameters out (a LoRA run's base: :class:`Frozen`) gives only those it
    holds without ``target``; with one, ``frozen`` reads the others again.

    Args:
      path: a run directory, its ``checkpoints`` directory (the latest step is used) or one step
        directory.
      target: abstract parameters with shardings (``trainer.abstract_state().params``) to place
        them on any mesh; None gives numpy arrays on the host.

    Example:
      >>> params = load_params("runs/tiny", trainer.abstract_state().params)  # doctest: +SKIP
    """
    directory, step = store.resolve(path)
    if step is None:
        found = store.steps(directory)
        if not found:
            raise CheckpointError(f"no checkpoint in {directory}")
        step = found[-1]
    step_dir = os.path.join(directory, str(step))
    meta = read_meta(step_dir)
    if target is None:
        target = nest({name: np.empty(shape, jnp.dtype(dtype))
                       for name, (shape, dtype) in meta.params(meta.arrays).items()})
    params = store.read_params(step_dir, held(target, _entries(meta)))
    try:
        store.verify(params, meta.params(meta.checksums))
    except CheckpointError as err:
        raise CheckpointError(f"{step_dir}: {err}") from None
    missing = [name for name in _entries(meta) if name in target]
    return {**params, **read_frozen(meta, target, frozen, step_dir)} if missing else params


def restore_latest(directory: str, target: TrainState, check: Callable[[Meta], None] = lambda meta: None,
                   report: Callable[[str], None] = print, set_aside: bool = False, frozen: Frozen | None = None):
    """The newest checkpoint in ``directory`` that restores and verifies; damaged ones are skipped.

    Args:
      check: called with each candidate's meta before its arrays are read; raise (e.g. a
        ConfigError) to refuse it: that error propagates, it does not count as damage.
      report: receives one line per unfinished or damaged checkpoint.
      set_aside: move damaged checkpoints to ``<directory>-damaged/`` (never deleted), so that
        the same step can be saved again.
      frozen: reads the parameters a checkpoint left out (:func:`restore`).

    Returns:
      ``(state, meta, step)``, or None when ``directory`` holds no finalized checkpoint.

    Raises:
      CheckpointError: if there are checkpoints but none of them is usable.
    """
    for tmp in store.unfinished(directory):
        report(f"ignoring an unfinished checkpoint write (the process stopped while saving): {tmp}")
    candidates = store.steps(directory)
    damaged = []
    for step in reversed(candidates):
        step_dir = os.path.join(directory, str(step))
        try:
            check(read_meta(step_dir))
            state, meta = restore(step_dir, target, frozen)
        except CheckpointError as err:
            damaged.append(step)
            where = f"; moved to {store.set_aside_damaged(step_dir)}" if set_aside else ""
            report(f"skipping damaged checkpoint step {step}: {err}{where}{handled(f'checkpoint step {step}', err)}")
            continue
        return state, meta, step
    if candidates:
        raise CheckpointError(f"none of the {len(candidates)} checkpoints in {directory} is usable "
                              f"(steps {', '.join(map(str, damaged))})")
    return None


# ----------------------------------------------------------------------------- saving


class Checkpointer:
    """Saves train states as checkpoints with their :class:`Meta`; keeps the last ``keep``.

    With ``async_save`` a save returns once the arrays are copied to host memory (so the state may
    be donated to the next step right away) and is written by a background thread.

        ckpt = Checkpointer("runs/x/checkpoints", keep=3)
        ckpt.save(step, state)                  # returns once the arrays are on the host
        state, meta = restore(ckpt.step_dir(step), trainer.abstract_state())
    """

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True, frozen: Frozen | None = None):
        self._writer = store.ArrayWriter(directory, keep, async_save)
        self.directory = self._writer.directory
        self._frozen, self._frozen_record = frozen, None

    def step_dir(self, step: int) -> str:
        return self._writer.step_dir(step)

    def save(self, step: int, state: TrainState, meta: dict | None = None, iterator_state: dict | None = None,
             *, run: Identity | None = None, data_state: dict | None = None, mesh: dict | None = None) -> str:
        """Starts saving ``state`` as checkpoint ``step``; returns its (future) directory.

        ``run``, ``data_state``, ``mesh``: what the checkpoint records beside the arrays (``meta``,
        a dict of :func:`checkpoint_meta`, gives them the older way). ``iterator_state``: this
        process's grain iterator state. Blocks until ``state`` is computed and on the host. The
        ``frozen`` parameters are not written: their source and fingerprint are recorded instead.
        """
        meta = meta or {}
        run = run or meta.get("run")
        if isinstance(run, dict):
            run = Identity.from_json(run)
        data = meta.get("data") or {"position": step if run else None, "state": data_state}
        if self._frozen is not None and self._frozen_record is None:  # frozen: the same in every checkpoint
            self._frozen_record = frozen_record(state, self._frozen)
        state = _held_state(state, self._frozen.entries if self._frozen else ())
        sums = store.checksums(state)  # waits for the step, as the host copy would anyway
        record = Meta(VERSION, int(step), run, data["position"], data["state"],
                      {k: int(v) for k, v in (mesh or meta.get("mesh") or {}).items()}, store.describe(state), sums,
                      self._frozen_record)
        return self._writer.save(step, state, record.to_json(), iterator_state)

    def wait(self) -> None:
        """Blocks until every started save is written and finalized."""
        self._writer.wait()

    def close(self) -> None:
        self._writer.close()


def checkpoint_meta(ident: Identity, step: int, data_state: dict | None, mesh_shape: dict) -> dict:
    """What :meth:`Checkpointer.save` records beside the arrays, as its ``meta`` argument."""
    return {"run": ident, "data": {"position": int(step), "state": data_state},
            "mesh": {name: int(size) for name, size in mesh_shape.items()}}


# ----------------------------------------------------------------------------- claiming out_dir


def _read_run(out_dir: str) -> Identity | None:
    path = os.path.join(out_dir, "run.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return Identity.from_json(json.load(f))


def write_run(out_dir: str, ident: Identity) -> None:
    """Writes ``out_dir/run.json`` atomically (a reader never sees half of it)."""
    path = os.path.join(out_dir, "run.json")
    with open(path + ".tmp", "w") as f:
        json.dump(ident.to_json(), f, indent=1)
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


def _other_model(saved: Identity | None, ident: Identity) -> str | None:
    if saved is None or saved.params == ident.params:
        return None
    old, new = saved.params, ident.params
    differ = differing(old, new)
    return (f"{saved.model} with {len(old)} parameter arrays, {len(differ)} differing from this "
            f"{ident.model}'s (first: {differ[0]} {old.get(differ[0])} -> {new.get(differ[0])})")


def _other_training(saved: Identity | None, ident: Identity) -> list[str]:
    """``key: old -> new`` for every key of what is trained that differs (none when either run
    does not say)."""
    if saved is None or not saved.trained or not ident.trained:
        return []
    old, new = saved.trained, ident.trained
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)]


def _other_data(saved: Identity | None, ident: Identity) -> str | None:
    old, new = saved.data if saved else None, ident.data
    if old is None or new is None or old == new:
        return None
    return "; ".join(f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
                     if old.get(key) != new.get(key))


def refuse_other_run(saved: Identity | None, ident: Identity, where: str) -> None:
    """Raises when the run ``saved`` in ``where`` trains another model or something else than ``ident``.

    Raises:
      ConfigError: naming the keys that differ and the flag that starts fresh.
    """
    other, changes = _other_model(saved, ident), _other_training(saved, ident)
    if other:
        keys = f" ({'; '.join(changes)})" if changes else ""
        raise ConfigError(f"{where} holds a run of another model ({other}){keys}; it was not touched: {FRESH_HINT}")
    if changes:
        raise ConfigError(f"{where} holds a run that trains something else ({'; '.join(changes)}); continuing it "
                          f"would train that run's weights under these settings. It was not touched: {FRESH_HINT}")


def claim_out_dir(out_dir: str, ident: Identity, resume: str = "auto", fresh: bool = False,
                  notice: Callable[[str], None] = print, primary: bool = True) -> None:
    """Refuses an ``out_dir`` whose run this one must not continue or overwrite; with ``fresh``,
    moves that run aside instead. Call it before anything is written to ``out_dir``.

    On several processes every process runs the checks (they read the same files, so all refuse
    together) and only the ``primary`` one moves files.

    Raises:
      ConfigError: ``out_dir`` is a file, holds a run of another model or that trains something
        else, of another data stream while resuming, or any run while ``resume="never"``.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"out_dir={out_dir} is an existing file, not a directory; it was not touched: give a "
                          "directory for the run (it is created if missing)")
    if fresh:
        moved = move_aside(out_dir) if primary else None
        if moved:
            notice(f"fresh start: moved the previous run in {out_dir} to {moved}")
        return
    saved = _read_run(out_dir)
    own_steps = store.steps(os.path.join(out_dir, "checkpoints"))
    refuse_other_run(saved, ident, f"out_dir {out_dir}")
    if resume == "never" and (own_steps or os.path.exists(os.path.join(out_dir, "metrics.jsonl"))):
        held = f"checkpoints up to step {own_steps[-1]}" if own_steps else "metrics"
        raise ConfigError(f"resume=never, but out_dir {out_dir} already holds a run ({held}): {FRESH_HINT}")
    data = _other_data(saved, ident) if own_steps else None
    if resume == "auto" and data:
        raise ConfigError(f"cannot resume the run in {out_dir}: the data stream differs ({data}), so the batches "
                          f"after step {own_steps[-1]} would not be the run's; keep those values, or {FRESH_HINT}")


# ----------------------------------------------------------------------------- resuming


@dataclasses.dataclass(frozen=True)
class Start:
    """Where the loop starts. ``state`` is None for a new run (step 0)."""

    state: Any
    step: int
    source: str | None  # the checkpoint restored from
    data_state: dict | None  # the data source's position, as saved


NEW = Start(state=None, step=0, source=None, data_state=None)


def check_resumable(ident: Identity, where: str) -> Callable[[Meta], None]:
    """A check of a checkpoint's :class:`Meta` before its arrays are read: it must be of this run
    (model, what is trained, data stream) and saved at its data's position.

    Raises (when called):
      ConfigError: another run's checkpoint; CheckpointError: a position that is not its step.
    """
    def check(meta: Meta) -> None:
        other = _other_model(meta.run, ident)
        if other:
            raise ConfigError(f"{where} holds checkpoints of another model ({other}); they were not touched. "
                              f"{FRESH_HINT[0].upper()}{FRESH_HINT[1:]}")
        refuse_other_run(meta.run, ident, where)
        if meta.data_position != meta.step:
            raise CheckpointError(f"its data position {meta.data_position} is not its step {meta.step}")
        data = _other_data(meta.run, ident)
        if data:
            raise ConfigError(f"cannot resume from {where}: the data stream differs ({data}), so the batches after "
                              f"step {meta.step} would not be the run's. Keep those values, or {FRESH_HINT}")
    return check


def _config_notes(saved: dict | None, ident: Identity) -> list[str]:
    if not saved or not ident.config:
        return []
    old, new = flat_dict(saved), flat_dict(ident.config)
    return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in sorted(set(old) & set(new))
            if old[key] != new[key] and key not in _QUIET_KEYS]


def _restore_named(directory: str, step: int, target, check, resume: str, frozen: Frozen | None = None):
    """One checkpoint named by ``resume``: it must be usable."""
    step_dir = os.path.join(directory, str(step))
    try:
        check(read_meta(step_dir))
        state, meta = restore(step_dir, target, frozen)
    except CheckpointError as err:
        raise CheckpointError(f"resume={resume}: {err}") from None
    return state, meta, step


def _found(out_dir: str, resume: str, trainer, ident: Identity, notice, primary: bool, frozen: Frozen | None):
    """``(state, meta, step, directory)`` of the checkpoint ``resume`` asks for, or None."""
    own_dir = os.path.join(out_dir, "checkpoints")
    directory, step = store.resolve(own_dir if resume == "auto" else resume)
    check = check_resumable(ident, out_dir if resume == "auto" else resume)
    target = trainer.abstract_state()
    if directory != own_dir:
        for tmp in store.unfinished(own_dir):
            notice(f"ignoring an unfinished checkpoint write (the process stopped while saving): {tmp}")
    if step is not None:
        return (*_restore_named(directory, step, target, check, resume, frozen), directory)
    if resume != "auto" and not store.steps(directory):
        raise ConfigError(f"resume={resume}: no checkpoint there; give a run directory, its checkpoints "
                          "directory or one step directory (e.g. runs/x/checkpoints/100)")
    found = restore_latest(directory, target, check, report=notice, set_aside=directory == own_dir and primary,
                           frozen=frozen)
    return None if found is None else (*found, directory)


def resume_point(out_dir: str, resume: str, trainer, ident: Identity, notice: Callable[[str], None] = print,
                 primary: bool = True, frozen: Frozen | None = None) -> Start:
    """Where the run starts: restores the checkpoint ``resume`` asks for (``auto``: the latest valid
    one of ``out_dir``; or a path) onto ``trainer``'s mesh, or step 0. Damaged checkpoints of
    ``out_dir`` are reported and moved to ``checkpoints-damaged/`` (by the ``primary`` process);
    a damaged one named explicitly is an error. ``frozen`` reads what checkpoints left out.

    Raises:
      ConfigError: the checkpoint holds another model, trains something else or another data
        stream, ``resume`` names no checkpoint, or resuming would overwrite later checkpoints.
      CheckpointError: checkpoints exist but none is usable.
    """
    out_dir = os.path.abspath(out_dir)
    if resume == "never":
        return NEW
    found = _found(out_dir, resume, trainer, ident, notice, primary, frozen)
    if found is None:
        if os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
            notice(f"no checkpoint in {os.path.join(out_dir, 'checkpoints')}; starting the run in {out_dir} from "
                   "step 0")
        return NEW
    state, meta, step, directory = found
    source = os.path.join(directory, str(step))
    later = [s for s in store.steps(os.path.join(out_dir, "checkpoints")) if s > step]
    if later:
        raise ConfigError(f"out_dir {out_dir} already has checkpoints after step {step} (up to {later[-1]}), "
                          f"which resuming from {source} would overwrite; use another out_dir or --fresh")
    saved_mesh = " x ".join(f"{k}={v}" for k, v in meta.mesh.items() if v > 1) or "one device"
    notice(f"resuming from step {step}: {source} (saved on {saved_mesh})")
    notes = _config_notes(meta.run.config if meta.run else None, ident)
    if notes:
        notice(f"config differs from the checkpoint's: {'; '.join(notes)}")
    return Start(state=state, step=step, source=source, data_state=meta.data_state)


# ----------------------------------------------------------------------------- the run directory


def experiment_name(config: dict) -> str:
    """What distinguishes a population or federated experiment in a default out_dir: the kind
    (``sweep8``, ``fedavg``) and a short hash of what it trains; "" for a plain run."""
    trained = trained_keys(config)
    if trained.get("federated.algorithm", "none") != "none":
        label = trained["federated.algorithm"]
    elif trained.get("population.size", 1) > 1:
        label = f"{trained['population.kind']}{trained['population.size']}"
    else:
        return ""
    mode = {k: v for k, v in trained.items() if k.startswith(("population.", "federated."))}
    digest = hashlib.sha1(json.dumps(mode, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"{label}-{digest}"


EXPERIMENT = "{experiment}"


def default_out_dir(out_dir: str, config: dict) -> str:
    """``out_dir`` with ``{experiment}`` replaced: nothing for a plain run, ``-<experiment_name>``
    for a population or federated one. ``runs/digits{experiment}`` gives ``runs/digits`` for the
    plain run and ``runs/digits-sweep8-1a2b3c`` for a sweep, so experiments never share one."""
    name = experiment_name(config)
    return out_dir.replace(EXPERIMENT, f"-{name}" if name else "")


class RunDir:
    """One run's directory: claimed, resumed from, saved to (see the module docstring).

    Args:
      path: the ``out_dir``; None keeps nothing (no checkpoints, no resume).
      resume: ``auto`` (the latest valid checkpoint of ``path``), ``never``, or a checkpoint path.
      fresh: move a run found in ``path`` to ``path/previous/`` and start over.
      frozen: parameters its checkpoints leave out and read again (:class:`Frozen`); None saves all.
    """

    def __init__(self, path: str | None, resume: str = "auto", fresh: bool = False, keep: int = 3,
                 async_save: bool = True, notice: Callable[[str], None] = print, frozen: Frozen | None = None):
        self.path = None if path is None else os.path.abspath(path)
        self.frozen = frozen
        self.resume, self.fresh, self.notice = resume, fresh, notice
        self.primary = distributed.primary()
        self._keep, self._async = keep, async_save
        self.ident: Identity | None = None
        self._writer: Checkpointer | None = None

    def claim(self, ident: Identity, config: dict | None = None, tokenizer=None) -> None:
        """Checks that this run may use the directory (every process), then writes ``run.json``,
        ``config.yaml`` and the tokenizer (process 0).

        Raises:
          ConfigError: see :func:`claim_out_dir`.
        """
        self.ident = ident
        if self.path is None:
            return
        claim_out_dir(self.path, ident, self.resume, self.fresh, notice=self.notice, primary=self.primary)
        distributed.barrier("shardml-checked-out-dir")  # every process has read out_dir before process 0 writes
        if self.primary:
            os.makedirs(self.path, exist_ok=True)
            write_run(self.path, ident)
            if config is not None:
                with open(os.path.join(self.path, "config.yaml"), "w") as f:
                    yaml.safe_dump(config, f, sort_keys=False)
            if tokenizer is not None:
                tokenizer.save(os.path.join(self.path, "tokenizer.json"))
        distributed.barrier("shardml-wrote-out-dir")  # ... and has written (or moved aside) before anyone reads

    def start(self, trainer) -> Start:
        """Where the run starts (:func:`resume_point`; step 0 without a directory); saving opens
        after it, once damaged checkpoints are set aside and unfinished writes reported."""
        if self.path is None:
            return NEW
        begin = resume_point(self.path, self.resume, trainer, self.ident, notice=self.notice, primary=self.primary,
                             frozen=self.frozen)
        self._writer = Checkpointer(os.path.join(self.path, "checkpoints"), self._keep, self._async, self.frozen)
        return begin

    @property
    def saves(self) -> bool:
        return self._writer is not None

    def save(self, step: int, state: TrainState, data_state: dict | None, iterator_state: dict | None,
             mesh: dict) -> str:
        """Starts saving checkpoint ``step`` (returns once ``state`` is on the host)."""
        return self._writer.save(step, state, iterator_state=iterator_state, run=self.ident, data_state=data_state,
                                 mesh=mesh)

    def close(self) -> None:
        """Waits until the last save is written and finalized."""
        if self._writer is not None:
            self._writer.close()

    latest = staticmethod(latest)
    identity = staticmethod(identity)  # what claim() takes: RunDir.identity(trainer, fingerprint, config)
