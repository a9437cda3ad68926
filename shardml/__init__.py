"""shardml: sharded training on JAX/XLA, the same model on any mesh layout.

    import shardml
    shardml.emulate_cpu_devices(8)                       # CPU only, before JAX starts
    model = shardml.from_nnx(lambda rngs: MyModel(rngs=rngs))
    summary = shardml.fit(model, data, optax.adamw(1e-3), mesh={"data": 2, "fsdp": 2, "tensor": 2},
                          steps=100, out_dir="runs/mine")

    cfg = shardml.load_config("tiny", ["mesh.data=2", "mesh.tensor=4"])
    summary = shardml.train(cfg)                         # what `shardml train` runs

Each job has one entry point:

- train any model from Python: :func:`fit`; from a config: :func:`train` (a thin wrapper that
  builds :func:`run_parts` and calls the same loop); the parts a config run builds (model, data,
  trainer, mesh): :func:`run_parts`;
- build a trainer: :func:`build_trainer`; a population of trainers on the ``members`` axis:
  :func:`build_population`; federated rounds: :func:`build_federated`. All three compose the same
  pieces: :func:`step_program` (the pure ``(init, step)`` pair), :func:`over_population` and
  :func:`federated_rounds` (transformations of it) and :func:`compile_trainer`;
- different architectures at once, each on its own disjoint group of devices with its own layout:
  :func:`build_groups` (one :class:`GroupSpec` per architecture), :func:`train_groups` (every
  group's step dispatched each iteration without waiting), :func:`group_ensemble_metrics` (a
  heterogeneous ensemble);
- evaluate: :func:`evaluate`; predict: :func:`predict`; generate text: :func:`generate`; the same
  on a run directory: :func:`evaluate_run`, :func:`predict_run`, :func:`generate_run`;
- start from an open model (Llama, Qwen2/2.5, Qwen3, Mistral on Hugging Face) and hand it back:
  :func:`load_hf`, :func:`save_hf`; fine-tune it with low-rank adapters: :func:`lora` (with
  :func:`lora_optimizer`), export merged (:func:`merge_lora`) or as a PEFT adapter (:func:`save_peft`);
- plan a layout before running it: :func:`make_plan`, :func:`compare_layouts`;
- checkpoints: :class:`RunDir` (one run's directory), :class:`Checkpointer`, :func:`load_params`;
- test a model's sharding in your own CI: :mod:`shardml.testing`; audit compiled programs:
  :mod:`shardml.analysis`; federated clients with Flower: :mod:`shardml.flower`.

Public: the names of ``shardml.__all__`` and of the ``__all__`` of :mod:`shardml.analysis`,
:mod:`shardml.testing` and :mod:`shardml.flower`. Everything else (``shardml.core``,
``shardml.models``, ``shardml.parallel``, ``shardml.run`` and the modules under
``shardml.analysis`` and ``shardml.testing``) is internal and may change without notice.
"""

# Devices and processes
from shardml.core.devices import emulate_cpu_devices
from shardml.core.host_memory import keep_freed_host_memory
from shardml.run.distributed import start as start_distributed

# Errors
from shardml.core.errors import DataError, LayoutError, ModelError, SettingError, ShardmlError
from shardml.run.errors import ConfigError

# Configs and config-driven runs (`shardml train`, `shardml plan`, `shardml eval` / `generate`)
from shardml.run.config import Config, ModelConfig, load_config, validate
from shardml.run.recipe import build as run_parts
from shardml.run.train import train
from shardml.run.planning import abstract_batch, compare_layouts, layout_config, make_plan, workload
from shardml.run.inference import evaluate_run, generate_run, load_run, predict_run

# Models and losses
from shardml.models import (Model, ParamSpec, Stages, TransformerConfig, from_linen, from_nnx, from_specs,
                            mlp_classifier, transformer)
from shardml.core.losses import classification, token_cross_entropy
from shardml.models.hf_io import load_hf, save_hf
from shardml.models.lora import lora, lora_optimizer, merge_lora, save_peft

# Data
from shardml.core.data import (ArrayBatches, Examples, TextBatches, Tokens, load_digits, load_tokens, put_batch,
                               split_examples)
from shardml.core.input import Feeder, PlacementError
from shardml.core.sft import SFTBatches, SFTExamples, chat_template_of, pack_examples, pad_examples, read_sft
from shardml.core.tokenizer import BPE, train_bpe

# Meshes, sharding rules, gradient strategies, optimizers
from shardml.core.mesh import MESH_AXES, MeshConfig, describe, layout_name, make_mesh
from shardml.core.sharding import Rules, constrain, per_example, use_rules
from shardml.core.strategy import GradientStrategy
from shardml.core.accumulate import accumulator
from shardml.core.pipeline import SCHEDULES, Pipeline, Schedule
from shardml.core.privacy import dp_fedavg_epsilon, dp_sgd_epsilon, private_accumulator
from shardml.core.optim import OptimConfig, default_optimizer

# Trainers: one builder, populations and federated rounds as transformations of its program
from shardml.core.step import Program, Trainer, TrainState, build_trainer, compile_trainer, step_program, train_step
from shardml.parallel.members import build_population, over_population, with_hyperparams
from shardml.parallel.population import ensemble_metrics
from shardml.parallel.groups import GroupSpec, Groups, GroupsHook, GroupsRun, build_groups, group_ensemble_metrics, train_groups
from shardml.parallel.federated import (Algorithm, FederatedTrainer, Privacy, build_federated, diloco, fedavg, fedopt,
                                        federated_rounds, fedprox, server_optimizer)
from shardml.parallel.partition import (ClientBatches, dirichlet, format_label_report, iid, label_counts, label_report,
                                        natural, partition)

# The training loop, run directories and checkpoints
from shardml.run.loop import LoopSettings, NonFiniteError, TrainSummary, evaluate, fit
from shardml.run.run_dir import RunDir
from shardml.run.checkpoint import CheckpointError, Checkpointer, load_params

# Inference
from shardml.parallel.inference import Generation, generate, held_out_batches, predict

# Plans and the audit (more in shardml.analysis)
from shardml.analysis.audit import collectives, memory
from shardml.analysis.plan import Plan, format_comparison, format_plan
from shardml.analysis.theory import layout_theory

# Public submodules (shardml.testing is imported on use: it is for test suites)
from shardml import analysis, flower  # noqa: E402

__version__ = "0.2.0"

__all__ = [
    # devices and processes
    "emulate_cpu_devices", "keep_freed_host_memory", "start_distributed",
    # errors
    "ConfigError", "DataError", "LayoutError", "ModelError", "SettingError", "ShardmlError",
    # configs and config-driven runs
    "Config", "ModelConfig", "abstract_batch", "compare_layouts", "evaluate_run", "generate_run", "layout_config",
    "load_config", "load_run", "make_plan", "predict_run", "run_parts", "train", "validate", "workload",
    # models and losses
    "Model", "ParamSpec", "Stages", "TransformerConfig", "classification", "from_linen", "from_nnx", "from_specs",
    "load_hf", "lora", "lora_optimizer", "merge_lora", "mlp_classifier", "save_hf", "save_peft", "token_cross_entropy",
    "transformer",
    # data
    "ArrayBatches", "BPE", "Examples", "Feeder", "PlacementError", "TextBatches", "Tokens", "load_digits",
    "load_tokens", "put_batch", "split_examples", "train_bpe",
    "SFTBatches", "SFTExamples", "chat_template_of", "pack_examples", "pad_examples", "read_sft",
    # meshes, rules, gradient strategies, optimizers
    "MESH_AXES", "SCHEDULES", "GradientStrategy", "MeshConfig", "OptimConfig", "Pipeline", "Rules", "Schedule",
    "accumulator", "constrain", "default_optimizer", "describe", "dp_fedavg_epsilon", "dp_sgd_epsilon",
    "layout_name", "make_mesh", "per_example", "private_accumulator", "use_rules",
    # trainers
    "Program", "TrainState", "Trainer", "build_population", "build_trainer", "compile_trainer", "over_population",
    "step_program", "train_step", "with_hyperparams", "ensemble_metrics",
    # architectures on disjoint groups of devices
    "GroupSpec", "Groups", "GroupsHook", "GroupsRun", "build_groups", "group_ensemble_metrics", "train_groups",
    # federated learning
    "Algorithm", "ClientBatches", "FederatedTrainer", "Privacy", "build_federated", "diloco", "dirichlet", "fedavg",
    "federated_rounds", "fedopt", "fedprox", "format_label_report", "iid", "label_counts", "label_report", "natural",
    "partition", "server_optimizer",
    # the loop, run directories, checkpoints
    "CheckpointError", "Checkpointer", "LoopSettings", "NonFiniteError", "RunDir", "TrainSummary", "evaluate", "fit",
    "load_params",
    # inference
    "Generation", "generate", "held_out_batches", "predict",
    # plans and the audit
    "Plan", "collectives", "format_comparison", "format_plan", "layout_theory", "memory",
]
