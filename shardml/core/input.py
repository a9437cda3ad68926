"""The input pipeline: each process's rows of every step, preprocessed by grain worker processes,
assembled into global arrays, checked and prefetched to the devices.

    feeder = Feeder(source, trainer.batch_sharding, workers=4)
    feeder.start(step=0)
    batch = feeder.get(0)          # global jax.Arrays, ready for trainer.step
    feeder.close()

A source's global batch of step s is a pure function of (seed, s) (:mod:`shardml.core.data`).
This process holds rows ``[lo, hi)`` of it (:func:`process_rows`, from the batch sharding's
addressable indices); the pipeline reads only those rows::

    source.steps()                          grain.MapDataset: step s -> ids of its B examples
      .map_with_index(rows lo:hi -> load)   windowing / tokenisation / augmentation of L = hi - lo rows
      [origin:]                             where the run (re)starts
      .to_iter_dataset()
      .mp_prefetch(workers)                 steps dealt round-robin to worker processes, order kept
      .map(make_array_from_process_local_data)
      ThreadPrefetch(2)                     global batches placed ahead of the step

so the batches do not depend on the number of workers or processes. The first batch is checked:
every device's shard must hold exactly the rows this process read for that slice of the global
batch (the JAX guide warns that a wrong placement trains silently on wrong data). Each element
carries its step, and a batch delivered for another step than asked is an error, never a silent
repeat or skip. The iterator's state (grain's ``get_state``) goes into checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import jax
import numpy as np

from shardml.core.data import put_batch
from shardml.core.errors import LayoutError, SettingError

WORKER_BUFFER = 2  # preprocessed batches each worker keeps ready
DEVICE_BUFFER = 2  # global batches placed on the devices ahead of the step


class PlacementError(RuntimeError):
    """A device holds other rows of the global batch than this process read for it."""


# ----------------------------------------------------------------------------- which rows


def contiguous_rows(spans: list[tuple[int, int]]) -> slice:
    """The one range ``[lo, hi)`` covered by row spans (overlaps allowed: replicas).

    Raises:
      LayoutError: the spans leave a gap (this process's rows are not one block).
    """
    spans = sorted(spans)
    lo, hi = spans[0]
    for start, stop in spans[1:]:
        if start > hi:
            raise LayoutError(f"this process's devices hold rows {spans} of the batch, which are not one contiguous "
                              "block; a mesh whose batch axes keep each process's devices together (the default "
                              "device order of shardml.make_mesh) is needed")
        hi = max(hi, stop)
    return slice(lo, hi)


def process_rows(sharding, rows: int) -> slice:
    """The rows ``[lo, hi)`` of a global batch of ``rows`` rows that this process's devices hold
    (all of them on one process; replicated rows count for every process holding them)."""
    spans = []
    for index in sharding.addressable_devices_indices_map((rows,)).values():
        cut = index[0]
        spans.append((cut.start or 0, rows if cut.stop is None else cut.stop))
    return contiguous_rows(spans)


# ----------------------------------------------------------------------------- assembly and checks


def assemble(local: dict, sharding, rows: int) -> dict:
    """This process's rows -> global arrays of ``rows`` rows (``make_array_from_process_local_data``)."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x, (rows, *np.shape(x)[1:])),
                        local)


def check_placement(batch: dict, local: dict, first_row: int) -> None:
    """Every addressable shard of ``batch`` holds exactly the rows of ``local`` (rows
    ``[first_row, first_row + len)`` of the global batch) that its index names.

    Costs one copy of this process's shards to the host; done once per run, on its first batch.

    Raises:
      PlacementError: naming the leaf, the rows, the device and where they differ.
    """
    pairs = zip(jax.tree_util.tree_flatten_with_path(batch)[0], jax.tree.leaves(local))
    for (path, array), host in pairs:
        host = np.asarray(host)
        for shard in array.addressable_shards:
            cut = shard.index[0] if shard.index else slice(None)
            start, stop = cut.start or 0, array.shape[0] if cut.stop is None else cut.stop
            if start < first_row or stop > first_row + len(host):
                raise PlacementError(
                    f"batch{jax.tree_util.keystr(path)}: device {shard.device} holds rows {start}:{stop} of the global "
                    f"batch, but this process read rows {first_row}:{first_row + len(host)}")
            held = np.asarray(shard.data)
            if not np.array_equal(held, host[start - first_row:stop - first_row]):
                raise PlacementError(
                    f"batch{jax.tree_util.keystr(path)}: device {shard.device} holds other data for rows "
                    f"{start}:{stop} than this process read for them; the global batch would be trained on wrong rows")


# ----------------------------------------------------------------------------- grain plumbing


@dataclasses.dataclass(frozen=True)
class _Rows:
    """A grain map over steps: (step, ids of the global batch) -> (step, this process's rows)."""

    source: Any
    lo: int
    hi: int

    def __call__(self, step: int, ids: np.ndarray):
        return int(step), self.source.load(int(step), ids[self.lo:self.hi], self.lo)


def _worker_init(worker_index: int, worker_count: int) -> None:
    # Parallelism comes from the workers: one thread each for the tokenizer (no oversubscription).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _grain_flags() -> None:
    """grain 0.2.18 reads an absl flag in mp_prefetch that raises unless flags were parsed, which
    only absl.app programs do (google/grain#1355, fixed after 0.2.18): take the defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def pipelined(source: Any) -> bool:
    """Whether ``source`` splits into grain stages (``steps``, ``load`` and ``batch_size``; the
    built-in text and array sources do)."""
    return (callable(getattr(source, "steps", None)) and callable(getattr(source, "load", None))
            and isinstance(getattr(source, "batch_size", None), int))


class Feeder:
    """Global batches of each step for the train step, from a source.

    Args:
      source: a source (``batch(step)``); one with ``steps()`` / ``load()`` (TextBatches,
        ArrayBatches) is read row-wise: each process reads only its rows.
      sharding: the batch sharding (``trainer.batch_sharding``).
      workers: grain worker processes preprocessing batches ahead (0: read in this process, when
        asked). With workers, batches come from a grain iterator whose state is checkpointed.

    Raises:
      SettingError: ``workers`` > 0 for a source that is not a grain pipeline.
      LayoutError: this process's rows are not one block.
    """

    def __init__(self, source: Any, sharding, workers: int = 0):
        self.source, self.sharding, self.workers = source, sharding, workers
        multi = jax.process_count() > 1
        if workers and not pipelined(source):
            raise SettingError(f"workers={workers}: {type(source).__name__} is not a grain pipeline (it has no "
                               "steps()/load()); use workers=0, or a source such as shardml.TextBatches",
                               subject="workers", value=workers)
        self.rowwise = pipelined(source) and (workers > 0 or multi)
        self.rows = source.batch_size if self.rowwise else None
        self.mine = process_rows(sharding, self.rows) if self.rowwise else None
        self._iterator = None
        self._origin: int | None = None
        self._checked = not (self.rowwise or multi)  # one process, whole batches: device_put is exact

    # -------------------------------------------------------------- position

    def start(self, step: int, state: dict | None = None, iterator_state: dict | None = None) -> str | None:
        """Positions the feeder at ``step``: with workers, a grain iterator restored from
        ``iterator_state`` when ``state`` (as :meth:`state` gave it) says it was saved with the
        same processes and workers, else started at ``step``. Returns a note when a saved
        position could not be used as it was (the batches are the same either way)."""
        self.close()
        if not (self.rowwise and self.workers):
            return None
        saved = (state or {}).get("grain")
        here = {"workers": self.workers, "processes": jax.process_count()}
        origin, restore, note = step, None, None
        if saved is not None:
            if {k: saved.get(k) for k in here} == here and iterator_state is not None:
                origin, restore = int(saved["origin"]), iterator_state
            else:
                why = "its file for this process is missing" if iterator_state is None else "another split"
                note = (f"input position: the checkpoint's grain iterator state was saved by {saved.get('processes')} "
                        f"process(es) x {saved.get('workers')} worker(s) ({why}), this run has {here['processes']} x "
                        f"{here['workers']}; it starts a new iterator at step {step} (the batch of a step does not "
                        "depend on the split)")
        self._origin = origin
        self._iterator = iter(self._pipeline(origin))
        if restore is not None:
            self._iterator.set_state(restore)
        return note

    def _pipeline(self, origin: int):
        _grain_flags()
        lo, hi = self.mine.start, self.mine.stop
        per_step = self.source.steps().map_with_index(_Rows(self.source, lo, hi))[origin:]
        read = per_step.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        read = read.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers,
                                                             per_worker_buffer_size=WORKER_BUFFER),
                                worker_init_fn=_worker_init)
        placed = read.map(self._placed)
        return grain.experimental.ThreadPrefetchIterDataset(placed, prefetch_buffer_size=DEVICE_BUFFER)

    def _placed(self, element):
        step, local = element
        # Out of grain's shared memory at once: its segments are released here, not when the
        # device arrays (which may alias host memory on CPU) die.
        local = jax.tree.map(np.array, local)
        return step, local, assemble(local, self.sharding, self.rows)

    def state(self) -> dict | None:
        """What a checkpoint's meta records of the input position (JSON); None without workers."""
        if self._iterator is None:
            return None
        return {"grain": {"origin": self._origin, "workers": self.workers, "processes": jax.process_count()}}

    def iterator_state(self) -> dict | None:
        """The grain iterator's own state (``get_state()``), for grain's Orbax checkpoint handler."""
        return None if self._iterator is None else self._iterator.get_state()

    # -------------------------------------------------------------- batches

    def get(self, step: int) -> dict:
        """The global batch of ``step`` as jax.Arrays sharded like ``sharding``.

        Raises:
          RuntimeError: the iterator delivered another step (it was not positioned at ``step``).
          PlacementError: on the first batch, a shard holds other rows than this process read.
        """
        if self._iterator is not None:
            got, local, batch = next(self._iterator)
            if got != step:
                raise RuntimeError(f"the input pipeline delivered the batch of step {got} when step {step} was due; "
                                   "it was positioned at another step than the run (no batch is repeated or skipped "
                                   "silently)")
            first = self.mine.start
        elif self.rowwise:
            ids = self.source.steps()[step]
            local = self.source.load(step, ids[self.mine], self.mine.start)
            batch, first = assemble(local, self.sharding, self.rows), self.mine.start
        else:
            local = self.source.batch(step)
            batch, first = put_batch(local, self.sharding), 0
        if not self._checked:
            check_placement(batch, local, first)
            self._checked = True
        return batch

    def close(self) -> None:
        """Stops the worker processes (idempotent)."""
        if self._iterator is not None:
            close = getattr(self._iterator, "close", None)
            if callable(close):
                close()
            self._iterator = None
