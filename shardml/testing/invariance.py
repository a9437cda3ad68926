"""Sharding invariance of a user's model: every layout and microbatch count trains exactly as one
device does, step by step, parameter by parameter.

    assert_layouts_match(model, shardml.classification, batch,
                         layouts=["data=2 x tensor=2", "fsdp=4"], steps=3, microbatches=(1, 2))

A mismatch is an :class:`AssertionError` (:class:`LayoutMismatch`) that names the first layout,
the first step and the first parameter that differ, and by how much.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax

from shardml.core.checks import check_batch
from shardml.core.data import as_source
from shardml.core.errors import ConfigError
from shardml.core.mesh import layout_name
from shardml.core.sharding import Rules
from shardml.core.step import build_trainer
from shardml.core.trees import path_name
from shardml.core.model import Model
from shardml.testing.layouts import Layout, mesh_of, parse_layout

DEFAULT_RTOL = 1e-5
DEFAULT_LR = 0.1


def default_layouts(n_devices: int) -> tuple[str, ...]:
    """Three layouts that together split the batch, the parameters (ZeRO-3) and the model's
    Megatron dimensions, on ``n_devices`` (8: data=2 x fsdp=2 x tensor=2, data=4 x tensor=2, fsdp=8)."""
    if n_devices >= 8:
        return "data=2 x fsdp=2 x tensor=2", "data=4 x tensor=2", "fsdp=8"
    if n_devices >= 4:
        return "data=2 x tensor=2", "fsdp=2 x tensor=2", "fsdp=4"
    if n_devices >= 2:
        return "data=2", "fsdp=2", "tensor=2"
    raise ConfigError("sharding invariance needs at least 2 devices; enable shardml's pytest plugin "
                      "(`shardml = true` in the pytest ini file) or call shardml.emulate_cpu_devices(8) first")


class LayoutMismatch(AssertionError):
    """A layout trained differently from one device.

    Attributes:
      layout: the layout's name (``"data=2 x tensor=2"``).
      microbatches: its microbatch count.
      step: the first step that differs (0: the initial parameters).
      parameter: the first parameter (in tree order) that differs after that step, or None when only
        the loss or the gradient norm of the step differs.
      difference: that parameter's largest difference relative to its largest value on one
        device (or the loss's, else the gradient norm's, relative difference).
    """

    def __init__(self, message: str, *, layout: str, microbatches: int, step: int, parameter: str | None,
                 difference: float):
        super().__init__(message)
        self.layout, self.microbatches, self.step = layout, microbatches, step
        self.parameter, self.difference = parameter, difference


@dataclasses.dataclass(frozen=True)
class _Trajectory:
    losses: list[float]  # loss of step s (1-based) at index s - 1
    params: list[dict[str, np.ndarray]]  # flat parameters after step s at index s (0: initial)
    grad_norms: Sequence[float] = ()  # global gradient norm of step s at index s - 1 (empty: not recorded)


def as_model(model: Any, example_inputs: Any) -> Model:
    """A :class:`shardml.Model` as is; a built Flax NNX module through :func:`shardml.from_nnx`; a Flax
    Linen module through :func:`shardml.from_linen` (traced with ``example_inputs``; for dropout, call
    ``from_linen(module, inputs, rng_streams=("dropout",))`` yourself)."""
    if isinstance(model, Model):
        return model
    from shardml.models.flax import from_linen, from_nnx

    try:
        from flax import nnx

        if isinstance(model, nnx.Module):
            return from_nnx(model)
    except ImportError:  # pragma: no cover - flax is a dependency
        pass
    import flax.linen as nn

    if isinstance(model, nn.Module):
        return from_linen(model, jax.tree.map(lambda x: np.asarray(x)[:1], example_inputs))
    raise TypeError(f"cannot train a {type(model).__name__}: pass a shardml.Model (shardml.from_specs, "
                    "shardml.from_nnx(lambda rngs: Module(..., rngs=rngs)), shardml.from_linen(...)) or a built "
                    "Flax NNX or Linen module")


def _batches(data: Any, steps: int) -> list[dict]:
    """The first ``steps`` host batches (read once, so every layout sees the same ones)."""
    if isinstance(data, Mapping):
        return [dict(data)] * steps
    source = as_source(data)
    return [jax.tree.map(np.asarray, source.batch(step)) for step in range(steps)]


def _flat(params: Any) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    return {path_name(path): np.asarray(leaf) for path, leaf in leaves}


def _train(model: Model, loss, batches: list[dict], mesh, microbatches: int, optimizer, rules, seed: int):
    trainer = build_trainer(model, mesh, optimizer, loss=loss, microbatches=microbatches, rules=rules)
    state = trainer.init(seed)
    params = [_flat(trainer.natural(state.params))]
    losses, grad_norms = [], []
    for batch in batches:
        state, metrics = trainer.step(state, trainer.put(batch))
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
        params.append(_flat(trainer.natural(state.params)))
    return _Trajectory(losses, params, grad_norms)


def _relative(x: np.ndarray, y: np.ndarray) -> tuple[float, tuple[int, ...]]:
    """max |x - y| / max |y| (NaN or inf where either is not finite), and where |x - y| is largest."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape:
        return math.inf, ()
    if x.size == 0:
        return 0.0, ()
    delta = np.abs(x - y)
    if not np.all(np.isfinite(delta)):
        bad = np.argwhere(~np.isfinite(delta))[0]
        return math.nan, tuple(int(i) for i in bad)
    where = tuple(int(i) for i in np.unravel_index(np.argmax(delta), delta.shape))
    return float(delta.max() / (np.abs(y).max() + 1e-30)), where


def _case(layout: str, microbatches: int) -> str:
    return f"{layout} with {microbatches} microbatch{'es' if microbatches > 1 else ''}"


def _scalar_difference(what: str, step: int, a: float, b: float) -> tuple[float, str]:
    diff = abs(a - b) / (abs(b) + 1e-30) if math.isfinite(a) and math.isfinite(b) else math.nan
    return diff, f"{what} of step {step}: {a:.6g} here, {b:.6g} on one device (relative difference {diff:.2e})"


def _first_difference(layout: str, microbatches: int, got: _Trajectory, want: _Trajectory,
                      rtol: float, gradients: bool = True) -> LayoutMismatch | None:
    """The first step (0: the initial parameters) at which ``got`` leaves ``want``, as an error."""
    steps = len(want.losses)
    for step in range(steps + 1):
        loss_line, loss_diff, grad_line, grad_diff = "", 0.0, "", 0.0
        if step:
            loss_diff, loss_line = _scalar_difference("loss", step, got.losses[step - 1], want.losses[step - 1])
            if gradients and got.grad_norms and want.grad_norms:
                grad_diff, grad_line = _scalar_difference("gradient norm", step, got.grad_norms[step - 1],
                                                          want.grad_norms[step - 1])
        differing = []
        for name, reference in want.params[step].items():
            value = got.params[step].get(name)
            diff, where = _relative(value, reference) if value is not None else (math.inf, ())
            if not diff <= rtol:
                differing.append((name, diff, where, value, reference))
        if not differing and loss_diff <= rtol and grad_diff <= rtol:
            continue
        when = "in its initial parameters" if step == 0 else f"at step {step} of {steps}"
        lines = [f"layout {_case(layout, microbatches)} differs from one device {when}:"]
        if differing:
            name, diff, where, value, reference = differing[0]
            if value is None or value.shape != reference.shape:
                lines.append(f"  parameter '{name}' has shape {None if value is None else value.shape} here, "
                             f"{reference.shape} on one device")
            else:
                lines.append(f"  parameter '{name}' differs by {diff:.2e} (largest |difference| / largest |value| on "
                             f"one device; rtol {rtol:g}), most at index {where}: {value[where]:.6g} here, "
                             f"{reference[where]:.6g} on one device")
            if len(differing) > 1:
                others = ", ".join(f"'{n}' ({d:.1e})" for n, d, *_ in differing[1:6])
                lines.append(f"  also differ: {others}{', ...' if len(differing) > 6 else ''}")
        elif not loss_diff <= rtol:
            lines.append(f"  the loss differs (rtol {rtol:g}); every parameter after the step agrees")
        else:
            lines.append(f"  the gradient's scale differs (rtol {rtol:g}); the loss and every parameter agree "
                         "(an adaptive optimizer such as Adam hides a gradient scaled by a constant)")
        lines.extend(f"  {line}" for line in (loss_line, grad_line) if line)
        first = differing[0] if differing else (None, loss_diff if not loss_diff <= rtol else grad_diff)
        return LayoutMismatch("\n".join(lines), layout=layout, microbatches=microbatches, step=step,
                              parameter=first[0], difference=first[1])
    return None


def assert_layouts_match(model: Any, loss, data: Any, layouts: Sequence[Layout] | None = None, *, steps: int = 3,
                         microbatches: int | Sequence[int] = (1, 2), rtol: float = DEFAULT_RTOL,
                         optimizer: optax.GradientTransformation | None = None, rules: Rules | None = None,
                         seed: int = 0, devices: Sequence[Any] | None = None,
                         gradients: bool = True) -> dict[str, float]:
    """Trains ``model`` for ``steps`` steps on one device and on every layout x microbatch count, and
    asserts that every step's loss, every step's gradient norm and every parameter after every step
    agree within ``rtol``.

    The reference is the same model, loss, optimizer, seed and batches on one device without
    accumulation. Parameters are compared by max |difference| / max |value on one device| per
    parameter; losses by their relative difference.

    Args:
      model: a :class:`shardml.Model`, or a built Flax NNX / Linen module (see :func:`as_model`).
      loss: ``loss(outputs, batch) -> sums`` (e.g. :func:`shardml.classification`).
      data: one host batch (used at every step), a sequence of batches, a ``step -> batch``
        function, an iterator or a source with ``batch(step)``; rows must divide by every layout's
        data x fsdp x microbatches.
      layouts: ``"data=2 x tensor=2"``, ``{"fsdp": 4}``, ...; default :func:`default_layouts`.
      steps: optimizer steps per run.
      microbatches: accumulation microbatch count(s) tried on every layout.
      rtol: the largest relative difference accepted (f32: 1e-5; a bf16 model needs ~1e-2).
      optimizer: default plain SGD (learning rate 0.1), so a gradient wrong by any factor moves the
        parameters differently (Adam would normalise a scale error away in its first steps).
      rules: the logical -> mesh axes table (default :meth:`shardml.Rules.default`).
      seed: the initialisation seed (the same for every run).
      devices: the devices to build meshes on (default: all; the pytest plugin's fixture
        ``shardml_devices`` gives its N).
      gradients: also compare each step's global gradient norm (the step's ``grad_norm``), so a
        gradient scaled by a constant (a wrong divisor, padding counted) fails also under an
        optimizer such as Adam that normalises the scale away from the parameters.

    Returns:
      The largest relative parameter difference of each case, e.g. ``{"fsdp=4 with 2 microbatches": 3e-8}``.

    Raises:
      LayoutMismatch: an AssertionError naming the first layout, step and parameter that differ.
      ConfigError: a layout the model or the batch cannot take (named in the message).

    Example:
      >>> assert_layouts_match(model, shardml.classification, batch, ["data=2 x tensor=2"])  # doctest: +SKIP
    """
    __tracebackhide__ = True  # pytest shows the failure at the caller's line
    devices = list(jax.devices() if devices is None else devices)
    layouts = default_layouts(len(devices)) if layouts is None else layouts
    counts = (microbatches,) if isinstance(microbatches, int) else tuple(microbatches)
    batches = _batches(data, steps)
    model = as_model(model, batches[0]["inputs"])
    optimizer = optimizer or optax.sgd(DEFAULT_LR)
    rows = int(jax.tree.leaves(batches[0])[0].shape[0])
    reference = _train(model, loss, batches, mesh_of({}, devices[:1]), 1, optimizer, rules, seed)
    report = {}
    for layout in layouts:
        sizes = parse_layout(layout)
        for k in counts:
            mesh = mesh_of(sizes, devices)
            name = layout_name(mesh.shape)
            case = _case(name, k)
            try:
                check_batch(rows, dict(mesh.shape), k, rules=rules)
                got = _train(model, loss, batches, mesh, k, optimizer, rules, seed)
            except ConfigError as err:
                raise ConfigError(f"layout {case}: {err}") from err
            mismatch = _first_difference(name, k, got, reference, rtol, gradients)
            if mismatch is not None:
                raise mismatch
            report[case] = max(_relative(got.params[s][n], ref)[0] for s, step in enumerate(reference.params)
                               for n, ref in step.items())
    return report
