"""Client data for federated learning: partitions of one dataset (IID, Dirichlet non-IID, a natural
split by a field), a per-client label report, and the batches of each round.

A partition is a list of index arrays, one per client. :class:`ClientBatches` holds the clients'
datasets (from a partition, or a user's own list of per-client arrays) and deals each round's
batch: the sampled cohort's ``local_steps`` batches stacked on a leading client-slot axis, padded
rows masked and every slot weighted by its client's real example count::

    parts = dirichlet(y, clients=64, alpha=0.3, seed=0)
    print(format_label_report(label_counts(parts, y, classes=10)))
    data = ClientBatches.from_arrays(x, y, parts, batch_size=16, local_steps=8, cohort=16)
    data.batch(0)["inputs"].shape       # (16, 8, 16, 64): [slot, local step, row, feature]
    data.batch(0)["weight"]             # each slot's client's example count (0: an empty slot)

The batches of client k in round t are a pure function of (seed, k, t): a seeded permutation of
its examples per epoch, ``min(batch_size, n_k)`` of them per local step, so a client smaller than
the batch trains on all of its examples with the rest of the rows masked. The same function serves
the simulation and the Flower clients (:mod:`shardml.parallel.flower`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from shardml.core.errors import DataError, SettingError

PARTITIONS = ("iid", "dirichlet", "natural")
_SAMPLE = 0xC0 << 8  # mixed into the seed of each round's cohort draw
_ORDER = 0xDA7A  # mixed into the seed of each client's example order


# ----------------------------------------------------------------------------- partitions


def iid(examples: int, clients: int, seed: int = 0, min_size: int = 1) -> list[np.ndarray]:
    """A seeded shuffle cut into ``clients`` parts of (nearly) equal size.

    Raises:
      DataError: too few examples for ``min_size`` per client.
    """
    _check_clients(examples, clients, min_size)
    order = np.random.default_rng([seed, _ORDER]).permutation(examples)
    return [np.sort(part) for part in np.array_split(order, clients)]


def dirichlet(labels: np.ndarray, clients: int, alpha: float, seed: int = 0, min_size: int = 1,
              max_tries: int = 1000) -> list[np.ndarray]:
    """Per-label Dirichlet split (Yurochkin et al. 2019; flwr-datasets' ``DirichletPartitioner``):
    for every class c, ``p_c ~ Dir(alpha · 1_K)`` and class c's examples are dealt to the K clients
    in proportions ``p_c``. Small ``alpha`` (0.1) gives clients few classes; large (100) is near
    IID. The draw is repeated (seeded) until every client holds at least ``min_size`` examples.

    Raises:
      DataError: no draw in ``max_tries`` gave every client ``min_size`` examples.
    """
    labels = np.asarray(labels)
    _check_clients(len(labels), clients, min_size)
    if alpha <= 0:
        raise SettingError(f"alpha={alpha} must be > 0", subject="alpha", value=alpha)
    rng = np.random.default_rng([seed, _ORDER, 1])
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for k, chunk in enumerate(np.split(members, cuts)):
                parts[k].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise DataError(f"a Dirichlet split of {len(labels)} examples over clients={clients} with alpha={alpha} gave "
                    f"some client fewer than min_size={min_size} examples in {max_tries} draws; "
                    f"lower min_size={min_size}, raise alpha={alpha} or use fewer clients", subject="min_size",
                    value=min_size)


def natural(values: np.ndarray, clients: int | None = None) -> list[np.ndarray]:
    """A split by a field of the data (a writer, a device, an island, a document): the examples of
    each distinct value go to one client, values in sorted order; with ``clients`` fewer than the
    values, consecutive values are grouped (the same number of values per client, ±1).

    Raises:
      DataError: more clients than distinct values.
    """
    values = np.asarray(values)
    distinct = np.unique(values)
    clients = len(distinct) if clients is None else clients
    if clients > len(distinct):
        raise DataError(f"a natural split has one client per distinct value of its field, and this data has "
                        f"{len(distinct)} values for clients={clients}; use at most {len(distinct)} "
                        "clients", subject="clients", value=clients)
    groups = np.array_split(distinct, clients)
    return [np.flatnonzero(np.isin(values, group)) for group in groups]


def partition(kind: str, labels: np.ndarray, clients: int, *, alpha: float = 0.5, seed: int = 0,
              min_size: int = 1, field: np.ndarray | None = None) -> list[np.ndarray]:
    """:func:`iid`, :func:`dirichlet` (over ``labels``) or :func:`natural` (over ``field``, default
    ``labels``) by name."""
    if kind == "iid":
        return iid(len(labels), clients, seed, min_size)
    if kind == "dirichlet":
        return dirichlet(labels, clients, alpha, seed, min_size)
    if kind == "natural":
        return natural(labels if field is None else field, clients)
    raise SettingError(f"partition={kind!r} is not one of {', '.join(PARTITIONS)}", subject="partition", value=kind)


def _check_clients(examples: int, clients: int, min_size: int) -> None:
    if clients < 1:
        raise SettingError(f"clients={clients} must be >= 1", subject="clients", value=clients)
    if examples < clients * min_size:
        raise DataError(f"{examples} examples cannot give each of {clients} clients {min_size} example(s); lower "
                        f"clients={clients} or min_size={min_size}", subject="clients", value=clients)


# ----------------------------------------------------------------------------- reports


def label_counts(parts: Sequence[np.ndarray], labels: np.ndarray, classes: int) -> np.ndarray:
    """[clients, classes] example counts."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=classes) for p in parts]).astype(np.int64)


def label_report(counts: np.ndarray) -> dict:
    """Sizes and label skew of a partition: per client its size, classes present and the effective
    number of classes (exp of the label entropy); the same summarised over clients."""
    counts = np.asarray(counts, np.float64)
    sizes = counts.sum(axis=1)
    share = counts / np.maximum(sizes[:, None], 1.0)
    entropy = -np.sum(np.where(share > 0, share * np.log(np.where(share > 0, share, 1.0)), 0.0), axis=1)
    effective = np.exp(entropy)
    present = (counts > 0).sum(axis=1)
    return {
        "clients": int(len(counts)), "examples": int(sizes.sum()),
        "size": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())},
        "classes_present": {"min": int(present.min()), "mean": float(present.mean()), "max": int(present.max())},
        "effective_classes": {"min": float(effective.min()), "mean": float(effective.mean())},
        "per_client": [{"client": k, "examples": int(sizes[k]), "labels": counts[k].astype(int).tolist()}
                       for k in range(len(counts))],
    }


def format_label_report(counts: np.ndarray, show: int = 8) -> str:
    """A few lines: the summary, then the label counts of the first ``show`` clients."""
    r = label_report(counts)
    lines = [f"clients: {r['clients']}, examples {r['examples']:,}; per client {r['size']['min']}-{r['size']['max']} "
             f"(median {r['size']['median']:g}); classes present {r['classes_present']['min']}-"
             f"{r['classes_present']['max']} (mean {r['classes_present']['mean']:.1f}), effective classes "
             f"mean {r['effective_classes']['mean']:.2f}"]
    for row in r["per_client"][:show]:
        lines.append(f"  client {row['client']:>4}: {row['examples']:>6} examples, labels {row['labels']}")
    if r["clients"] > show:
        lines.append(f"  ... {r['clients'] - show} more clients")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- round batches


def cohort_size(clients: int, fraction: float) -> int:
    """Clients per round: ``round(fraction · clients)``, at least 1."""
    if not 0.0 < fraction <= 1.0:
        raise SettingError(f"fraction={fraction} must lie in (0, 1]", subject="fraction", value=fraction)
    return max(1, min(clients, int(round(fraction * clients))))


def slots_for(cohort: int, groups: int) -> int:
    """Client slots of a round: the cohort rounded up to a multiple of the ``members`` mesh axis
    (every device group holds the same number; the extra slots are empty, weight 0)."""
    return math.ceil(cohort / groups) * groups


def sample_cohort(seed: int, round_: int, clients: int, cohort: int) -> np.ndarray:
    """The sorted ids of round ``round_``'s clients: ``cohort`` of ``clients`` drawn without
    replacement, a pure function of (seed, round); everyone when the cohort is all."""
    if cohort >= clients:
        return np.arange(clients)
    rng = np.random.default_rng([seed, _SAMPLE, round_])
    return np.sort(rng.choice(clients, size=cohort, replace=False))


@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class ClientBatches:
    """Every client's dataset and the batches of each round (see the module docstring).

    Attributes:
      clients: one dict per client of arrays with the examples on axis 0 (``inputs``,
        ``targets``; a language model's are token windows [n_k, seq_len]).
      batch_size: rows per local step.
      local_steps: H, local steps per round.
      cohort: clients per round (sampled per round when fewer than all).
      slots: client slots of the compiled round (>= cohort; the trainer's ``slots``).
      held_out: a source whose ``eval_batches(count)`` evaluates the global model (optional).
    """

    clients: tuple
    batch_size: int
    local_steps: int
    cohort: int = 0
    slots: int = 0
    seed: int = 0
    held_out: Any = None
    name: str = "clients"
    counts: Any = dataclasses.field(default=None, compare=False)  # [clients, labels], for reports

    def __post_init__(self):
        if not self.clients:
            raise DataError("federated data needs at least one client", subject="clients")
        object.__setattr__(self, "cohort", self.cohort or len(self.clients))
        object.__setattr__(self, "slots", max(self.slots, self.cohort))
        if self.cohort > len(self.clients):
            raise SettingError(f"a cohort of {self.cohort} clients from {len(self.clients)}: the cohort is at most "
                               "the number of clients", subject="cohort", value=self.cohort)
        for k, data in enumerate(self.clients):
            if "inputs" not in data or "targets" not in data:
                raise DataError(f"client {k}'s dataset needs 'inputs' and 'targets' arrays (examples on axis 0)")
            if len(data["inputs"]) != len(data["targets"]) or len(data["targets"]) == 0:
                raise DataError(f"client {k} has {len(data['inputs'])} inputs and {len(data['targets'])} targets; "
                                  "give each client at least one example, as many inputs as targets")

    @classmethod
    def from_arrays(cls, x: np.ndarray, y: np.ndarray, parts: Sequence[np.ndarray], **kwargs: Any) -> ClientBatches:
        """Clients from one dataset and a partition (a list of index arrays)."""
        return cls(tuple({"inputs": np.asarray(x)[p], "targets": np.asarray(y)[p]} for p in parts), **kwargs)

    @property
    def sizes(self) -> np.ndarray:
        """Each client's example count n_k (its weight in the aggregation)."""
        return np.array([len(c["targets"]) for c in self.clients], np.int64)

    @property
    def fingerprint(self) -> dict:
        return {"kind": "federated", "data": self.name, "clients": len(self.clients),
                "examples": int(self.sizes.sum()), "batch_size": self.batch_size, "local_steps": self.local_steps,
                "cohort": self.cohort, "slots": self.slots, "seed": self.seed}

    def cohort_of(self, round_: int) -> np.ndarray:
        return sample_cohort(self.seed, round_, len(self.clients), self.cohort)

    def client_batches(self, client: int, round_: int) -> dict:
        """Client ``client``'s ``local_steps`` batches of round ``round_``: leaves [H, batch_size, ...]
        and ``mask`` [H, batch_size(, seq)] (1 on real rows)."""
        data = self.clients[client]
        n, b, h = len(data["targets"]), self.batch_size, self.local_steps
        rows = min(b, n)
        positions = (round_ * h) * rows + np.arange(h * rows)
        epochs = positions // n
        order = {e: np.random.default_rng([self.seed, _ORDER, client, e]).permutation(n) for e in np.unique(epochs)}
        index = np.array([order[e][p % n] for e, p in zip(epochs, positions)]).reshape(h, rows)
        out = {}
        for key, value in data.items():
            picked = np.asarray(value)[index]
            pad = np.zeros((h, b - rows, *picked.shape[2:]), picked.dtype)
            out[key] = np.concatenate([picked, pad], axis=1)
        targets = out["targets"]
        mask = np.zeros(targets.shape, np.float32)
        mask[:, :rows] = 1.0
        out["mask"] = mask
        return out

    def empty_batches(self) -> dict:
        """An empty slot's batches: zeros, every row masked."""
        one = self.client_batches(0, 0)
        return {k: np.zeros_like(v) for k, v in one.items()}

    def batch(self, round_: int) -> dict:
        """Round ``round_``: every slot's batches [slots, H, batch_size, ...], ``mask``, ``weight``
        [slots] (the client's example count; 0 for an empty slot) and ``client`` [slots] (its id, -1)."""
        ids = self.cohort_of(round_)
        per_slot = [self.client_batches(int(k), round_) for k in ids]
        per_slot += [self.empty_batches()] * (self.slots - len(ids))
        out = {key: np.stack([s[key] for s in per_slot]) for key in per_slot[0]}
        sizes = self.sizes
        out["weight"] = np.concatenate([sizes[ids], np.zeros(self.slots - len(ids))]).astype(np.float32)
        out["client"] = np.concatenate([ids, -np.ones(self.slots - len(ids))]).astype(np.int32)
        return out

    def eval_batches(self, count: int = 0) -> list[dict]:
        """The held-out batches the global model is evaluated on (none without ``held_out``)."""
        return [] if self.held_out is None else self.held_out.eval_batches(count)


def text_examples(tokens: np.ndarray, seq_len: int) -> dict:
    """A token stream as examples: consecutive windows of ``seq_len + 1`` tokens (overlapping by
    one), ``inputs`` [n, seq_len] and next-token ``targets``."""
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise DataError(f"seq_len={seq_len} is longer than the text ({len(tokens)} tokens)", subject="seq_len",
                        value=seq_len)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    windows = np.asarray(tokens[idx]).astype(np.int32)
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}
