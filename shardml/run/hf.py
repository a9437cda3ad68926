"""``model.from=PATH``: a run that starts from a Hugging Face checkpoint (a directory, or a repo id
``huggingface_hub`` downloads).

The checkpoint's ``config.json`` sets the model's shape (a ``model.*`` key given with it must agree
or is refused, naming the key); its weights are the state of step 0 (a resumed run reads its own
checkpoints instead); its ``tokenizer.json``, when there is one, tokenises ``data.corpus`` and the
prompts of ``shardml generate``. The run keeps ``config.json`` and the tokenizer files in
``OUT_DIR/hf/``, where ``shardml eval``, ``generate`` and ``export`` read them::

    cfg = from_checkpoint(load_config(None, ["model.from=ckpt/", "data.corpus=notes.txt"]))
    cfg.model.layers          # what ckpt/config.json says
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil

import jax
import jax.numpy as jnp

from shardml.core.errors import ShardmlError
from shardml.core.step import Trainer, TrainState
from shardml.core.tokenizer import BPE, load_tokenizer
from shardml.core.update import state_of
from shardml.models.hf_io import checkpoint_config, load_hf
from shardml.models.lora import BASE, shared_params
from shardml.run import distributed, store
from shardml.run.errors import ConfigError
from shardml.run.run_dir import Frozen
from shardml.run.schema import RUN_MODEL_KEYS, Config, ModelConfig

# what a checkpoint's tokenizer is made of (transformers' AutoTokenizer reads them back)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
RUN_COPY = "hf"  # OUT_DIR/hf/: the checkpoint's config.json and tokenizer files


def _checkpoint(cfg: Config) -> tuple[str, ModelConfig]:
    """(directory, its config) of ``model.from``; a bad path is an error naming ``model.from``."""
    m = cfg.model
    try:
        return checkpoint_config(m.from_, m.dtype)
    except ShardmlError as err:
        raise ConfigError(f"model.from={m.from_}: {err}", subject="model.from", value=m.from_) from None


def _check_run(cfg: Config) -> None:
    """``model.from`` trains one transformer (or a population or federated clients of its adapters)."""
    adapters = cfg.lora.rank > 0 and cfg.population.kind in ("sweep", "ensemble")
    for wrong, what in ((cfg.model.kind != "transformer", f"model.kind={cfg.model.kind}"),
                        (cfg.population.size > 1 and not adapters, f"population.size={cfg.population.size} (only "
                         "adapters, lora.rank > 0, train as a sweep or ensemble over one imported base)"),
                        (cfg.federated.algorithm != "none" and not cfg.lora.rank,
                         f"federated.algorithm={cfg.federated.algorithm} without lora.rank (federated clients of "
                         "an imported base train adapters: set lora.rank=R)"),
                        (cfg.data.tokenizer != "byte", f"data.tokenizer={cfg.data.tokenizer}")):
        if wrong:
            raise ConfigError(f"model.from={cfg.model.from_} trains one transformer with the checkpoint's own "
                              f"tokenizer; {what} cannot go with it (drop it)", subject="model.from",
                              value=cfg.model.from_)


def from_checkpoint(cfg: Config) -> Config:
    """``cfg`` with the model's shape from ``model.from``'s ``config.json`` (``cfg`` itself when
    ``model.from`` is empty). Reads no weights.

    Raises:
      ConfigError: a ``model.*`` key that disagrees with the checkpoint (named, with the
        checkpoint's value), a missing or unsupported checkpoint, or a run kind it cannot start.
    """
    m = cfg.model
    if not m.from_:
        return cfg
    _check_run(cfg)
    directory, theirs = _checkpoint(cfg)
    default, shape = ModelConfig(), {}
    for field in dataclasses.fields(theirs):
        if field.name in RUN_MODEL_KEYS:
            continue
        mine, value = getattr(m, field.name), getattr(theirs, field.name)
        if mine != getattr(default, field.name) and mine != value:
            raise ConfigError(f"model.{field.name}={mine} conflicts with {os.path.join(directory, 'config.json')}, "
                              f"which gives {field.name}={value}; drop model.{field.name} (model.from takes the "
                              "model's shape from the checkpoint)", subject=f"model.{field.name}", value=mine)
        shape[field.name] = value
    return dataclasses.replace(cfg, model=dataclasses.replace(m, **shape))


def checkpoint_tokenizer(cfg: Config, text) -> BPE | None:
    """The ``tokenizer.json`` of ``model.from`` (None: the checkpoint has none, text is read as
    bytes), its bytes per token measured on ``text``.

    Raises:
      ConfigError: a tokenizer with more tokens than the model's embedding has rows.
    """
    directory, _ = _checkpoint(cfg)
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    tokenizer = load_tokenizer(path, text)
    if tokenizer.vocab > cfg.model.vocab:
        raise ConfigError(f"{path} has {tokenizer.vocab} tokens but the model of model.from={cfg.model.from_} embeds "
                          f"only vocab_size={cfg.model.vocab}; a token id past the embedding has no row. Use the "
                          "tokenizer the checkpoint was trained with", subject="model.from", value=tokenizer.vocab)
    return tokenizer


def imported_state(trainer: Trainer, cfg: Config, seed: int) -> TrainState:
    """Step 0 of a ``model.from`` run: the checkpoint's weights read straight into the trainer's
    shardings (in the strategy's layout), a fresh optimizer state; the checkpoint's config.json
    and tokenizer files are copied to ``OUT_DIR/hf/``. A LoRA run (one model or a population of
    adapters) takes them as its frozen base, stored once, under the trainer's own fresh adapters."""
    _, params = load_hf(cfg.model.from_, mesh=trainer.mesh, rules=trainer.rules, dtype=cfg.model.dtype)
    # Not trainer.init: that would make a random copy of every weight beside the loaded one.
    build = _under_adapters(trainer) if shared_params(trainer.model) else \
        (lambda p, s: state_of(trainer.strategy.layout(p), s, optimizer=trainer.optimizer))
    first = jax.jit(build, out_shardings=trainer.state_shardings, donate_argnums=0)
    with jax.set_mesh(trainer.mesh):
        state = first(params, jnp.asarray(seed, jnp.uint32))
    if cfg.out_dir and distributed.primary():
        copy_files(_checkpoint(cfg)[0], os.path.join(cfg.out_dir, RUN_COPY), ("config.json", *TOKENIZER_FILES))
    return state


def base_from(trainer: Trainer, cfg: Config) -> Frozen | None:
    """A LoRA run on ``model.from``'s weights: its checkpoints leave the frozen base out, record
    ``model.from`` (absolute, for a directory) and the base's fingerprint, and read it again from
    there on restore (:class:`shardml.run.run_dir.Frozen`). None for every other run: a random
    base (no ``model.from``) or a full fine-tune is saved whole.

        parts.frozen.source          # {"model.from": "/abs/ckpt"}
    """
    if not (cfg.model.from_ and shared_params(trainer.model)):
        return None
    path = cfg.model.from_
    source = {"model.from": os.path.abspath(path) if os.path.isdir(path) else path}
    return Frozen(shared_params(trainer.model), source, functools.partial(_read_base, trainer, cfg.model.dtype))


def _read_base(trainer: Trainer, dtype: str, source: dict, abstract: dict) -> dict:
    """``{"base": ...}`` read from the recorded ``model.from`` into the shardings and dtype of
    ``abstract`` (as :func:`imported_state` placed it at step 0), or as read when its shapes differ
    (the fingerprint check that follows names the change)."""
    path = source["model.from"]
    try:
        _, params = load_hf(path, mesh=trainer.mesh, rules=trainer.rules, dtype=dtype)
    except ShardmlError as err:
        raise ConfigError(f"model.from={path} is the frozen base of this LoRA run, whose checkpoints hold only the "
                          f"adapters, and it cannot be read ({err}); put the base model back at {path} (the "
                          "checkpoint's fingerprint of it must match)", subject="model.from", value=path) from None
    want = abstract[BASE]
    shapes = {name: shape for name, (shape, _) in store.describe(want).items()}
    if {name: shape for name, (shape, _) in store.describe(params).items()} != shapes:
        return {BASE: params}
    shardings = jax.tree.map(lambda a: a.sharding, want)
    cast = jax.jit(lambda p: jax.tree.map(lambda x, a: x.astype(a.dtype), p, want), out_shardings=shardings,
                   donate_argnums=0)
    with jax.set_mesh(trainer.mesh):
        return {BASE: cast(params)}


def _under_adapters(trainer: Trainer):
    """``(loaded, seed) -> state``: the trainer's own step 0 (its adapters, every member's, and
    their hyperparameters) with ``loaded`` as the base. The init's random base is unused, so the
    compiler drops it; a LoRA model has no pipeline, so the base needs no other layout."""
    init = trainer.program.init

    def build(loaded, seed):
        state = init(seed)
        base = jax.tree.map(lambda p, mine: p.astype(mine.dtype), loaded, state.params[BASE])
        return dataclasses.replace(state, params={**state.params, BASE: base})

    return build


def copy_files(source: str, target: str, names) -> None:
    """Copies the files of ``names`` that ``source`` has into ``target`` (created)."""
    os.makedirs(target, exist_ok=True)
    for name in names:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(target, name))


def in_run(cfg: Config, run_dir: str) -> Config:
    """A ``model.from`` run's config read from its directory: its own copy of the checkpoint's
    config.json and tokenizer (``RUN_DIR/hf/``) stands in for ``model.from``."""
    copy = os.path.join(run_dir, RUN_COPY)
    if not cfg.model.from_ or not os.path.isfile(os.path.join(copy, "config.json")):
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, from_=os.path.abspath(copy)))
