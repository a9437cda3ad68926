"""Reference models and Flax adapters; models name logical axes only."""

from shardml.core.model import Model, ParamSpec, Stages, from_specs, init_params, logical_axes
from shardml.models.flax import from_linen, from_nnx
from shardml.models.mlp import mlp_classifier
from shardml.models.transformer import TransformerConfig, transformer

__all__ = ["Model", "ParamSpec", "Stages", "TransformerConfig", "from_linen", "from_nnx", "from_specs", "init_params",
           "logical_axes", "mlp_classifier", "transformer"]
