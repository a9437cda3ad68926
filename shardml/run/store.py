"""Orbax storage of train states: array items, checksums, step directories, grain iterator state.

What a checkpoint *means* (its metadata, the run it belongs to, whether it may be resumed) is
:mod:`shardml.run.run_dir`'s job; this module only moves arrays and bytes::

    writer = ArrayWriter("runs/x/checkpoints", keep=3)
    writer.save(step, state, meta_json)            # meta_json: built by shardml.run.run_dir
    params, train = read_state(step_dir, target)   # onto the shardings of ``target``
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from shardml.core.step import TrainState
from shardml.core.trees import flatten

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


def verify(tree: Any, expected: dict[str, int]) -> None:
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


def read_item(step_dir: str, item: str, target: Any) -> Any:
    """One array item of a checkpoint, restored onto the shardings (or numpy types) of ``target``."""
    with ocp.Checkpointer(_array_handler()) as checkpointer:
        return checkpointer.restore(os.path.join(step_dir, item), args=_restore_args(target))


def split(state: TrainState) -> tuple[Any, dict]:
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




# Where TensorStore's messages stop saying what failed and start dumping their spec (kept, whole, in
# OUT_DIR/library.log: shardml.run.library_log).
_SPEC_DUMPS = (" See full TensorStore details", " [tensorstore_spec")


def _orbax_failure(err: Exception) -> str:
    first = str(err).splitlines()[0] if str(err) else ""
    for marker in _SPEC_DUMPS:
        first = first.split(marker)[0]
    return f"{type(err).__name__}: {first[:200]}"


def read_state(step_dir: str, target: TrainState) -> TrainState:
    """The ``params`` and ``train`` items of a checkpoint, restored onto the shardings of ``target``
    (not yet verified against checksums).

    Raises:
      CheckpointError: Orbax cannot read them.
    """
    params_target, train_target = split(target)
    try:
        params, train = read_item(step_dir, "params", params_target), read_item(step_dir, "train", train_target)
    except Exception as err:  # Orbax / TensorStore raise many types for damaged files
        raise CheckpointError(f"Orbax cannot read it ({_orbax_failure(err)})") from err
    restored = {**flatten({"params": params}), **flatten(train)}
    return jax.tree.unflatten(jax.tree.structure(target), [restored[name] for name in flatten(target)])


def read_params(step_dir: str, target: Any) -> Any:
    """The ``params`` item of a checkpoint onto ``target`` (shardings, or numpy arrays)."""
    try:
        return read_item(step_dir, "params", target)
    except Exception as err:
        raise CheckpointError(f"{step_dir}: Orbax cannot read its parameters ({_orbax_failure(err)})") from err


def read_json(step_dir: str) -> Any:
    """The JSON ``meta`` item of a checkpoint as written (its meaning: :mod:`shardml.run.run_dir`)."""
    try:
        with open(os.path.join(step_dir, "meta", "metadata")) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{step_dir}: its meta item is missing or unreadable ({err})") from err


# ----------------------------------------------------------------------------- saving


class ArrayWriter:
    """Saves train states with Orbax's CheckpointManager; keeps the last ``keep``.

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

    def save(self, step: int, state: TrainState, meta_json: dict, iterator_state: dict | None = None) -> str:
        """Starts saving ``state`` (and ``meta_json`` as the ``meta`` item, this process's grain
        iterator state as ``data``) as checkpoint ``step``; returns its (future) directory."""
        params, train = split(state)
        items = {"params": ocp.args.PyTreeSave(params), "train": ocp.args.PyTreeSave(train),
                 "meta": ocp.args.JsonSave(meta_json)}
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
