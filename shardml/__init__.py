"""shardml: sharded training on JAX/XLA, the same model on any mesh layout.

    import shardml
    shardml.emulate_cpu_devices(8)                       # CPU only, before JAX starts
    model = shardml.from_nnx(lambda rngs: MyModel(rngs=rngs))
    summary = shardml.fit(model, data, optax.adamw(1e-3), mesh={"data": 2, "fsdp": 2, "tensor": 2},
                          steps=100, out_dir="runs/mine")

    cfg = shardml.load_config("tiny", ["mesh.data=2", "mesh.tensor=4"])
    summary = shardml.train(cfg)                         # what `shardml train` runs

Layers: :mod:`shardml.core` (mesh, rules, gradient strategies, the train step, data),
:mod:`shardml.models` (reference models, Flax adapters), :mod:`shardml.run` (configs, the loop,
checkpoints, the CLI), :mod:`shardml.analysis` (HLO audit, theory, plans).
"""

from shardml.analysis.audit import collectives, memory
from shardml.analysis.plan import Plan, format_comparison, format_plan
from shardml.analysis.theory import layout_theory
from shardml.core.accumulate import accumulator
from shardml.core.data import (ArrayBatches, Examples, TextBatches, Tokens, load_digits, load_tokens, put_batch,
                               split_examples)
from shardml.core.devices import emulate_cpu_devices
from shardml.core.errors import DataError, LayoutError, ModelError, SettingError, ShardmlError
from shardml.run.errors import ConfigError
from shardml.core.losses import classification, token_cross_entropy
from shardml.core.mesh import MESH_AXES, MeshConfig, describe, layout_name, make_mesh
from shardml.core.optim import OptimConfig, default_optimizer
from shardml.core.pipeline import Pipeline, Schedule
from shardml.core.sharding import Rules, constrain, per_example, use_rules
from shardml.core.step import Trainer, TrainState, build_trainer, train_step
from shardml.core.strategy import GradientStrategy
from shardml.parallel.members import build_population
from shardml.parallel.population import ensemble_metrics
from shardml.models import (Model, ParamSpec, Stages, TransformerConfig, from_linen, from_nnx, from_specs,
                            mlp_classifier, transformer)
from shardml.run.checkpoint import CheckpointError, Checkpointer, load_params
from shardml.run.config import Config, ModelConfig, load_config
from shardml.run.loop import LoopSettings, NonFiniteError, TrainSummary, evaluate, fit
from shardml.run.planning import compare_layouts, make_plan
from shardml.run.recipe import trainer_from_config
from shardml.run.train import train
from shardml.core.input import Feeder, PlacementError
from shardml.core.tokenizer import BPE, train_bpe
from shardml.run.distributed import start as start_distributed
from shardml.parallel.inference import Generation, evaluate_batches, generate, held_out_batches, predict
from shardml.run.inference import evaluate_run, generate_run, load_run, predict_run
from shardml.core.privacy import dp_fedavg_epsilon, dp_sgd_epsilon, private_accumulator
from shardml.parallel import flower
from shardml.parallel.federated import (Algorithm, FederatedTrainer, Privacy, build_federated, diloco, fedavg, fedopt,
                                        fedprox, server_optimizer)
from shardml.parallel.partition import (ClientBatches, dirichlet, format_label_report, iid, label_counts, label_report,
                                        natural, partition)

__version__ = "0.2.0"

__all__ = [
    "MESH_AXES", "ArrayBatches", "CheckpointError", "Checkpointer", "Config", "ConfigError", "Examples",
    "GradientStrategy", "LoopSettings", "MeshConfig", "Model", "ModelConfig", "NonFiniteError", "OptimConfig",
    "ParamSpec", "Pipeline", "Plan", "Rules", "Schedule", "Stages", "TextBatches", "Tokens", "TrainState",
    "TrainSummary", "Trainer", "TransformerConfig", "accumulator", "build_population", "build_trainer", "classification", "collectives",
    "compare_layouts", "constrain", "default_optimizer", "describe", "emulate_cpu_devices", "ensemble_metrics", "evaluate", "fit",
    "format_comparison", "format_plan", "from_linen", "from_nnx", "from_specs", "layout_name", "layout_theory",
    "load_config", "load_digits", "load_params", "load_tokens", "make_mesh", "make_plan", "memory",
    "mlp_classifier", "per_example", "put_batch", "split_examples", "token_cross_entropy", "train",
    "train_step", "trainer_from_config", "transformer", "use_rules",
]
__all__ += ["BPE", "Feeder", "PlacementError", "start_distributed", "train_bpe"]
__all__ += ["DataError", "LayoutError", "ModelError", "SettingError", "ShardmlError"]
__all__ += ["Generation", "evaluate_batches", "evaluate_run", "generate", "generate_run", "held_out_batches",
            "load_run", "predict", "predict_run"]
__all__ += ["Algorithm", "ClientBatches", "FederatedTrainer", "Privacy", "build_federated", "diloco", "dirichlet",
            "dp_fedavg_epsilon", "dp_sgd_epsilon", "fedavg", "fedopt", "fedprox", "flower", "format_label_report",
            "iid", "label_counts", "label_report", "natural", "partition", "private_accumulator", "server_optimizer"]
