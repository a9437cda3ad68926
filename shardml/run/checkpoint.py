"""Checkpoints of the whole train state: the names users and older code import.

A checkpoint is one Orbax step directory, ``OUT_DIR/checkpoints/<step>/``, with the items
``params`` (a plain nested dict of arrays: it loads with plain Orbax; a LoRA run from
``model.from`` leaves its frozen base out, :class:`~shardml.run.run_dir.Frozen`), ``train`` (the rest of the
:class:`~shardml.core.step.TrainState`), ``meta`` (:class:`shardml.run.run_dir.Meta`) and, with
grain workers, ``data`` (the iterator's state). Storage lives in :mod:`shardml.run.store`; what a
checkpoint means, saving, restoring and resuming in :mod:`shardml.run.run_dir`::

    ckpt = Checkpointer("runs/x/checkpoints", keep=3)
    ckpt.save(step, state)
    state, meta = restore(ckpt.step_dir(step), trainer.abstract_state())
    params = load_params("runs/x", trainer.abstract_state().params)
"""

from shardml.core.trees import flatten
from shardml.run.run_dir import VERSION as FORMAT
from shardml.run.run_dir import Checkpointer, Frozen, Meta, load_params, read_meta, restore, restore_latest
from shardml.run.store import (TRAIN_FIELDS, CheckpointError, IteratorState, checksums, describe, read_iterator_state,
                               resolve, set_aside_damaged, steps, unfinished)

__all__ = ["FORMAT", "TRAIN_FIELDS", "CheckpointError", "Checkpointer", "Frozen", "IteratorState", "Meta", "checksums",
           "describe", "flatten", "load_params", "read_iterator_state", "read_meta", "resolve", "restore",
           "restore_latest", "set_aside_damaged", "steps", "unfinished"]
