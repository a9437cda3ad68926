"""``shardml plan`` from a config: build the trainer a run would build, compile its step from
abstract shapes, and measure it (:mod:`shardml.analysis.plan`); several layouts side by side.

    emulate_cpu_devices(8)                                  # before JAX starts, CPU only
    result = make_plan(load_config("default", ["mesh.data=1", "mesh.fsdp=8"]), device_memory=16 * 2**30)
    print(format_plan(result))
"""

from __future__ import annotations

import dataclasses

import jax

from shardml.analysis.plan import CompiledStep, Plan, compiled_step, plan_of
from shardml.analysis.theory import LayoutTheory, Workload, layout_theory
from shardml.core.mesh import MeshConfig
from shardml.run import config as config_lib
from shardml.run.config import Config
from shardml.run.errors import ConfigError, config_errors
from shardml.run.groups import build_architectures
from shardml.run.recipe import Parts, build


def abstract_batch(parts: Parts) -> dict:
    """ShapeDtypeStructs (with the batch sharding) of one global batch of the run's data."""
    # every leaf: packed SFT inputs are a dict of [B, S] arrays
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=parts.trainer.batch_sharding),
                        parts.data.batch(0))


def workload(cfg: Config) -> Workload:
    """What :mod:`shardml.analysis.theory` needs of a built config (``build(cfg).cfg``, its
    ``auto`` model choices resolved).

    Raises:
      ConfigError: ``model.remat`` or ``model.layer_loop`` is still ``auto``.
    """
    m, t, p = cfg.model, cfg.train, cfg.pipeline
    if "auto" in (m.remat, m.layer_loop):
        raise ConfigError("the theory needs model.remat and model.layer_loop resolved: pass build(cfg).cfg",
                          subject="model.remat", value=m.remat)
    return Workload(d_model=m.d_model, heads=m.heads, kv_heads=m.kv_heads, d_ff=m.d_ff, vocab=m.vocab,
                    layers=m.layers, dtype=m.dtype, remat=m.remat, seq_len=cfg.data.seq_len,
                    batch_size=t.batch_size, microbatches=t.microbatches, schedule=p.schedule,
                    pipeline_microbatches=p.microbatches, repeats=p.repeats, head_dim=m.head_dim,
                    experts=m.experts, expert_d_ff=m.expert_d_ff, shared_experts=m.shared_experts,
                    top_k=m.top_k, capacity_factor=m.capacity_factor, moe_dispatch=m.moe_dispatch,
                    context_attention=m.context_attention)


def config_theory(cfg: Config, sizes: dict[str, int]) -> LayoutTheory:
    """The closed-form theory of a built config on the resolved mesh ``sizes``."""
    return layout_theory(workload(cfg), sizes)


@config_errors
def compile_step(cfg: Config, devices=None, device_memory: int | None = None) -> CompiledStep:
    """Builds the trainer of ``cfg`` (``shardml train``'s, pipeline included) on ``devices``
    (default: all; a subset for a layout smaller than the machine) and compiles its step.

    Raises:
      ConfigError: before anything compiles, for a layout that cannot work.
    """
    parts = build(cfg, devices, device_memory=device_memory)
    return compiled_step(parts.trainer, abstract_batch(parts))


@config_errors
def make_plan(cfg: Config, device_memory: int | None = None, label: str = "") -> Plan:
    """The :class:`Plan` of ``cfg`` on the current devices (nothing trained, nothing allocated)."""
    parts = build(cfg, device_memory=device_memory)
    return plan_of(compiled_step(parts.trainer, abstract_batch(parts)), device_memory, label, _theory(parts))


@config_errors
def group_plans(cfg: Config, device_memory: int | None = None) -> list[Plan]:
    """One :class:`Plan` per group of a config with ``model.*`` lists (every group checked before the
    first compile), labelled with its architecture and its share of the devices."""
    parts = build_architectures(cfg)
    plans = []
    for index, group in enumerate(parts.groups):
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=group.trainer.batch_sharding)
                 for k, v in parts.data.batch(0).items()}
        label = f"group {index}: {group.name} on {len(group.devices)} device{'s' if len(group.devices) > 1 else ''}"
        plans.append(plan_of(compiled_step(group.trainer, batch), device_memory, label=label))
    return plans


@config_errors
def layout_config(base: Config, layout: str) -> Config:
    """Applies one ``--compare`` column: comma-separated ``key=value`` overrides.

    A column that sets any ``mesh.*`` key starts from a fresh mesh (``data=-1`` fills, the other
    axes 1), so ``mesh.fsdp=8`` means fsdp=8 alone, whatever the preset's mesh was.
    """
    items = [item.strip() for item in layout.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"--compare layout '{layout}' is empty; write e.g. mesh.data=2,mesh.tensor=4")
    bad = [item for item in items if "=" not in item]
    if bad:
        raise ConfigError(f"--compare layout '{layout}': '{bad[0]}' is not key=value (e.g. mesh.fsdp=8)")
    if any(item.split("=", 1)[0].strip().startswith("mesh.") for item in items):
        base = dataclasses.replace(base, mesh=MeshConfig())
    return config_lib.apply_overrides(base, items)


@config_errors
def compare_layouts(base: Config, layouts: list[str], device_memory: int | None = None) -> list[Plan]:
    """Plans several layouts of ``base``; every one is built and checked before the first compile."""
    built = []
    for layout in layouts:
        try:
            built.append(build(layout_config(base, layout), device_memory=device_memory))
        except ConfigError as err:
            message = str(err)
            raise ConfigError(message if message.startswith("--compare") else
                              f"--compare layout '{layout}': {message}") from None
    return [plan_of(compiled_step(parts.trainer, abstract_batch(parts)), device_memory, layout, _theory(parts))
            for layout, parts in zip(layouts, built)]


def _theory(parts: Parts) -> LayoutTheory | None:
    """The closed-form theory of a built run, where it models the model (a transformer, the theory's decoder)."""
    return config_theory(parts.cfg, parts.sizes) if parts.cfg.model.kind == "transformer" else None
