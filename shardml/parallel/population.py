"""Populations: ensembles, hyperparameter sweeps and population-based training as small policies on
the stacked-member mechanism (:mod:`shardml.parallel.members`).

- **Who the members are** (:func:`plan_members`): an ensemble's members differ by initialisation
  (and, with bootstrap, by their resample of the data); a sweep's by hyperparameters — lists form a
  grid, distributions (``loguniform(1e-4,1e-2)``, ``uniform(a,b)``) are sampled per member from the
  seed; PBT starts like a sweep. Member i always initialises from its own seed (base + i).
- **PBT** (:func:`exploit_explore`): every S steps the worst fraction of members copy the parameters
  and optimizer state of a better one (a gather along the sharded member axis, on device) and
  perturb its hyperparameters (x0.8 or x1.2, Jaderberg et al. 2017), without recompiling.
- **Ensembles** (:func:`ensemble_metrics`): each member and the ensemble (the mean of the members'
  probabilities): loss, accuracy, expected calibration error, predictive entropy, and disagreement.

    members = plan_members("sweep", 4, {"lr": [1e-3, 3e-3], "weight_decay": "uniform(0,0.1)"}, seed=0)
    members[1].hyperparams   # {'lr': 0.001, 'weight_decay': 0.0713...}; members[1].init_seed == 1
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shardml.core.errors import SettingError
from shardml.parallel.members import GATE, hyperparams_of, set_hyperparams, with_hyperparams

KINDS = ("ensemble", "sweep", "pbt")
_DISTRIBUTION = re.compile(r"^\s*(loguniform|uniform)\(\s*([^,]+?)\s*,\s*([^)]+?)\s*\)\s*$")
PERTURB = (0.8, 1.2)  # PBT's explore: multiply each hyperparameter by one of these (Jaderberg et al. 2017)
ECE_BINS = 15


@dataclasses.dataclass(frozen=True)
class Distribution:
    """A continuous search range: ``uniform(low, high)`` or ``loguniform(low, high)``."""

    kind: str
    low: float
    high: float

    def sample(self, rng: np.random.Generator) -> float:
        if self.kind == "uniform":
            return float(rng.uniform(self.low, self.high))
        return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))


def is_search_spec(value: Any) -> bool:
    """Whether a config value asks for a search: a list, or a distribution string."""
    return isinstance(value, (list, tuple)) or (isinstance(value, str) and bool(_DISTRIBUTION.match(value)))


def parse_space(key: str, spec: Any) -> list[float] | Distribution:
    """A list of values (a grid axis) or a :class:`Distribution`.

    Raises:
      SettingError: naming ``key`` (the hyperparameter) when the spec is neither, or a range is empty.
    """
    if isinstance(spec, (list, tuple)):
        try:
            values = [float(v) for v in spec]
        except (TypeError, ValueError):
            raise SettingError(f"{key}={spec!r}: a search list holds numbers, e.g. [1e-3,3e-3]", subject=key,
                               value=spec) from None
        if not values:
            raise SettingError(f"{key}=[]: a search list needs at least one value", subject=key, value=spec)
        return values
    match = _DISTRIBUTION.match(str(spec))
    if not match:
        raise SettingError(f"{key}={spec!r} is not a search space; write a list ([1e-3,3e-3]) or a distribution "
                           "(loguniform(1e-4,1e-2), uniform(0,0.1))", subject=key, value=spec)
    try:
        low, high = float(match.group(2)), float(match.group(3))
    except ValueError:
        raise SettingError(f"{key}={spec!r}: the bounds must be numbers", subject=key, value=spec) from None
    if not low < high or (match.group(1) == "loguniform" and low <= 0):
        raise SettingError(f"{key}={spec!r}: need low < high (and low > 0 for loguniform)", subject=key, value=spec)
    return Distribution(match.group(1), low, high)


@dataclasses.dataclass(frozen=True)
class Member:
    """One member: its index, initialisation seed, hyperparameters (optimizer field names) and,
    for bootstrap ensembles, which resample of the data it trains on (-1: the shared data)."""

    index: int
    init_seed: int
    hyperparams: Mapping[str, float]
    resample: int = -1


def plan_members(kind: str, size: int, search: Mapping[str, Any], seed: int, init_seed: int | None = None,
                 bootstrap: bool = False) -> list[Member]:
    """The members of a population (see the module docstring).

    Args:
      kind: ``ensemble``, ``sweep`` or ``pbt``.
      size: the number of members N; for a grid it must be a multiple of the grid's size (the
        grid is repeated with other seeds).
      search: optimizer field -> a list (grid axis) or a distribution string.
      seed: the run's seed (sampling of distributions); ``init_seed`` (default ``seed``) is member
        0's initialisation seed, member i's is ``init_seed + i``.

    Raises:
      SettingError: an impossible combination, naming the arguments.
    """
    if kind not in KINDS:
        raise SettingError(f"kind={kind!r} is not one of {', '.join(KINDS)}", subject="kind", value=kind)
    spaces = {key: parse_space(key, spec) for key, spec in sorted(search.items())}
    if kind == "ensemble" and spaces:
        raise SettingError(f"kind=ensemble: members differ by initialisation only, but {sorted(spaces)} "
                           "are searched; use kind=sweep (or pbt)", subject="kind", value=kind)
    if kind != "ensemble" and not spaces:
        raise SettingError(f"kind={kind} needs a search space: give a hyperparameter a list or a "
                           "distribution, e.g. lr=[1e-3,3e-3] or lr=loguniform(1e-4,1e-2)", subject="kind", value=kind)
    if bootstrap and kind != "ensemble":
        raise SettingError(f"bootstrap=true resamples the data of ensemble members; kind={kind} (use kind=ensemble "
                           "or bootstrap=false)", subject="bootstrap", value=True)
    grid_keys = [k for k, s in spaces.items() if isinstance(s, list)]
    grid = list(itertools.product(*(spaces[k] for k in grid_keys))) or [()]
    if size % len(grid):
        raise SettingError(f"size={size} is not a multiple of the grid's {len(grid)} points "
                           f"({' x '.join(f'{k}: {len(spaces[k])}' for k in grid_keys)})", subject="size", value=size)
    repeats = size // len(grid)
    rng = np.random.default_rng([seed, 0x5EED])
    base = seed if init_seed is None or init_seed < 0 else init_seed
    members = []
    for index in range(size):
        values = dict(zip(grid_keys, grid[index // repeats]))
        for key, space in spaces.items():
            if isinstance(space, Distribution):
                values[key] = space.sample(rng)
        members.append(Member(index, base + index, values, index if bootstrap else -1))
    return members


def hyperparam_arrays(members: Sequence[Member]) -> dict[str, np.ndarray]:
    """name -> one value per member (what :func:`shardml.parallel.members.build_population` takes)."""
    names = sorted({name for m in members for name in m.hyperparams})
    return {name: np.array([m.hyperparams[name] for m in members], np.float32) for name in names}


# ----------------------------------------------------------------------------- PBT and early stopping


def exploit_explore(state, scores: jax.Array, key: jax.Array, fraction: float, names: Sequence[str]):
    """PBT's step on a stacked state (jit it): the worst ``fraction`` of the members (highest
    ``scores``) copy the parameters and optimizer state of a member of the best ``fraction`` and
    multiply each hyperparameter in ``names`` by 0.8 or 1.2.

    Returns:
      ``(state, sources)``: ``sources[i]`` is the member i copied (i itself if it kept its own).
    """
    n = scores.shape[0]
    q = max(1, int(fraction * n))
    order = jnp.argsort(scores)
    best, worst = order[:q], order[n - q:]
    pick_key, factor_key = jax.random.split(key)
    donors = best[jax.random.randint(pick_key, (q,), 0, q)]
    sources = jnp.arange(n).at[worst].set(donors)
    params, opt_state = jax.tree.map(lambda x: x[sources], (state.params, state.opt_state))
    hyper = hyperparams_of(opt_state)
    factors = jnp.asarray(PERTURB, jnp.float32)[jax.random.randint(factor_key, (len(names), n), 0, len(PERTURB))]
    replaced = sources != jnp.arange(n)
    perturbed = {name: jnp.where(replaced, hyper[name] * factors[i], hyper[name]) for i, name in enumerate(names)}
    opt_state = set_hyperparams(opt_state, perturbed)
    return dataclasses.replace(state, params=params, opt_state=opt_state), sources


def freeze(state, members: Iterable[int]):
    """Stops the given members: their update gate becomes 0 (parameters frozen). The new state
    keeps the old one's shardings, so the compiled step takes it as it is (no recompile)."""
    gate = np.asarray(hyperparams_of(state.opt_state)[GATE]).copy()
    gate[list(members)] = 0.0
    return with_hyperparams(state, {GATE: gate})


def active(state) -> np.ndarray:
    """Which members still train (their gate is 1)."""
    return np.asarray(hyperparams_of(state.opt_state)[GATE]) > 0


# ----------------------------------------------------------------------------- ensemble metrics


class EnsembleMetrics:
    """Accumulates, over batches of per-member logits [N, ..., C] and integer targets [...], each
    member's and the ensemble's loss and accuracy, the ensemble's expected calibration error
    (15 equal-width confidence bins), its predictive entropy, the members' mean entropy (their
    difference is the mutual information), and the disagreement: the fraction of member
    predictions that differ from the ensemble's. Sums in float64, divided once at the end."""

    def __init__(self):
        self.count = 0.0
        self.sums: dict[str, Any] = {}
        self.bins = None  # [members + 1 (the ensemble last), 3 (count, confidence sum, correct sum), bins]

    def _add(self, name: str, value) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value

    def add(self, logits: np.ndarray, targets: np.ndarray, mask: np.ndarray | None = None) -> None:
        logits = np.asarray(logits, np.float64).reshape(logits.shape[0], -1, logits.shape[-1])
        targets = np.asarray(targets).reshape(-1)
        weight = np.ones(targets.shape) if mask is None else np.asarray(mask, np.float64).reshape(-1)
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))  # [N, T, C]
        probs = np.exp(logp)
        mean = probs.mean(0)  # the ensemble: mean of probabilities
        rows = np.arange(len(targets))
        member_pred, pred = probs.argmax(-1), mean.argmax(-1)
        self.count += weight.sum()
        self._add("member_loss", -(logp[:, rows, targets] * weight).sum(-1))
        self._add("member_accuracy", ((member_pred == targets) * weight).sum(-1))
        self._add("loss", -(np.log(mean[rows, targets] + 1e-30) * weight).sum())
        self._add("accuracy", ((pred == targets) * weight).sum())
        self._add("entropy", (-(mean * np.log(mean + 1e-30)).sum(-1) * weight).sum())
        self._add("member_entropy", (-(probs * logp).sum(-1).mean(0) * weight).sum())
        self._add("disagreement", ((member_pred != pred[None]).mean(0) * weight).sum())
        if self.bins is None:
            self.bins = np.zeros((probs.shape[0] + 1, 3, ECE_BINS))
        for row, p in enumerate([*probs, mean]):
            confidence = p.max(-1)
            which = np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)
            for part, values in enumerate((weight, weight * confidence, weight * (p.argmax(-1) == targets))):
                np.add.at(self.bins[row, part], which, values)

    def result(self) -> dict:
        n = max(self.count, 1.0)
        out = {name: (value / n).tolist() if np.ndim(value) else float(value / n) for name, value in self.sums.items()}
        ece = np.abs(self.bins[:, 1] - self.bins[:, 2]).sum(-1) / n
        out["ece"], out["member_ece"] = float(ece[-1]), ece[:-1].tolist()
        out["mean_member_ece"] = float(np.mean(ece[:-1]))
        out["mutual_information"] = out["entropy"] - out["member_entropy"]
        out["mean_member_accuracy"] = float(np.mean(out["member_accuracy"]))
        out["mean_member_loss"] = float(np.mean(out["member_loss"]))
        return out


def ensemble_metrics(trainer, params, batches: Iterable[dict]) -> dict:
    """:class:`EnsembleMetrics` of a population's ``params`` over evaluation ``batches`` (the
    model's outputs are class or token logits, the batches' ``targets`` their labels)."""
    metrics = EnsembleMetrics()
    for batch in batches:
        logits = jax.device_get(trainer.predict(params, trainer.put_eval({"inputs": batch["inputs"]})["inputs"]))
        metrics.add(logits, batch["targets"], batch.get("mask"))
    return metrics.result()
