"""Logical axis names -> mesh axes: one rules table for parameters, optimizer state and activations.

Models name their dimensions with logical names only (``"embed"``, ``"mlp"``, ``"batch"``); a
:class:`Rules` table maps each name to zero, one or several mesh axes. Changing the layout is a
change of mesh sizes (or of this table), never of the model::

    rules = Rules.default()
    rules.spec(("embed", "mlp"))   # PartitionSpec('fsdp', 'tensor')

Flax models name the same axes with ``nnx.with_partitioning`` / ``nn.with_logical_partitioning``
and constrain activations with ``nn.with_logical_constraint``; :func:`flax_rules` hands this table to
Flax while a model is traced, so both kinds of annotation follow the same rules.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from shardml.core.errors import LayoutError, ModelError

# Parameters: "embed" is the model dimension of weights (ZeRO-3 shards it over fsdp); heads, mlp and
# vocab are the Megatron dimensions; the stacked "layers" axis is cut into pipeline stages (a no-op
# on meshes without a pipeline axis). Activations: the batch is split over every batch-parallel axis;
# "act_*" names are the activation twins of the weight dimensions. The experts of a mixture-of-experts
# layer are split over ``expert``, which outside those layers is one more batch axis (each device
# holds its tokens and 1/expert of the experts; the tokens travel to their experts and back). The
# sequence of every activation is split over ``context`` (the batch is not: each context shard holds
# a slice of every row).
DEFAULT_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp", "expert"),
    "members": "members",
    "layers": "pipeline",
    "repeats": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
    "norm": None,
    "classes": None,
    "act_seq": "context",
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
        """A copy with names added or remapped (``None`` replicates the dimension)."""
        table = dict(self.table)
        table.update(changes)
        return Rules(tuple(table.items()))

    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.table)

    def mesh_axes(self, name: str | None) -> tuple[str, ...]:
        """The mesh axes of one logical name (``()`` for None or an unsharded name).

        Raises:
          ModelError: the name has no rule; the message shows how to add one.
        """
        if name is None:
            return ()
        table = dict(self.table)
        if name not in table:
            raise ModelError(
                f"logical axis '{name}' has no sharding rule (known: {', '.join(table)}); map it, e.g. "
                f"rules=shardml.Rules.default().replace({name}='tensor'), or replace({name}=None) to replicate it",
                subject="rules", value=name)
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
                    raise LayoutError(
                        f"mesh axis '{axis}' is mapped from both '{used[axis]}' and '{name}' in {tuple(logical)}; "
                        "one array dimension per mesh axis: remap one of them in the rules",
                        subject="rules", value=axis)
                used[axis] = name
            parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return P(*parts)


def is_axes(x: Any) -> bool:
    """Whether ``x`` is one array's logical axes (a tuple of names or None), a leaf of a logical tree."""
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(logical_tree: Any, rules: Rules, mesh) -> Any:
    """Maps a PyTree of logical-axes tuples to NamedShardings on ``mesh``."""
    return jax.tree.map(lambda axes: NamedSharding(mesh, rules.spec(axes)), logical_tree, is_leaf=is_axes)


# ----------------------------------------------------------------------------- activations

_ACTIVE_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("shardml_rules", default=None)
_SKIPPED_AXES: contextvars.ContextVar[frozenset] = contextvars.ContextVar("shardml_skip", default=frozenset())


@contextlib.contextmanager
def use_rules(rules: Rules | None):
    """Activates ``rules`` for :func:`constrain` (and Flax's logical constraints) while tracing."""
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


def transform_owned_axes() -> frozenset[str]:
    """The mesh axes an enclosing ``vmap`` places (:func:`axes_owned_by_transform`): a ``shard_map``
    under that vmap must name them manual too, since the vmap's batching adds them to its specs."""
    return _SKIPPED_AXES.get()


def current_rules() -> Rules | None:
    """The rules activated by the innermost :func:`use_rules`, if any."""
    return _ACTIVE_RULES.get()


def manual_axes() -> frozenset[str]:
    """The mesh axes an enclosing ``shard_map`` made manual here (a pipeline's stages: ``pipeline``
    and the axes it owns); empty outside one."""
    return _manual_axes()


def _manual_axes() -> frozenset[str]:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return frozenset()
    return frozenset(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == jax.sharding.AxisType.Manual)


def _unavailable_axes() -> frozenset[str]:
    """Mesh axes a constraint must leave out here: manual (inside shard_map) or owned by a vmap."""
    return _manual_axes() | _SKIPPED_AXES.get()


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Pins an activation's layout by logical names; a no-op outside :func:`use_rules` or a mesh.

    Axes that are manual at this point (inside ``shard_map``) or owned by an enclosing ``vmap`` are
    left out, so the same model code runs inside the accumulator's per-shard loop and outside it.
    """
    rules = _ACTIVE_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return x
    spec = rules.spec(logical, skip=_unavailable_axes())
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def moves_as_words(dtype) -> bool:
    """Whether a collective should move ``dtype`` as raw uint16 words (:func:`relayout`): a 16-bit
    float, which XLA:CPU would widen to f32 on the wire."""
    return jnp.dtype(dtype).itemsize == 2 and jnp.issubdtype(dtype, jnp.floating)


def relayout(x: jax.Array, source: Sequence[str | None], target: Sequence[str | None]) -> jax.Array:
    """``x``, laid out by the logical names ``source``, moved to ``target`` (e.g. an FSDP weight's
    shards gathered), a 16-bit float as its raw 16-bit words.

    XLA:CPU widens every bf16 collective to f32 (convert, f32 collective, convert): twice the bytes
    and two more passes over them. The collectives of a layout change only move bits, so moving
    them as uint16 keeps them in the compute dtype (``shardml.core.pipeline`` sends its bf16
    activations the same way). Pinning both ends keeps the partitioner from moving the collective
    to before the cast, onto the f32 source. The bitcast is not differentiable: use it where no
    gradient flows through (a custom VJP's forward).

        w_DF = relayout(w_DF.astype(jnp.bfloat16), ("embed", "mlp"), ("act_embed", "act_mlp"))
    """
    if not moves_as_words(x.dtype):
        return constrain(constrain(x, source), target)
    words = constrain(jax.lax.bitcast_convert_type(x, jnp.uint16), source)
    return jax.lax.bitcast_convert_type(constrain(words, target), x.dtype)


def shards_of(logical: str) -> int:
    """How many ways the active rules and mesh split the logical axis ``logical`` here (1 outside
    :func:`use_rules` or a mesh, and for axes an enclosing transform owns)."""
    rules = _ACTIVE_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return 1
    skip = _unavailable_axes()
    return math.prod(mesh.shape[a] for a in rules.mesh_axes(logical) if a not in skip)


def split_axes(logical: str) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that split the logical axis ``logical`` here, for code that
    communicates over them by hand (ring attention's ``ppermute`` over ``act_seq``'s axis); ``()``
    outside :func:`use_rules` or a mesh, and for axes that are manual or an enclosing transform owns.

        split_axes("act_seq")   # ('context',) on a mesh with context=4
    """
    rules = _ACTIVE_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return ()
    skip = _unavailable_axes()
    return tuple(a for a in rules.mesh_axes(logical) if a not in skip and mesh.shape[a] > 1)


def flax_rules() -> tuple[tuple[str, Any], ...]:
    """The active rules in Flax's ``logical_axis_rules`` form, without the axes that are manual or
    owned by a transform here; ``()`` (Flax constraints are no-ops) outside :func:`use_rules`."""
    rules = _ACTIVE_RULES.get()
    if rules is None or jax.sharding.get_abstract_mesh().empty:
        return ()
    skip = _unavailable_axes()
    table = []
    for name in rules.names():
        axes = tuple(a for a in rules.mesh_axes(name) if a not in skip)
        table.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
    return tuple(table)


def per_example(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """``fn(x_1, key)`` applied to every example of a batch: ``f(x_B, keys_B) -> y_B``.

    For randomness that must not depend on the layout: each example draws from its own key, so
    the same example sees the same random numbers on one device, on any mesh and in any
    microbatch. ``fn`` gets one example with a leading batch axis of 1. The mapped axis stays
    sharded over the batch's mesh axes (``vmap`` with ``spmd_axis_name``).

        dropped_B = per_example(lambda x_1, key: dropout(x_1, key))(x_B, keys_B)
    """

    def mapped(x, keys):
        rules = _ACTIVE_RULES.get()
        mesh = jax.sharding.get_abstract_mesh()
        axes = ()
        if rules is not None and not mesh.empty:
            skip = _unavailable_axes()
            axes = tuple(a for a in rules.mesh_axes("batch") if a not in skip and mesh.shape[a] > 1)

        def one(x_i, key):
            out = fn(jax.tree.map(lambda a: a[None], x_i), key)
            return jax.tree.map(lambda a: a[0], out)

        with axes_owned_by_transform(*axes):
            return jax.vmap(one, spmd_axis_name=axes or None)(x, keys)

    return mapped


def batch_sharding(mesh, rules: Rules, ndim: int = 1) -> NamedSharding:
    """Sharding of a batch array: leading dim over the batch axes, the rest replicated."""
    return NamedSharding(mesh, rules.spec(("batch",) + (None,) * (ndim - 1)))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
