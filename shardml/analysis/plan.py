"""Plan a run before asking for hardware: per-device memory and per-step communication of a layout.

Nothing is trained and nothing is allocated: the train step is lowered from abstract shapes and
compiled for the mesh the config asks for (on emulated CPU devices when there is no accelerator),
then read twice: the shardings of the abstract state give the parameter and optimizer bytes each
device holds, ``compiled.memory_analysis()`` gives arguments, outputs and temporaries (activations,
gradients, buffers), and the HLO audit (:mod:`shardml.audit`) gives every collective with its bytes
and mesh axes, loops multiplied by their trip counts::

    step = compiled_step(trainer, abstract_batch)          # nothing allocated
    result = plan_of(step, device_memory=16 * 2**30)
    print(format_plan(result))
    result.params_bytes, result.peak_bytes, result.fits

From a run config, :func:`shardml.run.planning.make_plan` builds the trainer and does the same
(what ``shardml plan`` prints). :func:`compiled_step` is the compile on its own (the compiled
program and the abstract state), for audits that read more of the program than a :class:`Plan` keeps.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

from shardml.core.errors import SettingError
from shardml.core.mesh import layout_name

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_bytes(text: str) -> int:
    """``"16GiB"`` -> 17179869184. Units: B, KiB/MiB/GiB/TiB (and K/M/G/T, binary), KB/MB/GB/TB (decimal).

    Raises:
      SettingError: when ``text`` is not a positive size.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise SettingError(f"device memory '{text}' is not a size; write e.g. 16GiB, 80GB, 512MiB or a byte count",
                           subject="device_memory", value=text)
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """Binary units, three significant digits: ``1536 -> '1.50 KiB'``."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


@dataclasses.dataclass(frozen=True)
class CommRow:
    """All collectives of one kind over one set of mesh axes, inside or outside loops, per step.

    ``bytes`` is the audit's figure: result bytes of each op x its executions (one device).
    ``sent_bytes`` is what one device sends on a ring of ``group`` devices: all-reduce
    2(n-1)/n x result, all-gather and all-to-all (n-1)/n x result, reduce-scatter (n-1) x result
    (its result is one shard), collective-permute the result times the share of devices that send
    (a permute whose pairs leave some devices out: the average over the mesh).
    """

    kind: str
    axes: tuple[str, ...]
    in_loop: bool
    ops: int
    executions: int
    bytes: int
    sent_bytes: int
    dtypes: str


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one layout costs per device and per step (all bytes are per device)."""

    label: str
    mesh: dict[str, int]
    devices: int
    platform: str
    num_params: int
    params_bytes: int  # parameters this device holds (from the state shardings)
    opt_state_bytes: int  # optimizer state this device holds
    batch_bytes: int  # the step's batch rows this device holds
    arguments_bytes: int  # memory_analysis: inputs (state + batch)
    outputs_bytes: int
    aliased_bytes: int  # outputs written over donated inputs
    temporaries_bytes: int  # activations, gradients and other buffers live during the step
    generated_code_bytes: int
    comm: tuple[CommRow, ...]
    compile_s: float
    device_memory: int | None = None
    theory: Any = None  # the layout's closed-form LayoutTheory, where the planner had one (shardml plan does)

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs not aliased to donated arguments + temporaries."""
        return self.arguments_bytes + self.outputs_bytes - self.aliased_bytes + self.temporaries_bytes

    @property
    def fits(self) -> bool | None:
        """Whether ``peak_bytes`` fits in ``device_memory`` (None when no memory was given)."""
        return None if self.device_memory is None else self.peak_bytes <= self.device_memory

    def comm_bytes(self, kind: str | None = None, axis: str | None = None) -> int:
        """Audit bytes per step of a collective kind and/or over a mesh axis."""
        return sum(r.bytes for r in self.comm if (kind is None or r.kind == kind)
                   and (axis is None or axis in r.axes))

    @property
    def sent_bytes(self) -> int:
        return sum(r.sent_bytes for r in self.comm)


def sent_per_device(op, result_bytes: int, devices: int | None = None) -> int:
    """Bytes one device sends for ``op`` on a ring (see :class:`CommRow`); ``devices``: mesh size,
    for the per-device average of a collective-permute."""
    if op.kind == "collective-permute":
        return result_bytes * len(op.groups) // devices if devices and op.groups else result_bytes
    n = len(op.groups[0]) if op.groups else 1
    if op.kind == "all-reduce":
        return int(2 * (n - 1) / n * result_bytes)
    if op.kind in ("all-gather", "all-to-all"):
        return int((n - 1) / n * result_bytes)
    if op.kind == "reduce-scatter":
        return (n - 1) * result_bytes
    return result_bytes


def comm_rows(report, mesh) -> tuple[CommRow, ...]:
    """Groups an audit report by (kind, mesh axes, inside loops)."""
    from shardml.analysis.audit import KINDS

    groups: dict = {}
    for op in report.ops:
        groups.setdefault((KINDS.index(op.kind), op.kind, op.axes(mesh), op.in_loop), []).append(op)
    rows = []
    for (_, kind, axes, in_loop), ops in sorted(groups.items()):
        rows.append(CommRow(
            kind=kind, axes=axes, in_loop=in_loop, ops=len(ops), executions=sum(o.trips for o in ops),
            bytes=sum(o.bytes * o.trips for o in ops),
            sent_bytes=sum(sent_per_device(o, o.bytes, mesh.devices.size) * o.trips for o in ops),
            dtypes=",".join(sorted({o.dtype for o in ops}))))
    return tuple(rows)


def _per_device_bytes(abstract_tree) -> int:
    import jax

    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(abstract_tree))


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """A trainer's train step, compiled from abstract shapes (nothing allocated)."""

    trainer: Any
    state: Any  # abstract TrainState (ShapeDtypeStructs with shardings)
    batch: dict
    compiled: Any  # jax.stages.Compiled
    compile_s: float

    @property
    def mesh(self):
        return self.trainer.mesh

    def argument_bytes(self) -> dict[str, int]:
        """Per-device bytes of the compiled step's arguments by part of the state, read from the
        shardings the compiled program takes them in (``params``, ``opt_state``, ``batch``, ...)."""
        import jax

        (state_shardings, batch_shardings), _ = self.compiled.input_shardings

        def per_device(shapes, shardings):
            return sum(math.prod(sh.shard_shape(s.shape)) * s.dtype.itemsize
                       for s, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))

        parts = {field.name: per_device(getattr(self.state, field.name), getattr(state_shardings, field.name))
                 for field in dataclasses.fields(self.state)}
        parts["batch"] = per_device(self.batch, batch_shardings)
        return parts


def compiled_step(trainer, batch: dict) -> CompiledStep:
    """Lowers and compiles ``trainer``'s step for ``batch`` (ShapeDtypeStructs, or arrays)."""
    import jax

    state = trainer.abstract_state()
    batch = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding), batch)
    start = time.perf_counter()
    compiled = trainer.lower_step(state, batch).compile()
    return CompiledStep(trainer, state, batch, compiled, time.perf_counter() - start)


def plan_of(step: CompiledStep, device_memory: int | None = None, label: str = "", theory=None) -> Plan:
    """Measures a compiled step: memory per device and communication per step.

    Args:
      step: from :func:`compiled_step`.
      device_memory: bytes one device has; sets :attr:`Plan.fits`.
      label: a name for tables (default: the mesh layout).
      theory: the layout's :class:`~shardml.analysis.theory.LayoutTheory`, printed beside the compiled
        figures (its activation estimate and its context traffic).
    """
    from shardml.analysis.audit import collectives, memory

    mesh, state = step.mesh, step.state
    mem = memory(step.compiled)
    return Plan(
        label=label or layout_name(mesh.shape, sep=","),
        mesh=dict(mesh.shape), devices=mesh.devices.size, platform=mesh.devices.flat[0].platform,
        num_params=step.trainer.model.num_params, params_bytes=_per_device_bytes(state.params),
        opt_state_bytes=_per_device_bytes(state.opt_state), batch_bytes=_per_device_bytes(step.batch),
        arguments_bytes=mem.arguments, outputs_bytes=mem.outputs, aliased_bytes=mem.aliased,
        temporaries_bytes=mem.temporaries, generated_code_bytes=mem.generated_code,
        comm=comm_rows(collectives(step.compiled.as_text(), mesh), mesh), compile_s=step.compile_s,
        device_memory=device_memory, theory=theory,
    )


# ----------------------------------------------------------------------------- printing


def _axes(row: CommRow) -> str:
    return "+".join(row.axes) or "-"


def _warning(p: Plan) -> str | None:
    if p.fits is False:
        return (f"WARNING: {p.label}: estimated peak {format_bytes(p.peak_bytes)} per device exceeds the "
                f"device memory {format_bytes(p.device_memory)} by {format_bytes(p.peak_bytes - p.device_memory)}")
    return None


def format_plan(p: Plan) -> str:
    """A report of one layout: memory per device, then communication per step."""
    lines = [(f"plan: {p.devices} {p.platform} device(s): {layout_name(p.mesh)}; {p.num_params:,} parameters; "
              f"compiled in {p.compile_s:.1f}s"),
             "", "memory per device"]
    rows = [("parameters (state shardings)", p.params_bytes),
            ("optimizer state (state shardings)", p.opt_state_bytes),
            ("batch", p.batch_bytes),
            ("arguments (compiled)", p.arguments_bytes),
            ("outputs not aliased to donated inputs", p.outputs_bytes - p.aliased_bytes),
            ("temporaries: activations, gradients, buffers", p.temporaries_bytes),
            ("estimated peak", p.peak_bytes)]
    if p.device_memory is not None:
        rows.append(("device memory (--device-memory)", p.device_memory))
    if p.theory is not None:
        rows.append(("activations kept for the backward (theory)", p.theory.activation_bytes))
    lines += [f"  {name:<46} {format_bytes(value):>11}" for name, value in rows]
    lines += ["", "communication per step (bytes: result x executions, one device; sent: ring estimate)",
              (f"  {'collective':<19} {'axes':<16} {'where':<5} {'ops':>4} {'runs':>5} {'bytes':>11} "
               f"{'sent':>11}  dtype")]
    for r in p.comm:
        lines.append(f"  {r.kind:<19} {_axes(r):<16} {'loop' if r.in_loop else 'step':<5} {r.ops:>4} "
                     f"{r.executions:>5} {format_bytes(r.bytes):>11} {format_bytes(r.sent_bytes):>11}  {r.dtypes}")
    if not p.comm:
        lines.append("  (none)")
    lines.append(f"  {'total':<19} {'':<16} {'':<5} {'':>4} {'':>5} {format_bytes(p.comm_bytes()):>11} "
                 f"{format_bytes(p.sent_bytes):>11}")
    lines += _theory_rows(p.theory, "context")
    if p.platform == "cpu":
        lines += ["", ("note: compiled by XLA:CPU; TPU/GPU compilers fuse, schedule and pick collectives "
                       "differently, so temporaries and collective forms there can differ")]
    warning = _warning(p)
    if warning:
        lines += ["", warning]
    return "\n".join(lines)


def _theory_rows(theory, axis: str) -> list[str]:
    """The closed-form traffic over ``axis`` (none without a theory or traffic there): a check on the audit's rows."""
    rows = [t for t in (theory.traffic if theory is not None else ()) if axis in t.axes]
    if not rows:
        return []
    lines = ["", f"theory over {axis} per step (closed form, one device; sent: ring estimate)"]
    for t in rows:
        lines.append(f"  {t.kind:<19} {'+'.join(t.axes):<16} {t.count:>10g} {format_bytes(t.sent_bytes):>11}  {t.what}")
    return lines


def format_comparison(plans: list[Plan]) -> str:
    """Layouts side by side: one column per plan, one row per figure."""
    from shardml.analysis.audit import KINDS

    keys = sorted({(r.kind, r.axes, r.in_loop) for p in plans for r in p.comm},
                  key=lambda k: (KINDS.index(k[0]), k[1], k[2]))
    table = [("layout", [p.label for p in plans]),
             ("mesh", [layout_name(p.mesh) for p in plans]),
             ("parameters / device", [format_bytes(p.params_bytes) for p in plans]),
             ("optimizer state / device", [format_bytes(p.opt_state_bytes) for p in plans]),
             ("temporaries / device", [format_bytes(p.temporaries_bytes) for p in plans]),
             ("estimated peak / device", [format_bytes(p.peak_bytes) for p in plans])]
    if any(p.theory is not None for p in plans):
        table.append(("activations / device (theory)",
                      [format_bytes(p.theory.activation_bytes) if p.theory else "-" for p in plans]))
    if any(p.device_memory is not None for p in plans):
        table.append(("fits --device-memory", ["yes" if p.fits else "NO" for p in plans]))
    for kind, axes, in_loop in keys:
        name = f"{kind} {'+'.join(axes) or '-'}{' (loop)' if in_loop else ''}"
        cells = []
        for p in plans:
            value = sum(r.bytes for r in p.comm if (r.kind, r.axes, r.in_loop) == (kind, axes, in_loop))
            cells.append(format_bytes(value) if value else "-")
        table.append((name, cells))
    table.append(("comm bytes / step", [format_bytes(p.comm_bytes()) for p in plans]))
    table.append(("sent / device / step (ring)", [format_bytes(p.sent_bytes) for p in plans]))
    table.append(("compile s", [f"{p.compile_s:.1f}" for p in plans]))
    first = max(len(name) for name, _ in table)
    widths = [max(len(cells[i]) for _, cells in table) for i in range(len(plans))]
    lines = ["  ".join([f"{name:<{first}}"] + [f"{cell:>{w}}" for cell, w in zip(cells, widths)])
             for name, cells in table]
    lines.insert(1, "-" * len(lines[0]))
    if plans and plans[0].platform == "cpu":
        lines += ["", ("bytes are per device; compiled by XLA:CPU (TPU/GPU compilers may fuse and pick "
                       "collectives differently)")]
    lines += [w for w in (_warning(p) for p in plans) if w]
    return "\n".join(lines)
