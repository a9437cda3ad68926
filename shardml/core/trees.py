"""Naming the leaves of a PyTree by their path (``"layers/wq"``), and back.

    flat = flatten({"a": {"b": 1}})    # {"a/b": 1}
    nest(flat)                         # {"a": {"b": 1}}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax


def path_name(path: Sequence[Any]) -> str:
    """``"params/layers/wq"`` for a key path of dict keys, dataclass fields or indices."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def flatten(tree: Any, is_leaf=None) -> dict[str, Any]:
    """``{"params/layers/wq": leaf, ...}``: leaves by their path."""
    return {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def nest(flat: Mapping[str, Any]) -> dict:
    """The nested dict of a ``{"a/b": leaf}`` mapping."""
    tree: dict = {}
    for name, leaf in flat.items():
        node = tree
        *parents, last = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    return tree
