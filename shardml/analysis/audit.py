"""Read a compiled program: its collectives (count, bytes, dtype, inside or outside loops), its
matmuls (per-device shapes and executions) and memory.

    compiled = trainer.lower_step(state, batch).compile()
    report = collectives(compiled.as_text())
    report.count("all-reduce", in_loop=False)   # e.g. 1
    report.bytes("all-reduce")                  # bytes of the results, loops multiplied by trip count
    sum(d.flops * d.trips for d in dots(compiled.as_text()))   # matmul FLOPs per device per step

Each op also keeps its result arrays (a combined collective reduces several at once), the JAX
operation it came from (``op_name``), and the element type the program gave it before XLA changed
it: XLA:CPU runs bf16 collectives in f32 (a convert to f32 right before the op, and back after),
which ``Collective.source_dtypes`` shows as ``bf16`` next to ``dtype`` ``f32``.
"""

from __future__ import annotations

import dataclasses
import math
import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(?:body|condition|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)")
_CALLEE_LIST = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_OPERAND = re.compile(r"%([\w.\-]+)")
_FLOAT_BITS = {"f64": 64, "f32": 32, "bf16": 16, "f16": 16, "f8e4m3fn": 8, "f8e5m2": 8}
_PASS_THROUGH = ("bitcast", "copy", "reshape", "transpose")


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
    arrays: tuple[tuple[str, int], ...] = ()  # (dtype, elements) of each result array of one execution
    source_dtypes: tuple[str, ...] = ()  # per array: the dtype before XLA promoted it (else its dtype)
    op_name: str = ""  # the JAX operation(s) it came from (HLO metadata)

    @property
    def promoted(self) -> bool:
        """True when XLA widened this collective's element type (e.g. bf16 run in f32 on XLA:CPU)."""
        return any(src != dtype for src, (dtype, _) in zip(self.source_dtypes, self.arrays))

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
    for dtype, n in _arrays(text):
        total += n * DTYPE_BYTES[dtype]
        dtypes.append(dtype)
    return total, (dtypes[0] if len(set(dtypes)) == 1 else ",".join(sorted(set(dtypes))) or "?")


def _arrays(text: str) -> list[tuple[str, int]]:
    out = []
    for dtype, dims in _ARRAY.findall(text):
        if dtype in DTYPE_BYTES:
            out.append((dtype, _elements(dims)))
    return out


def _elements(dims: str) -> int:
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return n


def _operands(rest: str) -> list[str]:
    """Operand names of an instruction, from the text after ``opcode(``."""
    depth, end = 1, len(rest)
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            end = i
            break
    return _OPERAND.findall(rest[:end])


def _widened_from(name: str, comp: str, module: dict, depth: int = 0) -> str | None:
    """The narrower float type ``name`` was converted up from (through bitcasts, copies and fusions)."""
    inst = module["defs"].get(comp, {}).get(name)
    if inst is None or depth > 8:
        return None
    opcode, result, operands, callee = inst
    if opcode == "convert" and operands:
        source = module["defs"][comp].get(operands[0])
        src, dst = _dtype_of(source[1]) if source else None, _dtype_of(result)
        return src if src in _FLOAT_BITS and dst in _FLOAT_BITS and _FLOAT_BITS[src] < _FLOAT_BITS[dst] else None
    if opcode in _PASS_THROUGH and operands:
        return _widened_from(operands[0], comp, module, depth + 1)
    if opcode == "fusion" and callee in module["roots"]:
        return _widened_from(module["roots"][callee], callee, module, depth + 1)
    return None


def _narrowed_to(name: str, comp: str, module: dict, dtype: str, index: int | None = None, depth: int = 0) -> bool:
    """Whether every use of ``name`` (element ``index`` of a tuple) first converts it down to ``dtype``."""
    uses = module["users"].get(comp, {}).get(name, [])
    if index is not None:  # a tuple: follow the get-tuple-elements of that element
        uses = [(user, 0) for user, _ in uses if module["defs"][comp][user][0] == "get-tuple-element"
                and re.search(rf"index={index}\b", module["lines"][comp][user])]
        return bool(uses) and all(_narrowed_to(user, comp, module, dtype, None, depth + 1) for user, _ in uses)
    if not uses or depth > 8:
        return False
    for user, position in uses:
        opcode, result, _, callee = module["defs"][comp][user]
        if opcode == "convert":
            ok = _dtype_of(result) == dtype
        elif opcode in _PASS_THROUGH:
            ok = _narrowed_to(user, comp, module, dtype, None, depth + 1)
        elif opcode == "fusion" and position in module["params"].get(callee, {}):
            ok = _narrowed_to(module["params"][callee][position], callee, module, dtype, None, depth + 1)
        else:
            ok = False
        if not ok:
            return False
    return True


def _dtype_of(type_text: str) -> str | None:
    found = _ARRAY.search(type_text)
    return found.group(1) if found else None


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


def _parse(hlo_text: str):
    """Optimized HLO text -> (lines per computation, per-computation tables, entry computation).

    Tables: ``defs`` name -> (opcode, result type, operands, callee), ``lines``, ``users`` name ->
    [(user, operand position)], ``params`` index -> name, ``roots``.
    """
    computations: dict[str, list[str]] = {}
    module: dict[str, dict] = {"defs": {}, "lines": {}, "users": {}, "params": {}, "roots": {}}
    entry = None
    current = None
    for line in hlo_text.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            current = match.group(1)
            computations[current] = []
            for table in ("defs", "lines", "users", "params"):
                module[table][current] = {}
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is not None:
            if line.strip() == "}":
                current = None
            else:
                computations[current].append(line)
                inst = _INSTRUCTION.match(line)
                if inst:
                    name, opcode, operands = inst.group(1), inst.group(3), _operands(inst.group(4))
                    callee = _CALLEE.search(line)
                    module["defs"][current][name] = (opcode, inst.group(2), operands,
                                                     callee.group(1) if callee else None)
                    module["lines"][current][name] = line
                    for position, operand in enumerate(operands):
                        module["users"][current].setdefault(operand, []).append((name, position))
                    if opcode == "parameter":
                        module["params"][current][int(re.match(r"\s*(\d+)", inst.group(4)).group(1))] = name
                    if line.lstrip().startswith("ROOT"):
                        module["roots"][current] = name
    return computations, module, entry


def _loop_context(computations: dict[str, list[str]], entry: str | None) -> dict[str, tuple[bool, int]]:
    """Computation -> (reachable from a ``while``, executions per run: the enclosing loops' trip counts)."""
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
    return context


def collectives(hlo_text: str, mesh=None) -> CollectiveReport:
    """Parses optimized HLO text (``compiled.as_text()``) into a :class:`CollectiveReport`.

    Async pairs count once (the ``-start``); ops in a computation reachable from a ``while`` body or
    condition are ``in_loop`` and multiplied by the known trip counts of their enclosing loops.
    With ``mesh`` (the program's mesh), ops can be selected by the mesh axis they span.
    """
    computations, module, entry = _parse(hlo_text)
    context = _loop_context(computations, entry)
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
            arrays = _arrays(inst.group(2))
            if opcode.endswith("-start") and kind in ("all-gather", "collective-permute", "all-reduce"):
                # An async start returns (operands, results[, scratch]); count the results half.
                result_bytes //= 2 if kind != "all-reduce" else 1
                if kind != "all-reduce":
                    arrays = [a for a in arrays if a[0] not in ("u32", "s32") or a[1] != 1]
                    arrays = arrays[len(arrays) // 2:]
            operands = _operands(inst.group(4))
            # Promoted: the operand was rounded to a narrower type just before and the result is
            # rounded to it again just after, so the op carries narrow values in wide containers
            # (a program that itself converts up, to reduce or multiply in f32, is left as it is).
            sources = []
            for i, (array_dtype, _) in enumerate(arrays):
                src = _widened_from(operands[i], name, module) if i < len(operands) else None
                index = i if len(arrays) > 1 else None
                narrow = src is not None and _narrowed_to(inst.group(1), name, module, src, index)
                sources.append(src if narrow else array_dtype)
            op_name = _OP_NAME.search(line)
            ops.append(Collective(kind, inst.group(1), dtype, result_bytes, in_loop, trips, name,
                                  _replica_groups(line), tuple(arrays), tuple(sources),
                                  op_name.group(1) if op_name else ""))
    return CollectiveReport(tuple(ops), mesh)


@dataclasses.dataclass(frozen=True)
class Dot:
    """One ``dot`` instruction of a compiled program, with per-device shapes (what each device multiplies)."""

    name: str
    lhs: tuple[str, tuple[int, ...]]  # (dtype, shape)
    rhs: tuple[str, tuple[int, ...]]
    result: tuple[str, tuple[int, ...]]
    lhs_contracting: tuple[int, ...]
    rhs_contracting: tuple[int, ...]
    lhs_batch: tuple[int, ...]
    rhs_batch: tuple[int, ...]
    trips: int  # executions per program run
    op_name: str = ""

    @property
    def flops(self) -> int:
        """Multiply-adds x 2 of one execution on one device."""
        return 2 * math.prod(self.result[1]) * math.prod(self.lhs[1][d] for d in self.lhs_contracting)


def _typed(type_text: str) -> tuple[str, tuple[int, ...]]:
    dtype, dims = _ARRAY.search(type_text).groups()
    return dtype, tuple(int(d) for d in dims.split(",") if d)


def _dims(line: str, key: str) -> tuple[int, ...]:
    """A dimension-list attribute of an instruction (``lhs_contracting_dims={1}``); () when absent."""
    found = re.search(rf"\b{key}=\{{([\d,]*)\}}", line)
    return tuple(int(d) for d in found.group(1).split(",") if d) if found else ()


def dots(hlo_text: str) -> tuple[Dot, ...]:
    """Every ``dot`` of optimized HLO text (fusions included), with its loops' trip counts.

    Shapes are the partitioned program's, so per device: ``sum(d.flops * d.trips for d in dots(text))``
    are the matmul FLOPs one device runs per step.

        dots(trainer.lower_step(state, batch).compile().as_text())
    """
    computations, module, entry = _parse(hlo_text)
    context = _loop_context(computations, entry)
    found = []
    for comp, defs in module["defs"].items():
        if comp not in context:  # not reachable from the entry: never runs
            continue
        for name, (opcode, result, operands, _) in defs.items():
            if opcode != "dot":
                continue
            line = module["lines"][comp][name]
            op_name = _OP_NAME.search(line)
            found.append(Dot(name, _typed(defs[operands[0]][1]), _typed(defs[operands[1]][1]), _typed(result),
                             *(_dims(line, f"{side}_{kind}_dims") for kind in ("contracting", "batch")
                               for side in ("lhs", "rhs")),
                             context[comp][1], op_name.group(1) if op_name else ""))
    return tuple(found)


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
    """Per-device bytes of ``compiled`` (a ``jax.stages.Compiled``), from XLA's memory analysis."""
    stats = compiled.memory_analysis()
    return MemoryReport(
        arguments=int(stats.argument_size_in_bytes), outputs=int(stats.output_size_in_bytes),
        temporaries=int(stats.temp_size_in_bytes), generated_code=int(stats.generated_code_size_in_bytes),
        aliased=int(stats.alias_size_in_bytes),
    )
