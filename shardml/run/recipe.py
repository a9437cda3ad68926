"""From a config to the parts of a run: model, loss, data, optimizer, mesh and trainer.

The one place that turns a :class:`~shardml.run.config.Config` into objects; ``shardml train``,
``shardml plan`` and the benchmarks all build their trainer here::

    parts = build(load_config("tiny"))
    state = parts.trainer.init(parts.cfg.train.seed)
    state, metrics = parts.trainer.step(state, parts.trainer.put(parts.data.batch(0)))
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable
from typing import Any

import jax

from shardml.core.checks import check_batch
from shardml.core.data import ArrayBatches, MemberBatches, TextBatches, is_token_file, load_digits, load_tokens
from shardml.core.devices import device_memory_bytes
from shardml.core.errors import ConfigError
from shardml.core.losses import Loss, classification, token_cross_entropy
from shardml.core.mesh import MeshConfig, make_mesh
from shardml.core.optim import default_optimizer
from shardml.core.pipeline import Schedule
from shardml.core.step import Trainer, build_trainer
from shardml.core.tokenizer import train_bpe
from shardml.models import Model, mlp_classifier, transformer
from shardml.models.lora import lora, lora_optimizer
from shardml.models.transformer import AUTO, resolve_execution, unrolled_fits
from shardml.parallel.federated import build_federated
from shardml.parallel.members import build_population
from shardml.parallel.partition import cohort_size
from shardml.parallel.population import Member, hyperparam_arrays, plan_members
from shardml.run.config import Config, pipeline_microbatches, validate
from shardml.run.rules import lora_targets
from shardml.run.search import LORA_SEARCH
from shardml.run.errors import config_errors, keyed
from shardml.run.federated import algorithm_of, client_data, privacy_of
from shardml.run.hf import base_from, checkpoint_tokenizer, from_checkpoint, imported_state
from shardml.run.run_dir import Frozen
from shardml.run.sft_data import sft_source

ARRAY_DATASETS = {"digits": load_digits}


@dataclasses.dataclass(frozen=True)
class Parts:
    """Everything a run of ``cfg`` needs, built and checked (nothing compiled yet)."""

    cfg: Config
    sizes: dict[str, int]
    model: Model
    loss: Loss
    data: Any  # TextBatches | ArrayBatches (MemberBatches of them for a bootstrap ensemble)
    trainer: Trainer
    schedule: Schedule | None
    members: list[Member] | None = None  # a population's members (None: one model)
    initial: Callable | None = None  # seed -> the state of step 0 (model.from's weights); None: trainer.init
    frozen: Frozen | None = None  # what checkpoints leave out and read again: a LoRA run's model.from base


    def eval_batches(self) -> list[dict]:
        return self.data.eval_batches(self.cfg.train.eval_batches)


def data_source(cfg: Config, resample: int | None = None) -> TextBatches | ArrayBatches:
    """The data of ``cfg``: text windows for the transformer, examples for the classifier
    (``resample``, default ``data.resample``: which bootstrap resample, -1 none)."""
    d, t = cfg.data, cfg.train
    if d.sft:
        return sft_source(cfg)
    resample = d.resample if resample is None else resample
    if cfg.model.kind == "mlp":
        if d.corpus not in ARRAY_DATASETS:
            raise ConfigError(f"model.kind=mlp trains on array data; data.corpus={d.corpus!r} is not one of "
                              f"{', '.join(ARRAY_DATASETS)} (from Python, any arrays: shardml.ArrayBatches)")
        return ArrayBatches(ARRAY_DATASETS[d.corpus](), t.batch_size, t.seed, resample, d.noise)
    if d.corpus in ARRAY_DATASETS:
        raise ConfigError(f"data.corpus={d.corpus} holds labelled examples, not text; use model.kind=mlp")
    if d.noise:
        raise ConfigError(f"data.noise={d.noise} augments array inputs; text has none (set data.noise=0)")
    tokens = load_tokens(d.corpus, d.val_fraction, vocab=cfg.model.vocab if is_token_file(d.corpus) else 0,
                         token_dtype=d.token_dtype)
    tokenizer = _bpe(cfg, tokens) if d.tokenizer == "bpe" else None
    if cfg.model.from_ and not is_token_file(d.corpus):
        tokenizer = checkpoint_tokenizer(cfg, tokens.train)
    if tokenizer is not None:
        tokens = dataclasses.replace(tokens, vocab=tokenizer.vocab)
    if tokens.vocab > cfg.model.vocab:
        raise ConfigError(f"data.corpus={d.corpus!r} has a vocabulary of {tokens.vocab} but model.vocab="
                          f"{cfg.model.vocab}; set model.vocab={tokens.vocab}")
    return TextBatches(tokens, t.batch_size, d.seq_len, t.seed, resample, tokenizer)


_BPE_CACHE: dict = {}


def _bpe(cfg: Config, tokens):
    """``data.tokenizer=bpe``: a BPE tokenizer of ``data.vocab`` (0: ``model.vocab``) tokens trained on
    the training text (once per process for the same text and vocabulary: training is deterministic)."""
    d = cfg.data
    if is_token_file(d.corpus):
        raise ConfigError(f"data.tokenizer=bpe tokenises text; data.corpus={d.corpus!r} already holds token ids "
                          "(use data.tokenizer=byte)")
    vocab = d.vocab or cfg.model.vocab
    if vocab > cfg.model.vocab:
        raise ConfigError(f"data.vocab={vocab} exceeds model.vocab={cfg.model.vocab}; the model's vocabulary must hold "
                          f"every token id: set model.vocab={vocab} (or a smaller data.vocab)")
    key = (hashlib.sha1(memoryview(tokens.train)).hexdigest(), vocab)
    if key not in _BPE_CACHE:
        _BPE_CACHE[key] = train_bpe(tokens.train, vocab)
    return _BPE_CACHE[key]


def model_of(cfg: Config, data) -> tuple[Model, Loss]:
    """The reference model of ``cfg.model.kind`` and its loss."""
    if cfg.model.kind == "mlp":
        ex = data.examples
        return mlp_classifier(ex.features, cfg.model.d_ff, ex.classes, cfg.model.dtype), classification
    model = transformer(cfg.model, cfg.data.seq_len)
    return (adapted(cfg, model) if cfg.lora.rank else model), token_cross_entropy


LORA_KEYS = {"rank": "lora.rank", "alpha": "lora.alpha", "dropout": "lora.dropout", "targets": "lora.targets"}
LORA_BASE_SEED = 0  # the random base of a LoRA run without model.from


def adapted(cfg: Config, model: Model) -> Model:
    """``lora.rank`` > 0: ``model`` frozen under adapters (:func:`shardml.lora`). Without
    ``model.from`` the base is ``model``'s init from a fixed seed, not ``train.seed``, so every
    seed and every member of a population adapts the same base; ``model.from``'s weights replace
    it at step 0 (:func:`shardml.run.hf.imported_state`). A population searching ``lora.alpha`` or
    ``lora.dropout`` holds them per member (``per_member``).

    Raises:
      ConfigError: a rank above a targeted layer's width, a role the model lacks (``lora.*`` named).
    """
    base = dataclasses.replace(model, init=lambda key: model.init(jax.random.key(LORA_BASE_SEED)))
    with keyed(cfg, LORA_KEYS):
        return lora(base, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                    targets=lora_targets(cfg), per_member=tuple(n for n in cfg.population.search if n in LORA_SEARCH))


def optimizer_of(cfg: Config, model: Model | None = None):
    """The run's optax optimizer (:func:`default_optimizer`); with ``lora.rank`` > 0 it updates the
    adapters only (:func:`shardml.lora_optimizer`: the base, and ``model``'s per-member settings,
    get no update and no state)."""
    optimizer = default_optimizer(cfg.optim, cfg.train.steps)
    return lora_optimizer(optimizer, model) if cfg.lora.rank else optimizer


def schedule_of(cfg: Config, stages: int) -> Schedule | None:
    if stages <= 1:
        return None
    pc = cfg.pipeline
    return Schedule(pc.schedule, stages, pipeline_microbatches(cfg, stages), pc.repeats)


def resolve_model(cfg: Config, sizes: dict[str, int], devices, device_memory: int | None = None) -> Config:
    """``cfg`` with the transformer's ``auto`` remat and layer loop chosen for ``device_memory``
    bytes per device (default: what ``devices`` have; see
    :func:`shardml.models.transformer.resolve_execution`); ``Parts.cfg`` holds the result."""
    m = cfg.model
    if m.kind != "transformer" or AUTO not in (m.remat, m.layer_loop):
        return cfg
    members_here = max(1, cfg.population.size // sizes["members"])
    rows = cfg.train.batch_size // (sizes["data"] * sizes["fsdp"] * cfg.train.microbatches) * members_here
    fits = unrolled_fits(m, cfg.data.seq_len, rows, sizes, device_memory or device_memory_bytes(devices))
    return dataclasses.replace(cfg, model=resolve_execution(m, fits))


@config_errors
def build(cfg: Config, devices=None, members: list[Member] | None = None, device_memory: int | None = None) -> Parts:
    """Validates ``cfg`` against ``devices`` (default: all), then builds the model, data and trainer
    (of a population's ``members`` when given, else of those ``cfg.population`` plans).
    ``device_memory`` (bytes per device; default: what ``devices`` have) decides the model's
    ``auto`` settings.

    Raises:
      ConfigError: before anything compiles, for anything that cannot work.
    """
    if cfg.population.models:
        raise ConfigError(f"model.* lists ({sorted(cfg.population.models)}) train one group of devices per "
                          "architecture: build them with shardml.run.groups.build_architectures (shardml train and "
                          "shardml plan do)", subject="population.models", value=cfg.population.models)
    devices = list(devices if devices is not None else jax.devices())
    cfg = from_checkpoint(cfg)
    sizes = validate(cfg, len(devices))
    cfg = resolve_model(cfg, sizes, devices, device_memory)
    schedule = schedule_of(cfg, sizes["pipeline"])
    check_batch(cfg.train.batch_size, sizes, cfg.train.microbatches, schedule.microbatches if schedule else 1)
    if cfg.federated.algorithm != "none":
        return federated_parts(cfg, sizes, devices)
    data = data_source(cfg)
    model, loss = model_of(cfg, data)
    mesh = make_mesh(MeshConfig(**sizes), devices=devices)
    optimizer = optimizer_of(cfg, model)
    pop = cfg.population
    if pop.size == 1:
        trainer = build_trainer(model, mesh, optimizer, loss=loss, microbatches=cfg.train.microbatches,
                                schedule=schedule)
        initial = functools.partial(imported_state, trainer, cfg) if cfg.model.from_ else None
        return Parts(cfg, sizes, model, loss, data, trainer, schedule, initial=initial, frozen=base_from(trainer, cfg))
    members = members or plan_members(pop.kind, pop.size, pop.search, cfg.train.seed, cfg.train.init_seed,
                                      pop.bootstrap)
    if pop.bootstrap:
        data = MemberBatches(tuple(data_source(cfg, resample=m.resample) for m in members))
    trainer = build_population(model, mesh, optimizer, pop.size, loss=loss, microbatches=cfg.train.microbatches,
                               hyperparams=hyperparam_arrays(members), per_member_data=pop.bootstrap)
    initial = functools.partial(imported_state, trainer, cfg) if cfg.model.from_ else None  # LoRA adapters only
    return Parts(cfg, sizes, model, loss, data, trainer, None, members, initial=initial, frozen=base_from(trainer, cfg))


def federated_parts(cfg: Config, sizes: dict, devices) -> Parts:
    """The parts of a federated config: ``data`` is the clients' :class:`ClientBatches`, ``trainer``
    the compiled round."""
    f = cfg.federated
    source = data_source(cfg)
    model, loss = model_of(cfg, source)
    mesh = make_mesh(MeshConfig(**sizes), devices=devices)
    trainer = build_federated(model, mesh, algorithm_of(cfg), clients=f.clients, local_steps=f.local_steps,
                              cohort=cohort_size(f.clients, f.fraction), loss=loss,
                              microbatches=cfg.train.microbatches, privacy=privacy_of(cfg))
    data = client_data(cfg, source, trainer.slots)
    initial = functools.partial(imported_state, trainer, cfg) if cfg.model.from_ else None  # the base, with LoRA
    return Parts(cfg, sizes, model, loss, data, trainer, None, initial=initial)


def trainer_from_config(cfg: Config, devices=None) -> Trainer:
    """The trainer ``shardml train`` builds for ``cfg`` (see :func:`build` for the other parts)."""
    return build(cfg, devices).trainer
