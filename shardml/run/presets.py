"""Presets: YAML files holding any subset of the config's fields, shipped in
``shardml/run/configs/`` or given as a path; :func:`load_config` reads one and applies overrides.

    cfg = load_config("tiny", ["mesh.data=2", "train.steps=5"])
    print(dump_yaml(cfg))
"""

from __future__ import annotations

import difflib
import importlib.resources
import pathlib
from typing import Any

import yaml

from shardml.run.errors import ConfigError
from shardml.run.overrides import apply_overrides, from_dict
from shardml.run.schema import RUN_MODEL_KEYS, Config, to_dict


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
        cfg = from_dict(_without_shape(_read_yaml(text, where), overrides or []))
    return apply_overrides(cfg, overrides or [])


def _without_shape(data: dict, overrides: list[str]) -> dict:
    """The preset without its model's shape when an override says ``model.from=``: the checkpoint's
    config.json sets the shape, and only the keys given with it are checked against it."""
    model = data.get("model")
    if not isinstance(model, dict) or "from" in model or not any(o.strip().startswith("model.from=")
                                                                  for o in overrides):
        return data
    return data | {"model": {k: v for k, v in model.items() if k in RUN_MODEL_KEYS}}


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


