"""What can be rejected before anything compiles, derived from the model's parameters, the rules
and the mesh (so any model is checked, not only the reference transformer).

Messages name every value as ``name=value``: mesh axes (``tensor=4``) and arguments
(``batch_size=12``, ``microbatches=2``), so the run layer can name the config keys instead.

    check_divisible(model.logical, model.abstract_params, rules, mesh.shape)
    check_batch(32, mesh.shape, microbatches=4)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax

from shardml.core.errors import LayoutError
from shardml.core.sharding import Rules, is_axes
from shardml.core.trees import path_name


def check_divisible(logical: Any, abstract_params: Any, rules: Rules, sizes: Mapping[str, int]) -> None:
    """Every parameter dimension divides evenly over the mesh axes its logical name maps to.

    Raises:
      LayoutError: naming the parameter, the dimension, its logical name and the mesh axes (as
        ``tensor=4``; ``subject`` is the mesh axis when only one splits the dimension).
    """
    flat_axes = jax.tree.leaves(logical, is_leaf=is_axes)
    flat_shapes = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    for axes, (path, leaf) in zip(flat_axes, flat_shapes):
        rules.spec(axes)  # unknown names and a mesh axis used twice fail here, with their fix
        for dim, name in enumerate(axes):
            mesh_axes = [a for a in rules.mesh_axes(name) if sizes.get(a, 1) > 1]
            ways = math.prod(sizes[a] for a in mesh_axes)
            if leaf.shape[dim] % ways:
                split = " x ".join(f"{a}={sizes[a]}" for a in mesh_axes)
                subject = mesh_axes[0] if len(mesh_axes) == 1 else None
                raise LayoutError(
                    f"parameter '{path_name(path)}' has size {leaf.shape[dim]} along '{name}' (dimension {dim} of "
                    f"{tuple(leaf.shape)}), which {split} = {ways} does not divide; pick mesh sizes that divide "
                    f"{leaf.shape[dim]}, change the model's size, or map '{name}' to other mesh axes in the rules",
                    subject=subject, value=sizes[subject] if subject else None)


def check_batch(batch_size: int, sizes: Mapping[str, int], microbatches: int = 1, pipeline_microbatches: int = 1,
                rules: Rules | None = None) -> None:
    """The global batch splits into data shards, accumulation microbatches and pipeline microbatches.

    Raises:
      LayoutError: naming the factors (mesh axes, ``microbatches``, ``pipeline_microbatches``) and
        the nearest valid batch sizes; ``subject`` is ``batch_size``.
    """
    rules = rules or Rules.default()
    axes = [a for a in rules.mesh_axes("batch") if sizes.get(a, 1) > 1]
    factors = [(a, sizes[a]) for a in axes] + [("microbatches", microbatches)]
    if pipeline_microbatches > 1:
        factors.append(("pipeline_microbatches", pipeline_microbatches))
    per_step = math.prod(n for _, n in factors)
    if batch_size % per_step:
        split = " x ".join(f"{name}={n}" for name, n in factors)
        lower = batch_size // per_step * per_step
        nearest = f"{lower} or {lower + per_step}" if lower else f"{per_step}"
        raise LayoutError(f"batch_size={batch_size} is not divisible by {split} = {per_step}; use a batch size that "
                          f"is a multiple of {per_step} (e.g. {nearest})", subject="batch_size", value=batch_size)
