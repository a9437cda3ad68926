"""Orbax checkpoints of the whole train state: async saves, the last N kept, restore onto any mesh.

A checkpoint is one Orbax step directory, ``OUT_DIR/checkpoints/<step>/``, with three items:

- ``params``: the parameters, a plain nested dict of arrays (it loads with plain Orbax: README);
- ``train``: the rest of the :class:`~shardml.core.step.TrainState`: ``step``, ``opt_state``,
  ``rng`` and the non-finite step counters;
- ``meta``: JSON: what the run was (its config), the data stream and position, the mesh it was
  saved on, and the shape, dtype and a checksum of every array;

and, when the input comes from a grain iterator (``data.workers`` > 0), a fourth:

- ``data``: the iterator's state, written by grain's own Orbax handler
  (``grain.checkpoint.CheckpointHandler``), one ``process_<i>-of-<n>.json`` per process.

On several processes every process writes its own shards of the arrays (Orbax coordinates them);
process 0 writes ``meta``.

Restores always take their shardings from a *target* (``trainer.abstract_state()`` of the current
mesh), never from the saved layout, so a checkpoint restores onto any mesh. A checkpoint counts as
valid only if Orbax finalized it, Orbax can read it, and every array matches its checksum (Orbax's
zstd chunks carry none, so a flipped bit would otherwise restore silently).

    ckpt = Checkpointer("runs/x/checkpoints", keep=3)
    ckpt.save(step, state, meta={"config": ...})      # returns once the arrays are on the host
    state, meta = restore(ckpt.step_dir(step), trainer.abstract_state())
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from shardml.core.errors import ConfigError
from shardml.core.step import TrainState
from shardml.core.trees import flatten, nest

FORMAT = 2
_TMP_SUFFIX = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unfinished, unreadable, or not matching its checksums."""


# ----------------------------------------------------------------------------- checksums


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """Sum of (bits x odd position weight) mod 2^32: exact integer arithmetic, so the same on any
    layout; changing any one element changes it (odd weights are invertible mod 2^32)."""
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = x if x.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(x, width)
    bits = bits.astype(jnp.uint32)
    index = jnp.zeros(bits.shape, jnp.uint32)
    for dim in range(bits.ndim):
        index = index * jnp.uint32(bits.shape[dim]) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim)
    return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


_checksums = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def checksums(tree: Any) -> dict[str, int]:
    """Per-array checksums of a PyTree (blocks until its arrays are computed)."""
    return {name: int(value) for name, value in flatten(jax.device_get(_checksums(tree))).items()}


def describe(tree: Any) -> dict[str, list]:
    """``{name: [shape, dtype]}`` of every array of a tree (abstract or concrete)."""
    return {name: [list(leaf.shape), str(leaf.dtype)] for name, leaf in flatten(tree).items()}


def _verify(tree: Any, expected: dict[str, int]) -> None:
    found = checksums(tree)
    bad = sorted(name for name, value in found.items() if expected.get(name) != value)
    if bad:
        raise CheckpointError(f"{len(bad)} array(s) do not match their saved checksum "
                              f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})")


# ----------------------------------------------------------------------------- orbax plumbing


def _array_handler() -> ocp.PyTreeCheckpointHandler:
    # Replica-parallel writes split every replicated shard into slices (one eager op each) so that
    # several hosts share the write; on one host that only adds latency to the blocking part of save.
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1)),
        (np.ndarray, ocp.type_handlers.NumpyHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _read_item(step_dir: str, item: str, target: Any) -> Any:
    """One array item of a checkpoint, restored onto the shardings (or numpy types) of ``target``."""
    with ocp.Checkpointer(_array_handler()) as checkpointer:
        return checkpointer.restore(os.path.join(step_dir, item), args=_restore_args(target))


def _split(state: TrainState) -> tuple[Any, dict]:
    return state.params, {name: getattr(state, name) for name in TRAIN_FIELDS}


TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainState) if f.name != "params")


def _restore_args(target: Any) -> ocp.args.PyTreeRestore:
    return ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))


class IteratorState:
    """An input iterator's state as grain's Orbax handler saves and restores it (grain calls
    ``get_state`` / ``set_state`` with JSON bytes). It is captured when the save starts, so an
    asynchronous write cannot see a later position."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, raw: bytes) -> None:
        self.state = json.loads(raw)

    def start_prefetch(self) -> None:  # called by grain's handler after a restore
        pass


def read_iterator_state(step_dir: str) -> dict | None:
    """This process's grain iterator state of a checkpoint (grain's handler reads
    ``data/process_<i>-of-<n>.json``); None when the checkpoint has none for this process count."""
    path = os.path.join(step_dir, "data")
    if not os.path.isdir(path):
        return None
    holder = IteratorState()
    try:
        grain.checkpoint.CheckpointHandler().restore(epath.Path(path), args=grain.checkpoint.CheckpointRestore(holder))
    except ValueError:  # no file for this (process index, process count)
        return None
    return holder.state


def steps(directory: str) -> list[int]:
    """Finalized checkpoint steps in ``directory`` (unfinished writes excluded), ascending."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def unfinished(directory: str) -> list[str]:
    """Temporary directories of saves that never finished (the process died while writing)."""
    return sorted(glob.glob(os.path.join(glob.escape(directory), f"*{_TMP_SUFFIX}*")))


def resolve(path: str) -> tuple[str, int | None]:
    """``(checkpoints directory, step or None)`` for a run directory, a checkpoints directory or
    one step directory (``.../checkpoints/120``)."""
    path = os.path.abspath(path)
    name = os.path.basename(path.rstrip(os.sep))
    if name.isdigit() and os.path.isdir(os.path.join(path, "meta")):
        return os.path.dirname(path), int(name)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    return path, None


def read_meta(step_dir: str) -> dict:
    """The ``meta`` item of a checkpoint (JSON), without touching its arrays."""
    try:
        with open(os.path.join(step_dir, "meta", "metadata")) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{step_dir}: its meta item is missing or unreadable ({err})") from err
    if not isinstance(meta, dict) or "format" not in meta:
        raise CheckpointError(f"{step_dir}: not a shardml checkpoint")
    if meta["format"] != FORMAT:
        # Not damage: nothing is moved aside, the user decides.
        raise ConfigError(f"{step_dir} was written by another shardml version (checkpoint format {meta['format']}, "
                          f"this one reads {FORMAT}); it was not touched: use another out_dir, or --fresh to move "
                          "the old run to out_dir/previous/")
    return meta


# ----------------------------------------------------------------------------- restore


def restore(step_dir: str, target: TrainState) -> tuple[TrainState, dict]:
    """Restores one checkpoint onto the shardings of ``target`` (ShapeDtypeStructs, e.g.
    ``trainer.abstract_state()``), whatever mesh it was saved on, and verifies it.

    Raises:
      CheckpointError: if it is unfinished, unreadable, or an array does not match its checksum.
      ConfigError: if it holds a state of other shapes than ``target`` (another model).
    """
    step_dir = os.path.abspath(step_dir)
    meta = read_meta(step_dir)
    expected, saved = describe(target), meta.get("arrays", {})
    differ = [name for name in sorted(set(expected) | set(saved)) if saved.get(name) != expected.get(name)]
    if differ:
        name = differ[0]
        raise ConfigError(f"checkpoint {step_dir} holds a state of other shapes than this model "
                          f"({len(differ)} arrays differ; first: {name} saved as {saved.get(name)}, "
                          f"this model has {expected.get(name)})")
    params_target, train_target = _split(target)
    try:
        params, train = _read_item(step_dir, "params", params_target), _read_item(step_dir, "train", train_target)
    except Exception as err:  # Orbax / TensorStore raise many types for damaged files
        raise CheckpointError(f"Orbax cannot read it ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]})") from err
    restored = {**flatten({"params": params}), **flatten(train)}
    state = jax.tree.unflatten(jax.tree.structure(target), [restored[name] for name in expected])
    _verify(state, meta["checksums"])
    steps_held = np.unique(np.asarray(state.step))  # a population holds one step per member
    if steps_held.tolist() != [meta["step"]]:
        raise CheckpointError(f"its state is at step {steps_held.tolist()}, not {meta['step']}")
    return state, meta


def load_params(path: str, target: Any = None) -> Any:
    """The parameters of a checkpoint, for evaluation or fine-tuning; verified against checksums.

    Args:
      path: a run directory, its ``checkpoints`` directory (the latest step is used) or one step
        directory.
      target: abstract parameters with shardings (``trainer.abstract_state().params``) to place
        them on any mesh; None gives numpy arrays on the host.

    Example:
      >>> params = load_params("runs/tiny", trainer.abstract_state().params)  # doctest: +SKIP
    """
    directory, step = resolve(path)
    if step is None:
        found = steps(directory)
        if not found:
            raise CheckpointError(f"no checkpoint in {directory}")
        step = found[-1]
    step_dir = os.path.join(directory, str(step))
    meta = read_meta(step_dir)
    if target is None:
        arrays = {name[len("params/"):]: spec for name, spec in meta["arrays"].items()
                  if name.startswith("params/")}
        target = nest({name: np.empty(shape, jnp.dtype(dtype)) for name, (shape, dtype) in arrays.items()})
    try:
        params = _read_item(step_dir, "params", target)
    except Exception as err:
        raise CheckpointError(f"{step_dir}: Orbax cannot read its parameters ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]})") from err
    expected = {name[len("params/"):]: value for name, value in meta["checksums"].items()
                if name.startswith("params/")}
    try:
        _verify(params, expected)
    except CheckpointError as err:
        raise CheckpointError(f"{step_dir}: {err}") from None
    return params


def restore_latest(directory: str, target: TrainState, check: Callable[[dict], None] = lambda meta: None,
                   report: Callable[[str], None] = print, set_aside: bool = False):
    """The newest checkpoint in ``directory`` that restores and verifies; damaged ones are skipped.

    Args:
      check: called with each candidate's meta before its arrays are read; raise (e.g. a
        ConfigError) to refuse it: that error propagates, it does not count as damage.
      report: receives one line per unfinished or damaged checkpoint.
      set_aside: move damaged checkpoints to ``<directory>-damaged/`` (never deleted), so that
        the same step can be saved again.

    Returns:
      ``(state, meta, step)``, or None when ``directory`` holds no finalized checkpoint.

    Raises:
      CheckpointError: if there are checkpoints but none of them is usable.
    """
    for tmp in unfinished(directory):
        report(f"ignoring an unfinished checkpoint write (the process stopped while saving): {tmp}")
    candidates = steps(directory)
    damaged = []
    for step in reversed(candidates):
        step_dir = os.path.join(directory, str(step))
        try:
            meta = read_meta(step_dir)
            check(meta)
            state, meta = restore(step_dir, target)
        except CheckpointError as err:
            damaged.append(step)
            where = ""
            if set_aside:
                where = f"; moved to {set_aside_damaged(step_dir)}"
            report(f"skipping damaged checkpoint step {step}: {err}{where}")
            continue
        return state, meta, step
    if candidates:
        raise CheckpointError(f"none of the {len(candidates)} checkpoints in {directory} is usable "
                              f"(steps {', '.join(map(str, damaged))})")
    return None


def set_aside_damaged(step_dir: str) -> str:
    """Moves a damaged checkpoint out of Orbax's directory (kept for inspection, not deleted)."""
    parent, name = os.path.split(os.path.abspath(step_dir))
    dest_root = parent + "-damaged"
    os.makedirs(dest_root, exist_ok=True)
    dest, n = os.path.join(dest_root, name), 1
    while os.path.exists(dest):
        dest, n = os.path.join(dest_root, f"{name}.{n}"), n + 1
    shutil.move(step_dir, dest)
    return dest


# ----------------------------------------------------------------------------- saving


class Checkpointer:
    """Saves the train state with Orbax's CheckpointManager; keeps the last ``keep``.

    With ``async_save`` a save returns once the arrays are copied to host memory (so the state may
    be donated to the next step right away) and is written by a background thread.
    """

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "params": _array_handler(), "train": _array_handler(), "meta": ocp.JsonCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler()})

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: TrainState, meta: dict, iterator_state: dict | None = None) -> str:
        """Starts saving ``state`` as checkpoint ``step``; returns its (future) directory.

        ``iterator_state``: this process's grain iterator state (``get_state()``), saved as the
        ``data`` item by grain's handler. Blocks until ``state`` is computed and on the host, not
        until it is written.
        """
        sums = checksums(state)  # waits for the step, as the host copy below would anyway
        meta = {"format": FORMAT, "step": int(step), **meta, "arrays": describe(state), "checksums": sums}
        params, train = _split(state)
        items = {"params": ocp.args.PyTreeSave(params), "train": ocp.args.PyTreeSave(train),
                 "meta": ocp.args.JsonSave(meta)}
        if iterator_state is not None:
            items["data"] = grain.checkpoint.CheckpointSave(IteratorState(iterator_state))
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        return self.step_dir(step)

    def wait(self) -> None:
        """Blocks until every started save is written and finalized."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
