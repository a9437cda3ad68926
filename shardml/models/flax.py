"""Flax models as shardml models, sharded by the annotations their authors wrote.

``from_nnx`` reads ``nnx.with_partitioning`` (the ``out_sharding`` metadata of ``nnx.Param``,
formerly ``sharding_names``); ``from_linen`` reads ``nn.with_logical_partitioning``. Those names
are logical axes, mapped to mesh axes by shardml's rules, and so are the activation constraints a
model writes with ``nn.with_logical_constraint``: while the step is traced, Flax is handed the
same rules table. Unannotated parameters are replicated; a name the rules do not know is an error
that shows how to map it. The model's own initializers create the parameters, inside the sharded
``init``.

Randomness: an NNX module that holds RNG streams (``nnx.Dropout(rate, rngs=rngs)``), or a Linen
module given ``rng_streams``, is applied example by example with one key per example
(:func:`shardml.core.sharding.per_example`), so dropout masks are the same on every layout and
microbatch count. Evaluation runs it deterministically (NNX ``eval()`` mode; Linen
``eval_kwargs``).

Non-trainable variables (batch statistics, other collections) are refused with a clear error:
their update rule (which microbatch, which devices) would break the equality with one device.

    model = shardml.from_nnx(lambda rngs: MLP(64, 128, 10, rngs=rngs))
    model = shardml.from_linen(Transformer(cfg), example_inputs=jnp.zeros((1, 32), jnp.int32))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from shardml.core.errors import ModelError
from shardml.core.sharding import flax_rules, per_example
from shardml.core.trees import nest, path_name
from shardml.core.model import Model


def _refuse_non_trainable(name: str, what: list[str]) -> None:
    """Raises ModelError (subject ``module``) naming the first few non-trainable variables."""
    if what:
        raise ModelError(
            f"{name} has non-trainable variables ({', '.join(what[:4])}{', ...' if len(what) > 4 else ''}); shardml "
            "trains parameters only, so that every layout and microbatch count equals one device. Replace batch "
            "norm with layer or group norm, or keep these values as constants outside the module",
            subject="module", value=name)


# ----------------------------------------------------------------------------- NNX


def _nnx_logical(path: str, variable) -> tuple:
    """The logical axes an ``nnx.Param`` was annotated with (replicated when it has none)."""
    names = variable.get_metadata().get("out_sharding")
    shape = variable.get_value().shape
    if not names:
        return (None,) * len(shape)
    names = tuple(names)
    if len(names) != len(shape):
        raise ModelError(f"parameter {path} of shape {shape} is annotated with {len(names)} logical axes {names}; "
                         "give nnx.with_partitioning one name (or None) per dimension", subject="module", value=path)
    return names


def _nnx_builder(module) -> Callable[[jax.Array], Any]:
    """``key -> a fresh module``, from a function of ``nnx.Rngs`` or from a built module."""
    from flax import nnx

    if isinstance(module, nnx.Module):
        return lambda key: nnx.clone(module)
    if callable(module):
        return lambda key: module(nnx.Rngs(key))
    raise TypeError(f"from_nnx takes an nnx.Module or a function rngs -> nnx.Module, got {type(module).__name__}")


@dataclasses.dataclass(frozen=True)
class _NnxParts:
    """An NNX module split into its graph, its parameters and its RNG streams (anything else is
    refused), and merged back from a plain parameter tree and one key."""

    graphdef: Any
    params: tuple  # ((path, abstract nnx.Param), ...)
    rngs: tuple  # ((path, abstract RngKey / RngCount), ...)

    @classmethod
    def split(cls, abstract, name: str) -> _NnxParts:
        from flax import nnx

        graphdef, params, rngs, rest = nnx.split(abstract, nnx.Param, nnx.RngState, ...)
        _refuse_non_trainable(name, [f"{'/'.join(map(str, p))} ({type(v).__name__})" for p, v in nnx.to_flat_state(rest)])
        return cls(graphdef, tuple(nnx.to_flat_state(params)), tuple(nnx.to_flat_state(rngs)))

    def logical(self) -> dict:
        return nest({path_name(path): _nnx_logical(path_name(path), var) for path, var in self.params})

    def merge(self, tree: dict, key: jax.Array | None):
        """The module with ``tree``'s parameters and RNG streams seeded from ``key`` (key 0 if None)."""
        from flax import nnx

        flat = {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
        params = [(path, var.replace(flat[path_name(path)])) for path, var in self.params]
        seed = jax.random.key(0) if key is None else key
        rngs = [(path, var.replace(jax.random.fold_in(seed, i) if isinstance(var, nnx.RngKey)
                                   else jnp.zeros((), jnp.uint32))) for i, (path, var) in enumerate(self.rngs)]
        return nnx.merge(self.graphdef, nnx.from_flat_state(params), nnx.from_flat_state(rngs))


def from_nnx(module: Callable[..., Any] | Any, *, name: str | None = None, flops_per_example: float | None = None,
             tokens_per_example: int = 1) -> Model:
    """A :class:`shardml.Model` of a Flax NNX module.

    Args:
      module: a function that builds the module from an ``nnx.Rngs`` (``lambda rngs: MLP(...,
        rngs=rngs)``), called with each seed's key so every run and population member gets its own
        initialisation; or a built module, whose current values are the initial parameters.
      name: for messages and runs (default: the module's class name).
      flops_per_example, tokens_per_example: see :class:`shardml.Model`.

    Example:
      >>> model = from_nnx(lambda rngs: nnx.Linear(4, 2, rngs=rngs))   # doctest: +SKIP
    """
    from flax import nnx

    build = _nnx_builder(module)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: build(jax.random.key(0)))
    name = name or type(abstract).__name__
    parts = _NnxParts.split(abstract, name)
    uses_rng = bool(parts.rngs)

    def init(key):
        with nnx.use_eager_sharding(False):
            state = nnx.state(build(key), nnx.Param)
        return nest({path_name(path): var.get_value() for path, var in nnx.to_flat_state(state)})

    def call(tree, inputs, key, train: bool):
        model = parts.merge(tree, key)
        model.train() if train else model.eval()
        with _flax_constraints():
            return model(inputs)

    def apply(tree, inputs, *, rng=None):
        if rng is None:  # evaluation: deterministic
            return call(tree, inputs, None, train=not uses_rng)
        return per_example(lambda x_1, key: call(tree, x_1, key, train=True))(inputs, rng)

    return Model(init=init, logical=parts.logical(), apply=apply, uses_rng=uses_rng,
                 flops_per_example=flops_per_example, tokens_per_example=tokens_per_example, name=name)


def _flax_constraints():
    """Flax's logical-axis context set to shardml's active rules (constraints are no-ops outside)."""
    import flax.linen as nn

    return nn.logical_axis_rules(flax_rules())


# ----------------------------------------------------------------------------- Linen


def _linen_logical(tree: Any) -> Any:
    import flax.linen as nn

    specs = nn.get_partition_spec(tree)

    def axes(spec, leaf):
        leaf = getattr(leaf, "value", leaf)
        names = tuple(spec) if spec is not None else ()
        return names if names else (None,) * len(leaf.shape)

    return jax.tree.map(axes, specs, tree, is_leaf=lambda x: isinstance(x, (jax.sharding.PartitionSpec, nn.Partitioned)))


def from_linen(module, example_inputs: Any, *, rng_streams: tuple[str, ...] = (),
               train_kwargs: dict | None = None, eval_kwargs: dict | None = None, name: str | None = None,
               flops_per_example: float | None = None, tokens_per_example: int = 1) -> Model:
    """A :class:`shardml.Model` of a Flax Linen module.

    Args:
      module: the ``nn.Module``.
      example_inputs: an input batch (or its ShapeDtypeStruct): its shape and dtype trace ``init``.
      rng_streams: the Linen RNG streams the module draws from in training (e.g. ``("dropout",)``);
        each example gets its own key per stream.
      train_kwargs, eval_kwargs: keyword arguments of ``__call__`` in training and evaluation
        (e.g. ``{"train": True}`` / ``{"train": False}``).

    Example:
      >>> model = from_linen(MLP(), jnp.zeros((1, 64)))   # doctest: +SKIP
    """
    import flax.linen as nn

    train_kwargs, eval_kwargs = dict(train_kwargs or {}), dict(eval_kwargs or {})
    spec = jax.ShapeDtypeStruct(jnp.shape(example_inputs), jnp.result_type(example_inputs))
    name = name or type(module).__name__

    def streams(key):
        return {"params": key, **{s: jax.random.fold_in(key, i + 1) for i, s in enumerate(rng_streams)}}

    def boxed(key):
        return module.init(streams(key), jnp.zeros(spec.shape, spec.dtype), **eval_kwargs)

    abstract = jax.eval_shape(lambda: boxed(jax.random.key(0)))  # the key too: nothing is computed
    _refuse_non_trainable(name, [c for c in abstract if c != "params"])
    logical = _linen_logical(abstract["params"])

    def init(key):
        return nn.unbox(boxed(key)["params"])

    def apply(params, inputs, *, rng=None):
        if rng is None:
            with _flax_constraints():
                return module.apply({"params": params}, inputs, **eval_kwargs)

        def one(x_1, key):
            keys = {s: jax.random.fold_in(key, i) for i, s in enumerate(rng_streams)}
            with _flax_constraints():  # inside the per-example map, which owns the batch axes
                return module.apply({"params": params}, x_1, rngs=keys, **train_kwargs)

        return per_example(one)(inputs, rng)

    return Model(init=init, logical=logical, apply=apply, uses_rng=bool(rng_streams),
                 flops_per_example=flops_per_example, tokens_per_example=tokens_per_example, name=name)


__all__ = ["from_linen", "from_nnx"]
