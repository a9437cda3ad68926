"""The run config's schema: nested typed sections, one per part they configure, and their keys.

A run is fully described by one :class:`Config`. Its sections are the typed settings of the parts
they configure (``MeshConfig`` of the mesh, ``OptimConfig`` of the optimizer, the transformer's
own config), plus the run's data, loop and checkpoint settings defined here; each field's valid
range is declared beside it (:func:`shardml.core.settings.setting`)::

    cfg = Config()
    cfg.train.steps                 # 100
    "mesh.tensor" in all_keys()     # True
"""

from __future__ import annotations

import dataclasses
import keyword
import typing
from typing import Any

from shardml.core.mesh import MeshConfig
from shardml.core.optim import OptimConfig
from shardml.core.pipeline import SCHEDULES
from shardml.core.settings import setting
from shardml.models.transformer import TransformerConfig
from shardml.parallel.federated import ALGORITHMS as FED_ALGORITHMS, SERVER_OPTIMIZERS
from shardml.parallel.partition import PARTITIONS
from shardml.parallel.population import KINDS

MODEL_KINDS = ("transformer", "mlp")
# model.* keys a Hugging Face checkpoint's config.json does not set: how (and which) model runs, not its shape
RUN_MODEL_KEYS = ("kind", "from", "dtype", "remat", "layer_loop", "grad_dtype", "context_attention", "moe_dispatch")
RESUME_MODES = ("auto", "never")


@dataclasses.dataclass(frozen=True)
class ModelConfig(TransformerConfig):
    """The reference model: the transformer's settings, and ``kind``. ``mlp`` is a classifier with
    one hidden layer of ``d_ff`` units, for array data (``data.corpus=digits``). ``from``
    (``model.from=PATH``; the field ``from_``): a Hugging Face checkpoint directory or repo id whose
    weights start the run; its ``config.json`` sets the architecture (:mod:`shardml.run.hf`)."""

    kind: str = setting("transformer", choices=MODEL_KINDS)
    from_: str = setting("", hint="a Hugging Face checkpoint directory or repo id; empty: a new model")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``corpus``: an embedded corpus or dataset (``pydoc``, ``digits``), a UTF-8 text file or a
    directory of them (byte-level), or a ``.npy`` / raw ``.bin`` file of token ids. ``resample``
    k >= 0 trains on the k-th bootstrap resample of the data (what member k of a bootstrap
    ensemble sees). ``workers`` grain worker processes preprocess batches ahead (0: in the training
    process). ``tokenizer=bpe`` trains a BPE tokenizer of ``vocab`` tokens (0: ``model.vocab``) on
    the training text, saved as ``out_dir/tokenizer.json``. ``noise`` augments array inputs with
    Gaussian noise of that standard deviation. ``sft`` (a JSONL file) fine-tunes on prompt/completion or
    chat examples instead of ``corpus``, the loss on the completion tokens only."""

    corpus: str = "pydoc"
    seq_len: int = setting(64, minimum=1)
    val_fraction: float = setting(0.05, above=0.0, below=0.5)
    token_dtype: str = setting("uint16", choices=("uint8", "uint16", "int32", "uint32", "int64"),
                               hint="the integer type of a raw .bin token file")
    resample: int = setting(-1, minimum=-1, hint="-1 uses the data as it is")
    workers: int = setting(0, minimum=0, hint="0 preprocesses in the training process")
    tokenizer: str = setting("byte", choices=("byte", "bpe"), hint="byte: one token per UTF-8 byte (vocabulary 256)")
    vocab: int = setting(0, minimum=0, hint="the BPE vocabulary; 0 uses model.vocab")
    noise: float = setting(0.0, minimum=0.0, hint="std of Gaussian noise added to array inputs (augmentation)")
    # Supervised fine-tuning (shardml.core.sft): a JSONL of prompt/completion or chat examples, tokenized by
    # sft_tokenizer's tokenizer.json (chat data rendered with its tokenizer_config.json's chat_template).
    sft: str = ""
    sft_tokenizer: str = ""
    pack: bool = True  # several examples per row, attention kept within each
    truncate: bool = False  # cut an example longer than seq_len + 1 tokens (else an error)


LORA_ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (:func:`shardml.lora`): ``rank`` > 0 freezes the transformer (``model.from``'s
    weights, or a random base from a fixed seed) and trains only rank-``rank`` adapters on the
    ``targets`` projections (comma-separated roles: q, k, v, o, gate, up, down), scaled by
    ``alpha / rank``, their input dropped out with ``dropout``. 0 trains every weight."""

    rank: int = setting(0, minimum=0, hint="0: no adapters, every weight trains")
    alpha: float = setting(16.0, above=0.0, hint="the adapters' scale is alpha / rank")
    dropout: float = setting(0.0, minimum=0.0, below=1.0, hint="dropout on the adapters' input")
    targets: str = setting("q,v", hint="comma-separated roles: q, k, v, o, gate, up, down")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints of the whole train state in ``out_dir/checkpoints`` (see :mod:`shardml.run.checkpoint`)."""

    every: int = setting(100, minimum=0, hint="0 saves only at the end (and on SIGTERM / SIGINT)")
    keep: int = setting(3, minimum=1)
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = setting(100, minimum=1)
    batch_size: int = setting(32, minimum=1, hint="the global batch, the same on every layout")
    microbatches: int = setting(1, minimum=1)
    seed: int = setting(0, minimum=0, hint="the data order (and, unless init_seed is set, the initialisation)")
    init_seed: int = setting(-1, minimum=-1, hint="-1 initialises from train.seed")
    # auto: the latest valid checkpoint in out_dir, if any | never | a checkpoint path
    resume: str = "auto"
    max_bad_steps: int = setting(10, minimum=1, hint="stop after this many non-finite steps in a row")
    log_every: int = setting(10, minimum=1)
    eval_every: int = setting(0, minimum=0, hint="0 evaluates once, at the end")
    eval_batches: int = setting(8, minimum=0, hint="0 evaluates the whole held-out set (array data)")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How the ``pipeline`` mesh axis runs the layers (used when ``mesh.pipeline > 1``).

    The batch of each ``train.microbatches`` accumulation step is cut again into ``microbatches``
    pipeline microbatches, so one step runs ``train.microbatches`` pipelined passes of
    ``microbatches`` microbatches each (0 means one per stage).
    """

    schedule: str = setting("1f1b", choices=SCHEDULES)
    microbatches: int = setting(0, minimum=0, hint="0 means one per stage")
    repeats: int = setting(1, minimum=1, hint="virtual stages per device (circular)")


@dataclasses.dataclass(frozen=True)
class PopulationConfig:
    """Many models in one compiled step (see :mod:`shardml.parallel.population`).

    ``size`` members of ``kind``: ``ensemble`` (members differ by initialisation; ``bootstrap``
    resamples the data per member), ``sweep`` (members differ by the hyperparameters in
    ``search``, filled from ``optim.*`` keys, and ``lora.alpha`` / ``lora.dropout`` as ``lora_alpha`` /
    ``lora_dropout``, given a list or a distribution), or ``pbt`` (a sweep
    whose worst ``exploit_fraction`` copy a better member every ``ready_every`` steps). A sweep
    stops its worst ``prune_fraction`` of members every ``prune_every`` steps. ``sampler=optuna``
    asks Optuna for ``size`` trials per generation, ``generations`` times.

    ``models``: ``model.*`` keys given a list (``model.layers=[2,4]``) land here; every
    combination is an architecture of its own, trained at the same time on its own group of
    devices (:mod:`shardml.run.groups`), ``size`` / architectures members each: a sweep of
    architectures, or with ``kind=ensemble`` one heterogeneous ensemble. With ``sampler=optuna`` a
    sweep's ``model.*`` keys may also be integer ranges (``model.d_ff=uniform(16,128)``,
    ``loguniform``): each generation Optuna picks ``size`` architectures, trained at once
    (:mod:`shardml.run.group_trials`); ``pruner=median`` stops a trial whose validation loss at an
    evaluation (every ``train.eval_every`` steps) is worse than the median of the completed trials'.
    """

    size: int = setting(1, minimum=1)
    kind: str = setting("ensemble", choices=KINDS)
    bootstrap: bool = False
    search: dict = dataclasses.field(default_factory=dict)
    models: dict = dataclasses.field(default_factory=dict)
    sampler: str = setting("grid", choices=("grid", "optuna"), hint="grid: lists form a grid, distributions are sampled")
    generations: int = setting(1, minimum=1)
    pruner: str = setting("none", choices=("none", "median"), hint="median: Optuna's MedianPruner over architecture "
                          "trials (model.* searched with sampler=optuna)")
    ready_every: int = setting(0, minimum=0, hint="PBT's exploit/explore interval in steps")
    exploit_fraction: float = setting(0.25, above=0.0, maximum=0.5)
    prune_every: int = setting(0, minimum=0, hint="0: never stop members early")
    prune_fraction: float = setting(0.25, above=0.0, below=1.0)


@dataclasses.dataclass(frozen=True)
class FederatedConfig:
    """Federated learning (see :mod:`shardml.parallel.federated`): ``clients`` simulated clients,
    each holding a ``partition`` of the training data, ``fraction`` of them sampled per round, each
    running ``local_steps`` steps on batches of ``train.batch_size`` rows inside one compiled round;
    ``train.steps`` counts rounds. ``none`` trains one model on all the data.

    Algorithms: ``fedavg`` (client SGD at ``client_lr``, server SGD lr 1), ``fedprox`` (plus the
    proximal term ``mu``), ``fedopt`` (server ``adam`` / ``yogi`` / ``adagrad``), ``diloco`` (inner
    AdamW from ``optim.*``, kept across rounds; outer SGD lr 0.7 with Nesterov momentum 0.9). The
    server settings at ``auto`` / 0 / -1 take the algorithm's defaults. Privacy: ``update_clip`` > 0
    is DP-FedAvg (noise ``update_noise`` x clip at the server), ``example_clip`` > 0 DP-SGD inside
    the clients (noise ``example_noise`` x clip per local step); ε is reported at ``delta``.
    With ``lora.rank`` > 0 (fedavg, fedprox) the clients train and send only adapters over one
    shared frozen base.
    """

    algorithm: str = setting("none", choices=("none", *FED_ALGORITHMS))
    clients: int = setting(10, minimum=1)
    local_steps: int = setting(1, minimum=1, hint="H local steps per round")
    fraction: float = setting(1.0, above=0.0, maximum=1.0, hint="clients sampled per round (seeded)")
    partition: str = setting("iid", choices=PARTITIONS)
    alpha: float = setting(0.5, above=0.0, hint="Dirichlet concentration: 0.1 very skewed, 100 near IID")
    min_partition: int = setting(1, minimum=1, hint="the Dirichlet split is redrawn until every client has this many")
    client_lr: float = setting(0.1, above=0.0, hint="client SGD (fedavg, fedprox, fedopt); diloco uses optim.*")
    mu: float = setting(0.01, minimum=0.0, hint="fedprox's proximal weight")
    server_optimizer: str = setting("auto", choices=("auto", *SERVER_OPTIMIZERS))
    server_lr: float = setting(0.0, minimum=0.0, hint="0: the algorithm's (1 fedavg/fedprox, 1e-2 fedopt, 0.7 diloco)")
    server_momentum: float = setting(-1.0, minimum=-1.0, below=1.0, hint="-1: the algorithm's (0.9 diloco, else 0)")
    server_eps: float = setting(1e-3, above=0.0, hint="fedopt's tau")
    update_clip: float = setting(0.0, minimum=0.0, hint="DP-FedAvg: clip client updates to this L2 norm (0: off)")
    update_noise: float = setting(0.0, minimum=0.0, hint="DP-FedAvg noise multiplier")
    example_clip: float = setting(0.0, minimum=0.0, hint="DP-SGD in clients: per-example clip (0: off)")
    example_noise: float = setting(0.0, minimum=0.0, hint="DP-SGD noise multiplier")
    delta: float = setting(1e-5, above=0.0, below=1.0, hint="the delta epsilon is reported at")


@dataclasses.dataclass(frozen=True)
class Config:
    mesh: MeshConfig = MeshConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    train: TrainConfig = TrainConfig()
    pipeline: PipelineConfig = PipelineConfig()
    population: PopulationConfig = PopulationConfig()
    federated: FederatedConfig = FederatedConfig()
    lora: LoRAConfig = LoRAConfig()
    out_dir: str = "runs/default{experiment}"




def field_key(name: str) -> str:
    """A field's config key: ``from_`` (a Python keyword with ``_`` added) is ``from``."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def _keyed(tree: Any) -> Any:
    return {field_key(k): _keyed(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def to_dict(cfg: Any) -> dict:
    """A plain nested dict of ``cfg`` (for YAML and JSON), keyed by config keys (``model.from``)."""
    return _keyed(dataclasses.asdict(cfg))


def flat_dict(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"mesh.data": 2, ...}`` of a nested dict."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_dict(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key of ``cls`` (``mesh.data``, ..., ``out_dir``)."""
    keys = []
    for name, typ in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(typ):
            keys += all_keys(typ, f"{prefix}{name}.")
        else:
            keys.append(prefix + field_key(name))
    return keys
