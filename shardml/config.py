"""Typed, frozen run configuration: presets in ``configs/``, ``key=value`` overrides, validation.

A run is fully described by one :class:`Config`. Presets are YAML files holding any subset of its
fields; dotted overrides (``mesh.tensor=2``) change single fields and are type-checked, so a typo
fails before anything is compiled::

    cfg = load_config("tiny", ["mesh.data=2", "train.steps=5"])
    cfg.train.steps  # 5
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import pathlib
import typing
from typing import Any

import yaml

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
_PACKAGED_CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the value and the fix."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device-mesh axis sizes, in the canonical order; ``-1`` fills the remaining devices."""

    members: int = 1
    pipeline: int = 1
    data: int = -1
    fsdp: int = 1
    tensor: int = 1


GRAD_DTYPES = ("float32", "compute")  # ModelConfig.grad_dtype
REMAT_POLICIES = ("none", "full", "dots")  # ModelConfig.remat


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The reference model. ``dtype`` is the compute dtype; parameters are always float32."""

    kind: str = "transformer"  # transformer | mlp
    vocab: int = 256
    layers: int = 2
    d_model: int = 64
    heads: int = 4
    kv_heads: int = 0  # 0 means "same as heads" (no grouped-query attention)
    d_ff: int = 256
    dtype: str = "bfloat16"
    # none | full | dots (dots: keep matmul outputs, recompute the rest). On XLA:CPU which is faster
    # depends on the layout (benchmarks/README.md, the MaxText race); dots does the least recompute.
    remat: str = "dots"
    # Weight-gradient products of bf16/f16 compute: "float32" accumulates and returns them in f32, so
    # the FSDP and data reductions sum f32 values; "compute" returns them in the compute dtype (what
    # autodiff of a plain cast gives), cheaper where f32-output products are slow (XLA:CPU).
    grad_dtype: str = "float32"
    rope_base: float = 10000.0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup, cosine decay and global-norm clipping."""

    lr: float = 3e-3
    warmup: int = 10
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Byte-level text. ``corpus`` names an embedded corpus (see :mod:`shardml.data`)."""

    corpus: str = "pydoc"
    seq_len: int = 64
    val_fraction: float = 0.05


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints of the whole train state in ``out_dir/checkpoints`` (see :mod:`shardml.checkpoint`)."""

    every: int = 100  # save every N steps; 0: only at the end (and on SIGTERM / SIGINT)
    keep: int = 3  # the last N checkpoints are kept
    async_save: bool = True  # written in the background while training goes on


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 32  # global, in sequences, the same on every layout
    microbatches: int = 1
    seed: int = 0
    resume: str = "auto"  # auto: the latest valid checkpoint in out_dir, if any | never | a checkpoint path
    max_bad_steps: int = 10  # stop after this many steps in a row with a non-finite loss or gradients
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate once, at the end
    eval_batches: int = 8


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How the ``pipeline`` mesh axis runs the layers (used when ``mesh.pipeline > 1``).

    The batch of each ``train.microbatches`` accumulation step is cut again into ``microbatches``
    pipeline microbatches, so one step runs ``train.microbatches`` pipelined passes of
    ``microbatches`` microbatches each (0 means one per stage).
    """

    schedule: str = "1f1b"  # gpipe | circular | 1f1b
    microbatches: int = 0
    repeats: int = 1  # virtual stages per device (circular)


SCHEDULES = ("gpipe", "circular", "1f1b")


@dataclasses.dataclass(frozen=True)
class Config:
    mesh: MeshConfig = MeshConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    train: TrainConfig = TrainConfig()
    pipeline: PipelineConfig = PipelineConfig()
    out_dir: str = "runs/default"


# ----------------------------------------------------------------------------- dict <-> dataclass


def to_dict(cfg: Any) -> dict:
    """A plain nested dict of ``cfg`` (for YAML and JSON)."""
    return dataclasses.asdict(cfg)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _all_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for name, typ in _field_types(cls).items():
        if dataclasses.is_dataclass(typ):
            keys += _all_keys(typ, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _unknown_key(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, _all_keys(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else f"; valid keys: {', '.join(_all_keys())}"
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
    if isinstance(value, bool) and typ is not bool or not isinstance(value, typ):
        raise ConfigError(
            f"config key '{key}' expects {typ.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def from_dict(data: dict, cls=Config, prefix: str = "", base: Any = None) -> Any:
    """Builds ``cls`` from a nested dict, starting from ``base`` (defaults if None)."""
    base = base if base is not None else cls()
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    types = _field_types(cls)
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
        if key not in _all_keys():
            raise _unknown_key(key)
        value = yaml.safe_load(raw) if raw.strip() else ""
        nested: dict = {}
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        cfg = from_dict(nested, base=cfg)
    return cfg


def preset_path(name: str) -> pathlib.Path:
    """Resolves a preset name (``tiny``) or a YAML path to a file."""
    path = pathlib.Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"config file '{name}' does not exist")
        return path
    for folder in (CONFIG_DIR, _PACKAGED_CONFIG_DIR):
        candidate = folder / f"{name}.yaml"
        if candidate.exists():
            return candidate
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    near = difflib.get_close_matches(name, names, n=3)
    hint = f"did you mean {', '.join(near)}? " if near else ""
    raise ConfigError(f"no preset named '{name}'; {hint}presets: {', '.join(names)} (or pass a .yaml path)")


def load_config(preset: str | None = "default", overrides: list[str] | None = None) -> Config:
    """Loads a preset (name or YAML path; None for the built-in defaults) and applies overrides."""
    cfg = Config()
    if preset is not None:
        with open(preset_path(preset)) as f:
            cfg = from_dict(yaml.safe_load(f) or {})
    return apply_overrides(cfg, overrides or [])


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ----------------------------------------------------------------------------- validation

MESH_AXES = ("members", "pipeline", "data", "fsdp", "tensor")


def resolve_mesh_sizes(mesh: MeshConfig, n_devices: int) -> dict[str, int]:
    """Axis sizes with ``-1`` filled in; raises ConfigError if they cannot cover ``n_devices``."""
    sizes = {name: getattr(mesh, name) for name in MESH_AXES}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name}={size} must be a positive size, or -1 to fill the remaining devices")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ConfigError(f"only one mesh axis may be -1, got {', '.join('mesh.' + n for n in fill)}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if n_devices % fixed:
            raise ConfigError(
                f"mesh.{fill[0]}=-1 cannot fill {n_devices} devices: the other axes multiply to {fixed}, "
                f"which does not divide {n_devices}; choose sizes whose product divides {n_devices}"
            )
        sizes[fill[0]] = n_devices // fixed
    elif fixed != n_devices:
        layout = " x ".join(f"{n}={s}" for n, s in sizes.items() if s != 1) or "all 1"
        raise ConfigError(
            f"mesh sizes ({layout}) multiply to {fixed} but {n_devices} devices are available; "
            f"make the product {n_devices}, or set one axis to -1 (e.g. mesh.data=-1)"
        )
    return sizes


def _positive(section: Any, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(section, name)
        if value <= 0:
            raise ConfigError(f"{prefix}.{name}={value} must be positive")


def validate(cfg: Config, n_devices: int) -> dict[str, int]:
    """Checks everything that can be checked without compiling; returns the resolved mesh sizes."""
    m, t, d = cfg.model, cfg.train, cfg.data
    _positive(m, "model", ("vocab", "layers", "d_model", "heads", "d_ff"))
    _positive(t, "train", ("steps", "batch_size", "microbatches", "log_every", "eval_batches"))
    _positive(d, "data", ("seq_len",))
    _positive(t, "train", ("max_bad_steps",))
    _positive(cfg.checkpoint, "checkpoint", ("keep",))
    if cfg.checkpoint.every < 0:
        raise ConfigError(f"checkpoint.every={cfg.checkpoint.every} must be >= 0 (0: save only at the end)")
    if not t.resume:
        raise ConfigError("train.resume is empty; use auto, never, or the path of a checkpoint")
    if m.kv_heads < 0:
        raise ConfigError(f"model.kv_heads={m.kv_heads} must be positive, or 0 for 'same as model.heads'")
    if m.kind not in ("transformer", "mlp"):
        raise ConfigError(f"model.kind='{m.kind}' is not a reference model; use transformer or mlp")
    if m.dtype not in ("bfloat16", "float32", "float16"):
        raise ConfigError(f"model.dtype='{m.dtype}' is not supported; use bfloat16 or float32")
    if m.remat not in REMAT_POLICIES:
        raise ConfigError(f"model.remat='{m.remat}' is not a remat policy; use none, full or dots")
    if m.grad_dtype not in GRAD_DTYPES:
        raise ConfigError(f"model.grad_dtype='{m.grad_dtype}' is not supported; use float32 or compute")
    sizes = resolve_mesh_sizes(cfg.mesh, n_devices)
    microbatches = validate_pipeline(cfg, sizes["pipeline"])
    if sizes["members"] > 1:
        raise ConfigError(
            f"mesh.members={sizes['members']}: populations of models are not supported yet; set mesh.members=1"
        )
    tp = sizes["tensor"]
    kv = m.kv_heads or m.heads
    if m.d_model % m.heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.heads={m.heads}; "
                          "choose d_model = heads x head_dim")
    if m.heads % kv:
        raise ConfigError(f"model.heads={m.heads} is not divisible by model.kv_heads={kv}; "
                          "each key/value head must serve a whole group of query heads")
    for key, value in (("model.heads", m.heads), ("model.kv_heads", kv), ("model.d_ff", m.d_ff),
                       ("model.vocab", m.vocab)):
        if key == "model.kv_heads" and not m.kv_heads:
            continue
        if value % tp:
            raise ConfigError(
                f"{key}={value} is not divisible by mesh.tensor={tp}; tensor parallelism splits it "
                f"evenly, so pick mesh.tensor among the divisors of {value} or change {key}"
            )
    if sizes["fsdp"] > 1 and m.d_model % sizes["fsdp"]:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by mesh.fsdp={sizes['fsdp']}; "
                          "FSDP shards the model dimension of every weight")
    shards = sizes["data"] * sizes["fsdp"]
    per_step = shards * t.microbatches * microbatches
    if t.batch_size % per_step:
        pipe = " x pipeline.microbatches" if microbatches > 1 else ""
        pipe_n = f" x {microbatches}" if microbatches > 1 else ""
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by mesh.data x mesh.fsdp x train.microbatches{pipe} "
            f"= {sizes['data']} x {sizes['fsdp']} x {t.microbatches}{pipe_n} = {per_step}; "
            f"use a batch size that is a multiple of {per_step}"
        )
    return sizes


def pipeline_microbatches(cfg: Config, stages: int) -> int:
    """Pipeline microbatches per pass: ``pipeline.microbatches``, or one per stage when it is 0."""
    if stages <= 1:
        return 1
    return cfg.pipeline.microbatches or stages


def validate_pipeline(cfg: Config, stages: int) -> int:
    """Checks the pipeline section against ``stages`` devices on the pipeline axis; returns m."""
    pc, m = cfg.pipeline, cfg.model
    if pc.schedule not in SCHEDULES:
        raise ConfigError(f"pipeline.schedule='{pc.schedule}' is not a schedule; use {', '.join(SCHEDULES)}")
    if pc.microbatches < 0 or pc.repeats <= 0:
        bad = f"pipeline.microbatches={pc.microbatches}" if pc.microbatches < 0 else f"pipeline.repeats={pc.repeats}"
        raise ConfigError(f"{bad} must be positive (pipeline.microbatches=0 means one per stage)")
    if stages <= 1:
        return 1
    if m.kind != "transformer":
        raise ConfigError(f"mesh.pipeline={stages}: model.kind='{m.kind}' cannot be cut into stages; "
                          "use model.kind=transformer or mesh.pipeline=1")
    if pc.repeats > 1 and pc.schedule != "circular":
        raise ConfigError(f"pipeline.repeats={pc.repeats} needs pipeline.schedule=circular "
                          f"(got '{pc.schedule}'); set pipeline.repeats=1 or choose the circular schedule")
    chunks = stages * pc.repeats
    if m.layers % chunks:
        raise ConfigError(
            f"model.layers={m.layers} is not divisible by mesh.pipeline x pipeline.repeats = {stages} x "
            f"{pc.repeats} = {chunks}; every stage needs the same number of layers, so use a multiple of {chunks}"
        )
    micro = pipeline_microbatches(cfg, stages)
    if pc.repeats > 1 and micro % stages:
        raise ConfigError(
            f"pipeline.microbatches={micro} is not a multiple of mesh.pipeline={stages}; the circular schedule "
            "sends microbatches round the ring in groups of one per stage"
        )
    return micro
