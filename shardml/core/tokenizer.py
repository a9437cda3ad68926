"""A byte-level BPE tokenizer trained on the run's own text with Hugging Face ``tokenizers``.

Byte-level text (one token per UTF-8 byte, vocabulary 256) is the default and needs nothing. A BPE
tokenizer is the option for a larger vocabulary: :func:`train_bpe` learns ``vocab`` tokens from
the training text (byte-level pre-tokenisation, so every string encodes: no unknown token), the
run saves it as ``OUT_DIR/tokenizer.json`` (loadable with ``tokenizers.Tokenizer.from_file``), and
the text is tokenised window by window in the input pipeline's worker processes::

    bpe = train_bpe(text_bytes, vocab=1024)
    bpe.encode_batch([b"hello world"])    # [[...ids...]]
    bpe.save("runs/x/tokenizer.json")

Training is deterministic (the same text and vocabulary give the same tokenizer, whatever the
thread count), so every process of a multi-process run trains the same one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np

from shardml.core.errors import SettingError

_SAMPLE_BYTES = 1 << 16  # text tokenised to measure the bytes per token


def _require():
    try:
        import tokenizers
    except ImportError:
        raise SettingError("a BPE tokenizer needs the tokenizers library: pip install 'shardml[text]'",
                           subject="tokenizer", value="bpe") from None
    return tokenizers


@dataclasses.dataclass(frozen=True)
class BPE:
    """A trained tokenizer as its JSON (picklable: worker processes rebuild it on first use).

    Attributes:
      json: the tokenizer, as ``tokenizers.Tokenizer.to_str()`` writes it.
      vocab: its vocabulary size (ids lie in ``[0, vocab)``).
      bytes_per_token: measured on the training text; sizes the text window read per sequence.
    """

    json: str
    vocab: int
    bytes_per_token: float

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.json.encode()).hexdigest()[:16]

    def _tokenizer(self):
        cached = self.__dict__.get("_cached")
        if cached is None:
            cached = _require().Tokenizer.from_str(self.json)
            object.__setattr__(self, "_cached", cached)
        return cached

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_cached"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def encode_batch(self, texts: list[bytes]) -> list[list[int]]:
        """Token ids of UTF-8 byte strings (a character cut at either end is dropped)."""
        decoded = [t.decode("utf-8", errors="ignore") for t in texts]
        return [e.ids for e in self._tokenizer().encode_batch(decoded, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tokenizer().decode([int(i) for i in ids])

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(self.json)


def train_bpe(text: bytes | np.ndarray, vocab: int) -> BPE:
    """Learns a byte-level BPE vocabulary of ``vocab`` tokens (at least 257: the 256 bytes first).

    Raises:
      SettingError: ``vocab`` too small, or ``tokenizers`` is not installed.
    """
    tokenizers = _require()
    if vocab <= 256:
        raise SettingError(f"vocab={vocab}: a BPE vocabulary starts from the 256 bytes; give more than 256 "
                           "(e.g. vocab=1024), or use the byte-level tokenizer", subject="vocab", value=vocab)
    data = bytes(np.asarray(text, np.uint8)) if not isinstance(text, bytes) else text
    string = data.decode("utf-8", errors="ignore")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    chunk = 1 << 16
    tokenizer.train_from_iterator((string[i:i + chunk] for i in range(0, len(string), chunk)), trainer=trainer)
    sample = string[:_SAMPLE_BYTES]
    ids = tokenizer.encode(sample, add_special_tokens=False).ids
    ratio = len(sample.encode()) / max(len(ids), 1)
    return BPE(tokenizer.to_str(), tokenizer.get_vocab_size(), ratio)


def load_tokenizer(path: str, text: bytes | np.ndarray) -> BPE:
    """A saved ``tokenizer.json`` (e.g. a Hugging Face checkpoint's) as a :class:`BPE`, its bytes
    per token measured on the start of ``text``.

        tok = load_tokenizer("Qwen2.5-0.5B/tokenizer.json", text_bytes)
        tok.vocab    # 151665

    Raises:
      SettingError: ``tokenizers`` is not installed.
    """
    tokenizer = _require().Tokenizer.from_file(path)
    sample = bytes(np.asarray(text[:_SAMPLE_BYTES], np.uint8)).decode("utf-8", errors="ignore")
    ids = tokenizer.encode(sample, add_special_tokens=False).ids
    return BPE(tokenizer.to_str(), tokenizer.get_vocab_size(), len(sample.encode()) / max(len(ids), 1))


def window_bytes(bpe: BPE, seq_len: int) -> tuple[int, int]:
    """(stride, span) in bytes of text windows that tokenise to ``seq_len + 1`` tokens: windows
    start every ``stride`` bytes (about ``seq_len`` tokens apart) and read ``span`` bytes, half as
    much again as needed on average, so that a short window (padded and masked) is rare."""
    stride = max(1, round(bpe.bytes_per_token * seq_len))
    span = math.ceil(1.5 * bpe.bytes_per_token * (seq_len + 1)) + 8
    return stride, span
