"""Checkpoints of a groups run (``model.*`` lists, :mod:`shardml.run.groups`): every group's state
in its own Orbax directory, all saved at the same step, each with the group's metrics so far.

    OUT_DIR/checkpoints/group-0/<step>/   group 0's state on its own mesh (+ Meta: identity, metrics)
    OUT_DIR/checkpoints/group-1/<step>/   ...

A rerun of the same command resumes every group from the latest step that all groups saved and
that restores and verifies in all of them; a step only some groups hold (the process died while
saving) or one damaged in any group is moved to ``checkpoints/group-<i>-damaged/`` (never deleted)
so that the step can be saved again::

    ckpts = GroupCheckpoints(out_dir, groups, ident, keep=3)
    start, states, metrics = ckpts.resume()        # 0, None, None for a new run
    ckpts.save(step, run)                          # every group, at ``step``
    ckpts.close()
"""

from __future__ import annotations

import os
from collections.abc import Callable

from shardml.core.step import TrainState
from shardml.parallel.groups import Groups, GroupsRun
from shardml.run import store
from shardml.run.library_log import handled
from shardml.run.run_dir import Checkpointer, Identity, check_resumable, read_meta, restore
from shardml.run.store import CheckpointError


def group_dir(out_dir: str, index: int) -> str:
    """Where group ``index`` of a groups run keeps its checkpoints.

    Example:
      >>> group_dir("runs/x", 1)
      'runs/x/checkpoints/group-1'
    """
    return os.path.join(out_dir, "checkpoints", f"group-{index}")


def common_steps(held: list[list[int]]) -> tuple[list[int], list[int]]:
    """``(steps every group holds, steps only some hold)``, ascending.

    Example:
      >>> common_steps([[2, 4], [2]])
      ([2], [4])
    """
    every = set.intersection(*map(set, held)) if held else set()
    return sorted(every), sorted(set().union(*map(set, held)) - every)


class GroupCheckpoints:
    """Saves and resumes every group of a groups run (see the module docstring).

    Args:
      out_dir: the run's directory; ``ident``: its identity (recorded in every checkpoint, and
        checked before one is resumed); ``primary``: the process that moves damaged checkpoints.
    """

    def __init__(self, out_dir: str, groups: Groups, ident: Identity, keep: int = 3, async_save: bool = True,
                 notice: Callable[[str], None] = print, primary: bool = True):
        self.out_dir, self.groups, self.ident, self.notice, self.primary = out_dir, groups, ident, notice, primary
        self.dirs = [group_dir(out_dir, i) for i in range(len(groups))]
        self._keep, self._async = keep, async_save
        self._writers: list[Checkpointer] = []
        self.saved: int | None = None

    def _set_aside(self, step: int, why: str) -> None:
        for directory in self.dirs:
            step_dir = os.path.join(directory, str(step))
            if os.path.isdir(step_dir):
                where = f"; moved to {store.set_aside_damaged(step_dir)}" if self.primary else ""
                self.notice(f"skipping checkpoint step {step} of {os.path.basename(directory)}: {why}{where}")

    def _restore(self, step: int) -> tuple[list[TrainState], list[list[dict]]]:
        """Every group's state and metrics at ``step`` (each checked, restored and verified)."""
        check = check_resumable(self.ident, self.out_dir)
        states, metrics = [], []
        for group, directory in zip(self.groups, self.dirs):
            step_dir = os.path.join(directory, str(step))
            check(read_meta(step_dir))
            state, meta = restore(step_dir, group.trainer.abstract_state())
            states.append(state)
            metrics.append(list((meta.data_state or {}).get("metrics", [])))
        if any(len(rows) != step for rows in metrics):
            raise CheckpointError(f"its metrics hold {[len(rows) for rows in metrics]} steps, not {step}")
        return states, metrics

    def resume(self, search: bool = True) -> tuple[int, list[TrainState] | None, list[list[dict]] | None]:
        """``(step, states, metrics)`` of the latest step every group restores at, or ``(0, None,
        None)`` for a new run (also without ``search``: ``train.resume=never``); then opens the writers.

        Raises:
          ConfigError: the checkpoints are of another run (another model, other trained keys).
          CheckpointError: there are checkpoints but no step restores in every group.
        """
        if not search:
            self._writers = [Checkpointer(d, self._keep, self._async) for d in self.dirs]
            return 0, None, None
        for directory in self.dirs:
            for tmp in store.unfinished(directory):
                self.notice(f"ignoring an unfinished checkpoint write (the process stopped while saving): {tmp}")
        common, partial = common_steps([store.steps(d) for d in self.dirs])
        for step in partial:
            self._set_aside(step, "not every group saved it (the run stopped while saving)")
        found, damaged = (0, None, None), []
        for step in reversed(common):
            try:
                found = (step, *self._restore(step))
                break
            except CheckpointError as err:
                damaged.append(step)
                self._set_aside(step, f"{err}{handled(f'checkpoint step {step}', err)}")
        if common and found[1] is None:
            raise CheckpointError(f"none of the {len(common)} checkpoint steps in {os.path.dirname(self.dirs[0])} "
                                  f"restores in every group (steps {', '.join(map(str, damaged))})")
        self._writers = [Checkpointer(d, self._keep, self._async) for d in self.dirs]
        return found

    def save(self, step: int, run: GroupsRun) -> None:
        """Starts saving every group's state and metrics as checkpoint ``step`` (returns once each
        state is on the host)."""
        for index, (group, writer) in enumerate(zip(self.groups, self._writers)):
            writer.save(step, run.states[index], run=self.ident, data_state={"metrics": run.metrics[index][:step]},
                        mesh=dict(group.trainer.mesh.shape))
        self.saved = step

    def close(self) -> None:
        """Waits until every save is written and finalized."""
        for writer in self._writers:
            writer.close()
