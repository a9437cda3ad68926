"""Hugging Face checkpoints in and out: safetensors read slice by slice straight into the target
shardings, and written back tensor by tensor.

:func:`load_hf` builds the family's transformer from ``config.json``
(:mod:`shardml.models.hf_families`), checks every tensor's shape and the layout before reading
any data, then places each parameter block by block: each distinct block a process's devices hold
is read from the memory-mapped file (``safe_open(...).get_slice``), put on those devices and
dropped (``jax.make_array_from_single_device_arrays``), so a process reads only the slices its
devices hold and no host holds the whole model. :func:`save_hf` gathers one tensor
(one layer of one parameter) at a time and writes files of at most ``max_shard_bytes``.

    model, params = load_hf("Qwen2.5-0.5B/", mesh=make_mesh({"fsdp": 8}))
    save_hf(model, params, "out/")   # transformers.AutoModelForCausalLM.from_pretrained("out/") loads it
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any

import jax
import numpy as np

from shardml.core.checks import check_divisible
from shardml.core.errors import DataError, ModelError
from shardml.core.mesh import as_mesh
from shardml.core.model import Model
from shardml.core.sharding import Rules, tree_shardings
from shardml.models.hf_families import Source, config_from_hf, hf_config, weight_sources
from shardml.models.transformer import transformer
from shardml.models.transformer_layers import TransformerConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _safetensors():
    """The optional ``safetensors`` package, or an error naming the extra that installs it."""
    try:
        import safetensors  # noqa: PLC0415  (lazy: the `hf` extra)
        import safetensors.numpy  # noqa: F401, PLC0415
    except ImportError as err:
        raise ModelError("reading or writing Hugging Face checkpoints needs safetensors: pip install 'shardml[hf]'",
                         subject="safetensors", value=None) from err
    return safetensors


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist; a Hugging Face checkpoint directory holds config.json and "
                        f"{SINGLE_FILE} (or {INDEX_FILE} and its shards)", subject="path", value=path)
    with open(path) as f:
        return json.load(f)


def tensor_files(directory: str) -> dict[str, str]:
    """Each tensor's name -> the file that holds it, from the index of a sharded checkpoint or the
    single file's keys.

    Raises:
      DataError: no safetensors in ``directory``, or a shard the index names that is missing.
    """
    index_path, single = os.path.join(directory, INDEX_FILE), os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(index_path):
        weight_map = _read_json(index_path)["weight_map"]
        for file in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(directory, file)):
                raise DataError(f"shard {file} named by {index_path} is missing; download the whole checkpoint "
                                "again", subject="path", value=os.path.join(directory, file))
        return {name: os.path.join(directory, file) for name, file in weight_map.items()}
    if os.path.isfile(single):
        with _safetensors().safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    raise DataError(f"{directory} holds neither {SINGLE_FILE} nor {INDEX_FILE}", subject="path", value=directory)


class _Reader:
    """Open safetensors files (memory-mapped), one handle per file and framework."""

    def __init__(self, files: dict[str, str], stack: contextlib.ExitStack):
        self.files, self.stack, self.handles = files, stack, {}

    def slice(self, name: str, framework: str = "numpy"):
        key = (self.files[name], framework)
        if key not in self.handles:
            self.handles[key] = self.stack.enter_context(_safetensors().safe_open(key[0], framework=framework))
        return self.handles[key].get_slice(name)

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        part = self.slice(name)
        if part.get_dtype() == "BF16":  # NumPy has no bfloat16 of its own: read through JAX (ml_dtypes)
            return np.asarray(self.slice(name, "flax")[index], np.float32)
        return np.asarray(part[index], np.float32)


def _check_tensors(sources: list[Source], shapes: dict, reader: _Reader, cfg: TransformerConfig) -> None:
    """Every tensor the config implies is present with the shape it implies, before any is read."""
    for source in sources:
        shape = shapes[source.path]
        per_tensor = shape[int(source.stacked) + int(source.experts):]
        for layer, expert in _tensor_keys(source, shape):
            name = source.hf_name(layer, expert)
            if name not in reader.files:
                raise DataError(f"tensor {name} is missing from the checkpoint, though config.json implies it",
                                subject="path", value=name)
            found, want = tuple(reader.slice(name).get_shape()), source.hf_shape(per_tensor)
            if found != want:
                raise ModelError(f"tensor {name} has shape {found} but config.json (layers={cfg.layers}, "
                                 f"d_model={cfg.d_model}, heads={cfg.heads}, kv_heads={cfg.kv_heads}, d_ff={cfg.d_ff}, "
                                 f"experts={cfg.experts}, expert_d_ff={cfg.expert_d_ff}, vocab={cfg.vocab}) implies "
                                 f"{want}; the config and the weights disagree",
                                 subject="config.json", value=found)


def _tensor_keys(source: Source, shape: tuple[int, ...]) -> list[tuple[int | None, int | None]]:
    """(layer, expert) of each checkpoint tensor a parameter of ``shape`` is made of (None: no such
    dimension)."""
    layers = range(shape[0]) if source.stacked else [None]
    if not source.experts:
        return [(layer, None) for layer in layers]
    return [(layer, expert) for layer in layers for expert in range(shape[1])]


def read_block(reader: _Reader, source: Source, name: str, shape: tuple[int, ...], index: tuple[slice, ...]):
    """One device's block [index] of a per-layer parameter of ``shape``, read from tensor ``name``:
    for each tensor dimension the rows covering the block's leading dimension of its group (the
    group's inner dimensions whole), then reshaped and the inner dimensions sliced."""
    ranges, block_shape, inner_index, start = [], [], [], 0
    for n in source.groups:
        inner = shape[start + 1:start + n]
        lead = index[start]
        ranges.append(slice(lead.start * math.prod(inner), lead.stop * math.prod(inner)))
        block_shape += [lead.stop - lead.start, *inner]
        inner_index += [slice(None), *index[start + 1:start + n]]
        start += n
    block = reader.read(name, tuple(reversed(ranges)) if source.transpose else tuple(ranges))
    block = block.T if source.transpose else block
    return block.reshape(block_shape)[tuple(inner_index)]


def _load_param(reader: _Reader, source: Source, shape: tuple[int, ...], sharding) -> jax.Array:
    """The parameter placed in ``sharding``: each distinct block this process's devices hold is read
    once, put on the devices that hold it, and dropped, so the host stages one block at a time."""
    holders: dict[tuple, list] = {}  # a block's (start, stop) per dimension -> the devices holding it
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
        holders.setdefault(tuple((s.start, s.stop) for s in index), []).append(device)
    arrays = []
    for key, devices in holders.items():
        index = tuple(slice(start, stop) for start, stop in key)
        block = _read_stacked(reader, source, shape, index)
        arrays += [jax.device_put(block, device) for device in devices]
        del block
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _read_stacked(reader: _Reader, source: Source, shape: tuple[int, ...], index: tuple[slice, ...], layer=None):
    """The block [index] of a parameter of ``shape``, stacked from the tensors of the layers (and
    experts) it covers: a stacked parameter's leading dimension is the layers, an expert one's next
    the experts (one tensor each)."""
    if source.stacked and layer is None:
        return np.stack([_read_stacked(reader, source, shape[1:], index[1:], layer)
                         for layer in range(index[0].start, index[0].stop)])
    if source.experts:
        return np.stack([read_block(reader, source, source.hf_name(layer, expert), shape[1:], index[1:])
                         for expert in range(index[0].start, index[0].stop)])
    return read_block(reader, source, source.hf_name(layer), shape, index)


def _put(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _local_dir(path: str) -> str:
    """``path`` itself when it is a directory, else a Hugging Face repo id fetched (or found in the
    cache) by ``huggingface_hub``."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.startswith((".", os.sep)) or path.count("/") != 1:  # a path, not a repo id
        raise DataError(f"{path} is not a checkpoint directory", subject="path", value=path)
    try:
        import huggingface_hub  # noqa: PLC0415  (lazy: the `hf` extra)
    except ImportError as err:
        raise DataError(f"{path} is not a directory; to download a repo id install huggingface_hub: "
                        "pip install 'shardml[hf]'", subject="path", value=path) from err
    try:
        return huggingface_hub.snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    except Exception as err:  # offline, unknown repo, gated: all the same to the caller
        raise DataError(f"{path} is not a directory and could not be downloaded ({err})", subject="path",
                        value=path) from err


def checkpoint_config(path: str, dtype: str = "float32") -> tuple[str, TransformerConfig]:
    """(local directory, :class:`TransformerConfig`) of a checkpoint directory or repo id, from its
    ``config.json`` alone (no weights read).

        directory, cfg = checkpoint_config("ckpt/")    # ("ckpt/", TransformerConfig(layers=2, ...))

    Raises:
      DataError: no such directory (or a repo id that cannot be downloaded), no config.json.
      ModelError: an unsupported architecture.
    """
    directory = _local_dir(path)
    return directory, config_from_hf(_read_json(os.path.join(directory, "config.json")), dtype=dtype)


def load_hf(path: str, *, mesh: Any = None, rules: Rules | None = None, dtype: str = "float32",
            seq_len: int = 2048) -> tuple[Model, Any]:
    """A Hugging Face checkpoint as a :class:`shardml.Model` and its parameters, placed in ``mesh``'s
    shardings under ``rules`` (float32, as shardml trains them).

    Args:
      path: a checkpoint directory (config.json and safetensors, single or sharded with the index),
        or a Hugging Face repo id (downloaded through huggingface_hub, its cache honoured).
      mesh: a Mesh or mesh sizes (``{"fsdp": 8}``); None: all devices on ``data``.
      dtype: the compute dtype of the model's matmuls.
      seq_len: the sequence length the model's FLOP count (MFU) assumes.

    Example::

        model, params = load_hf("ckpt/", mesh={"fsdp": 2, "tensor": 4})
        logits_BSV = model.apply(params, tokens_BS)

    Raises:
      ModelError: an unsupported architecture, or a tensor whose shape disagrees with config.json.
      DataError: no such directory, a missing shard or tensor.
      LayoutError: a parameter (e.g. the heads) the mesh cannot divide.
    """
    directory, cfg = checkpoint_config(path, dtype)
    model = transformer(cfg, seq_len)
    mesh, rules = as_mesh(mesh), rules or Rules.default()
    check_divisible(model.logical, model.abstract_params, rules, dict(mesh.shape))
    shardings = tree_shardings(model.logical, rules, mesh)
    sources = weight_sources(cfg)
    shapes = {s.path: _at(model.abstract_params, s.path).shape for s in sources}
    params: dict = {}
    with contextlib.ExitStack() as stack:
        reader = _Reader(tensor_files(directory), stack)
        _check_tensors(sources, shapes, reader, cfg)
        for source in sources:
            _put(params, source.path, _load_param(reader, source, shapes[source.path], _at(shardings, source.path)))
    return model, params


def _at(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _hf_tensors(cfg: TransformerConfig, params: Any):
    """(name, gathered array in ``cfg.export_dtype``) of every tensor of the checkpoint, one at a time."""
    dtype = jax.numpy.dtype(cfg.export_dtype)  # bfloat16 through ml_dtypes, which NumPy and safetensors take
    for source in weight_sources(cfg):
        param = _at(params, source.path)
        for layer, expert in _tensor_keys(source, param.shape):
            value = param[layer] if source.stacked else param
            value = np.asarray(jax.device_get(value if expert is None else value[expert]), np.float32)
            value = value.reshape(source.hf_shape(value.shape)[::-1] if source.transpose else source.hf_shape(value.shape))
            yield source.hf_name(layer, expert), np.ascontiguousarray(value.T if source.transpose else value).astype(dtype, copy=False)


def save_hf(model: Model, params: Any, out_dir: str, *, max_shard_bytes: int = 2**31) -> None:
    """Writes ``model`` (a transformer, e.g. from :func:`load_hf`) as a Hugging Face checkpoint:
    ``config.json`` and safetensors in ``model.config.export_dtype`` (a loaded checkpoint's own dtype,
    float32 for a model born in shardml), sharded with an index above ``max_shard_bytes``. One
    tensor (one layer of one parameter) is gathered at a time, so the host holds at most one file's
    worth.

        save_hf(model, params, "out/")
        # transformers.AutoModelForCausalLM.from_pretrained("out/")

    Raises:
      ModelError: a model that is not a transformer (no TransformerConfig to describe it), or
        settings no Hugging Face family here holds (e.g. shared experts), before any file is written.
    """
    cfg = model.config
    if not isinstance(cfg, TransformerConfig):
        raise ModelError(f"{model.name} is not a transformer; save_hf writes shardml.transformer and load_hf "
                         "models only", subject="model", value=model.name)
    config = hf_config(cfg)  # before any file: it refuses settings no family can hold
    writer = _safetensors().numpy
    os.makedirs(out_dir, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    files: list[str] = []

    def flush():
        files.append(f"model-{len(files) + 1:05d}.safetensors")
        writer.save_file(shards[0], os.path.join(out_dir, files[-1]), metadata={"format": "pt"})
        shards[0] = {}

    weight_map = {}
    for name, value in _hf_tensors(cfg, params):
        if shards[0] and sum(v.nbytes for v in shards[0].values()) + value.nbytes > max_shard_bytes:
            flush()
        shards[0][name] = value
        weight_map[name] = len(files)
    flush()
    _write_index(out_dir, files, weight_map)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _write_index(out_dir: str, files: list[str], weight_map: dict[str, int]) -> None:
    """One file is renamed to ``model.safetensors``; several are named by an index."""
    if len(files) == 1:
        os.replace(os.path.join(out_dir, files[0]), os.path.join(out_dir, SINGLE_FILE))
        return
    total = sum(os.path.getsize(os.path.join(out_dir, f)) for f in files)
    index = {"metadata": {"total_size": total}, "weight_map": {n: files[i] for n, i in weight_map.items()}}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
