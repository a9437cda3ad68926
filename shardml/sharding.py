"""Logical axis names -> mesh axes: one rules table for parameters, optimizer state and activations.

Models name their dimensions with logical names only (``"embed"``, ``"mlp"``, ``"batch"``); a
:class:`Rules` table maps each name to zero, one or several mesh axes. Changing the layout is a
change of mesh sizes (or of this table), never of the model::

    rules = Rules.default()
    rules.spec(("embed", "mlp"))   # PartitionSpec('fsdp', 'tensor')
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

# Parameters: "embed" is the model dimension of weights (ZeRO-3 shards it over fsdp); heads, mlp and
# vocab are the Megatron dimensions. Activations: the batch is split over every batch-parallel axis;
# "act_*" names are the activation twins of the weight dimensions.
DEFAULT_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "members": "members",
    "layers": None,  # "pipeline" when the mesh has a pipeline axis (the trainer sets it)
    "repeats": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "features": None,
    "classes": None,
    "act_seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


@dataclasses.dataclass(frozen=True)
class Rules:
    """A frozen logical-name -> mesh-axes table.

    Example:
      >>> Rules.default().replace(embed=None).spec(("embed", "mlp"))
      PartitionSpec(None, 'tensor')
    """

    table: tuple[tuple[str, Any], ...]

    @classmethod
    def default(cls) -> Rules:
        return cls(tuple(DEFAULT_RULES.items()))

    def replace(self, **changes: Any) -> Rules:
        table = dict(self.table)
        table.update(changes)
        return Rules(tuple(table.items()))

    def mesh_axes(self, name: str | None) -> tuple[str, ...]:
        if name is None:
            return ()
        table = dict(self.table)
        if name not in table:
            raise KeyError(f"logical axis '{name}' has no sharding rule; known names: {', '.join(table)}")
        axes = table[name]
        if axes is None:
            return ()
        return (axes,) if isinstance(axes, str) else tuple(axes)

    def spec(self, logical: Sequence[str | None], skip: frozenset[str] = frozenset()) -> P:
        """The PartitionSpec for one array; a mesh axis may serve only one dimension."""
        used: dict[str, str] = {}
        parts = []
        for name in logical:
            axes = tuple(a for a in self.mesh_axes(name) if a not in skip)
            for axis in axes:
                if axis in used:
                    raise ValueError(
                        f"mesh axis '{axis}' is mapped from both '{used[axis]}' and '{name}' in {tuple(logical)}; "
                        "one array dimension per mesh axis"
                    )
                used[axis] = name
            parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return P(*parts)


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_specs(logical_tree: Any, rules: Rules) -> Any:
    """Maps a PyTree of logical-axes tuples to a PyTree of PartitionSpecs."""
    return jax.tree.map(rules.spec, logical_tree, is_leaf=_is_axes)


def tree_shardings(logical_tree: Any, rules: Rules, mesh) -> Any:
    """Maps a PyTree of logical-axes tuples to NamedShardings on ``mesh``."""
    return jax.tree.map(lambda axes: NamedSharding(mesh, rules.spec(axes)), logical_tree, is_leaf=_is_axes)


# ----------------------------------------------------------------------------- activations

_ACTIVE_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("shardml_rules", default=None)
_SKIPPED_AXES: contextvars.ContextVar[frozenset] = contextvars.ContextVar("shardml_skip", default=frozenset())


@contextlib.contextmanager
def use_rules(rules: Rules | None):
    """Activates ``rules`` for :func:`constrain` while a model is traced."""
    token = _ACTIVE_RULES.set(rules)
    try:
        yield rules
    finally:
        _ACTIVE_RULES.reset(token)


@contextlib.contextmanager
def axes_owned_by_transform(*axes: str):
    """Tells :func:`constrain` that an enclosing transform (``vmap`` with ``spmd_axis_name``)
    already places ``axes``, so constraints must leave them out."""
    token = _SKIPPED_AXES.set(_SKIPPED_AXES.get() | frozenset(axes))
    try:
        yield
    finally:
        _SKIPPED_AXES.reset(token)


def current_rules() -> Rules | None:
    """The rules activated by the innermost :func:`use_rules`, if any."""
    return _ACTIVE_RULES.get()


def _manual_axes() -> frozenset[str]:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return frozenset()
    return frozenset(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == jax.sharding.AxisType.Manual)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Pins an activation's layout by logical names; a no-op outside :func:`use_rules` or a mesh.

    Axes that are manual at this point (inside ``shard_map``) or owned by an enclosing ``vmap`` are
    left out, so the same model code runs inside the accumulator's per-shard loop and outside it.
    """
    rules = _ACTIVE_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return x
    spec = rules.spec(logical, skip=_manual_axes() | _SKIPPED_AXES.get())
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def shards_of(logical: str) -> int:
    """How many ways the active rules and mesh split the logical axis ``logical`` here (1 outside
    :func:`use_rules` or a mesh, and for axes an enclosing transform owns)."""
    rules = _ACTIVE_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return 1
    skip = _manual_axes() | _SKIPPED_AXES.get()
    return math.prod(mesh.shape[a] for a in rules.mesh_axes(logical) if a not in skip)


def batch_sharding(mesh, rules: Rules, ndim: int) -> NamedSharding:
    """Sharding of a batch array: leading dim over the batch axes, the rest replicated."""
    return NamedSharding(mesh, rules.spec(("batch",) + (None,) * (ndim - 1)))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
