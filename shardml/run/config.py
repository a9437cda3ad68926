"""The run's configuration: nested typed sections, YAML presets, ``key=value`` overrides, validation.

A run is fully described by one :class:`Config`. Its sections are the typed settings of the parts
they configure (``MeshConfig`` of the mesh, ``OptimConfig`` of the optimizer, the transformer's
own config), plus the run's data, loop and checkpoint settings defined here. Presets are YAML files
holding any subset of its fields (``shardml/run/configs/``, shipped inside the package); dotted
overrides (``mesh.tensor=2``) change single fields and are type- and range-checked, so a typo or an
impossible value fails before anything is compiled::

    cfg = load_config("tiny", ["mesh.data=2", "train.steps=5"])
    cfg.train.steps  # 5
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import importlib.util
import pathlib
import typing
from typing import Any

import yaml

from shardml.core.errors import ConfigError
from shardml.core.mesh import MeshConfig, resolve_mesh_sizes
from shardml.core.optim import INJECTED, OptimConfig
from shardml.core.pipeline import SCHEDULES
from shardml.core.settings import check_settings, setting
from shardml.models.transformer import TransformerConfig
from shardml.parallel.federated import ALGORITHMS as FED_ALGORITHMS, SERVER_OPTIMIZERS
from shardml.parallel.partition import PARTITIONS
from shardml.parallel.population import KINDS, is_search_spec, parse_space

MODEL_KINDS = ("transformer", "mlp")
RESUME_MODES = ("auto", "never")


@dataclasses.dataclass(frozen=True)
class ModelConfig(TransformerConfig):
    """The reference model: the transformer's settings, and ``kind``. ``mlp`` is a classifier with
    one hidden layer of ``d_ff`` units, for array data (``data.corpus=digits``)."""

    kind: str = setting("transformer", choices=MODEL_KINDS)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``corpus``: an embedded corpus or dataset (``pydoc``, ``digits``), a UTF-8 text file or a
    directory of them (byte-level), or a ``.npy`` / raw ``.bin`` file of token ids. ``resample``
    k >= 0 trains on the k-th bootstrap resample of the data (what member k of a bootstrap
    ensemble sees). ``workers`` grain worker processes preprocess batches ahead (0: in the training
    process). ``tokenizer=bpe`` trains a BPE tokenizer of ``vocab`` tokens (0: ``model.vocab``) on
    the training text, saved as ``out_dir/tokenizer.json``. ``noise`` augments array inputs with
    Gaussian noise of that standard deviation."""

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
    ``search``, filled from ``optim.*`` keys given a list or a distribution), or ``pbt`` (a sweep
    whose worst ``exploit_fraction`` copy a better member every ``ready_every`` steps). A sweep
    stops its worst ``prune_fraction`` of members every ``prune_every`` steps. ``sampler=optuna``
    asks Optuna for ``size`` trials per generation, ``generations`` times.
    """

    size: int = setting(1, minimum=1)
    kind: str = setting("ensemble", choices=KINDS)
    bootstrap: bool = False
    search: dict = dataclasses.field(default_factory=dict)
    sampler: str = setting("grid", choices=("grid", "optuna"), hint="grid: lists form a grid, distributions are sampled")
    generations: int = setting(1, minimum=1)
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
    out_dir: str = "runs/default"


# ----------------------------------------------------------------------------- dict <-> dataclass


def to_dict(cfg: Any) -> dict:
    """A plain nested dict of ``cfg`` (for YAML and JSON)."""
    return dataclasses.asdict(cfg)


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
    keys = []
    for name, typ in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(typ):
            keys += all_keys(typ, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _unknown_key(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, all_keys(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else f"; valid keys: {', '.join(all_keys())}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, typ: type) -> Any:
    """Checks ``value`` against the field type; ints are accepted where floats are expected."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:  # YAML 1.1 reads '3e-3' as a string
            return float(value)
        except ValueError:
            pass
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a directory named 2024, a corpus path given as a number
    if typ is dict and isinstance(value, dict):
        return dict(value)
    if isinstance(value, bool) and typ is not bool or not isinstance(value, typ):
        raise ConfigError(f"config key '{key}' expects {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


SEARCHABLE = tuple(f"optim.{name}" for name in INJECTED)


def _move_search(data: dict, base: Config) -> dict:
    """``optim.*`` values that are lists or distributions move to ``population.search``."""
    optim = data.get("optim")
    if not isinstance(optim, dict) or not any(is_search_spec(v) for v in optim.values()):
        return data
    search = dict(base.population.search)
    for name, value in list(optim.items()):
        if is_search_spec(value):
            key = f"optim.{name}"
            if key not in SEARCHABLE:
                raise ConfigError(f"{key}={value!r}: only {', '.join(SEARCHABLE)} can differ between members "
                                  "(the others shape the compiled step or the schedule)")
            space = parse_space(key, value)
            search[name] = space if isinstance(space, list) else value
    population = dict(data.get("population") or {})
    population["search"] = {**search, **(population.get("search") or {})}
    return {**data, "optim": {k: v for k, v in optim.items() if not is_search_spec(v)}, "population": population}


def from_dict(data: dict, cls=Config, prefix: str = "", base: Any = None) -> Any:
    """Builds ``cls`` from a nested dict, starting from ``base`` (defaults if None)."""
    base = base if base is not None else cls()
    if cls is Config and isinstance(data, dict):
        data = _move_search(data, base)
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    types = typing.get_type_hints(cls)
    changes = {}
    for name, value in data.items():
        key = prefix + name
        if name not in types:
            raise _unknown_key(key)
        typ = types[name]
        if dataclasses.is_dataclass(typ):
            changes[name] = from_dict(value, typ, key + ".", getattr(base, name))
        else:
            changes[name] = _coerce(key, value, typ)
    return dataclasses.replace(base, **changes)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Applies ``key=value`` strings; values are parsed as YAML scalars (``2``, ``1e-3``, ``bf16``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. mesh.data=2)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in all_keys():
            raise _unknown_key(key)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw  # a string YAML cannot read as a scalar (a path with ': ' in it, say)
        nested: dict = {}
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        cfg = from_dict(nested, base=cfg)
    return cfg


# ----------------------------------------------------------------------------- presets


def presets() -> dict[str, Any]:
    """The presets shipped inside the package: name -> resource."""
    folder = importlib.resources.files("shardml.run") / "configs"
    return {entry.name[:-5]: entry for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def _read_yaml(text: str, where: str) -> dict:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {where} is not valid YAML{line}: {problem}; fix that line "
                          "(sections are 'key: value' mappings, e.g. 'train: {steps: 100}')") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {where} must hold a mapping of sections (e.g. 'train: {{steps: 100}}'), "
                          f"not a {type(data).__name__}")
    return data


def preset_text(name: str) -> tuple[str, str]:
    """The YAML text of a preset name (``tiny``) or a YAML path, and where it came from."""
    path = pathlib.Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if path.is_dir():
            raise ConfigError(f"config '{name}' is a directory; give a preset name or a .yaml file")
        if not path.exists():
            raise ConfigError(f"config file '{name}' does not exist")
        return path.read_text(), str(path)
    found = presets()
    if name in found:
        return found[name].read_text(), f"preset '{name}'"
    near = difflib.get_close_matches(name, sorted(found), n=3)
    hint = f"did you mean {', '.join(near)}? " if near else ""
    raise ConfigError(f"no preset named '{name}'; {hint}presets: {', '.join(sorted(found))} (or pass a .yaml path)")


def load_config(preset: str | None = "default", overrides: list[str] | None = None) -> Config:
    """Loads a preset (name or YAML path; None for the built-in defaults) and applies overrides.

    Raises:
      ConfigError: an unknown preset or key, YAML that does not parse, a value of the wrong type.
    """
    cfg = Config()
    if preset is not None:
        text, where = preset_text(preset)
        cfg = from_dict(_read_yaml(text, where))
    return apply_overrides(cfg, overrides or [])


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ----------------------------------------------------------------------------- validation


def pipeline_microbatches(cfg: Config, stages: int) -> int:
    """Pipeline microbatches per pass: ``pipeline.microbatches``, or one per stage when it is 0."""
    return 1 if stages <= 1 else cfg.pipeline.microbatches or stages


def validate(cfg: Config, n_devices: int) -> dict[str, int]:
    """Checks what the config alone decides (every key's range, the mesh against the devices, the
    resume mode); the model's shapes against the layout are checked when the trainer is built,
    still before anything compiles. Returns the resolved mesh sizes.

    Raises:
      ConfigError: naming the key, its value and the fix.
    """
    check_settings(cfg)
    if cfg.train.resume not in RESUME_MODES and not cfg.train.resume.strip():
        raise ConfigError("train.resume is empty; use auto, never, or the path of a checkpoint")
    if not cfg.out_dir.strip():
        raise ConfigError("out_dir is empty; give the directory the run writes to (e.g. out_dir=runs/x)")
    sizes = resolve_mesh_sizes(cfg.mesh, n_devices)
    if cfg.model.kind == "mlp" and sizes["pipeline"] > 1:
        raise ConfigError(f"mesh.pipeline={sizes['pipeline']}: model.kind=mlp has no layers to cut into stages; "
                          "use model.kind=transformer or mesh.pipeline=1")
    if cfg.pipeline.repeats > 1 and cfg.pipeline.schedule != "circular":
        raise ConfigError(f"pipeline.repeats={cfg.pipeline.repeats} needs pipeline.schedule=circular (got "
                          f"'{cfg.pipeline.schedule}'); set pipeline.repeats=1 or choose the circular schedule")
    if cfg.federated.algorithm != "none":
        return _validate_federated(cfg, sizes)
    pop = cfg.population
    if sizes["members"] > 1 and pop.size % sizes["members"]:
        raise ConfigError(f"population.size={pop.size} is not divisible by mesh.members={sizes['members']}; each "
                          f"device group holds the same number of members, so use a multiple of {sizes['members']}")
    if pop.size > 1 and sizes["pipeline"] > 1:
        raise ConfigError(f"population.size={pop.size} with mesh.pipeline={sizes['pipeline']}: members are vmapped "
                          "and the pipeline's shard_map does not run under vmap; use mesh.pipeline=1")
    if pop.size == 1 and (pop.search or sizes["members"] > 1):
        what = "a search space" if pop.search else f"mesh.members={sizes['members']}"
        raise ConfigError(f"{what} needs a population: set population.size (and population.kind)")
    if pop.kind == "pbt" and pop.size > 1 and not pop.ready_every:
        raise ConfigError("population.kind=pbt needs population.ready_every=S (exploit/explore every S steps)")
    return sizes


def _validate_federated(cfg: Config, sizes: dict[str, int]) -> dict[str, int]:
    f = cfg.federated
    if cfg.population.size > 1 or cfg.population.search:
        raise ConfigError(f"federated.algorithm={f.algorithm} with a population: federated clients use the members "
                          "axis themselves; leave population.size at 1")
    if sizes["pipeline"] > 1:
        raise ConfigError(f"federated.algorithm={f.algorithm} with mesh.pipeline={sizes['pipeline']}: clients are "
                          "vmapped and the pipeline's shard_map does not run under vmap; use mesh.pipeline=1")
    if f.algorithm == "diloco" and f.fraction < 1.0:
        raise ConfigError(f"federated.algorithm=diloco keeps every client's inner optimizer state across rounds, so "
                          f"every client takes part in every round: use federated.fraction=1 (got {f.fraction})")
    for noise, clip in (("update_noise", "update_clip"), ("example_noise", "example_clip")):
        if getattr(f, noise) and not getattr(f, clip):
            raise ConfigError(f"federated.{noise}={getattr(f, noise)} needs federated.{clip} > 0 (the noise is "
                              "scaled by the clip norm)")
    if (f.update_noise or f.example_noise) and importlib.util.find_spec("dp_accounting") is None:
        raise ConfigError("differential privacy reports epsilon with Google's dp-accounting library: "
                          "pip install 'shardml[privacy]'")
    return sizes
