"""What every shardml model is: a table of parameter specs plus a pure apply function.

A :class:`ParamSpec` names the logical axes of one weight, so shardings are derived, never written
by hand; parameters are plain nested dicts (they checkpoint and load anywhere)::

    specs = {"w": ParamSpec((16, 32), ("embed", "mlp"))}
    params = init_params(specs, jax.random.key(0))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape, logical axes and initializer of one parameter.

    ``init`` is ``"normal"`` (std ``scale / sqrt(fan_in)``, fan_in = product of ``fan_in_dims``),
    ``"ones"`` or ``"zeros"``.
    """

    shape: tuple[int, ...]
    logical: tuple[str | None, ...]
    init: str = "normal"
    fan_in_dims: tuple[int, ...] = (0,)
    scale: float = 1.0

    def __post_init__(self):
        if len(self.shape) != len(self.logical):
            raise ValueError(f"shape {self.shape} and logical axes {self.logical} differ in rank")

    def initialize(self, key: jax.Array) -> jax.Array:
        if self.init == "ones":
            return jnp.ones(self.shape, jnp.float32)
        if self.init == "zeros":
            return jnp.zeros(self.shape, jnp.float32)
        fan_in = math.prod(self.shape[d] for d in self.fan_in_dims)
        std = self.scale / math.sqrt(fan_in)
        return std * jax.random.truncated_normal(key, -2.0, 2.0, self.shape, jnp.float32)


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def logical_axes(specs: Any) -> Any:
    """The tree of logical-axes tuples of a spec tree."""
    return jax.tree.map(lambda s: s.logical, specs, is_leaf=_is_spec)


def abstract_params(specs: Any) -> Any:
    """ShapeDtypeStructs of the parameters; nothing is allocated."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), specs, is_leaf=_is_spec)


def init_params(specs: Any, key: jax.Array) -> Any:
    """Initializes every parameter from its own key (folded in by position, so layouts agree)."""
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    arrays = [spec.initialize(jax.random.fold_in(key, i)) for i, spec in enumerate(leaves)]
    return jax.tree.unflatten(treedef, arrays)


def count_params(specs: Any) -> int:
    return sum(math.prod(s.shape) for s in jax.tree.leaves(specs, is_leaf=_is_spec))


@dataclasses.dataclass(frozen=True)
class Stages:
    """The same model cut into three parts, for pipeline parallelism.

    ``apply(params, x) == head(params, layers(params[key], embed(params, x)))``, and ``layers``
    accepts any leading slice of the stacked layers, so a pipeline stage runs its own layers only.

    Attributes:
      embed: ``(params, inputs) -> activations``; runs on the first stage.
      layers: ``(layer_stack, activations) -> activations``; every leaf of ``layer_stack`` has a
        leading layer axis.
      head: ``(params, activations) -> logits``; runs on the last stage.
      key: the top-level entry of the parameters that holds the stacked layers.
    """

    embed: Callable[[Any, jax.Array], jax.Array]
    layers: Callable[[Any, jax.Array], jax.Array]
    head: Callable[[Any, jax.Array], jax.Array]
    key: str = "layers"


@dataclasses.dataclass(frozen=True)
class Model:
    """A model for the trainer.

    Attributes:
      specs: tree of :class:`ParamSpec`.
      apply: ``apply(params, inputs) -> logits``; pure, names activations by logical axes only.
      flops_per_example: training FLOPs (forward + backward) for one example, for MFU.
      tokens_per_example: tokens counted for throughput (sequence length, or 1 for a classifier).
      stages: the model cut for pipeline parallelism (None: the model cannot be pipelined).
    """

    specs: Any
    apply: Callable[[Any, jax.Array], jax.Array]
    flops_per_example: float
    tokens_per_example: int = 1
    stages: Stages | None = None

    @property
    def num_params(self) -> int:
        return count_params(self.specs)
