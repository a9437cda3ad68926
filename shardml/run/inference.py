"""``shardml eval``, ``shardml predict`` and ``shardml generate``: the checkpoint of a run directory
on any mesh, with the run's own config, model and data.

The config comes from the checkpoint itself (what the run trained with); ``key=value`` overrides
change it, a ``mesh.*`` override starting from a fresh mesh (``data=-1`` fills, the other axes 1),
so ``mesh.tensor=4`` means data=2 x tensor=4 on 8 devices, whatever the run trained on. The
parameters are restored straight into the shardings of the new mesh (resharding on restore)::

    report = evaluate_run("runs/tiny", ["mesh.data=2", "mesh.tensor=4"])   # loss, perplexity, bits/byte
    texts, gen = generate_run("runs/tiny", ["The ", "def "], max_tokens=24)
    out = predict_run("runs/digits")                                       # probs, prediction, ...
"""

from __future__ import annotations

import codecs
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from shardml.core.data import is_token_file
from shardml.core.errors import ConfigError
from shardml.core.mesh import MeshConfig, layout_name
from shardml.models.lora import BASE, merged_params, shared_params
from shardml.parallel import inference as inf
from shardml.run import run_dir as rd
from shardml.run import config as config_lib
from shardml.run.config import Config
from shardml.run.hf import in_run
from shardml.run.recipe import Parts, build

SAMPLE_PROMPTS = ("The ", "def ", "Return ")  # what `shardml train` continues at the end of a run
SAMPLE_TOKENS = 48
SAMPLE_TEMPERATURE = 0.7


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A run's checkpoint restored onto a mesh.

    Attributes:
      cfg: the run's config with the overrides applied (``train.batch_size``: the inference rows).
      parts: model, data and trainer built from it (on the new mesh).
      params: the checkpoint's parameters in the trainer's shardings.
      step: the checkpoint's step; checkpoint: its directory.
    """

    cfg: Config
    parts: Parts
    params: Any
    step: int
    checkpoint: str

    @property
    def trainer(self):
        return self.parts.trainer

    @property
    def rows(self) -> int:
        return self.cfg.train.batch_size


def latest_checkpoint(run_dir: str) -> tuple[str, rd.Meta]:
    """``(step directory, meta)`` of the newest checkpoint of a run directory, its checkpoints
    directory, or one step directory, opened read-only (:meth:`shardml.run.run_dir.RunDir.latest`).

    Raises:
      ConfigError: no such directory, or no checkpoint in it.
    """
    return rd.RunDir.latest(run_dir)


def run_config(meta: rd.Meta, overrides: Sequence[str], where: str) -> Config:
    """The config a checkpoint was trained with, with ``overrides`` (a ``mesh.*`` one starts from a
    fresh mesh)."""
    saved = meta.run.config if meta.run else None
    if not saved:
        raise ConfigError(f"{where} records no config (a run of shardml.fit from Python); load it with "
                          "shardml.load_params and use shardml.parallel.inference with your model")
    cfg = config_lib.from_dict(saved)
    if any(item.split("=", 1)[0].strip().startswith("mesh.") for item in overrides):
        cfg = dataclasses.replace(cfg, mesh=MeshConfig())
    return config_lib.apply_overrides(cfg, list(overrides))


def _rows_multiple(cfg: Config, sizes: dict) -> int:
    shards = sizes["data"] * sizes["fsdp"]
    if sizes["pipeline"] > 1:
        shards *= cfg.train.microbatches * config_lib.pipeline_microbatches(cfg, sizes["pipeline"])
    return shards


def prepare(run_dir: str, overrides: Sequence[str] = (), rows: int | None = None, devices=None):
    """``(cfg, step_dir, meta, mesh sizes)``: the run's config for inference, checked against
    ``devices`` (default: all) before anything is built. ``rows`` (default: twice the training
    batch per microbatch) is rounded up to a multiple of the batch shards (and of the pipeline's
    microbatches) and stored as ``train.batch_size``."""
    step_dir, meta = latest_checkpoint(run_dir)
    cfg = in_run(run_config(meta, overrides, step_dir), run_dir)
    sizes = config_lib.validate(cfg, len(devices if devices is not None else jax.devices()))
    if rows is not None and rows < 1:
        raise ConfigError(f"--batch-size={rows} must be >= 1")
    want = rows or 2 * cfg.train.batch_size // cfg.train.microbatches
    rows = inf.round_rows(want, _rows_multiple(cfg, sizes))
    train = dataclasses.replace(cfg.train, batch_size=rows)
    cfg = dataclasses.replace(cfg, out_dir=os.path.abspath(run_dir), train=train)
    return cfg, step_dir, meta, sizes


def load_run(run_dir: str, overrides: Sequence[str] = (), rows: int | None = None, devices=None) -> LoadedRun:
    """A run's newest checkpoint restored onto the mesh its config (with ``overrides``) describes.

    Raises:
      ConfigError: before anything compiles: no checkpoint, a layout the model cannot take (a weight
        dimension the mesh does not divide, device counts), overrides that change the model's shapes.
      CheckpointError: the checkpoint's parameters are unreadable or do not match their checksums.
    """
    cfg, step_dir, meta, _ = prepare(run_dir, overrides, rows, devices)
    return restore_run(cfg, step_dir, meta, devices)


def restore_run(cfg: Config, step_dir: str, meta: rd.Meta, devices=None) -> LoadedRun:
    """The checkpoint's parameters restored onto the trainer that ``cfg`` builds."""
    return restore_parts(build(cfg, devices), step_dir, meta)


def restore_parts(parts: Parts, step_dir: str, meta: rd.Meta) -> LoadedRun:
    """The checkpoint's parameters restored into ``parts.trainer``'s shardings, after checking
    their shapes against the model's (before reading any array)."""
    target = parts.trainer.abstract_state().params
    rd.check_params(meta, target, step_dir)
    params = rd.load_params(step_dir, target, parts.frozen)  # a LoRA run's base: read again from model.from
    return LoadedRun(parts.cfg, parts, params, meta.step, step_dir)


def _classifier(cfg: Config) -> bool:
    return cfg.model.kind == "mlp"


def _source(parts: Parts):
    return parts.data.sources[0] if hasattr(parts.data, "sources") else parts.data


@dataclasses.dataclass(frozen=True)
class Text:
    """Text <-> token ids the way a run's data reads text: UTF-8 bytes, or its BPE tokenizer."""

    tokenizer: Any = None  # None: one token per byte

    @classmethod
    def of(cls, parts: Parts) -> Text:
        """The text codec of a language-model run.

        Raises:
          ConfigError: the run reads token ids (a .npy / .bin corpus), not text.
        """
        cfg = parts.cfg
        if is_token_file(cfg.data.corpus):
            raise ConfigError(f"this run reads token ids from {cfg.data.corpus}, not text, so text prompts cannot be "
                              "encoded; use shardml.parallel.inference.generate with token ids")
        return cls(getattr(_source(parts), "tokenizer", None))

    def encode(self, text: str | bytes) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return list(data) if self.tokenizer is None else list(self.tokenizer.encode_batch([data])[0])

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return bytes(ids).decode("utf-8", errors="replace") if self.tokenizer is None else self.tokenizer.decode(ids)


# ----------------------------------------------------------------------------- eval


def evaluate_run(run_dir: str, overrides: Sequence[str] = (), rows: int | None = None, devices=None) -> dict:
    """The run's checkpoint over its whole held-out set (``shardml eval``).

    A language model reports ``loss`` (nats per token), ``perplexity``, ``bits_per_token``,
    ``bits_per_byte`` (text: the nats of every predicted token over the bytes they spell, so byte
    and BPE runs compare) and ``tokens_per_s``; a classifier ``loss``, ``accuracy``,
    ``ece`` (calibration) and ``entropy``; a population every member's figures (lists) and, for
    classifiers, the ensemble's. Padding is masked: the figures are those of the real examples.
    """
    run = load_run(run_dir, overrides, rows, devices)
    source, trainer = _source(run.parts), run.trainer
    report = {"checkpoint": run.checkpoint, "step": run.step, "mesh": layout_name(trainer.mesh.shape), "rows": run.rows}
    if _classifier(run.cfg):
        examples = source.examples
        start = time.perf_counter()
        logits = inf.predict(trainer, run.params, examples.x_val, run.rows)
        seconds = time.perf_counter() - start
        report.update(inf.classifier_metrics(logits, examples.y_val, members=trainer.members > 1))
        report.update(seconds=seconds, examples_per_s=len(examples.y_val) / seconds)
        return report
    seq_len, stream, predicted_bytes = run.cfg.data.seq_len, source.tokens.val, None
    if not is_token_file(run.cfg.data.corpus):  # text: bits per byte of the bytes predicted
        text = Text.of(run.parts)
        predicted_bytes = len(stream) - 1  # every byte but the first
        if text.tokenizer is not None:  # the held-out text tokenised as the run reads text
            stream = np.asarray(text.encode(np.asarray(stream)), np.int32)
            predicted_bytes = len(source.tokens.val) - len(text.decode(stream[:1]).encode("utf-8"))
    sums = inf.evaluate_batches(trainer, run.params, inf.held_out_batches(stream, seq_len, run.rows))
    report.update(inf.lm_metrics(sums, predicted_bytes))
    report["windows"] = -(-report["tokens"] // seq_len)
    return report


def format_eval(report: dict) -> str:
    lines = [(f"eval {report['checkpoint']} (step {report['step']}) on {report['mesh']}, "
              f"batches of {report['rows']} rows")]

    def fmt(value):
        return "[" + ", ".join(f"{v:.4f}" for v in value) + "]" if isinstance(value, list) else f"{value:.4f}"

    if "perplexity" in report:
        lines.append(f"held-out: {report['tokens']:,} tokens in {report['windows']:,} windows")
        names = ("loss", "perplexity", "bits_per_byte" if "bits_per_byte" in report else "bits_per_token")
        lines += [f"{name}: {fmt(report[name])}" for name in names]
        lines.append(f"{report['tokens_per_s']:,.0f} tokens/s (the first batch, with compilation, "
                     f"{report['compile_seconds']:.2f}s; the rest {report['seconds']:.2f}s)")
    else:
        lines.append(f"held-out: {report['examples']:,} examples ({report['examples_per_s']:,.0f} examples/s "
                     "with compilation)")
        names = [n for n in ("loss", "accuracy", "ece", "entropy", "member_loss", "member_accuracy",
                             "mutual_information", "disagreement") if n in report]
        prefix = "ensemble " if "member_loss" in report else ""
        lines += [f"{'' if name.startswith('member') else prefix}{name}: {fmt(report[name])}" for name in names]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- predict


def predict_run(run_dir: str, overrides: Sequence[str] = (), inputs: np.ndarray | None = None, rows: int | None = None,
                devices=None) -> dict[str, np.ndarray]:
    """Class predictions of a classifier run for ``inputs`` (default: its held-out set), in their
    order, as NumPy (``shardml predict``): ``logits``, ``probs``, ``prediction``, ``confidence``;
    a population adds every member's (``member_logits``, ``member_probs``) and the ensemble's mean
    with its uncertainty (``std``, ``entropy``, ``mutual_information``, ``disagreement``), from one
    pass. ``targets`` when the held-out set was used.

    Raises:
      ConfigError: a language-model run (use eval or generate), inputs of the wrong shape.
    """
    cfg, step_dir, meta, _ = prepare(run_dir, overrides, rows, devices)
    if not _classifier(cfg):
        raise ConfigError(f"{run_dir} is a language-model run (model.kind={cfg.model.kind}); predict gives the class "
                          "predictions of classifier runs (model.kind=mlp): use shardml eval or shardml generate")
    run = restore_run(cfg, step_dir, meta, devices)
    examples = _source(run.parts).examples
    out: dict[str, np.ndarray] = {}
    if inputs is None:
        inputs, out["targets"] = examples.x_val, examples.y_val
    inputs = np.asarray(inputs, np.float32)
    if inputs.ndim < 2 or inputs.shape[1:] != examples.x_val.shape[1:]:
        wanted = ", ".join(map(str, examples.x_val.shape[1:]))
        raise ConfigError(f"inputs of shape {inputs.shape}; this model takes [N, {wanted}]")
    logits = inf.predict(run.trainer, run.params, inputs, run.rows)
    if run.trainer.members > 1:
        summary = inf.ensemble(logits)
        out.update(member_logits=logits, probs=summary.pop("mean"), **summary)
    else:
        probs = inf.ensemble(logits[None])["mean"]
        out.update(logits=logits, probs=probs, prediction=probs.argmax(-1), confidence=probs.max(-1))
    return out


def format_predict(out: dict, path: str) -> str:
    n = len(out["prediction"])
    lines = [f"{n:,} predictions written to {path} ({', '.join(sorted(out))})"]
    if "targets" in out:
        lines.append(f"accuracy on the held-out set: {float(np.mean(out['prediction'] == out['targets'])):.4f}")
    if "member_probs" in out:
        lines.append(f"{out['member_probs'].shape[0]} members; mean predictive entropy {out['entropy'].mean():.4f}, "
                     f"mutual information {out['mutual_information'].mean():.4f}, "
                     f"disagreement {out['disagreement'].mean():.4f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- generate


def stop_tokens(text: Text, stops: Sequence[str]) -> list[int]:
    """Token ids of ``--stop`` strings, each one token (escapes such as ``\\n`` are read)."""
    ids = []
    for stop in stops:
        encoded = text.encode(codecs.decode(stop, "unicode_escape"))
        if len(encoded) != 1:
            raise ConfigError(f"--stop {stop!r} is {len(encoded)} tokens; a stop is one token (e.g. '\\n' or '.')")
        ids.append(encoded[0])
    return ids


def generate_run(run_dir: str, prompts: Sequence[str], overrides: Sequence[str] = (), max_tokens: int | None = None,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stops: Sequence[str] = (), devices=None) -> tuple[list[str], inf.Generation]:
    """Continues text prompts with the run's checkpoint (``shardml generate``); see
    :func:`shardml.parallel.inference.generate`. ``max_tokens`` defaults to 64, or what the
    context (``data.seq_len``) leaves after the longest prompt.

    Raises:
      ConfigError: before anything compiles, for a prompt longer than the model's context, a
        population or pipeline layout, a classifier run, and all that :func:`load_run` refuses.
    """
    cfg, step_dir, meta, sizes = prepare(run_dir, overrides, None, devices)
    if _classifier(cfg):
        raise ConfigError("generate decodes language models; this run is a classifier (model.kind=mlp): "
                          "use shardml predict")
    if cfg.population.size > 1:
        raise ConfigError(f"{run_dir} holds a population of {cfg.population.size} members; generate decodes one "
                          "model (train the member alone with the overrides population.json gives)")
    if sizes["pipeline"] > 1:
        raise ConfigError(f"mesh.pipeline={sizes['pipeline']}: generate runs on data, fsdp and tensor axes; set "
                          "mesh.pipeline=1 (the checkpoint reshards onto any layout)")
    parts = build(cfg, devices)  # nothing compiles or loads before the prompts are checked
    text = Text.of(parts)
    ids = [text.encode(prompt) for prompt in prompts]
    context = cfg.data.seq_len
    longest = max((len(p) for p in ids), default=0)
    if max_tokens is None:
        max_tokens = max(1, min(64, context - longest))
    for name, value, ok in (("--temperature", temperature, temperature >= 0), ("--top-k", top_k, top_k >= 0),
                            ("--top-p", top_p, 0 < top_p <= 1)):
        if not ok:
            raise ConfigError(f"{name}={value} is out of range (temperature >= 0, top-k >= 0, 0 < top-p <= 1)")
    inf.check_generation([len(p) for p in ids], max_tokens, context)
    stop_ids = stop_tokens(text, stops)
    run = restore_parts(parts, step_dir, meta)
    return _generate(run.parts, run.params, text, ids, max_tokens, temperature, top_k, top_p, seed, stop_ids)


def decoded_params(parts: Parts, params: Any) -> Any:
    """The parameters the decoder reads, in their natural layout: a LoRA run's adapters merged into
    its base (in the base's dtype and shardings), so decoding runs the plain transformer."""
    natural = parts.trainer.natural(params)
    if not shared_params(parts.model):
        return natural
    shardings = jax.tree.map(lambda b: b.sharding, natural[BASE])
    return jax.jit(merged_params, static_argnums=0, out_shardings=shardings)(parts.model, natural)


def _generate(parts: Parts, params, text: Text, ids, max_tokens, temperature, top_k, top_p, seed, stop_ids):
    trainer = parts.trainer
    gen = inf.generate(parts.cfg.model, decoded_params(parts, params), ids, mesh=trainer.mesh, rules=trainer.rules,
                       max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                       stop_tokens=stop_ids, context=parts.cfg.data.seq_len)
    return [text.decode(t) for t in gen.tokens], gen


def format_generation(prompts: Sequence[str], texts: Sequence[str], gen: inf.Generation) -> str:
    lines = []
    for prompt, text in zip(prompts, texts):
        lines += [f"--- {prompt!r}", prompt + text]
    lines.append(f"--- prefill: {gen.prompt_tokens} tokens, {gen.prefill_tokens_per_s:,.0f} tokens/s; decode: "
                 f"{gen.new_tokens - len(texts)} tokens in {gen.decode_steps} steps, {gen.decode_tokens_per_s:,.0f} "
                 f"tokens/s; compile {gen.compile_seconds:.2f}s; KV cache {gen.cache_bytes_per_device:,} bytes "
                 "per device")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- samples after training


def write_samples(parts: Parts, params: Any, step: int, say: Callable[[str], None] = print) -> str | None:
    """A few short samples from fixed prompts at the end of ``shardml train``: printed, and written
    to ``out_dir/samples.txt``. Only language models of text (bytes or BPE), one model, on a
    pipeline-free mesh; returns the file written (None when skipped)."""
    cfg = parts.cfg
    if _classifier(cfg) or is_token_file(cfg.data.corpus) or parts.members or parts.sizes["pipeline"] > 1:
        return None
    text = Text.of(parts)
    ids = [text.encode(p) for p in SAMPLE_PROMPTS]
    new = min(SAMPLE_TOKENS, cfg.data.seq_len - max(len(p) for p in ids))
    if new < 1:
        return None
    # Temperature alone: a small model's greedy text loops, and top-k / top-p would add a sort to
    # the program (this compiles after every finished run).
    texts, gen = _generate(parts, params, text, ids, new, temperature=SAMPLE_TEMPERATURE, top_k=0, top_p=1.0,
                           seed=cfg.train.seed, stop_ids=[])
    header = (f"# samples of step {step}: {new} new tokens per prompt, temperature {SAMPLE_TEMPERATURE}, seed "
              f"{cfg.train.seed} ({gen.decode_tokens_per_s:,.0f} tokens/s decoding)")
    body = [f"{prompt!r} -> {prompt + text!r}" for prompt, text in zip(SAMPLE_PROMPTS, texts)]
    path = os.path.join(cfg.out_dir, "samples.txt")
    with open(path, "w") as f:
        f.write("\n".join([header, *body]) + "\n")
    say("samples:")
    for line in body:
        say(f"  {line}")
    return path
