"""``data.sft=FILE.jsonl``: supervised fine-tuning data from the config, checked before anything compiles.

    shardml train tiny data.sft=train.jsonl data.sft_tokenizer=CHECKPOINT_DIR data.pack=true data.truncate=true

``data.sft_tokenizer`` is a directory with ``tokenizer.json`` (and, for chat data, the
``chat_template`` of its ``tokenizer_config.json``); the rows are packed (``data.pack=true``) or one
example each, dealt ``train.batch_size`` at a time (:class:`shardml.core.sft.SFTBatches`).
"""

from __future__ import annotations

import os

from shardml.core.errors import DataError
from shardml.core.sft import SFTBatches, chat_template_of, pack_examples, pad_examples, read_sft
from shardml.run.errors import ConfigError, keyed
from shardml.run.schema import Config


def _tokenizer(directory: str):
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise ConfigError(f"data.sft_tokenizer={directory!r} holds no tokenizer.json; give the directory of a "
                          "checkpoint (or of a tokenizer) that has one", subject="data.sft_tokenizer", value=directory)
    try:
        import tokenizers  # an optional extra: [hf]
    except ImportError:
        raise ConfigError("data.sft needs the tokenizers package: pip install 'shardml[hf]'",
                          subject="data.sft", value=None) from None
    return tokenizers.Tokenizer.from_file(path)


def _check(cfg: Config) -> None:
    d = cfg.data
    if cfg.model.kind != "transformer":
        raise ConfigError(f"data.sft={d.sft!r} fine-tunes a language model; set model.kind=transformer",
                          subject="model.kind", value=cfg.model.kind)
    if not d.sft_tokenizer:
        raise ConfigError(f"data.sft={d.sft!r} needs data.sft_tokenizer=DIR, a directory with the tokenizer.json "
                          "(and tokenizer_config.json) of the model", subject="data.sft_tokenizer", value="")
    if d.pack and cfg.mesh.pipeline > 1:
        raise ConfigError(f"data.pack=true with mesh.pipeline={cfg.mesh.pipeline}: packed rows are not pipelined yet; "
                          "set data.pack=false or mesh.pipeline=1", subject="data.pack", value=True)


def sft_source(cfg: Config) -> SFTBatches:
    """The SFT source of ``cfg`` (``data.sft`` set).

    Raises:
      ConfigError: a model that is not a transformer, no ``data.sft_tokenizer`` or no tokenizer.json
        there, packing with a pipeline, a tokenizer larger than ``model.vocab``, and every
        :class:`DataError` of the file (naming its line) in config keys.
    """
    _check(cfg)
    d = cfg.data
    tokenizer = _tokenizer(d.sft_tokenizer)
    if tokenizer.get_vocab_size() > cfg.model.vocab:
        raise ConfigError(f"data.sft_tokenizer={d.sft_tokenizer!r} has {tokenizer.get_vocab_size()} tokens but "
                          f"model.vocab={cfg.model.vocab}; set model.vocab={tokenizer.get_vocab_size()}",
                          subject="model.vocab", value=cfg.model.vocab)
    template, special = chat_template_of(d.sft_tokenizer)
    try:
        with keyed(cfg):
            examples = read_sft(d.sft, tokenizer, d.seq_len, truncate=d.truncate, chat_template=template,
                                special_tokens=special)
    except DataError as err:
        if err.subject != "chat_template":
            raise
        where = str(err).split(": ", 1)[0]
        raise ConfigError(f"{where}: chat data, but data.sft_tokenizer={d.sft_tokenizer!r} has no chat_template in "
                          "its tokenizer_config.json; add one or write the data as prompt/completion",
                          subject="data.sft_tokenizer", value=d.sft_tokenizer) from None
    rows = (pack_examples if d.pack else pad_examples)(examples, d.seq_len)
    with keyed(cfg):
        return SFTBatches(rows, cfg.train.batch_size, cfg.train.seed, examples)
