"""What a user's compiled train step communicates, asserted from the compiled program
(:func:`shardml.analysis.audit.collectives`): gradients reduced once per step over ``data``,
nothing over ``data`` inside the microbatch loop, no parameter replicated on ``fsdp``.

    report = assert_communication(model, shardml.classification, batch, "data=2 x fsdp=2 x tensor=2",
                                  microbatches=4)
    print(report.table())
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax

from shardml.analysis.audit import CollectiveReport, collectives
from shardml.core.errors import ConfigError
from shardml.core.mesh import layout_name
from shardml.core.sharding import Rules, is_axes
from shardml.core.step import build_trainer
from shardml.core.trees import path_name
from shardml.testing.invariance import DEFAULT_LR, as_model
from shardml.testing.layouts import Layout, mesh_of

REDUCTIONS = ("all-reduce", "reduce-scatter")


class CommunicationError(AssertionError):
    """The compiled step communicates in a way the test ruled out; ``report`` is its collectives."""

    def __init__(self, message: str, report: CollectiveReport | None = None):
        super().__init__(message)
        self.report = report


def compiled_collectives(trainer, batch: dict) -> CollectiveReport:
    """The collectives of ``trainer``'s compiled step for a host batch of this shape (nothing runs)."""
    state = trainer.abstract_state()
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=trainer.batch_sharding), batch)
    compiled = trainer.lower_step(state, shapes).compile()
    return collectives(compiled.as_text(), trainer.mesh)


def _describe(op, mesh) -> str:
    where = f"inside a loop ({op.trips} executions per step)" if op.in_loop else "once per step"
    origin = f", from {op.op_name}" if op.op_name else ""
    return f"{op.kind} over {'+'.join(op.axes(mesh)) or '?'} ({op.dtype}, {op.bytes:,} bytes) {where}{origin}"


def _replicated_on(trainer, axis: str, min_ndim: int) -> list[str]:
    """Parameters with at least ``min_ndim`` dimensions that ``axis`` does not split."""
    shardings = jax.tree_util.tree_flatten_with_path(trainer.state_shardings.params)[0]
    logical = jax.tree.leaves(trainer.strategy.param_logical, is_leaf=is_axes)
    shapes = jax.tree.leaves(jax.eval_shape(trainer.strategy.layout, trainer.model.abstract_params))
    found = []
    for (path, sharding), axes, shape in zip(shardings, logical, shapes):
        used = {a for part in sharding.spec if part is not None for a in ((part,) if isinstance(part, str) else part)}
        if len(shape.shape) >= min_ndim and axis not in used:
            found.append(f"'{path_name(path)}' (shape {tuple(shape.shape)}, logical axes {axes}, "
                         f"spec {sharding.spec})")
    return found


def _check_sharded_on_fsdp(trainer, name: str, min_ndim: int) -> None:
    replicated = _replicated_on(trainer, "fsdp", min_ndim)
    if replicated:
        raise CommunicationError(
            f"{name}: {len(replicated)} parameter(s) replicated on fsdp (every fsdp device holds all of it and "
            f"its optimizer state): {'; '.join(replicated)}. Name a logical axis of each that the rules map to "
            "fsdp (by default 'embed'), or pass sharded_on_fsdp=False / min_ndim to allow it")


def _check_reduced_once(report: CollectiveReport, single: CollectiveReport | None, mesh, name: str,
                        table: str) -> None:
    """No reduction over ``data`` inside a loop, and (``single``: the same step with 1 microbatch)
    the same bytes reduced over ``data`` per step whatever the microbatch count."""
    looped = [op for kind in REDUCTIONS for op in report.select(kind, in_loop=True, axis="data")]
    ops = "".join(f"\n  {_describe(op, mesh)}" for op in looped[:8])
    if single is not None:
        got = sum(report.bytes(kind, axis="data") for kind in REDUCTIONS)
        want = sum(single.bytes(kind, axis="data") for kind in REDUCTIONS)
        if got != want:
            raise CommunicationError(
                f"{name}: gradients are not reduced once per step: the reductions over data move {got:,} bytes "
                f"per step, {want:,} with 1 microbatch ({len(looped)} inside a loop){ops}{table}\n"
                f"collectives with 1 microbatch:\n{single.table()}", report)
    if looped:
        raise CommunicationError(f"{name}: gradients are not reduced once per step: {len(looped)} reduction(s) "
                                 f"over data inside a loop:{ops}{table}", report)


def _check_loop_free(report: CollectiveReport, mesh, loop_free: Sequence[str], name: str, table: str) -> None:
    for axis in loop_free:
        if mesh.shape.get(axis, 1) == 1:
            continue
        in_loop = report.select(in_loop=True, axis=axis)
        if in_loop:
            ops = "".join(f"\n  {_describe(op, mesh)}" for op in in_loop[:8])
            raise CommunicationError(
                f"{name}: {len(in_loop)} collective(s) over {axis} inside a loop (the microbatch loop should "
                f"communicate nothing over {axis}):{ops}{table}", report)


def assert_communication(model: Any, loss, batch: dict, layout: Layout, *, microbatches: int = 2,
                         reduced_once: bool = True, loop_free: Sequence[str] = ("data",),
                         sharded_on_fsdp: bool = True, min_ndim: int = 2,
                         optimizer: optax.GradientTransformation | None = None, rules: Rules | None = None,
                         devices: Sequence[Any] | None = None) -> CollectiveReport:
    """Compiles ``model``'s train step on ``layout`` with ``microbatches`` and asserts what it
    communicates (nothing is run):

    - ``sharded_on_fsdp``: when the layout has fsdp > 1, every parameter of ``min_ndim`` or more
      dimensions (weights, not biases or norms) is split over ``fsdp``, so no device holds all of
      it (nor its optimizer state);
    - ``loop_free``: no collective spans these mesh axes inside a loop (the microbatch loop): the
      accumulator keeps per-shard sums and reduces them once, after the loop;
    - ``reduced_once``: the reductions (all-reduce, reduce-scatter) over ``data`` move the same
      bytes per step with ``microbatches`` as with 1 (a second compile), and none sits in a loop.

    Returns:
      The :class:`~shardml.analysis.audit.CollectiveReport` of the step (``.table()`` prints it).

    Raises:
      CommunicationError: an AssertionError naming the parameter or the collective (kind, mesh
        axes, bytes, executions, the JAX operation it came from), with the step's table.
    """
    __tracebackhide__ = True
    devices = list(jax.devices() if devices is None else devices)
    mesh = mesh_of(layout, devices)
    model = as_model(model, batch["inputs"])
    optimizer = optimizer or optax.sgd(DEFAULT_LR)
    name = f"layout {layout_name(mesh.shape)} with {microbatches} microbatch{'es' if microbatches > 1 else ''}"

    def trainer_of(k: int):
        try:
            return build_trainer(model, mesh, optimizer, loss=loss, microbatches=k, rules=rules)
        except ConfigError as err:
            raise ConfigError(f"{name}: {err}") from err

    trainer = trainer_of(microbatches)
    if sharded_on_fsdp and mesh.shape["fsdp"] > 1:
        _check_sharded_on_fsdp(trainer, name, min_ndim)
    report = compiled_collectives(trainer, batch)
    table = f"\ncollectives of the step ({name}):\n{report.table()}"
    if reduced_once and mesh.shape["data"] > 1:
        single = compiled_collectives(trainer_of(1), batch) if microbatches > 1 else None
        _check_reduced_once(report, single, mesh, name, table)
    _check_loop_free(report, mesh, loop_free, name, table)
    return report
