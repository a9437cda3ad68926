"""Data sources: host NumPy batches by step, read through grain, and their placement as global arrays.

A *source* gives the loop the global batch of each step (``source.batch(step)``) and describes
itself (``source.fingerprint``) so a resumed run can check it is reading the same stream. Text
sources cut a token stream into windows; array sources deal examples; both in a new seeded order
every epoch (grain's global shuffle). The batch of step ``s`` is a pure function of (seed, s), so
every layout and every split into processes sees the same global batch at every step, and resuming
at step ``s`` needs nothing but ``s``::

    tokens = load_tokens("pydoc")                       # or a text file, a directory, .npy, .bin
    source = TextBatches(tokens, batch_size=32, seq_len=64, seed=0)
    batch = source.batch(0)     # {"inputs": int32 [32, 64], "targets": ..., "mask": f32 [32, 64]}

The built-in sources are two grain stages: ``source.steps()``, a ``grain.MapDataset`` whose element
s holds the ids of step s's examples (cheap), and ``source.load(step, ids, first_row)``, the work
(windowing, tokenisation, augmentation) on any subset of those rows. :mod:`shardml.core.input`
runs the second in worker processes, for this process's rows only.

Any ``step -> batch`` callable, an indexable (``data[step]``) or an iterator plugs into the same
loop through :func:`as_source`; an iterator's position is recorded, and restored when it offers
``get_state`` / ``set_state`` (grain's iterators do).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grain
import numpy as np

from shardml.core.errors import DataError, SettingError
from shardml.core.tokenizer import window_bytes

EMBEDDED = {"pydoc": "the English documentation of the Python language that CPython ships (pydoc_data.topics)",
            "digits": "scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes)"}
TOKEN_FILES = (".npy", ".bin")
_BOOT = 0xB007  # mixed into the seeds of resampled data, so resample k never repeats the plain stream
_NOISE = 0x401E  # mixed into the seeds of input noise


# ----------------------------------------------------------------------------- token streams


@dataclasses.dataclass(frozen=True)
class Tokens:
    """A token stream split into a training part and a held-out part (the last ``val_fraction``)."""

    name: str
    train: np.ndarray
    val: np.ndarray
    vocab: int
    loaded_by: tuple | None = None  # load_tokens' arguments, for a memory-mapped token file

    def __reduce__(self):
        # A memory-mapped token file travels to worker processes as its path, not its contents.
        if self.loaded_by is not None and isinstance(self.train, np.memmap):
            return (_reload_tokens, self.loaded_by)
        return super().__reduce__()


def _reload_tokens(*args) -> Tokens:
    return load_tokens(*args)


def _pydoc_bytes() -> bytes:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def _text_bytes(path: pathlib.Path) -> bytes:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise DataError(f"corpus={str(path)!r} is a directory with no files; give UTF-8 text files",
                        subject="corpus", value=str(path))
    parts = []
    for file in files:
        data = file.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"corpus: {file} is not UTF-8 text ({err.reason} at byte {err.start}); byte-level "
                            "text must be UTF-8, and token ids go in a .npy or .bin file",
                            subject="corpus", value=str(path)) from None
        parts.append(data)
    return b"\n\n".join(parts)


def _token_file(path: pathlib.Path, token_dtype: str) -> np.ndarray:
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
    else:
        try:
            tokens = np.memmap(path, dtype=np.dtype(token_dtype), mode="r")
        except TypeError:
            raise SettingError(f"token_dtype={token_dtype!r} is not a NumPy integer type (e.g. uint16)",
                               subject="token_dtype", value=token_dtype) from None
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"corpus={str(path)!r} holds {tokens.dtype} of shape {tokens.shape}; a token file is "
                        "a flat array of integer token ids", subject="corpus", value=str(path))
    return tokens


def load_tokens(corpus: str = "pydoc", val_fraction: float = 0.05, vocab: int = 0,
                token_dtype: str = "uint16") -> Tokens:
    """A token stream: an embedded corpus, a UTF-8 text file or a directory of them (byte-level,
    vocabulary 256), or a ``.npy`` / raw ``.bin`` file of token ids (memory-mapped; ``vocab`` is
    given, or read as the largest id + 1).

    Raises:
      SettingError: ``val_fraction`` outside (0, 0.5).
      DataError: an unknown name, a missing or unreadable file, ids outside ``vocab``.
    """
    if not 0.0 < val_fraction < 0.5:
        raise SettingError(f"val_fraction={val_fraction} must lie in (0, 0.5)", subject="val_fraction",
                           value=val_fraction)
    path = pathlib.Path(corpus).expanduser()
    if corpus == "pydoc":
        tokens, known_vocab = np.frombuffer(_pydoc_bytes(), dtype=np.uint8), 256
    elif path.suffix in TOKEN_FILES and path.is_file():
        tokens = _token_file(path, token_dtype)
        known_vocab = int(tokens.max()) + 1 if len(tokens) else 0
        if vocab and known_vocab > vocab:
            raise DataError(f"corpus={corpus!r} holds token id {known_vocab - 1}, outside vocab={vocab}; "
                            f"use vocab={known_vocab} or more", subject="vocab", value=vocab)
    elif path.exists():
        tokens, known_vocab = np.frombuffer(_text_bytes(path), dtype=np.uint8), 256
    else:
        raise DataError(f"corpus={corpus!r} is neither an embedded corpus ({', '.join(EMBEDDED)}) nor an "
                        "existing file or directory; give a UTF-8 text file, a directory of them, or a .npy / "
                        ".bin file of token ids", subject="corpus", value=corpus)
    cut = int(len(tokens) * (1.0 - val_fraction))
    loaded_by = (corpus, val_fraction, vocab, token_dtype) if isinstance(tokens, np.memmap) else None
    return Tokens(corpus, tokens[:cut], tokens[cut:], max(vocab, known_vocab), loaded_by)


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> dict:
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    seqs = np.asarray(tokens[idx]).astype(np.int32)
    return {"inputs": seqs[:, :-1], "targets": seqs[:, 1:], "mask": np.ones((len(starts), seq_len), np.float32)}


def _padded(ids: list[list[int]], seq_len: int) -> dict:
    """Token id lists cut (or zero-padded) to ``seq_len + 1``; the mask marks the real targets."""
    seqs = np.zeros((len(ids), seq_len + 1), np.int32)
    mask = np.zeros((len(ids), seq_len), np.float32)
    for row, one in enumerate(ids):
        one = one[:seq_len + 1]
        seqs[row, :len(one)] = one
        mask[row, :max(len(one) - 1, 0)] = 1.0
    return {"inputs": seqs[:, :-1], "targets": seqs[:, 1:], "mask": mask}


@dataclasses.dataclass(frozen=True)
class _Pick:
    """A grain map: position -> ``indices[position]`` (a bootstrap resample's draws)."""

    indices: np.ndarray

    def __call__(self, position):
        return int(self.indices[position])


def _example_order(count: int, batch_size: int, seed: int, resample: int) -> grain.MapDataset:
    """Element s: the ids of step s's examples, ``[batch_size]`` int64. Positions
    ``[s·B, (s+1)·B)`` of the concatenated epochs, each epoch a new seeded permutation (grain's
    global shuffle, reseeded every epoch); ``resample`` k >= 0 deals from the k-th bootstrap
    resample (``count`` draws with replacement) instead."""
    order = grain.MapDataset.range(count)
    if resample >= 0:
        draws = np.random.default_rng([seed, _BOOT, resample]).integers(0, count, count)
        order = order.map(_Pick(draws))
    return order.shuffle(seed=seed).repeat().batch(batch_size)


class _Order:
    """Caches a source's example order (a grain MapDataset) outside the dataclass fields."""

    def steps(self) -> grain.MapDataset:
        """A grain MapDataset whose element s holds the ids of the examples of step s: cheap to
        compute; :meth:`load` does the work (windowing, tokenisation, augmentation)."""
        cached = self.__dict__.get("_steps")
        if cached is None:
            cached = self._order()
            object.__setattr__(self, "_steps", cached)
        return cached

    def batch(self, step: int) -> dict:
        """The global batch of ``step``, a pure function of (seed, step[, resample])."""
        return self.load(step, self.steps()[step], 0)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_steps"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


@dataclasses.dataclass(frozen=True)
class TextBatches(_Order):
    """Windows of ``seq_len + 1`` tokens: next-token inputs, targets and a mask.

    The training tokens are cut into windows that start every ``seq_len`` tokens (so each token is
    a target once per epoch), dealt in a new seeded order every epoch by grain's global shuffle.
    With a ``tokenizer`` (:class:`shardml.core.tokenizer.BPE`), ``tokens`` holds UTF-8 bytes and
    each window is a span of text tokenised when it is loaded (in the input pipeline's workers).

    Example:
      >>> source = TextBatches(load_tokens("pydoc"), batch_size=8, seq_len=64)
      >>> source.batch(3)["inputs"].shape
      (8, 64)
    """

    tokens: Tokens
    batch_size: int
    seq_len: int
    seed: int = 0
    resample: int = -1  # k >= 0: the k-th bootstrap resample of the windows
    tokenizer: Any = None  # None: the tokens are the ids (bytes or a token file); a BPE: they are text

    def __post_init__(self):
        for part, stream in (("training", self.tokens.train), ("validation", self.tokens.val)):
            if len(stream) <= self._span():
                need = f"{self._span()} bytes of text" if self.tokenizer is not None else f"{self.seq_len + 1} tokens"
                raise DataError(f"seq_len={self.seq_len} is longer than the {part} text of "
                                f"{self.tokens.name!r} ({len(stream)} {'bytes' if self.tokenizer else 'tokens'}; "
                                f"a window needs {need}); use a shorter sequence", subject="seq_len",
                                value=self.seq_len)

    def _span(self) -> int:
        return self.seq_len + 1 if self.tokenizer is None else window_bytes(self.tokenizer, self.seq_len)[1]

    def _stride(self) -> int:
        return self.seq_len if self.tokenizer is None else window_bytes(self.tokenizer, self.seq_len)[0]

    @property
    def windows(self) -> int:
        """Training windows per epoch."""
        return (len(self.tokens.train) - self._span()) // self._stride() + 1

    @property
    def fingerprint(self) -> dict:
        tokenizer = "bytes" if self.tokenizer is None else f"bpe-{self.tokenizer.vocab}-{self.tokenizer.sha}"
        return {"kind": "text", "corpus": self.tokens.name, "train_tokens": len(self.tokens.train),
                "batch_size": self.batch_size, "seq_len": self.seq_len, "seed": self.seed, "resample": self.resample,
                "order": "shuffled-windows", "tokenizer": tokenizer}

    def _order(self) -> grain.MapDataset:
        return _example_order(self.windows, self.batch_size, self.seed, self.resample)

    def _read(self, stream: np.ndarray, starts: np.ndarray) -> dict:
        if self.tokenizer is None:
            return _windows(stream, starts, self.seq_len)
        span = self._span()
        texts = [bytes(np.asarray(stream[s:s + span])) for s in starts]
        return _padded(self.tokenizer.encode_batch(texts), self.seq_len)

    def load(self, step: int, ids: np.ndarray, first_row: int = 0) -> dict:
        """The rows of windows ``ids`` (cut, and tokenised with a tokenizer)."""
        return self._read(self.tokens.train, np.asarray(ids, np.int64) * self._stride())

    def eval_batches(self, count: int) -> list[dict]:
        """``count`` fixed validation batches: evenly spaced windows over the held-out tokens."""
        span = len(self.tokens.val) - self._span()
        starts = np.linspace(0, span, num=self.batch_size * count).astype(np.int64)
        return [self._read(self.tokens.val, starts[i * self.batch_size:(i + 1) * self.batch_size])
                for i in range(count)]


# ----------------------------------------------------------------------------- arrays


@dataclasses.dataclass(frozen=True)
class Examples:
    """A labelled dataset split into training and held-out arrays."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    classes: int

    @property
    def features(self) -> int:
        return int(np.prod(self.x_train.shape[1:]))


def split_examples(name: str, x: np.ndarray, y: np.ndarray, val_fraction: float = 0.2, seed: int = 0) -> Examples:
    """Shuffles (seeded) and holds out the last ``val_fraction`` of the examples."""
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(len(x) * (1.0 - val_fraction))
    x, y = np.asarray(x, np.float32)[order], np.asarray(y, np.int32)[order]
    return Examples(name, x[:cut], y[:cut], x[cut:], y[cut:], int(y.max()) + 1)


def load_digits(val_fraction: float = 0.2) -> Examples:
    """scikit-learn's digits: 8x8 images scaled to [0, 1] as 64 features, 10 classes."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise DataError("corpus='digits' needs scikit-learn: pip install 'shardml[examples]'", subject="corpus",
                        value="digits") from None
    digits = sklearn_digits()
    return split_examples("digits", digits.data / 16.0, digits.target, val_fraction)


def _pad_rows(batch: dict, rows: int) -> dict:
    """Pads every leaf to ``rows`` rows with zeros; ``mask`` marks the real ones."""
    have = len(batch["targets"])
    mask = np.zeros(rows, np.float32)
    mask[:have] = 1.0
    padded = {k: np.concatenate([v, np.zeros((rows - have, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
    return {**padded, "mask": mask}


@dataclasses.dataclass(frozen=True)
class ArrayBatches(_Order):
    """Batches of examples, a new seeded permutation every epoch (grain's global shuffle): the
    batch of step ``s`` holds positions ``[s·B, (s+1)·B)`` of the concatenated epochs, a pure
    function of (seed, s).

    ``resample`` k >= 0 replaces the training set by its k-th bootstrap resample (n examples drawn
    with replacement, seeded by (seed, k)): what member k of a bagged ensemble trains on.
    ``noise`` > 0 augments the inputs with Gaussian noise of that standard deviation, drawn for
    each (seed, step, row of the global batch), so every layout and process split sees the same.
    """

    examples: Examples
    batch_size: int
    seed: int = 0
    resample: int = -1
    noise: float = 0.0

    def __post_init__(self):
        if self.batch_size > len(self.examples.x_train):
            raise DataError(f"batch_size={self.batch_size} exceeds the {len(self.examples.x_train)} training "
                            f"examples of {self.examples.name!r}", subject="batch_size", value=self.batch_size)

    @property
    def fingerprint(self) -> dict:
        return {"kind": "arrays", "dataset": self.examples.name, "train_examples": len(self.examples.x_train),
                "batch_size": self.batch_size, "seed": self.seed, "resample": self.resample,
                "order": "grain-shuffle", "noise": self.noise}

    def _order(self) -> grain.MapDataset:
        return _example_order(len(self.examples.x_train), self.batch_size, self.seed, self.resample)

    def load(self, step: int, ids: np.ndarray, first_row: int = 0) -> dict:
        """Rows ``ids`` of the training arrays (``first_row``: the row of the global batch the
        first of them fills, which seeds its noise)."""
        ids = np.asarray(ids, np.int64)
        inputs = self.examples.x_train[ids]
        if self.noise:
            noise = np.stack([np.random.default_rng([self.seed, step, first_row + row, _NOISE]).standard_normal(
                inputs.shape[1:]) for row in range(len(ids))]) if len(ids) else np.zeros_like(inputs)
            inputs = (inputs + self.noise * noise).astype(inputs.dtype)
        return {"inputs": inputs, "targets": self.examples.y_train[ids], "mask": np.ones(len(ids), np.float32)}

    def eval_batches(self, count: int = 0) -> list[dict]:
        """The whole held-out set (or its first ``count`` batches) in batches of ``batch_size``,
        the last one padded with masked rows, so the figure is exactly the full-set mean."""
        x, y, b = self.examples.x_val, self.examples.y_val, self.batch_size
        batches = [_pad_rows({"inputs": x[i:i + b], "targets": y[i:i + b]}, b) for i in range(0, len(x), b)]
        return batches[:count] if count else batches


# ----------------------------------------------------------------------------- any source


class IteratorSource:
    """An iterator of batches as a source: read in order, its position recorded.

    ``state()`` is what a checkpoint keeps: the number of batches read, and the iterator's own
    ``get_state()`` when it has one; :meth:`restore` puts an iterator with ``set_state`` back
    there, and refuses (rather than repeat or skip batches) one that cannot be put back.
    """

    fingerprint = None

    def __init__(self, iterable: Iterable):
        self._iterator: Iterator = iter(iterable)
        self.position = 0

    def batch(self, step: int) -> dict:
        if step != self.position:
            raise RuntimeError(f"an iterator source is read in order: asked for step {step} at position {self.position}")
        self.position += 1
        return next(self._iterator)

    def state(self) -> dict:
        get_state = getattr(self._iterator, "get_state", None)
        return {"position": self.position, "iterator": get_state() if callable(get_state) else None}

    def restore(self, state: dict) -> None:
        position = int(state.get("position", 0))
        set_state = getattr(self._iterator, "set_state", None)
        if state.get("iterator") is not None and callable(set_state):
            set_state(state["iterator"])
        elif position:
            raise DataError(
                f"cannot resume at batch {position}: the data is a plain iterator, whose position cannot be restored "
                "without repeating or skipping batches. Pass an indexable source (step -> batch), an iterator with "
                "get_state/set_state (e.g. a grain DatasetIterator), or start over (resume='never' / --fresh)")
        self.position = position


@dataclasses.dataclass(frozen=True)
class MemberBatches:
    """One source per population member, read together: the batch of step s is every member's batch
    of step s stacked on a leading member axis (bootstrap ensembles, federated clients)."""

    sources: tuple

    @property
    def fingerprint(self) -> dict:
        return {"kind": "members", "members": [getattr(s, "fingerprint", None) for s in self.sources]}

    def batch(self, step: int) -> dict:
        batches = [source.batch(step) for source in self.sources]
        return {key: np.stack([b[key] for b in batches]) for key in batches[0]}

    def eval_batches(self, count: int = 0) -> list[dict]:
        """The first member's evaluation batches: every member is evaluated on the same data."""
        return self.sources[0].eval_batches(count)


@dataclasses.dataclass(frozen=True)
class FunctionSource:
    """``fn(step) -> batch`` (or ``data[step]``) as a source."""

    fn: Callable[[int], dict]
    fingerprint: dict | None = None

    def batch(self, step: int) -> dict:
        return self.fn(step)


def as_source(data: Any) -> Any:
    """A source with ``batch(step)`` from a source, a ``step -> batch`` callable, an indexable of
    batches (``data[step]``; a sequence is read round and round) or an iterator."""
    if hasattr(data, "batch") and callable(data.batch):
        return data
    if callable(data):
        return FunctionSource(data)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (dict, str, bytes)):
        return FunctionSource(lambda step: data[step % len(data)])
    if isinstance(data, (Iterator, Iterable)) and not isinstance(data, (dict, str, bytes)):
        return IteratorSource(data)
    raise TypeError(f"cannot read batches from {type(data).__name__}; pass a step -> batch function, a sequence of "
                    "batches, an iterator of batches, or a source such as shardml.TextBatches")


def put_batch(batch: dict, sharding) -> dict:
    """A whole host numpy batch -> global arrays sharded over the batch axes.

    On several processes every process passes the whole global batch and each places the rows of
    its own devices (``jax.make_array_from_callback``); :class:`shardml.core.input.Feeder` reads
    only those rows in the first place when the source can (``steps`` / ``load``).
    """
    import jax

    if jax.process_count() == 1:
        return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)
    # Every process holds the whole global batch here; each places only its own devices' rows.
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda index: np.asarray(x)[index]),
                        batch)


def is_token_file(corpus: str) -> bool:
    return os.path.splitext(corpus)[1] in TOKEN_FILES
