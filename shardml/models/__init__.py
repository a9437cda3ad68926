"""Reference models; they name logical axes only."""

from shardml.models.base import Model, ParamSpec, Stages, abstract_params, count_params, init_params, logical_axes
from shardml.models.mlp import mlp_classifier
from shardml.models.transformer import transformer

__all__ = ["Model", "ParamSpec", "Stages", "abstract_params", "count_params", "init_params", "logical_axes",
           "mlp_classifier", "transformer"]
