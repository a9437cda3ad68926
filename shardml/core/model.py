"""What the trainer needs of a model, and no more: ``init``, logical axes, a pure ``apply``.

A :class:`Model` is three things: ``init(key) -> params`` (a PyTree of f32 arrays), ``logical``
(the same tree with one tuple of logical axis names per array, mapped to mesh axes by the rules)
and ``apply(params, inputs, *, rng=None) -> outputs``. :func:`from_specs` builds one from a table
of :class:`ParamSpec`; :func:`shardml.from_nnx` and :func:`shardml.from_linen` build one from a Flax
module, reading the axis names its author wrote::

    specs = {"w": ParamSpec((16, 32), ("embed", "mlp"))}
    model = from_specs(specs, apply=lambda params, x: x @ params["w"])
    params = model.init(jax.random.key(0))
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from shardml.core.errors import ModelError
from shardml.core.sharding import is_axes, shards_of


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape, logical axes and initializer of one parameter.

    ``init`` is ``"normal"`` (truncated normal, std ``scale / sqrt(fan_in)``, fan_in = product of
    ``fan_in_dims``), ``"ones"``, ``"zeros"``, or any ``f(key, shape) -> array`` (e.g. a
    ``jax.nn.initializers`` initializer).
    """

    shape: tuple[int, ...]
    logical: tuple[str | None, ...]
    init: str | Callable = "normal"
    fan_in_dims: tuple[int, ...] = (0,)
    scale: float = 1.0

    def __post_init__(self):
        if len(self.shape) != len(self.logical):
            raise ModelError(f"shape={self.shape} and logical={self.logical} differ in rank; give one logical "
                             "axis name (or None) per dimension", subject="logical", value=self.logical)

    def initialize(self, key: jax.Array) -> jax.Array:
        if callable(self.init):
            return jnp.asarray(self.init(key, self.shape), jnp.float32)
        if self.init == "ones":
            return jnp.ones(self.shape, jnp.float32)
        if self.init == "zeros":
            return jnp.zeros(self.shape, jnp.float32)
        fan_in = math.prod(self.shape[d] for d in self.fan_in_dims)
        std = self.scale / math.sqrt(fan_in)
        drawn = jax.random.truncated_normal(key, -2.0, 2.0, draw_shape(self.shape, self.logical), jnp.float32)
        return std * drawn.reshape(self.shape)


# XLA:CPU compiles a random draw slower the more dimensions it has (the tiny test transformer's init:
# 8.5 CPU-s with its rank-3/4 parameters drawn as they are, 2.7 s all drawn flat, on JAX 0.10.2; one
# (2, 32, 4, 8) draw: 4.6 s against 0.6 s as (2, 32, 32), on 0.12 too), and a draw's values depend only on each element's row-major position, so drawing
# in fewer dimensions and reshaping gives the same numbers.
def draw_shape(shape: tuple[int, ...], logical: tuple[str | None, ...]) -> tuple[int, ...]:
    """``shape`` with every dimension the active rules and mesh leave whole merged into its outer
    neighbour, so the draw has fewer dimensions and is still sharded as the parameter is (outside
    rules or a mesh: one flat dimension)."""
    merged = list(shape[:1])
    for size, name in zip(shape[1:], logical[1:]):
        if shards_of(name) == 1:
            merged[-1] *= size
        else:
            merged.append(size)
    return tuple(merged)


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def init_params(specs: Any, key: jax.Array) -> Any:
    """Initializes every parameter from its own key (folded in by position, so layouts agree)."""
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    return jax.tree.unflatten(treedef, [spec.initialize(jax.random.fold_in(key, i)) for i, spec in enumerate(leaves)])


@dataclasses.dataclass(frozen=True)
class Stages:
    """The same model cut into three parts, for pipeline parallelism.

    ``apply(params, x) == head(params, layers(params[key], embed(params, x)))``, and ``layers``
    accepts any leading slice of the stacked layers, so a pipeline stage runs its own layers only.

    Attributes:
      embed: ``(params, inputs) -> activations``; runs on the first stage.
      layers: ``(layer_stack, activations) -> activations``; every leaf of ``layer_stack`` has a
        leading layer axis.
      head: ``(params, activations) -> outputs``; runs on the last stage.
      key: the top-level entry of the parameters that holds the stacked layers.
      layers_from: for layers that differ by their place in the model (Gemma's local and global
        attention): ``(layer_stack, activations, first) -> activations``, ``first`` the (traced)
        model-wide index of the stack's first layer; a pipeline stage calls it, where given,
        instead of ``layers``.
      layers_sums: for layers that add to the loss sums (a mixture of experts' auxiliary losses):
        ``(layer_stack, activations, first) -> (activations, sums)``, the sums this part of the
        stack adds (the parts' sums add up to what ``Model.apply_sums`` adds); a pipeline stage
        calls it, where given, instead of ``layers`` and ``layers_from``.
    """

    embed: Callable[[Any, jax.Array], jax.Array]
    layers: Callable[[Any, jax.Array], jax.Array]
    head: Callable[[Any, jax.Array], jax.Array]
    key: str = "layers"
    layers_from: Callable[[Any, jax.Array, Any], jax.Array] | None = None
    layers_sums: Callable[[Any, jax.Array, Any], tuple[jax.Array, dict]] | None = None


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity (its fields hold functions)
class Model:
    """A model for the trainer.

    Attributes:
      init: ``init(key) -> params``; called inside ``jit`` with sharded outputs, so full-size
        parameters never sit on one device.
      logical: the parameter tree with a tuple of logical axis names per array (``None`` for a
        dimension that is not sharded).
      apply: ``apply(params, inputs) -> outputs``, pure; with ``uses_rng`` it also takes
        ``rng=keys_B``, one key per example (None when evaluating: deterministic).
      uses_rng: the model draws random numbers (dropout) in training.
      flops_per_example: training FLOPs (forward + backward) of one example, for MFU; None: counted
        from the traced matmuls when first needed.
      tokens_per_example: tokens counted for throughput (sequence length, or 1 for a classifier).
      stages: the model cut for pipeline parallelism (None: it cannot be pipelined).
      name: how runs and errors name it.
      compute_dtype: the dtype its matmuls run in (the peak MFU is measured against).
      config: the settings it was built from, for what needs more than ``apply`` (the
        transformer's ``TransformerConfig``: KV-cache decoding, export to Hugging Face); or None.
      apply_sums: ``apply_sums(params, inputs) -> (outputs, sums)`` where the model adds sums of
        its own to the loss's (a mixture of experts' auxiliary losses: ``sums["loss"]`` is added to
        the loss, the others are reported); None: ``apply``, nothing added.
    """

    init: Callable[[jax.Array], Any]
    logical: Any
    apply: Callable[..., Any]
    uses_rng: bool = False
    flops_per_example: float | None = None
    tokens_per_example: int = 1
    stages: Stages | None = None
    name: str = "model"
    compute_dtype: str = "float32"
    config: Any = None
    apply_sums: Callable[..., tuple[Any, dict]] | None = None

    @functools.cached_property
    def abstract_params(self) -> Any:
        """ShapeDtypeStructs of the parameters; nothing is allocated."""
        return jax.eval_shape(lambda: self.init(jax.random.key(0)))  # the key too: nothing is computed

    @property
    def num_params(self) -> int:
        return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(self.abstract_params))

    def __call__(self, params: Any, inputs: Any, *, rng: jax.Array | None = None) -> Any:
        return self.apply(params, inputs, rng=rng) if self.uses_rng else self.apply(params, inputs)

    def outputs_and_sums(self, params: Any, inputs: Any, *, rng: jax.Array | None = None) -> tuple[Any, dict]:
        """``(outputs, sums)``: the outputs and what the model adds to the loss sums (``{}`` for most)."""
        if self.apply_sums is None:
            return self(params, inputs, rng=rng), {}
        return self.apply_sums(params, inputs, rng=rng) if self.uses_rng else self.apply_sums(params, inputs)


def logical_axes(specs: Any) -> Any:
    """The tree of logical-axes tuples of a spec tree."""
    return jax.tree.map(lambda s: s.logical, specs, is_leaf=_is_spec)


def from_specs(specs: Any, apply: Callable[..., Any], **fields: Any) -> Model:
    """A :class:`Model` from a tree of :class:`ParamSpec` and a pure apply function.

    Example:
      >>> model = from_specs({"w": ParamSpec((4, 2), ("embed", None))}, lambda p, x: x @ p["w"])
      >>> model.num_params
      8
    """
    return Model(init=functools.partial(init_params, specs), logical=logical_axes(specs), apply=apply, **fields)


def check_logical(model: Model) -> None:
    """The logical tree has the parameters' structure and one name per dimension.

    Raises:
      ModelError: naming the first parameter that does not match (``subject`` ``"logical"``).
    """
    shapes = model.abstract_params
    flat_axes = jax.tree_util.tree_flatten_with_path(model.logical, is_leaf=is_axes)[0]
    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    if [p for p, _ in flat_axes] != [p for p, _ in flat_shapes]:
        raise ModelError(f"{model.name}: its logical axes tree does not match its parameters "
                         f"({len(flat_axes)} entries against {len(flat_shapes)} arrays); give one tuple per "
                         "array, (None,) * ndim for a replicated one", subject="logical", value=len(flat_axes))
    for (path, axes), (_, shape) in zip(flat_axes, flat_shapes):
        if len(axes) != len(shape.shape):
            raise ModelError(f"{model.name}: parameter {jax.tree_util.keystr(path)} has shape {shape.shape} "
                             f"but logical axes {axes}; give one name (or None) per dimension",
                             subject="logical", value=axes)
