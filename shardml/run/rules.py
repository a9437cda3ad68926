"""The config's cross-field rules, each held once, and :func:`validate`, which checks a config once
before anything is built: every key's range, the mesh against the devices, then these rules.

    sizes = validate(load_config("tiny", ["mesh.tensor=2"]), n_devices=8)   # {"data": 4, ...}

The model's shapes against the layout are checked when the trainer is built (still before
anything compiles), by the library, and reworded in config keys by :func:`shardml.run.errors.keyed`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math

from shardml.core.mesh import resolve_mesh_sizes
from shardml.core.pipeline import Schedule
from shardml.core.settings import check_settings
from shardml.run.errors import ConfigError, keyed
from shardml.run.schema import LORA_ROLES, RESUME_MODES, Config, LoRAConfig
from shardml.run.search import check_model_spaces, check_search

# The keys of the pipeline schedule's arguments (``microbatches`` alone would mean train.microbatches).
SCHEDULE_KEYS = {"microbatches": "pipeline.microbatches", "stages": "mesh.pipeline", "repeats": "pipeline.repeats",
                 "schedule": "pipeline.schedule"}


def pipeline_microbatches(cfg: Config, stages: int) -> int:
    """Pipeline microbatches per pass: ``pipeline.microbatches``, or one per stage when it is 0."""
    return 1 if stages <= 1 else cfg.pipeline.microbatches or stages


def _paths(cfg: Config, sizes: dict[str, int]) -> None:
    if cfg.train.resume not in RESUME_MODES and not cfg.train.resume.strip():
        raise ConfigError("train.resume is empty; use auto, never, or the path of a checkpoint", subject="train.resume")
    if not cfg.out_dir.strip():
        raise ConfigError("out_dir is empty; give the directory the run writes to (e.g. out_dir=runs/x)",
                          subject="out_dir")


def _pipeline(cfg: Config, sizes: dict[str, int]) -> None:
    stages = sizes["pipeline"]
    if cfg.model.kind == "mlp" and stages > 1:
        raise ConfigError(f"mesh.pipeline={stages}: model.kind=mlp has no layers to cut into stages; "
                          "use model.kind=transformer or mesh.pipeline=1", subject="mesh.pipeline", value=stages)
    with keyed(cfg, SCHEDULE_KEYS):  # the schedule's own rules (repeats need circular, groups of p)
        Schedule(cfg.pipeline.schedule, stages, pipeline_microbatches(cfg, stages), cfg.pipeline.repeats)


def _vmapped_pipeline(cfg: Config, sizes: dict[str, int]) -> None:
    """Members and federated clients are vmapped; the pipeline's shard_map does not run under vmap."""
    fed = cfg.federated.algorithm
    if sizes["pipeline"] > 1 and (cfg.population.size > 1 or fed != "none"):
        who = f"federated.algorithm={fed}" if fed != "none" else f"population.size={cfg.population.size}"
        raise ConfigError(f"{who} with mesh.pipeline={sizes['pipeline']}: {'clients' if fed != 'none' else 'members'}"
                          " are vmapped and the pipeline's shard_map does not run under vmap; use mesh.pipeline=1",
                          subject="mesh.pipeline", value=sizes["pipeline"])


def _context(cfg: Config, sizes: dict[str, int]) -> None:
    """``mesh.context`` splits the sequence: a transformer's, into equal parts (ring attention's
    causal balancing into 2 x context chunks); inside a pipeline's stages with all-gathered
    attention only."""
    c = sizes["context"]
    if c == 1:
        return
    if cfg.model.kind != "transformer":
        raise ConfigError(f"mesh.context={c} splits the sequence, and model.kind={cfg.model.kind} has none; "
                          "use mesh.context=1", subject="mesh.context", value=c)
    ring = cfg.model.context_attention == "ring"
    _experts_in_1f1b(cfg, sizes)
    if ring and sizes["pipeline"] > 1:  # all-gathered attention runs inside the stages: the partitioner splits it
        raise ConfigError(f"mesh.context={c} with mesh.pipeline={sizes['pipeline']} and model.context_attention=ring: "
                          "the pipeline's stages run the sequence in its natural order, not ring attention's balanced "
                          "one, so ring attention does not run inside them yet; use model.context_attention=allgather "
                          "or mesh.pipeline=1", subject="model.context_attention", value="ring")
    parts = 2 * c if ring else c
    if cfg.data.seq_len % parts:
        why = (f"model.context_attention=ring gives each of the {c} context shards one early and one late chunk, "
               f"so 2 x mesh.context = {parts}" if ring else f"mesh.context={c}")
        lower = cfg.data.seq_len // parts * parts
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is not divisible by {why}: each context shard holds an "
                          f"equal part of the sequence; use data.seq_len={lower or parts} or {lower + parts}, or "
                          f"another mesh.context", subject="data.seq_len", value=cfg.data.seq_len)


def _experts_in_1f1b(cfg: Config, sizes: dict[str, int]) -> None:
    """1F1B runs each stage's forward and backward in a ``lax.cond`` that only that stage takes;
    experts split over ``expert`` exchange tokens there by collectives, which on XLA:CPU wait for
    every device: seen to hang on context=2 x expert=2 (JAX 0.10.2), so refused on any expert axis."""
    if cfg.model.experts and sizes["pipeline"] > 1 and cfg.pipeline.schedule == "1f1b" and sizes["expert"] > 1:
        raise ConfigError(f"model.experts={cfg.model.experts} with pipeline.schedule=1f1b on mesh.expert="
                          f"{sizes['expert']}: the experts' token exchanges inside 1F1B's per-stage branches wait for "
                          "every device and hang; use pipeline.schedule=gpipe or circular, or mesh.expert=1",
                          subject="pipeline.schedule", value="1f1b")


def _population(cfg: Config, sizes: dict[str, int]) -> None:
    pop, members = cfg.population, sizes["members"]
    if cfg.federated.algorithm != "none":
        if pop.size > 1 or pop.search:
            raise ConfigError(f"federated.algorithm={cfg.federated.algorithm} with a population: federated clients "
                              "use the members axis themselves; leave population.size at 1", subject="population.size",
                              value=pop.size)
        return
    if pop.sampler == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("population.sampler=optuna asks Optuna for the trials: pip install 'shardml[search]'",
                          subject="population.sampler", value=pop.sampler)
    if members > 1 and pop.size % members:
        raise ConfigError(f"population.size={pop.size} is not divisible by mesh.members={members}; each device group "
                          f"holds the same number of members, so use a multiple of {members}",
                          subject="population.size", value=pop.size)
    if pop.size == 1 and (pop.search or members > 1):
        what = "a search space" if pop.search else f"mesh.members={members}"
        raise ConfigError(f"{what} needs a population: set population.size (and population.kind)",
                          subject="population.size", value=pop.size)
    check_search(cfg)
    if pop.kind == "pbt" and pop.size > 1 and not pop.ready_every:
        raise ConfigError("population.kind=pbt needs population.ready_every=S (exploit/explore every S steps)",
                          subject="population.ready_every", value=pop.ready_every)


def _federated(cfg: Config, sizes: dict[str, int]) -> None:
    f = cfg.federated
    if f.algorithm == "diloco" and f.fraction < 1.0:
        raise ConfigError(f"federated.algorithm=diloco keeps every client's inner optimizer state across rounds, so "
                          f"every client takes part in every round: use federated.fraction=1 (got {f.fraction})",
                          subject="federated.fraction", value=f.fraction)
    for noise, clip in (("update_noise", "update_clip"), ("example_noise", "example_clip")):
        if getattr(f, noise) and not getattr(f, clip):
            raise ConfigError(f"federated.{noise}={getattr(f, noise)} needs federated.{clip} > 0 (the noise is "
                              "scaled by the clip norm)", subject=f"federated.{noise}", value=getattr(f, noise))
    if (f.update_noise or f.example_noise) and importlib.util.find_spec("dp_accounting") is None:
        raise ConfigError("differential privacy reports epsilon with Google's dp-accounting library: "
                          "pip install 'shardml[privacy]'")


def _architectures(cfg: Config, sizes: dict[str, int]) -> None:
    """``model.*`` lists: each architecture a group of devices (:mod:`shardml.run.groups`); with
    ``population.sampler=optuna`` Optuna picks them (:func:`_architecture_trials`)."""
    pop = cfg.population
    if pop.pruner != "none" and not (pop.models and pop.sampler == "optuna"):
        raise ConfigError(f"population.pruner={pop.pruner} prunes Optuna's architecture trials: search model.* keys "
                          "with population.sampler=optuna (or leave population.pruner=none)",
                          subject="population.pruner", value=pop.pruner)
    if not pop.models:
        return
    listed = " ".join(f"model.{k}={v}" for k, v in sorted(pop.models.items()))
    clashes = [(pop.kind not in ("sweep", "ensemble"), "population.kind", pop.kind,
                "architectures train as a sweep or an ensemble (pbt copies parameters between members of one shape)"),
               (bool(pop.search) and pop.sampler == "optuna", "population.search", sorted(pop.search),
                "Optuna searches either the optimizer or the architecture in one run"),
               (bool(pop.search) and pop.kind != "sweep", "population.kind", pop.kind,
                "an optimizer search over architectures is a sweep (population.kind=sweep)"),
               (pop.bootstrap, "population.bootstrap", True, "bootstrap ensembles share one architecture"),
               (cfg.federated.algorithm != "none", "federated.algorithm", cfg.federated.algorithm,
                "federated runs train one architecture"),
               (sizes["pipeline"] > 1, "mesh.pipeline", sizes["pipeline"], "groups do not pipeline yet")]
    for bad, key, value, why in clashes:
        if bad:
            raise ConfigError(f"{listed} with {key}={value}: {why}", subject=key, value=value)
    if pop.sampler == "optuna":
        _architecture_trials(cfg, sizes, listed)
        return
    for name, spec in sorted(pop.models.items()):
        if not isinstance(spec, list):
            raise ConfigError(f"model.{name}={spec!r}: a model distribution is sampled by Optuna; add "
                              "population.sampler=optuna (a grid lists every architecture: model.{name}=[a,b])",
                              subject=f"model.{name}", value=spec)
    count = math.prod(len(values) for values in pop.models.values())
    if pop.size % count or pop.size < count:
        raise ConfigError(f"population.size={pop.size} with {listed}: each of the {count} architectures gets the same "
                          f"number of members, so use a multiple of {count} (e.g. population.size={count})",
                          subject="population.size", value=pop.size)


def _architecture_trials(cfg: Config, sizes: dict[str, int], listed: str) -> None:
    """Optuna over architectures: a sweep, every space readable, the extra installed, and room for
    ``population.size`` groups (the trials of a generation may all differ)."""
    pop, t = cfg.population, cfg.train
    if pop.kind != "sweep":
        raise ConfigError(f"{listed} with population.sampler=optuna and population.kind={pop.kind}: Optuna searches "
                          "architectures in a sweep (population.kind=sweep)", subject="population.kind", value=pop.kind)
    check_model_spaces(cfg)
    if sizes["members"] > 1:
        raise ConfigError(f"mesh.members={sizes['members']} with Optuna's architecture trials: trials of one shape "
                          "share a group as members in any number; leave mesh.members=1",
                          subject="mesh.members", value=sizes["members"])
    group = sizes["fsdp"] * sizes["tensor"]
    if pop.size * group > math.prod(sizes.values()):
        raise ConfigError(f"population.size={pop.size} trials per generation with {listed}: they may all differ, and "
                          f"each needs a group of mesh.fsdp x mesh.tensor = {group} device(s), {pop.size * group} in "
                          f"all, but there are {math.prod(sizes.values())}; lower population.size",
                          subject="population.size", value=pop.size)
    if pop.pruner != "none" and not (0 < t.eval_every < t.steps):
        raise ConfigError(f"population.pruner={pop.pruner} decides at evaluations: set train.eval_every between 1 and "
                          f"train.steps={t.steps} (got {t.eval_every})", subject="train.eval_every", value=t.eval_every)


def groups_mesh(cfg: Config) -> None:
    """With ``model.*`` lists the mesh describes one group, whose size is not known yet: ``data`` fills it."""
    if cfg.population.models and cfg.mesh.data != -1:
        raise ConfigError(f"mesh.data={cfg.mesh.data} with model.* lists: every architecture trains on its own "
                          "group of devices and mesh.data=-1 fills each group; set mesh.data=-1",
                          subject="mesh.data", value=cfg.mesh.data)


def lora_targets(cfg: Config) -> tuple[str, ...]:
    """The roles of ``lora.targets`` (``"q, v"`` -> ``("q", "v")``)."""
    return tuple(t.strip() for t in cfg.lora.targets.split(",") if t.strip())


def _lora_off(cfg: Config) -> None:
    """A ``lora.*`` key set while ``lora.rank=0`` would silently train every weight."""
    default = LoRAConfig()
    changed = [f"lora.{f.name}={getattr(cfg.lora, f.name)}" for f in dataclasses.fields(default)
               if getattr(cfg.lora, f.name) != getattr(default, f.name)]
    if changed:
        raise ConfigError(f"{changed[0]} with lora.rank=0: rank 0 trains every weight and ignores it; set lora.rank=R "
                          "(e.g. lora.rank=8) to train adapters, or drop it", subject="lora.rank", value=0)


LORA_FEDERATED = ("fedavg", "fedprox")  # the federated algorithms tested with adapters over a shared base


def _lora(cfg: Config, sizes: dict[str, int]) -> None:
    """``lora.rank`` > 0: adapters on a transformer's projections (the rank against the layers'
    widths is checked where the model is built, by :func:`shardml.lora`)."""
    if not cfg.lora.rank:
        return _lora_off(cfg)
    targets = lora_targets(cfg)
    unknown = [t for t in targets if t not in LORA_ROLES]
    if unknown or not targets:
        raise ConfigError(f"lora.targets={cfg.lora.targets}: {', '.join(unknown) or 'no role given'}; give "
                          f"comma-separated roles of {', '.join(LORA_ROLES)} (e.g. lora.targets=q,v)",
                          subject="lora.targets", value=cfg.lora.targets)
    clashes = [(cfg.model.kind != "transformer", "model.kind", cfg.model.kind,
                "LoRA adapts a transformer's projections; use model.kind=transformer or lora.rank=0"),
               (sizes["pipeline"] > 1, "mesh.pipeline", sizes["pipeline"],
                "a LoRA model is not cut into pipeline stages; use mesh.pipeline=1 (fsdp or tensor split it instead)"),
               (cfg.federated.algorithm not in ("none", *LORA_FEDERATED), "federated.algorithm",
                cfg.federated.algorithm, "federated LoRA runs fedavg or fedprox (clients train and send adapters "
                "only); use federated.algorithm=fedavg or fedprox, or lora.rank=0"),
               (cfg.federated.algorithm != "none" and bool(cfg.federated.update_clip or cfg.federated.example_clip),
                "federated.update_clip" if cfg.federated.update_clip else "federated.example_clip",
                cfg.federated.update_clip or cfg.federated.example_clip,
                "differential privacy is not supported for federated adapters yet; set it to 0, or use lora.rank=0"),
               (cfg.population.kind == "pbt" and cfg.population.size > 1, "population.kind", "pbt",
                "a population of adapters trains as population.kind=sweep or ensemble (pbt copies whole models)"),
               (bool(cfg.population.models), "population.models", sorted(cfg.population.models),
                "architecture groups train every weight; list no model.* values, or use lora.rank=0")]
    for bad, key, value, why in clashes:
        if bad:
            raise ConfigError(f"lora.rank={cfg.lora.rank} with {key}={value}: {why}", subject=key, value=value)


RULES = (_paths, _pipeline, _vmapped_pipeline, _context, _population, _federated, _architectures, _lora)


def validate(cfg: Config, n_devices: int) -> dict[str, int]:
    """Checks what the config alone decides (every key's range, the mesh against the devices, the
    cross-field :data:`RULES`); returns the resolved mesh sizes.

    Raises:
      ConfigError: naming the key, its value and the fix.
    """
    with keyed(cfg):
        check_settings(cfg)
        groups_mesh(cfg)
        sizes = resolve_mesh_sizes(cfg.mesh, n_devices)
    for rule in RULES:
        rule(cfg, sizes)
    return sizes
