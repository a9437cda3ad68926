"""Search spaces written in place: an ``optim.*`` value that is a list or a distribution moves to
``population.search`` (the members of a sweep differ by it).

    move_search({"optim": {"lr": [1e-3, 3e-3]}}, Config())
    # {"optim": {}, "population": {"search": {"lr": [0.001, 0.003]}}}
    check_search(cfg)          # every value a member may take, in its key's range
    member_overrides(member, {"members": 2, "data": 2, ...})   # ['mesh.members=1', ..., 'mesh.data=4', ...,
                               # 'optim.lr=0.001', 'train.init_seed=1']: that member as a plain run
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from shardml.core.mesh import MESH_AXES
from shardml.core.optim import INJECTED
from shardml.core.settings import check_settings
from shardml.parallel.population import Distribution, Member, is_search_spec, parse_space
from shardml.run.errors import ConfigError, keyed
from shardml.run.schema import Config

SEARCHABLE = tuple(f"optim.{name}" for name in INJECTED)
# What stays one value for every architecture: the kind decides the data and the loss.
FIXED_MODEL_KEYS = ("kind",)


def move_search(data: dict, base: Config) -> dict:
    """``data`` (a nested config dict) with its searched ``optim.*`` values in ``population.search``
    and its ``model.*`` lists in ``population.models``.

    Raises:
      ConfigError: a searched key that shapes the compiled step, or a space that cannot be read.
    """
    data = move_models(data, base)
    lora = data.get("lora")
    for name, value in (lora.items() if isinstance(lora, dict) else ()):
        if isinstance(value, list) or is_search_spec(value) and not isinstance(value, str):
            raise ConfigError(f"lora.{name}={value!r}: every member of a population of adapters shares the lora.* "
                              f"settings (they shape the compiled step); members can differ by {', '.join(SEARCHABLE)}",
                              subject=f"lora.{name}", value=value)
    optim = data.get("optim")
    if not isinstance(optim, dict) or not any(is_search_spec(v) for v in optim.values()):
        return data
    search = dict(base.population.search)
    for name, value in list(optim.items()):
        if is_search_spec(value):
            space = _space(name, value)
            search[name] = space if isinstance(space, list) else value
    population = dict(data.get("population") or {})
    population["search"] = {**search, **(population.get("search") or {})}
    return {**data, "optim": {k: v for k, v in optim.items() if not is_search_spec(v)}, "population": population}


def _space(name: str, value: Any) -> list[float] | Distribution:
    """The search space of ``optim.<name>``, parsed.

    Raises:
      ConfigError: ``name`` is not searchable, or ``value`` is no list or distribution.
    """
    key = f"optim.{name}"
    if key not in SEARCHABLE:
        raise ConfigError(f"{key}={value!r}: only {', '.join(SEARCHABLE)} can differ between members "
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
        for value in space if isinstance(space, list) else (space.low, space.high):
            with keyed(cfg):
                check_settings(dataclasses.replace(cfg.optim, **{name: value}), "optim")


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
    out += [f"optim.{name}={value!r}" for name, value in sorted(member.hyperparams.items())]
    out.append(f"train.init_seed={member.init_seed}")
    if member.resample >= 0:
        out.append(f"data.resample={member.resample}")
    if out_dir:
        out.append(f"out_dir={os.path.join(out_dir, f'member-{member.index}')}")
    return out


def move_models(data: dict, base: Config) -> dict:
    """``data`` with its ``model.*`` lists moved to ``population.models`` (each combination of
    their values an architecture; see :mod:`shardml.run.groups`).

    Raises:
      ConfigError: a list for ``model.kind``, an empty list, or a distribution (architectures are listed).
    """
    model = data.get("model")
    if not isinstance(model, dict) or not any(is_search_spec(v) for v in model.values()):
        return data
    models = dict(base.population.models)
    for name, value in model.items():
        if not is_search_spec(value):
            continue
        key = f"model.{name}"
        if name in FIXED_MODEL_KEYS or not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{key}={value!r}: architectures are searched with a non-empty list of values "
                              f"(e.g. model.layers=[2,4]), and model.kind stays one value (it picks the data)",
                              subject=key, value=value)
        models[name] = list(value)
    population = dict(data.get("population") or {})
    population["models"] = {**models, **(population.get("models") or {})}
    return {**data, "model": {k: v for k, v in model.items() if not is_search_spec(v)}, "population": population}
