"""A small MLP classifier (ReLU hidden layers), with the same logical axes as the transformer.

    model = mlp_classifier(features=64, hidden=128, classes=10)
    logits_BC = model.apply(params, x_BI)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shardml.core.errors import SettingError
from shardml.core.model import Model, ParamSpec, from_specs
from shardml.core.sharding import constrain


def mlp_classifier(features: int, hidden: int, classes: int, dtype: str = "float32") -> Model:
    """Column-parallel hidden layer (``mlp`` over tensor), row-parallel output; inputs [B, I] floats,
    outputs f32 logits [B, C].

    Raises:
      SettingError: ``features``, ``hidden`` or ``classes`` < 1 (``subject`` is its name).
    """
    for name, size in (("features", features), ("hidden", hidden), ("classes", classes)):
        if size < 1:
            raise SettingError(f"{name}={size} must be >= 1", subject=name, value=size)
    specs = {
        "w_in": ParamSpec((features, hidden), ("embed", "mlp"), fan_in_dims=(0,)),
        "b_in": ParamSpec((hidden,), ("mlp",), "zeros"),
        "w_out": ParamSpec((hidden, classes), ("mlp", "classes"), fan_in_dims=(0,)),
        "b_out": ParamSpec((classes,), ("classes",), "zeros"),
    }
    compute = jnp.dtype(dtype)

    def apply(params, x_BI):
        p = jax.tree.map(lambda w: w.astype(compute), params)
        h_BH = jax.nn.relu(x_BI.astype(compute) @ p["w_in"] + p["b_in"])
        h_BH = constrain(h_BH, ("batch", "act_mlp"))
        logits_BC = jnp.dot(h_BH, p["w_out"], preferred_element_type=jnp.float32) + p["b_out"]
        return constrain(logits_BC, ("batch", None))

    flops = 6.0 * (features * hidden + hidden * classes)
    return from_specs(specs, apply, flops_per_example=flops, tokens_per_example=1, name="mlp_classifier",
                      compute_dtype=dtype)
