"""shardml: sharded training on JAX/XLA, the same model on any mesh layout.

    import shardml
    shardml.emulate_cpu_devices(8)                       # CPU only, before JAX starts
    cfg = shardml.load_config("tiny", ["mesh.data=2", "mesh.tensor=4"])
    summary = shardml.train(cfg)
"""

from shardml.accumulate import accumulate_gradients, model_loss, token_cross_entropy
from shardml.audit import collectives, memory
from shardml.checkpoint import CheckpointError, Checkpointer, load_params
from shardml.config import (Config, ConfigError, MeshConfig, ModelConfig, OptimConfig, PipelineConfig, load_config,
                            validate)
from shardml.data import load_corpus, train_batch
from shardml.mesh import describe, emulate_cpu_devices, make_mesh
from shardml.models import Model, ParamSpec, Stages, mlp_classifier, transformer
from shardml.pipeline import Pipeline, Schedule
from shardml.plan import Plan, compare_layouts, compile_step, format_comparison, format_plan, make_plan
from shardml.sharding import Rules, constrain, use_rules
from shardml.step import TrainState, Trainer, build_trainer, default_optimizer, put_batch
from shardml.theory import layout_theory
from shardml.train import evaluate, train

__version__ = "0.1.0"

__all__ = [
    "Config", "ConfigError", "MeshConfig", "Model", "ModelConfig", "OptimConfig", "ParamSpec", "Pipeline",
    "PipelineConfig", "Rules", "Schedule", "Stages", "TrainState", "Trainer", "accumulate_gradients",
    "build_trainer", "collectives", "constrain", "default_optimizer", "describe", "emulate_cpu_devices",
    "evaluate", "load_config", "make_mesh", "memory", "mlp_classifier", "model_loss", "put_batch",
    "load_corpus", "token_cross_entropy", "train", "train_batch", "transformer", "use_rules", "validate",
    "CheckpointError", "Checkpointer", "load_params",
    "Plan", "compare_layouts", "compile_step", "format_comparison", "format_plan", "make_plan", "layout_theory",
]
