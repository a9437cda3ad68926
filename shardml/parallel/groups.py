"""Different architectures at once: the devices split into disjoint groups, each group its own mesh
(its own data / fsdp / tensor layout) and its own compiled step, every group's step dispatched each
iteration without waiting for the others.

The ``members`` axis stacks copies of *one* architecture in one vmapped step; a 2-layer and a
6-layer model, or an MLP and a transformer, cannot share that step. Here each architecture gets
the one trainer builder (:func:`shardml.core.step.step_program`, wrapped by
:func:`shardml.parallel.members.over_population` when a group holds several members) on a mesh of
its group's devices only, and :func:`dispatch` calls every group's jitted step in turn: JAX
dispatches asynchronously, so a call returns once the work is queued and the groups' steps run on
their own devices while the host moves on. Metrics are read only after every group is dispatched.

    specs = [GroupSpec(mlp_classifier(64, 32, 10), optax.sgd(0.1), loss=classification, layout={"data": 4}),
             GroupSpec(mlp_classifier(64, 128, 10), optax.sgd(0.1), loss=classification,
                       layout={"data": 2, "tensor": 2})]
    groups = build_groups(specs)                      # checked for every group, then compiled
    run = train_groups(groups, batches, steps=100)    # run.states[g], run.metrics[g][step]
    group_ensemble_metrics(groups, [s.params for s in run.states], eval_batches)

Group sizes are given (``devices=``), follow a fully fixed layout (its product), or are balanced by
each model's cost (FLOPs per example times members): every flexible group gets the devices its
layout's fixed axes (and its batch) need, then the rest go, a step at a time, to the group with the
most cost per device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax

from shardml.core.errors import LayoutError, SettingError, ShardmlError
from shardml.core.losses import Loss, token_cross_entropy
from shardml.core.mesh import MESH_AXES, make_mesh
from shardml.core.model import Model
from shardml.core.sharding import Rules
from shardml.core.step import Program, Trainer, TrainState, compile_trainer, step_program
from shardml.parallel.members import gated, over_population
from shardml.parallel.population import EnsembleMetrics


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """One architecture of a group run and how its group is laid out.

    Attributes:
      model, optimizer, loss, microbatches, rules: as :func:`shardml.build_trainer`.
      layout: mesh axis sizes inside the group (``{"data": 2, "tensor": 2}``; ``-1`` fills the
        group); default all of the group on ``data``.
      devices: the group's number of devices; None: the product of a fixed ``layout``, or
        balanced by ``cost``.
      members: identical copies of the model stacked on the ``members`` axis inside the group
        (member i from seed + i); ``hyperparams``: one value per member, as
        :func:`shardml.build_population`.
      cost: the group's weight when balancing (default ``model.flops_per_example``, else its
        parameter count, times ``members``).
      name: how logs and errors name the group (default the model's name and the group's index).
      seed: the group's initialisation seed (default the run's).
      batch_size: the global batch the group trains on, so balancing picks sizes it divides over.

    Example:
      >>> spec = GroupSpec(mlp_classifier(64, 128, 10), optax.sgd(0.1), loss=classification,
      ...                  layout={"data": 2, "tensor": 2})   # doctest: +SKIP
      >>> spec.quantum(), spec.fixed()                          # doctest: +SKIP
      (4, True)
    """

    model: Model
    optimizer: optax.GradientTransformation
    loss: Loss = token_cross_entropy
    layout: Mapping[str, int] | None = None
    devices: int | None = None
    members: int = 1
    hyperparams: Mapping[str, Sequence[float]] | None = None
    microbatches: int = 1
    rules: Rules | None = None
    cost: float | None = None
    name: str | None = None
    seed: int | None = None
    batch_size: int | None = None

    def sizes(self) -> dict[str, int]:
        """The layout's axis sizes by canonical name (1 where not given; -1 fills).

        Raises:
          SettingError: an unknown axis, a size that is neither positive nor -1, or two -1s.
        """
        given = {k: int(v) for k, v in (self.layout or {"data": -1}).items()}
        unknown = sorted(set(given) - set(MESH_AXES))
        problems = [f"unknown axis '{k}'" for k in unknown] + [f"{k}={v}" for k, v in given.items() if v == 0 or v < -1]
        if list(given.values()).count(-1) > 1:
            problems.append("two axes are -1")
        if problems:
            raise SettingError(f"layout {given} of group '{self.name or self.model.name}': {', '.join(problems)}; the "
                               f"axes are {', '.join(MESH_AXES)}, each a positive size, at most one -1 (fills the group)",
                               subject="layout", value=given)
        return {axis: given.get(axis, 1) for axis in MESH_AXES}

    def quantum(self) -> int:
        """The devices the fixed axes of the layout need; the group's size is a multiple of it."""
        return math.prod(size for size in self.sizes().values() if size != -1)

    def allowed(self, n_devices: int) -> list[int]:
        """The group sizes up to ``n_devices`` this layout fills and, with ``batch_size``, whose
        data x fsdp x microbatches divides the batch."""
        sizes = []
        for size in range(self.quantum(), n_devices + 1, self.quantum()):
            mesh = {k: (size // self.quantum() if v == -1 else v) for k, v in self.sizes().items()}
            split = mesh.get("data", 1) * mesh.get("fsdp", 1) * self.microbatches
            if self.batch_size is None or self.batch_size % split == 0:
                sizes.append(size)
        return sizes

    def fixed(self) -> bool:
        """Whether the layout alone fixes the group's size (no axis is -1)."""
        return -1 not in self.sizes().values()

    def weight(self) -> float:
        """The cost balancing shares devices by."""
        if self.cost is not None:
            return float(self.cost)
        per_model = self.model.flops_per_example or float(self.model.num_params)
        return float(per_model) * self.members


# ----------------------------------------------------------------------------- splitting the devices


def balanced_sizes(options: Sequence[Sequence[int]], costs: Sequence[float], n_devices: int) -> list[int]:
    """Devices per group: each its smallest allowed size first, then the rest one step at a time (to
    the group's next allowed size) to the group with the most cost per device.

    Args:
      options: each group's allowed sizes, ascending (multiples of its layout's fixed axes that its
        batch divides over; see :meth:`GroupSpec.allowed`).

    Example:
      >>> balanced_sizes([range(1, 9), range(1, 9)], [3.0, 1.0], 8)
      [6, 2]

    Raises:
      LayoutError: the smallest sizes need more than ``n_devices``, or no split uses every device.
    """
    options = [list(o) for o in options]
    if any(not o for o in options) or sum(o[0] for o in options) > n_devices:
        smallest = [o[0] if o else None for o in options]
        raise LayoutError(f"the groups need at least {smallest} devices (their layouts' fixed axes and batches) but "
                          f"{n_devices} are available; use smaller layouts or fewer groups",
                          subject="groups", value=smallest)
    sizes = [o[0] for o in options]
    left = n_devices - sum(sizes)
    while left:
        grow = {i: next((s for s in o if s > sizes[i]), None) for i, o in enumerate(options)}
        fits = [i for i, s in grow.items() if s is not None and s - sizes[i] <= left]
        if not fits:
            raise LayoutError(f"cannot give the last {left} of {n_devices} devices to a group of sizes {sizes}: no "
                              f"group's next allowed size fits; give the groups' sizes (devices=) or other layouts",
                              subject="groups", value=sizes)
        best = max(fits, key=lambda i: (costs[i] / sizes[i], -i))
        left -= grow[best] - sizes[best]
        sizes[best] = grow[best]
    return sizes


def group_sizes(specs: Sequence[GroupSpec], n_devices: int) -> list[int]:
    """Each group's number of devices: given, fixed by its layout, or balanced by cost over the
    devices the others leave (see :func:`balanced_sizes`).

    Raises:
      LayoutError: sizes that do not add up to ``n_devices``, or a size < 1.
    """
    sizes = [spec.devices if spec.devices is not None else (spec.quantum() if spec.fixed() else None)
             for spec in specs]
    for index, size in enumerate(sizes):
        if size is not None and size < 1:
            raise LayoutError(f"group {index} has devices={size}; every group needs at least one device",
                              subject="devices", value=size)
    flexible = [i for i, size in enumerate(sizes) if size is None]
    if flexible:
        left = n_devices - sum(size for size in sizes if size is not None)
        shares = balanced_sizes([specs[i].allowed(left) for i in flexible], [specs[i].weight() for i in flexible],
                                left)
        for i, share in zip(flexible, shares):
            sizes[i] = share
    check_partition(sizes, n_devices)
    return sizes


def check_partition(sizes: Sequence[int], n_devices: int) -> None:
    """The groups' sizes use every device exactly once.

    Raises:
      LayoutError: naming the sizes, their sum and the number of devices.
    """
    if not sizes:
        raise SettingError("no groups: give at least one GroupSpec", subject="groups", value=[])
    if sum(sizes) != n_devices:
        raise LayoutError(f"groups of {list(sizes)} devices add up to {sum(sizes)}, but there are {n_devices} "
                          f"devices; the groups must partition the devices (sizes adding up to {n_devices})",
                          subject="groups", value=list(sizes))


def split_devices(devices: Sequence, sizes: Sequence[int]) -> list[tuple]:
    """``devices`` cut into consecutive disjoint groups of ``sizes``.

    Example:
      >>> split_devices(list(range(8)), [2, 6])
      [(0, 1), (2, 3, 4, 5, 6, 7)]

    Raises:
      LayoutError: a device listed twice, or sizes that do not partition the devices.
    """
    devices = list(devices)
    if len(set(devices)) != len(devices):
        raise LayoutError(f"a device is listed twice in {devices}; groups need disjoint devices",
                          subject="devices", value=devices)
    check_partition(sizes, len(devices))
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [tuple(devices[start:start + size]) for start, size in zip(starts, sizes)]


# ----------------------------------------------------------------------------- building the groups


@dataclasses.dataclass(frozen=True)
class Group:
    """One architecture on its devices: its spec, name, devices and compiled trainer."""

    name: str
    spec: GroupSpec
    devices: tuple
    trainer: Trainer


@contextlib.contextmanager
def in_group(name: str, size: int):
    """Errors raised inside say which group (and how many devices) they are about."""
    try:
        yield
    except ShardmlError as err:
        raise type(err)(f"group '{name}' ({size} devices): {err}", subject=err.subject, value=err.value) from None


def group_program(spec: GroupSpec, devices: Sequence) -> Program:
    """The checked :class:`Program` of ``spec`` on a mesh of ``devices`` (nothing compiled)."""
    mesh = make_mesh(spec.sizes(), devices)
    if spec.members == 1 and not spec.hyperparams:
        return step_program(spec.model, mesh, spec.optimizer, loss=spec.loss, microbatches=spec.microbatches,
                            rules=spec.rules)
    program = step_program(spec.model, mesh, gated(spec.optimizer), loss=spec.loss, microbatches=spec.microbatches,
                           rules=spec.rules)
    return over_population(program, spec.members, hyperparams=spec.hyperparams)


@dataclasses.dataclass(frozen=True)
class Groups:
    """Compiled groups, in the order of their specs; iterate for each :class:`Group` (``name``,
    ``devices``, ``spec``, ``trainer``: a :class:`shardml.Trainer` on the group's own mesh).

    Example:
      >>> groups = build_groups(specs)                       # doctest: +SKIP
      >>> [(g.name, len(g.devices)) for g in groups]         # doctest: +SKIP
      [('mlp_classifier-0', 4), ('mlp_classifier-1', 4)]
    """

    groups: tuple[Group, ...]

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> Group:
        return self.groups[index]

    def init(self, seed: int = 0) -> list[TrainState]:
        """Every group's fresh state (a group's own ``seed`` wins), each on its own devices."""
        return [g.trainer.init(seed if g.spec.seed is None else g.spec.seed) for g in self.groups]


def build_groups(specs: Sequence[GroupSpec], devices: Sequence | None = None) -> Groups:
    """Splits ``devices`` (default all) into one group per spec, checks every group's layout and
    model, then compiles (on first use) each group's step on its own mesh.

    Raises:
      ShardmlError: before anything compiles: groups that do not partition the devices, a layout
        whose sizes do not multiply to its group's size, a model (or members) that its group's
        layout does not divide; the message names the group.

    Example:
      >>> groups = build_groups([GroupSpec(small, optax.sgd(0.1), devices=2),
      ...                        GroupSpec(large, optax.sgd(0.1), layout={"fsdp": 2, "data": -1})])  # doctest: +SKIP
      >>> states = groups.init(seed=0)                       # doctest: +SKIP
    """
    devices = list(jax.devices() if devices is None else devices)
    parts = split_devices(devices, group_sizes(specs, len(devices)))
    names = [spec.name or f"{spec.model.name}-{i}" for i, spec in enumerate(specs)]
    programs = []
    for name, spec, part in zip(names, specs, parts):
        with in_group(name, len(part)):
            programs.append(group_program(spec, part))
    return Groups(tuple(Group(name, spec, part, compile_trainer(program))
                        for name, spec, part, program in zip(names, specs, parts, programs)))


# ----------------------------------------------------------------------------- the dispatch loop


def dispatch(groups: Groups, states: Sequence[TrainState], batches: Sequence[dict],
             live: Sequence[int] | None = None) -> tuple[list, list]:
    """One step of every group (or of the ``live`` ones; the others keep their state and get no
    metrics), none waited for: each call returns once its work is queued (states are donated).
    Returns the new states and the metrics, still on device."""
    live = range(len(groups)) if live is None else live
    states, metrics = list(states), [None] * len(groups)
    for index in live:
        trainer = groups[index].trainer
        states[index], metrics[index] = trainer.step(states[index], trainer.put(batches[index]))
    return states, metrics


@dataclasses.dataclass
class GroupsRun:
    """What :func:`train_groups` returns: every group's final state and its metrics per step (host
    values; a group of members has one value per member). A group stopped early (``stopped``:
    group -> the steps it trained) has fewer rows.

    Example:
      >>> run = train_groups(groups, batches, steps=10)      # doctest: +SKIP
      >>> run.loss(0)[-1], run.states[1].params              # doctest: +SKIP
    """

    groups: Groups
    states: list[TrainState]
    metrics: list[list[dict]]
    stopped: dict[int, int] = dataclasses.field(default_factory=dict)

    def loss(self, group: int) -> list:
        """The group's loss at every step."""
        return [m["loss"] for m in self.metrics[group]]


def batches_of(data: Callable | Sequence[Callable], n_groups: int) -> Callable[[int], list[dict]]:
    """``step -> one batch per group``: one ``step -> batch`` function shared by every group, or
    one per group."""
    if callable(data):
        return lambda step: [data(step)] * n_groups
    sources = list(data)
    if len(sources) != n_groups:
        raise SettingError(f"{len(sources)} data sources for {n_groups} groups; give one step -> batch function "
                           f"for all, or one per group", subject="data", value=len(sources))
    return lambda step: [source(step) for source in sources]


@dataclasses.dataclass(frozen=True)
class GroupsHook:
    """What :func:`train_groups` does between steps: ``due(done)`` (steps done so far) is asked
    after every dispatch and must be cheap; when it is true, the metrics up to that step are read
    and ``act(done, run)`` is called (to save every group, evaluate, prune; it may replace entries
    of ``run.states``, e.g. to freeze members). It returns the groups to stop there: they are no
    longer dispatched (their devices idle) and keep their state; stopping every group ends the run.

    Example:
      >>> hook = GroupsHook(due=lambda done: done % 100 == 0, act=lambda done, run: save(done, run) or ())  # doctest: +SKIP
    """

    due: Callable[[int], bool]
    act: Callable[[int, "GroupsRun"], Iterable[int]]


def train_groups(groups: Groups, data: Callable | Sequence[Callable], steps: int, *, seed: int = 0,
                 states: Sequence[TrainState] | None = None, start: int = 0,
                 metrics: Sequence[Sequence[dict]] | None = None, hook: GroupsHook | None = None) -> GroupsRun:
    """Trains every group from step ``start`` to ``steps``: each iteration dispatches every group's
    step, then reads the previous iteration's metrics (so the host never waits for a group before
    dispatching the next one, and a slow group never holds back a fast one's queue).

    Args:
      data: ``step -> batch`` (host NumPy dicts) shared by every group, or one such function per
        group (architectures that take different inputs); called with the absolute step.
      seed: initialisation seed (groups with their own ``seed`` keep it); ``states``: start from
        these instead (e.g. restored at step ``start``), ``metrics``: each group's metrics of the
        steps before ``start``, kept in the run's history.
      hook: called between steps (:class:`GroupsHook`): to checkpoint, evaluate, prune or stop.

    Example:
      >>> run = train_groups(build_groups(specs), lambda step: batch, steps=10)   # doctest: +SKIP
      >>> more = train_groups(groups, data, 20, states=run.states, start=10, metrics=run.metrics)  # doctest: +SKIP
    """
    if steps < 0 or not 0 <= start <= max(steps, 0):
        raise SettingError(f"steps={steps}, start={start}: need 0 <= start <= steps", subject="steps", value=steps)
    batches = batches_of(data, len(groups))
    states = list(states) if states is not None else groups.init(seed)
    history: list[list[dict]] = [list(rows) for rows in metrics] if metrics is not None else [[] for _ in groups]
    run, live, pending = GroupsRun(groups, states, history), list(range(len(groups))), None
    for step in range(start, steps):
        run.states, out = dispatch(groups, run.states, batches(step), live)
        if pending is not None:
            record(history, pending)
        pending = out
        if hook is not None and hook.due(step + 1):
            record(history, pending)  # the hook sees every step up to this one
            pending = None
            for index in sorted(set(hook.act(step + 1, run)) & set(live)):
                run.stopped[index] = step + 1
                live.remove(index)
            if not live:
                break
    if pending is not None:
        record(history, pending)
    return run


def record(history: list[list[dict]], metrics: Sequence[dict]) -> None:
    """Appends one step's metrics of every group (blocks until all are computed)."""
    for rows, values in zip(history, jax.device_get(list(metrics))):
        if values is not None:  # a stopped group's
            rows.append({k: v.tolist() for k, v in values.items()})


# ----------------------------------------------------------------------------- heterogeneous ensembles


def group_logits(groups: Groups, params: Sequence[Any], inputs: Any) -> list:
    """Every group's logits for ``inputs`` as [members, ...]: all dispatched, then read."""
    out = [g.trainer.predict(p, g.trainer.put_eval({"inputs": inputs})["inputs"]) for g, p in zip(groups, params)]
    return [np.asarray(x, np.float32) if g.trainer.members > 1 else np.asarray(x, np.float32)[None]
            for g, x in zip(groups, jax.device_get(out))]


def group_ensemble_metrics(groups: Groups, params: Sequence[Any], batches: Iterable[dict]) -> dict:
    """The metrics of :func:`shardml.ensemble_metrics` for an ensemble of every member of every
    group (different architectures; the ensemble is the mean of their probabilities). Members are
    ordered group by group, ``member_*`` lists follow that order.

    Raises:
      SettingError: ``params`` not one per group.

    Example:
      >>> group_ensemble_metrics(groups, [s.params for s in run.states], eval_batches)["ece"]  # doctest: +SKIP
    """
    if len(params) != len(groups):
        raise SettingError(f"{len(params)} parameter trees for {len(groups)} groups; give each group's params",
                           subject="params", value=len(params))
    metrics = EnsembleMetrics()
    for batch in batches:
        logits = np.concatenate(group_logits(groups, params, batch["inputs"]), axis=0)
        metrics.add(logits, batch["targets"], batch.get("mask"))
    return metrics.result()
