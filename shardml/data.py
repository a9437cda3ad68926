"""Embedded data: byte-level text that ships with Python, and deterministic batches from it.

The default corpus is the English documentation of the Python language that CPython ships in
``pydoc_data.topics`` (about 465 kB of prose and examples): real text, no download. The batch of
step ``s`` is a pure function of (seed, s), so every layout sees the same global batch at every
step, and resuming at step ``s`` needs nothing but ``s``.

    corpus = load_corpus("pydoc")
    batch = train_batch(corpus, step=0, batch_size=8, seq_len=64, seed=0)   # numpy, on the host
"""

from __future__ import annotations

import dataclasses

import numpy as np

from shardml.config import ConfigError

CORPORA = ("pydoc",)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Byte tokens (vocabulary 256) split into a training and a held-out validation part."""

    name: str
    train: np.ndarray  # uint8
    val: np.ndarray  # uint8


def corpus_text(name: str) -> bytes:
    if name == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")
    raise ConfigError(f"data.corpus='{name}' is not an embedded corpus; choose one of {', '.join(CORPORA)}")


def load_corpus(name: str = "pydoc", val_fraction: float = 0.05) -> Corpus:
    """Loads an embedded corpus; the last ``val_fraction`` of the bytes is held out."""
    if not 0.0 < val_fraction < 0.5:
        raise ConfigError(f"data.val_fraction={val_fraction} must lie in (0, 0.5)")
    tokens = np.frombuffer(corpus_text(name), dtype=np.uint8)
    cut = int(len(tokens) * (1.0 - val_fraction))
    return Corpus(name, tokens[:cut], tokens[cut:])


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> dict:
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    seqs = tokens[idx].astype(np.int32)
    return {"inputs": seqs[:, :-1], "targets": seqs[:, 1:], "mask": np.ones((len(starts), seq_len), np.float32)}


def train_batch(corpus: Corpus, step: int, batch_size: int, seq_len: int, seed: int = 0) -> dict:
    """The global batch of ``step``: random windows, a pure function of (seed, step)."""
    if len(corpus.train) <= seq_len + 1:
        raise ConfigError(f"data.seq_len={seq_len} is longer than the training text ({len(corpus.train)} bytes)")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(corpus.train) - seq_len - 1, size=batch_size)
    return _windows(corpus.train, starts, seq_len)


def val_batches(corpus: Corpus, batch_size: int, seq_len: int, count: int) -> list[dict]:
    """Fixed validation batches: evenly spaced windows over the held-out text."""
    span = len(corpus.val) - seq_len - 1
    if span <= 0:
        raise ConfigError(f"data.seq_len={seq_len} is longer than the validation text ({len(corpus.val)} bytes)")
    starts = np.linspace(0, span, num=batch_size * count).astype(np.int64)
    return [_windows(corpus.val, starts[i * batch_size:(i + 1) * batch_size], seq_len) for i in range(count)]
