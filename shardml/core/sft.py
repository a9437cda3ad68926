"""Supervised fine-tuning data: prompt/completion or chat JSONL, tokenized with a loss mask on the
completion only, each example padded alone or several packed into one row.

A line is ``{"prompt": ..., "completion": ...}`` or ``{"messages": [{"role": ..., "content": ...}, ...]}``,
the latter rendered with the checkpoint's chat template (``tokenizer_config.json``'s
``chat_template``, a Jinja template, see :func:`chat_template_of`). The loss counts only the
completion's tokens (every assistant message's, the template's own markers around them included),
and the step divides by their number: the loss is the mean over the completion tokens of the
whole global batch, not a mean of per-example means.

    examples = read_sft("train.jsonl", tokenizer, seq_len=512, truncate=True)
    examples.truncated                           # how many lines were cut to seq_len + 1 tokens
    rows = pack_examples(examples, seq_len=512)  # inputs: {"tokens", "segments", "positions"}
    source = SFTBatches(rows, batch_size=8)

Packed rows hold several examples one after another; ``segments`` numbers them 1, 2, ... (0 is
padding) and ``positions`` restart at 0 in each, so the transformer's attention keeps every token
within its own example (:func:`shardml.models.transformer_layers.attention`) and the packed loss
and gradients equal those of the same examples padded alone (:func:`pad_examples`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
from typing import Any

import grain
import numpy as np

from shardml.core.data import _example_order, _Order
from shardml.core.errors import DataError


@dataclasses.dataclass(frozen=True)
class SFTExamples:
    """Tokenized examples: ``tokens[i]`` int32 [n_i] and ``completion[i]`` bool [n_i] (True on the
    tokens the loss counts), ``truncated`` how many were cut to ``seq_len + 1`` tokens."""

    tokens: tuple[np.ndarray, ...]
    completion: tuple[np.ndarray, ...]
    truncated: int = 0
    source: str = ""

    def __len__(self) -> int:
        return len(self.tokens)


def _jinja():
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise DataError("chat data needs jinja2 to render the chat template: pip install 'shardml[hf]'",
                        subject="chat_template") from None

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)  # Llama 3.2's templates
    return env, jinja2.TemplateError


def _token_text(token: Any) -> str:
    return token.get("content", "") if isinstance(token, dict) else (token or "")


def chat_template_of(directory: str) -> tuple[str | None, dict]:
    """``(chat_template or None, {"bos_token": ..., "eos_token": ...})`` from a checkpoint directory's
    ``tokenizer_config.json`` (a list of named templates gives the one named ``default``)."""
    path = pathlib.Path(directory) / "tokenizer_config.json"
    if not path.is_file():
        return None, {}
    config = json.loads(path.read_text())
    template = config.get("chat_template")
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    return template, {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}


def _chat_pieces(messages: list, render) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_completion) pieces: each assistant message is
    what rendering it adds after the prompt that asks for it (``add_generation_prompt``)."""
    whole = render(messages, False)
    pieces, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, through = render(messages[:i], True), render(messages[:i + 1], False)
        if not (through.startswith(prompt) and whole.startswith(through) and len(prompt) >= cursor):
            raise ValueError("the chat template does not render the conversation as a prefix of itself, so the "
                             "assistant's tokens cannot be told apart")
        pieces += [(whole[cursor:len(prompt)], False), (through[len(prompt):], True)]
        cursor = len(through)
    return pieces + [(whole[cursor:], False)]


def _pieces(record: Any, render) -> list[tuple[str, bool]]:
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return [(record["prompt"], False), (record["completion"], True)]
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        messages = record["messages"]
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                   for m in messages):
            raise ValueError('every message must be {"role": str, "content": str}')
        if render is None:
            raise LookupError("chat data needs the checkpoint's chat template and none was given")
        return _chat_pieces(messages, render)
    raise ValueError('expected {"prompt": str, "completion": str} or {"messages": [{"role", "content"}, ...]}')


def _renderer(chat_template: str | None, special_tokens: dict | None):
    if chat_template is None:
        return None
    env, template_error = _jinja()
    template = env.from_string(chat_template)

    def render(messages, generation):
        try:
            return template.render(messages=messages, add_generation_prompt=generation, **(special_tokens or {}))
        except template_error as e:  # the template's own raise_exception, or a variable it lacks
            raise ValueError(f"the chat template refused it: {e}") from None

    return render


def _encode(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray]:
    """Each piece tokenized alone (no special tokens added: the template writes its own), so the
    completion's tokens are exactly its pieces' tokens."""
    ids, flags = [], []
    for text, is_completion in pieces:
        if text:
            piece = tokenizer.encode(text, add_special_tokens=False).ids
            ids += piece
            flags += [is_completion] * len(piece)
    return np.asarray(ids, np.int32), np.asarray(flags, bool)


def _example(line: str, where: str, tokenizer, render, seq_len: int, truncate: bool):
    """One line's (tokens, completion flags, was it cut); errors name ``where`` (file:line)."""
    try:
        tokens, flags = _encode(tokenizer, _pieces(json.loads(line), render))
    except LookupError as e:
        raise DataError(f"{where}: {e}; pass chat_template= (the checkpoint's tokenizer_config.json has it: "
                        "shardml.core.sft.chat_template_of)", subject="chat_template", value=None) from None
    except (ValueError, TypeError, KeyError) as e:  # json.JSONDecodeError is a ValueError
        raise DataError(f"{where}: malformed SFT example: {e}", subject="data", value=where) from None
    if not flags[1:].any():  # the first token is never a target
        raise DataError(f"{where}: the example has no completion tokens to learn (an empty completion, or no "
                        "assistant message after the first token)", subject="data", value=where)
    if len(tokens) > seq_len + 1:
        if not truncate:
            raise DataError(f"{where}: {len(tokens)} tokens, more than seq_len + 1 = {seq_len + 1}; raise seq_len, "
                            "shorten the example, or pass truncate=True to cut it", subject="truncate", value=False)
        return tokens[:seq_len + 1], flags[:seq_len + 1], True
    return tokens, flags, False


def read_sft(path: str, tokenizer, seq_len: int, *, truncate: bool = False, chat_template: str | None = None,
             special_tokens: dict | None = None) -> SFTExamples:
    """The examples of a JSONL file (blank lines skipped), tokenized by ``tokenizer`` (a
    ``tokenizers.Tokenizer``). An example of more than ``seq_len + 1`` tokens (``seq_len`` input and
    target pairs) is an error, or with ``truncate`` cut to that and counted.

    Raises:
      DataError: a missing file; a malformed line, chat data without ``chat_template``, an example
        with no completion token or too long (each naming the file and line); no completion token
        left in the whole file after truncation.
    """
    file = pathlib.Path(path)
    if not file.is_file():
        raise DataError(f"SFT data {path!r} is not a file; give a JSONL file of prompt/completion or chat examples",
                        subject="data", value=path)
    render = _renderer(chat_template, special_tokens)
    examples = [_example(line, f"{path}:{number}", tokenizer, render, seq_len, truncate)
                for number, line in enumerate(file.read_text().splitlines(), start=1) if line.strip()]
    if not examples:
        raise DataError(f"SFT data {path!r} holds no examples", subject="data", value=path)
    if not any(flags[1:].any() for _, flags, _ in examples):
        raise DataError(f"{path}: no completion token is left within seq_len={seq_len} in any example; raise "
                        "seq_len or shorten the prompts", subject="data", value=path)
    tokens, flags, cut = zip(*examples)
    return SFTExamples(tuple(tokens), tuple(flags), sum(cut), str(path))


def pad_examples(examples: SFTExamples, seq_len: int) -> dict:
    """One example per row, zero-padded: ``{"inputs": int32 [N, seq_len], "targets", "mask"}``; the
    mask is 1 where the *target* is a completion token."""
    rows = len(examples)
    out = {"inputs": np.zeros((rows, seq_len), np.int32), "targets": np.zeros((rows, seq_len), np.int32),
           "mask": np.zeros((rows, seq_len), np.float32)}
    for row, (tokens, flags) in enumerate(zip(examples.tokens, examples.completion)):
        n = len(tokens) - 1
        out["inputs"][row, :n], out["targets"][row, :n] = tokens[:-1], tokens[1:]
        out["mask"][row, :n] = flags[1:]
    return out


def _rows_of(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Example indices per row, in order: a new row whenever the next example does not fit."""
    rows, used = [[]], 0
    for i, n in enumerate(lengths):
        if used + n > seq_len:
            rows, used = rows + [[]], 0
        rows[-1].append(i)
        used += n
    return rows


def pack_examples(examples: SFTExamples, seq_len: int) -> dict:
    """Examples packed in order into rows of ``seq_len``: ``{"inputs": {"tokens", "segments",
    "positions"}, "targets", "mask"}``, int32 / f32 [R, seq_len]. Segment ids count 1, 2, ... within
    a row (0: padding); positions restart at 0 for each example."""
    lengths = [len(t) - 1 for t in examples.tokens]
    rows = _rows_of(lengths, seq_len)
    shape = (len(rows), seq_len)
    tokens, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    segments, positions, mask = np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.float32)
    for r, members in enumerate(rows):
        start = 0
        for segment, i in enumerate(members, start=1):
            n, cut = lengths[i], slice(start, start + lengths[i])
            tokens[r, cut], targets[r, cut] = examples.tokens[i][:-1], examples.tokens[i][1:]
            mask[r, cut], segments[r, cut], positions[r, cut] = examples.completion[i][1:], segment, np.arange(n)
            start += n
    return {"inputs": {"tokens": tokens, "segments": segments, "positions": positions}, "targets": targets,
            "mask": mask}


@dataclasses.dataclass(frozen=True, eq=False)
class SFTBatches(_Order):
    """Rows of :func:`pack_examples` or :func:`pad_examples` dealt ``batch_size`` at a time, a new
    seeded order every epoch (as :class:`shardml.core.data.ArrayBatches`).

        source = SFTBatches(pack_examples(read_sft(path, tok, 256), 256), batch_size=8)
        source.batch(0)["inputs"]["segments"].shape     # (8, 256)
    """

    rows: dict
    batch_size: int
    seed: int = 0
    examples: SFTExamples | None = None  # what the rows were built from, for describe()

    def __post_init__(self):
        count = len(self.rows["targets"])
        if self.batch_size > count:
            raise DataError(f"batch_size={self.batch_size} exceeds the {count} rows of SFT data; lower batch_size "
                            "or add examples", subject="batch_size", value=self.batch_size)

    @property
    def fingerprint(self) -> dict:
        return {"kind": "sft", "rows": len(self.rows["targets"]), "batch_size": self.batch_size, "seed": self.seed,
                "packed": isinstance(self.rows["inputs"], dict), "order": "grain-shuffle"}

    def _order(self) -> grain.MapDataset:
        return _example_order(len(self.rows["targets"]), self.batch_size, self.seed, -1)

    def describe(self) -> str:
        """One line: examples, how many were truncated, rows, completion tokens."""
        ex = self.examples
        told = (f"SFT data '{ex.source}': {len(ex):,} examples ({ex.truncated:,} truncated), " if ex else "SFT data: ")
        packed = "packed " if isinstance(self.rows["inputs"], dict) else ""
        return told + (f"{len(self.rows['targets']):,} {packed}rows, {int(self.rows['mask'].sum()):,} completion "
                       "tokens (evaluated on these training rows)")

    def load(self, step: int, ids: np.ndarray, first_row: int = 0) -> dict:
        ids = np.asarray(ids, np.int64)
        return {k: ({n: a[ids] for n, a in v.items()} if isinstance(v, dict) else v[ids]) for k, v in self.rows.items()}

    def eval_batches(self, count: int = 0) -> list[dict]:
        """The first ``count`` (or every) whole batch of rows in order: the training rows (no
        held-out split yet)."""
        total = len(self.rows["targets"]) // self.batch_size
        ids = [np.arange(i * self.batch_size, (i + 1) * self.batch_size) for i in range(count or total)]
        return [self.load(0, one) for one in ids[:total]]
