"""``shardml export RUN --format hf OUT``: a run's newest checkpoint as a Hugging Face checkpoint
(safetensors, ``config.json`` and the run's tokenizer files) that
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` loads::

    export_run("runs/qwen", "qwen-tuned/")
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from shardml.models.hf_io import save_hf
from shardml.run.errors import ConfigError
from shardml.run.hf import RUN_COPY, TOKENIZER_FILES, copy_files
from shardml.run.inference import prepare, restore_run

FORMATS = ("hf",)


def check_target(out: str, fmt: str) -> None:
    """``out`` is new or an empty directory, and ``fmt`` one of :data:`FORMATS`.

    Raises:
      ConfigError: naming the format or the directory and what to do instead.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: shardml exports {', '.join(FORMATS)} (e.g. --format hf)")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f"{out} exists and is not an empty directory; export writes a new checkpoint: give a new "
                          "or empty directory (nothing is overwritten)")


def export_run(run_dir: str, out: str, fmt: str = "hf", overrides: Sequence[str] = (), devices=None) -> str:
    """Writes the newest checkpoint of ``run_dir`` (a transformer run) to ``out``; returns ``out``.
    The parameters are restored onto the run's layout (or the ``mesh.*`` ``overrides``) and
    gathered one tensor at a time.

    Raises:
      ConfigError: before anything is read: a non-empty ``out``, an unknown format, a classifier
        run, no checkpoint.
    """
    check_target(out, fmt)
    cfg, step_dir, meta, _ = prepare(run_dir, overrides, None, devices)
    if cfg.model.kind != "transformer":
        raise ConfigError(f"{run_dir} trains model.kind={cfg.model.kind}; --format hf writes transformers only")
    run = restore_run(cfg, step_dir, meta, devices)
    save_hf(run.parts.model, run.trainer.natural(run.params), out)
    # the tokenizer: a model.from run's copy of the checkpoint's files, else a data.tokenizer=bpe run's own
    copy_files(os.path.join(run_dir, RUN_COPY), out, TOKENIZER_FILES)
    if not os.path.isfile(os.path.join(out, "tokenizer.json")):
        copy_files(run_dir, out, ("tokenizer.json",))
    return out
