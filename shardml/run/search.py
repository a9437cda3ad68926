"""Search spaces written in place: an ``optim.*`` value that is a list or a distribution moves to
``population.search`` (the members of a sweep differ by it), and so does a ``lora.alpha`` or
``lora.dropout`` one (as ``lora_alpha`` / ``lora_dropout``: a population of adapters holds them
per member, see :mod:`shardml.models.lora`).

    move_search({"optim": {"lr": [1e-3, 3e-3]}}, Config())
    # {"optim": {}, "population": {"search": {"lr": [0.001, 0.003]}}}
    check_search(cfg)          # every value a member may take, in its key's range
    member_overrides(member, {"members": 2, "data": 2, ...})   # ['mesh.members=1', ..., 'mesh.data=4', ...,
                               # 'optim.lr=0.001', 'train.init_seed=1']: that member as a plain run
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Mapping
from typing import Any

from shardml.core.mesh import MESH_AXES
from shardml.core.optim import INJECTED
from shardml.core.settings import check_settings
from shardml.parallel.population import Distribution, Member, is_search_spec, parse_space
from shardml.run.errors import ConfigError, keyed
from shardml.run.schema import Config, ModelConfig

LORA_SEARCH = {"lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout"}  # search name -> config key
SEARCHABLE = (*(f"optim.{name}" for name in INJECTED), *LORA_SEARCH.values())
# What stays one value for every architecture: the kind decides the data and the loss.
FIXED_MODEL_KEYS = ("kind",)


def move_search(data: dict, base: Config) -> dict:
    """``data`` (a nested config dict) with its searched ``optim.*`` values in ``population.search``
    and its ``model.*`` lists in ``population.models``.

    Raises:
      ConfigError: a searched key that shapes the compiled step, or a space that cannot be read.
    """
    data = move_models(data, base)
    search = dict(base.population.search)
    for section in ("lora", "optim"):
        values = data.get(section)
        if not isinstance(values, dict) or not any(is_search_spec(v) for v in values.values()):
            continue
        for name, value in values.items():
            if is_search_spec(value):
                searched = f"lora_{name}" if section == "lora" else name
                space = _space(searched, value, f"{section}.{name}")
                search[searched] = space if isinstance(space, list) else value
        data = {**data, section: {k: v for k, v in values.items() if not is_search_spec(v)}}
    if search == base.population.search:
        return data
    population = dict(data.get("population") or {})
    population["search"] = {**search, **(population.get("search") or {})}
    return {**data, "population": population}


def search_key(name: str) -> str:
    """The config key of a ``population.search`` name: ``lr`` -> ``optim.lr``, ``lora_alpha`` ->
    ``lora.alpha``."""
    return LORA_SEARCH.get(name, f"optim.{name}")


def _space(name: str, value: Any, key: str | None = None) -> list[float] | Distribution:
    """The search space of ``population.search``'s ``name`` (given as config ``key``), parsed.

    Raises:
      ConfigError: ``name`` is not searchable, or ``value`` is no list or distribution.
    """
    key = key or search_key(name)
    if key not in SEARCHABLE or search_key(name) != key:
        raise ConfigError(f"{key}={value!r}: members can differ by {', '.join(SEARCHABLE)} only "
                          "(the others shape the compiled step or the schedule)", subject=key, value=value)
    with keyed(keys={name: key}):
        return parse_space(name, value)


def check_search(cfg: Config) -> None:
    """Every value a member may take is checked as the same value given alone would be: each entry
    of a list, both ends of a distribution (``optim.b1=[0.9,1.5]`` fails as ``optim.b1=1.5`` does).

    Raises:
      ConfigError: the message a single value gets (``optim.b1=1.5 must be < 1.0``).
    """
    for name, spec in cfg.population.search.items():
        space = _space(name, spec)
        section, field = search_key(name).split(".")
        if section == "lora" and not cfg.lora.rank:
            raise ConfigError(f"{search_key(name)}={spec!r} with lora.rank=0: rank 0 trains every weight and has no "
                              "adapters to scale; set lora.rank=R (e.g. lora.rank=8)", subject="lora.rank", value=0)
        for value in space if isinstance(space, list) else (space.low, space.high):
            with keyed(cfg):
                check_settings(dataclasses.replace(getattr(cfg, section), **{field: value}), section)


def member_overrides(member: Member, sizes: Mapping[str, int], out_dir: str | None = None) -> list[str]:
    """The ``key=value`` strings that, appended to the population's own command, train exactly this
    member as a plain run on the same devices: its hyperparameters, seed and data resample, no
    population, and every mesh key: the members axis folded into ``data`` (the member's batch
    then splits over ``members x data``, which trains the same model), so the sizes multiply to
    the same device count. ``out_dir`` (the population's) gives the member ``out_dir/member-<i>``.
    """
    alone = {**sizes, "members": 1, "data": sizes["data"] * sizes["members"]}
    out = [f"mesh.{axis}={alone[axis]}" for axis in MESH_AXES]
    out += ["population.size=1", "population.search={}"]
    out += [f"{search_key(name)}={value!r}" for name, value in sorted(member.hyperparams.items())]
    out.append(f"train.init_seed={member.init_seed}")
    if member.resample >= 0:
        out.append(f"data.resample={member.resample}")
    if out_dir:
        out.append(f"out_dir={os.path.join(out_dir, f'member-{member.index}')}")
    return out


def move_models(data: dict, base: Config) -> dict:
    """``data`` with its ``model.*`` lists and distributions moved to ``population.models`` (each
    combination of listed values an architecture, see :mod:`shardml.run.groups`; with
    ``population.sampler=optuna`` Optuna picks them, see :mod:`shardml.run.group_trials`).

    Raises:
      ConfigError: a search of ``model.kind``, or an empty list.
    """
    model = data.get("model")
    if not isinstance(model, dict) or not any(is_search_spec(v) for v in model.values()):
        return data
    models = dict(base.population.models)
    for name, value in model.items():
        if not is_search_spec(value):
            continue
        key = f"model.{name}"
        if name in FIXED_MODEL_KEYS or (isinstance(value, (list, tuple)) and not value):
            raise ConfigError(f"{key}={value!r}: architectures are searched with a non-empty list of values "
                              f"(e.g. model.layers=[2,4]), and model.kind stays one value (it picks the data)",
                              subject=key, value=value)
        models[name] = list(value) if isinstance(value, (list, tuple)) else value
    population = dict(data.get("population") or {})
    population["models"] = {**models, **(population.get("models") or {})}
    return {**data, "model": {k: v for k, v in model.items() if not is_search_spec(v)}, "population": population}


def model_space(name: str, spec: Any) -> list | tuple[int, int, bool]:
    """The search space of ``model.<name>``: a list of values, or an integer range
    ``(low, high, log)`` from ``uniform(low,high)`` / ``loguniform(low,high)`` (both ends included;
    Optuna's ``suggest_int``).

    Example:
      >>> model_space("d_ff", "loguniform(16,128)")
      (16, 128, True)

    Raises:
      ConfigError: a distribution over a key that is not an integer, or bounds that are not integers.
    """
    key = f"model.{name}"
    if isinstance(spec, (list, tuple)):
        return list(spec)
    with keyed(keys={name: key}):
        space = parse_space(name, spec)
    field = MODEL_TYPES.get(name)
    if field is not int:
        kind = field.__name__ if field is not None else "not a model key"
        raise ConfigError(f"{key}={spec!r}: a model distribution draws integers (layers, widths, heads), but {key} is "
                          f"{kind}; list its values instead (e.g. {key}=[a,b])", subject=key, value=spec)
    if space.low != int(space.low) or space.high != int(space.high):
        raise ConfigError(f"{key}={spec!r}: the bounds of a model range are integers (both included), e.g. "
                          f"{key}={space.kind}({math.floor(space.low)},{math.ceil(space.high)})", subject=key,
                          value=spec)
    return int(space.low), int(space.high), space.kind == "loguniform"


def check_model_spaces(cfg: Config) -> None:
    """Every ``model.*`` search space readable and each value it may take (a list's entries, a
    range's ends) valid as that value alone would be (``model.d_ff=uniform(0,8)`` fails as
    ``model.d_ff=0`` does).

    Raises:
      ConfigError: naming the key and the value.
    """
    for name, spec in sorted(cfg.population.models.items()):
        space = model_space(name, spec)
        for value in space if isinstance(space, list) else space[:2]:
            with keyed(cfg):
                check_settings(dataclasses.replace(cfg.model, **{name: value}), "model")


MODEL_TYPES = {field.name: typing.get_type_hints(ModelConfig)[field.name] for field in dataclasses.fields(ModelConfig)}
