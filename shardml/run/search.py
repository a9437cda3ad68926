"""Search spaces written in place: an ``optim.*`` value that is a list or a distribution moves to
``population.search`` (the members of a sweep differ by it).

    move_search({"optim": {"lr": [1e-3, 3e-3]}}, Config())
    # {"optim": {}, "population": {"search": {"lr": [0.001, 0.003]}}}
    member_overrides(member)   # ['optim.lr=0.001', 'train.init_seed=1']: that member as a plain run
"""

from __future__ import annotations

from shardml.core.optim import INJECTED
from shardml.parallel.population import Member, is_search_spec, parse_space
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
    optim = data.get("optim")
    if not isinstance(optim, dict) or not any(is_search_spec(v) for v in optim.values()):
        return data
    search = dict(base.population.search)
    for name, value in list(optim.items()):
        if is_search_spec(value):
            key = f"optim.{name}"
            if key not in SEARCHABLE:
                raise ConfigError(f"{key}={value!r}: only {', '.join(SEARCHABLE)} can differ between members "
                                  "(the others shape the compiled step or the schedule)", subject=key, value=value)
            with keyed(keys={name: key}):
                space = parse_space(name, value)
            search[name] = space if isinstance(space, list) else value
    population = dict(data.get("population") or {})
    population["search"] = {**search, **(population.get("search") or {})}
    return {**data, "optim": {k: v for k, v in optim.items() if not is_search_spec(v)}, "population": population}


def member_overrides(member: Member) -> list[str]:
    """The ``key=value`` strings that train exactly this member of a population as a plain run."""
    out = [f"optim.{name}={value!r}" for name, value in sorted(member.hyperparams.items())]
    out.append(f"train.init_seed={member.init_seed}")
    if member.resample >= 0:
        out.append(f"data.resample={member.resample}")
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
