"""Read a compiled program: its collectives (count, bytes, dtype, inside or outside loops) and memory.

    compiled = trainer.lower_step(state, batch).compile()
    report = collectives(compiled.as_text())
    report.count("all-reduce", in_loop=False)   # e.g. 1
    report.bytes("all-reduce")                  # bytes of the results, loops multiplied by trip count
"""

from __future__ import annotations

import dataclasses
import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(?:body|condition|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)")
_CALLEE_LIST = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled program."""

    kind: str
    name: str
    dtype: str
    bytes: int  # result bytes of one execution
    in_loop: bool
    trips: int  # executions per program run (product of enclosing loops' trip counts)
    computation: str
    groups: tuple[tuple[int, ...], ...] = ()  # partition ids that communicate together

    def axes(self, mesh) -> tuple[str, ...]:
        """The mesh axes this collective spans (those whose coordinate varies inside a group)."""
        import numpy as np

        shape = tuple(mesh.shape.values())
        varying = set()
        for group in self.groups:
            coords = np.array(np.unravel_index(np.array(group), shape)).T
            varying |= {i for i in range(len(shape)) if len(set(coords[:, i])) > 1}
        return tuple(name for i, name in enumerate(mesh.shape) if i in varying)


@dataclasses.dataclass(frozen=True)
class CollectiveReport:
    ops: tuple[Collective, ...]

    mesh: object = None

    def select(self, kind: str | None = None, in_loop: bool | None = None, axis: str | None = None):
        """Ops of a kind, inside or outside loops, spanning a mesh axis (needs ``mesh``)."""
        return [op for op in self.ops
                if (kind is None or op.kind == kind) and (in_loop is None or op.in_loop == in_loop)
                and (axis is None or axis in op.axes(self.mesh))]

    def count(self, kind: str | None = None, in_loop: bool | None = None, axis: str | None = None) -> int:
        """Number of instructions (not executions)."""
        return len(self.select(kind, in_loop, axis))

    def bytes(self, kind: str | None = None, in_loop: bool | None = None, axis: str | None = None) -> int:
        """Bytes moved per program run: result bytes x executions."""
        return sum(op.bytes * op.trips for op in self.select(kind, in_loop, axis))

    def table(self) -> str:
        """One row per (collective, mesh axes, inside/outside loops)."""
        rows = [f"{'collective':<20} {'axes':<16} {'where':<6} {'count':>6} {'executions':>11} "
                f"{'bytes/run':>14}  dtypes"]
        groups: dict = {}
        for op in self.ops:
            axes = "+".join(op.axes(self.mesh)) if self.mesh is not None else "?"
            groups.setdefault((KINDS.index(op.kind), op.kind, axes, op.in_loop), []).append(op)
        for (_, kind, axes, in_loop), ops in sorted(groups.items()):
            dtypes = ",".join(sorted({op.dtype for op in ops}))
            rows.append(f"{kind:<20} {axes:<16} {'loop' if in_loop else 'step':<6} {len(ops):>6} "
                        f"{sum(op.trips for op in ops):>11} {sum(o.bytes * o.trips for o in ops):>14,}  {dtypes}")
        return "\n".join(rows)


def _shape_bytes(text: str) -> tuple[int, str]:
    total, dtypes = 0, []
    for dtype, dims in _ARRAY.findall(text):
        if dtype not in _DTYPE_BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
        dtypes.append(dtype)
    return total, (dtypes[0] if len(set(dtypes)) == 1 else ",".join(sorted(set(dtypes))) or "?")


def _replica_groups(line: str) -> tuple[tuple[int, ...], ...]:
    """Explicit groups of partition ids from any of XLA's three replica-group spellings."""
    import numpy as np

    if m := re.search(r"replica_groups=\{(\{[\d,\s{}]*\})\}", line):
        return tuple(tuple(int(i) for i in g.split(",") if i.strip()) for g in re.findall(r"\{([\d,\s]*)\}", m.group(1)))
    if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line):
        n_groups, size = int(m.group(1)), int(m.group(2))
        dims = [int(d) for d in m.group(3).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if m.group(4):
            ids = ids.transpose([int(p) for p in m.group(4).split(",")])
        return tuple(tuple(int(i) for i in row) for row in ids.reshape(n_groups, size))
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\](?:\s*\{([^}]*)\})?", line):
        axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
        names = [a for a, _ in axes]
        ids = np.arange(int(np.prod([int(n) for _, n in axes]))).reshape([int(n) for _, n in axes])
        # No axis list means the group spans every axis of the (flattened) device mesh.
        chosen = ([names.index(a) for a in re.findall(r"'([^']+)'", m.group(2))] if m.group(2) is not None
                  else list(range(len(names))))
        rest = [i for i in range(len(names)) if i not in chosen]
        size = int(np.prod([ids.shape[i] for i in chosen])) if chosen else 1
        return tuple(tuple(int(i) for i in row) for row in ids.transpose(rest + chosen).reshape(-1, size))
    if m := re.search(r"source_target_pairs=\{([^}]*(?:\}[^}]*)*)\}", line):
        return tuple(tuple(int(i) for i in p.split(",")) for p in re.findall(r"\{(\d+,\d+)\}", line))
    return ()


def collectives(hlo_text: str, mesh=None) -> CollectiveReport:
    """Parses optimized HLO text (``compiled.as_text()``) into a :class:`CollectiveReport`.

    Async pairs count once (the ``-start``); ops in a computation reachable from a ``while`` body or
    condition are ``in_loop`` and multiplied by the known trip counts of their enclosing loops.
    With ``mesh`` (the program's mesh), ops can be selected by the mesh axis they span.
    """
    computations: dict[str, list[str]] = {}
    entry = None
    current = None
    for line in hlo_text.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            current = match.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is not None:
            if line.strip() == "}":
                current = None
            else:
                computations[current].append(line)

    # Walk the call graph from the entry, tracking loop nesting and trip counts.
    context: dict[str, tuple[bool, int]] = {}

    def visit(name: str, in_loop: bool, trips: int) -> None:
        old = context.get(name)
        if old is not None and old[0] >= in_loop and old[1] >= trips:
            return
        context[name] = (in_loop or (old[0] if old else False), max(trips, old[1] if old else 0))
        for line in computations.get(name, ()):
            inst = _INSTRUCTION.match(line)
            opcode = inst.group(3) if inst else ""
            trip = 1
            loop = False
            if opcode == "while":
                loop = True
                found = _TRIP.search(line)
                trip = int(found.group(1)) if found else 1
            callees = _CALLEE.findall(line)
            for group in _CALLEE_LIST.findall(line):
                callees += [c.strip("% ") for c in group.split(",") if c.strip()]
            for callee in callees:
                visit(callee, in_loop or loop, trips * trip)

    if entry is not None:
        visit(entry, False, 1)
    ops = []
    for name, lines in computations.items():
        in_loop, trips = context.get(name, (False, 1))
        for line in lines:
            inst = _INSTRUCTION.match(line)
            if not inst:
                continue
            opcode = inst.group(3)
            kind = opcode[:-6] if opcode.endswith("-start") else opcode
            if kind not in KINDS:
                continue
            result_bytes, dtype = _shape_bytes(inst.group(2))
            if opcode.endswith("-start") and kind in ("all-gather", "collective-permute", "all-reduce"):
                # An async start returns (operands, results[, scratch]); count the results half.
                result_bytes //= 2 if kind != "all-reduce" else 1
            ops.append(Collective(kind, inst.group(1), dtype, result_bytes, in_loop, trips, name,
                                  _replica_groups(line)))
    return CollectiveReport(tuple(ops), mesh)


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-device bytes of a compiled program (from ``compiled.memory_analysis()``)."""

    arguments: int
    outputs: int
    temporaries: int
    generated_code: int
    aliased: int

    @property
    def peak_estimate(self) -> int:
        return self.arguments + self.outputs + self.temporaries - self.aliased


def memory(compiled) -> MemoryReport:
    stats = compiled.memory_analysis()
    return MemoryReport(
        arguments=int(stats.argument_size_in_bytes), outputs=int(stats.output_size_in_bytes),
        temporaries=int(stats.temp_size_in_bytes), generated_code=int(stats.generated_code_size_in_bytes),
        aliased=int(stats.alias_size_in_bytes),
    )
