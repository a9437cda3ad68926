"""``shardml export RUN --format hf OUT``: a run's newest checkpoint as a Hugging Face checkpoint
(safetensors, ``config.json`` and the run's tokenizer files) that
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` loads; a LoRA run (``lora.rank`` > 0)
exports its adapters merged into the base (``--merge``), or alone in PEFT's format
(``--format peft``: ``peft.PeftModel.from_pretrained(base, OUT)``)::

    export_run("runs/qwen", "qwen-tuned/")
    export_run("runs/qwen-lora", "qwen-adapter/", "peft")
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from shardml.models.hf_io import save_hf
from shardml.models.lora import merge_lora, save_peft
from shardml.run.errors import ConfigError
from shardml.run.hf import RUN_COPY, TOKENIZER_FILES, copy_files
from shardml.run.inference import prepare, restore_run

FORMATS = ("hf", "peft")


def meta_base(meta) -> str:
    """The ``model.from`` the run was started with (its own config, not the run's copy)."""
    config = meta.run.config if meta.run else None
    return ((config or {}).get("model") or {}).get("from", "") or ""


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


def check_lora(run_dir: str, cfg, fmt: str, merge: bool) -> None:
    """``--merge`` and ``--format peft`` need a LoRA run; a LoRA run exports one of the two.

    Raises:
      ConfigError: naming the run, its ``lora.rank`` and the export that fits it.
    """
    rank = cfg.lora.rank
    if merge and fmt != "hf":
        raise ConfigError(f"--merge with --format {fmt}: --merge writes merged weights as --format hf; drop one")
    if not rank and (merge or fmt == "peft"):
        what = "--merge" if merge else "--format peft"
        raise ConfigError(f"{what}: {run_dir} is not a LoRA run (lora.rank=0), so it has no adapters; export it "
                          "with --format hf")
    if rank and fmt == "hf" and not merge:
        raise ConfigError(f"{run_dir} trains LoRA adapters (lora.rank={rank}) on a frozen base: export the merged "
                          "model with --format hf --merge, or the adapters with --format peft")


def export_run(run_dir: str, out: str, fmt: str = "hf", overrides: Sequence[str] = (), devices=None,
               merge: bool = False) -> str:
    """Writes the newest checkpoint of ``run_dir`` (a transformer run) to ``out``; returns ``out``.
    The parameters are restored onto the run's layout (or the ``mesh.*`` ``overrides``) and
    gathered one tensor at a time. A LoRA run: ``merge`` writes the base with its adapters merged
    in (``fmt="hf"``); ``fmt="peft"`` the adapters alone, naming ``model.from`` as their base.

    Raises:
      ConfigError: before anything is read: a non-empty ``out``, an unknown format, a classifier
        run, a population, no checkpoint, ``merge`` or ``peft`` on a run without adapters (or neither on
        one with).
    """
    check_target(out, fmt)
    cfg, step_dir, meta, _ = prepare(run_dir, overrides, None, devices)
    if cfg.model.kind != "transformer":
        raise ConfigError(f"{run_dir} trains model.kind={cfg.model.kind}; --format hf writes transformers only")
    if cfg.population.size > 1:
        raise ConfigError(f"{run_dir} holds a population of {cfg.population.size} members; export writes one model "
                          "(train the member alone with the overrides population.json gives, then export that run)")
    check_lora(run_dir, cfg, fmt, merge)
    run = restore_run(cfg, step_dir, meta, devices)
    params = run.trainer.natural(run.params)
    if fmt == "peft":
        save_peft(run.parts.model, params, out, base_model=meta_base(meta) or cfg.model.from_)
    elif merge:
        save_hf(*merge_lora(run.parts.model, params), out)
    else:
        save_hf(run.parts.model, params, out)
    # the tokenizer: a model.from run's copy of the checkpoint's files, else a data.tokenizer=bpe run's own
    copy_files(os.path.join(run_dir, RUN_COPY), out, TOKENIZER_FILES)
    if not os.path.isfile(os.path.join(out, "tokenizer.json")):
        copy_files(run_dir, out, ("tokenizer.json",))
    return out
