"""The run's configuration, one import away: the schema (:mod:`shardml.run.schema`), presets
(:mod:`shardml.run.presets`), ``key=value`` overrides (:mod:`shardml.run.overrides`), search spaces
(:mod:`shardml.run.search`) and the cross-field rules (:mod:`shardml.run.rules`).

Presets are YAML files holding any subset of the fields; dotted overrides (``mesh.tensor=2``)
change single fields and are type- and range-checked, so a typo or an impossible value fails
before anything is compiled::

    cfg = load_config("tiny", ["mesh.data=2", "train.steps=5"])
    cfg.train.steps  # 5
    validate(cfg, n_devices=8)
"""

from shardml.run.errors import ConfigError
from shardml.run.overrides import apply_overrides, from_dict, parse_override
from shardml.run.presets import dump_yaml, load_config, preset_text, presets
from shardml.run.rules import pipeline_microbatches, validate
from shardml.run.schema import (MODEL_KINDS, RESUME_MODES, CheckpointConfig, Config, DataConfig, FederatedConfig,
                                ModelConfig, PipelineConfig, PopulationConfig, TrainConfig, all_keys, flat_dict,
                                to_dict)
from shardml.run.search import SEARCHABLE, move_search

__all__ = ["MODEL_KINDS", "RESUME_MODES", "SEARCHABLE", "CheckpointConfig", "Config", "ConfigError", "DataConfig",
           "FederatedConfig", "ModelConfig", "PipelineConfig", "PopulationConfig", "TrainConfig", "all_keys",
           "apply_overrides", "dump_yaml", "flat_dict", "from_dict", "load_config", "move_search", "parse_override",
           "pipeline_microbatches", "preset_text", "presets", "to_dict", "validate"]
