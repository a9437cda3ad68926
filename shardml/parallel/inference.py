"""Sharded multi-batch inference: evaluation over a whole held-out set, predictions in their
original order (every member of a population and the ensemble in one pass), and generation with a
KV cache sharded the way training shards (batch over the batch axes, key/value heads over
``tensor``).

Everything runs on a trainer's mesh with its rules and parameter shardings, so inference needs no
layout code of its own: a trainer built on another mesh restores the same checkpoint resharded.

    sums = evaluate_batches(trainer, params, held_out_batches(tokens.val, seq_len=64, rows=64))
    lm_metrics(sums, predicted_bytes=len(tokens.val) - 1)   # loss, perplexity, bits per byte, tokens/s
    logits = predict(trainer, params, x_N, rows=256)                       # [N, C] (population: [M, N, C])
    out = generate(cfg, params, [[84, 104, 101], [65]], mesh=trainer.mesh, max_new_tokens=32)
    out.tokens[0], out.decode_tokens_per_s

Padding is never counted: the last window of a token stream and the last batch of rows are padded
and masked (predictions drop their padded rows), so a figure equals the unsharded one-device
figure over exactly the real examples.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from shardml.core.errors import DataError, LayoutError, ModelError, SettingError
from shardml.core.model import Model
from shardml.core.sharding import Rules, batch_sharding, tree_shardings, use_rules
from shardml.models.transformer_decode import KV_CACHE_LOGICAL, decode_step, prefill
from shardml.models.transformer_layers import TransformerConfig
from shardml.parallel.population import EnsembleMetrics

MAX_STOP_TOKENS = 8  # stop tokens travel as a fixed-size array, so their number does not recompile
_PROMPT_BUCKET = 8  # prompts are padded to a multiple of this many slots (fewer distinct compiles)


# ----------------------------------------------------------------------------- rows and batches


def batch_multiple(trainer) -> int:
    """The row count every evaluation batch of ``trainer`` must be a multiple of: its batch shards
    (data x fsdp), times the accumulation and pipeline microbatches its loss pass splits rows into."""
    pipeline = trainer.schedule.microbatches * trainer.microbatches if trainer.schedule is not None else 1
    return _batch_shards(trainer.mesh, trainer.rules) * pipeline


def _batch_shards(mesh, rules: Rules) -> int:
    """How many ways ``rules`` split a batch's rows over ``mesh`` (its batch axes' sizes multiplied)."""
    return math.prod(mesh.shape[a] for a in rules.mesh_axes("batch"))


def round_rows(rows: int, multiple: int) -> int:
    """``rows`` rounded up to a multiple of ``multiple`` (padding rows are masked)."""
    return max(multiple, -(-rows // multiple) * multiple)


def held_out_batches(tokens: np.ndarray, seq_len: int, rows: int) -> Iterator[dict]:
    """Every next-token prediction of a token stream, once: consecutive windows of ``seq_len``
    inputs (window w predicts tokens ``w*seq_len+1 .. (w+1)*seq_len``), the last window padded and
    masked, the last batch filled with masked rows. Batches are made lazily (any stream length).
    """
    predicted = len(tokens) - 1
    if predicted < 1:
        raise DataError(f"the held-out stream (tokens) has {len(tokens)} token(s); evaluation needs at least 2",
                        subject="tokens", value=len(tokens))
    windows = -(-predicted // seq_len)
    for first in range(0, windows, rows):
        inputs = np.zeros((rows, seq_len), np.int32)
        targets = np.zeros((rows, seq_len), np.int32)
        mask = np.zeros((rows, seq_len), np.float32)
        for row, window in enumerate(range(first, min(first + rows, windows))):
            start = window * seq_len
            n = min(seq_len, predicted - start)
            inputs[row, :n] = tokens[start:start + n]
            targets[row, :n] = tokens[start + 1:start + n + 1]
            mask[row, :n] = 1.0
        yield {"inputs": inputs, "targets": targets, "mask": mask}


def padded_rows(arrays: dict, rows: int) -> Iterator[tuple[dict, int]]:
    """``(batch, real)`` pairs over the rows of host arrays in order, each batch ``rows`` long;
    the last is padded with zero rows, masked (``mask`` 0) and ``real`` says how many are real."""
    n = len(next(iter(arrays.values())))
    for start in range(0, n, rows):
        real = min(rows, n - start)
        batch = {}
        for name, value in arrays.items():
            chunk = np.asarray(value[start:start + real])
            batch[name] = np.concatenate([chunk, np.zeros((rows - real, *chunk.shape[1:]), chunk.dtype)])
        mask = np.zeros(rows, np.float32)
        mask[:real] = 1.0
        yield {**batch, "mask": mask}, real


# ----------------------------------------------------------------------------- evaluation


def evaluate_batches(trainer, params: Any, batches: Iterable[dict], in_flight: int = 4) -> dict:
    """Loss sums of ``trainer``'s loss over every batch, added in float64 on the host.

    Up to ``in_flight`` batches are queued on the devices before the oldest result is read, so
    transfers and compute overlap while device memory stays bounded. The first batch (which
    compiles) is timed apart: ``compile_seconds``; ``seconds`` and ``tokens_per_s`` (real,
    unmasked tokens, or examples, per second) cover the rest.

    Returns:
      ``{"loss": sum, "count": n, ...other sums, "seconds", "compile_seconds", "tokens_per_s"}``; a
      population's sums have one entry per member.
    """
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise DataError("batches is empty: nothing to evaluate; give at least one batch", subject="batches",
                        value=[])
    totals: dict[str, Any] = {}

    def add(sums) -> float:
        for key, value in jax.device_get(sums).items():
            totals[key] = totals.get(key, 0.0) + np.asarray(value, np.float64)
        return float(np.max(np.asarray(sums["count"])))

    start = time.perf_counter()
    add(trainer.evaluate(params, trainer.put_eval(first)))
    compile_s = time.perf_counter() - start
    start, counted, pending = time.perf_counter(), 0.0, collections.deque()
    for batch in iterator:
        pending.append(trainer.evaluate(params, trainer.put_eval(batch)))
        if len(pending) > in_flight:
            counted += add(pending.popleft())
    while pending:
        counted += add(pending.popleft())
    seconds = time.perf_counter() - start
    totals.update(seconds=seconds, compile_seconds=compile_s,
                  tokens_per_s=counted / seconds if counted and seconds > 0 else float("nan"))
    return totals


def lm_metrics(sums: dict, predicted_bytes: float | None = None) -> dict:
    """Language-model figures of :func:`evaluate_batches` sums: ``loss`` (nats per token),
    ``perplexity``, ``bits_per_token`` and, given the number of bytes of text the predicted tokens
    spell, ``bits_per_byte``; a population gives a list per figure (one value per member)."""
    count = np.maximum(np.asarray(sums["count"], np.float64), 1.0)
    loss = np.asarray(sums["loss"], np.float64) / count
    out = {"loss": loss, "perplexity": np.exp(loss), "bits_per_token": loss / math.log(2)}
    if predicted_bytes:
        out["bits_per_byte"] = np.asarray(sums["loss"], np.float64) / math.log(2) / predicted_bytes
    out = {k: v.tolist() if np.ndim(v) else float(v) for k, v in out.items()}
    out["tokens"] = int(np.max(np.asarray(sums["count"])))
    out.update({k: sums[k] for k in ("tokens_per_s", "seconds", "compile_seconds") if k in sums})
    return out


# ----------------------------------------------------------------------------- predictions


def predict(trainer, params: Any, inputs: Any, rows: int, in_flight: int = 4) -> np.ndarray:
    """The model's outputs for every example of ``inputs`` (host array [N, ...]) in their order,
    as NumPy: [N, ...], or [M, N, ...] for a population of M members (all members in one pass).

    Args:
      rows: examples per batch; rounded up to a multiple of the batch shards (padding rows are
        dropped from the result).
      in_flight: batches queued on the devices before the oldest result is read.
    """
    rows = round_rows(rows, batch_multiple(trainer))
    axis = 1 if trainer.members > 1 else 0
    pending, outputs = collections.deque(), []

    def fetch():
        out, real = pending.popleft()
        outputs.append(np.take(jax.device_get(out), np.arange(real), axis=axis))  # padding rows dropped

    for batch, real in padded_rows({"inputs": inputs}, rows):
        placed = trainer.put_eval({"inputs": batch["inputs"]})["inputs"]
        pending.append((trainer.predict(params, placed), real))
        if len(pending) > in_flight:
            fetch()
    while pending:
        fetch()
    return np.concatenate(outputs, axis=axis)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def ensemble(member_logits: np.ndarray) -> dict:
    """The ensemble of M members' class logits [M, N, C]: each member's probabilities, their mean
    (the ensemble's prediction), their standard deviation across members, and per example the
    predicted class, its mean probability, the predictive entropy, the mutual information
    (entropy minus the members' mean entropy: the members' disagreement in nats) and the fraction
    of members whose own prediction differs from the ensemble's."""
    probs = _softmax(member_logits)  # [M, N, C]
    mean = probs.mean(0)
    prediction = mean.argmax(-1)
    entropy = -(mean * np.log(mean + 1e-30)).sum(-1)
    member_entropy = -(probs * np.log(probs + 1e-30)).sum(-1).mean(0)
    return {"member_probs": probs, "mean": mean, "std": probs.std(0), "prediction": prediction,
            "confidence": mean.max(-1), "entropy": entropy, "mutual_information": entropy - member_entropy,
            "disagreement": (probs.argmax(-1) != prediction[None]).mean(0)}


def classifier_metrics(logits: np.ndarray, targets: np.ndarray, members: bool = False) -> dict:
    """Loss, accuracy and calibration (expected calibration error over 15 confidence bins, mean
    predictive entropy) of class logits [N, C] against integer ``targets`` [N], in float64; with
    ``members`` the logits are [M, N, C] and each member's figures come with the ensemble's."""
    metrics = EnsembleMetrics()
    metrics.add(logits if members else np.asarray(logits)[None], targets)
    result = metrics.result()
    keep = ("loss", "accuracy", "ece", "entropy")
    if not members:
        return {k: result[k] for k in keep} | {"examples": len(targets)}
    more = ("member_loss", "member_accuracy", "mutual_information", "disagreement", "mean_member_loss",
            "mean_member_accuracy")
    return {k: result[k] for k in keep + more} | {"examples": len(targets)}


# ----------------------------------------------------------------------------- generation


@dataclasses.dataclass(frozen=True)
class Generation:
    """What :func:`generate` produced and how fast.

    Attributes:
      tokens: per prompt, the new tokens (int32), ending with a stop token when one was drawn.
      prompt_tokens: real prompt tokens run by the prefill.
      new_tokens: tokens generated (the prefill draws each row's first one, the decode loop the rest).
      prefill_seconds, decode_seconds, compile_seconds: wall clock of each part (compile apart).
      decode_steps: iterations the decode loop ran (it stops once every row has stopped).
    """

    tokens: list[np.ndarray]
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    compile_seconds: float
    decode_steps: int
    cache_bytes_per_device: int

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        decoded = self.new_tokens - len(self.tokens)  # the first token of each row came from the prefill
        return decoded / self.decode_seconds if self.decode_seconds > 0 else float("nan")


SAMPLERS = ("greedy", "temperature", "filtered")


def sampler_of(temperature: float, top_k: int, top_p: float) -> str:
    """Which sampler the settings need; each compiles into its own program, because on XLA:CPU
    the random draw and the top-k / top-p sort multiply the compile time of the decode loop."""
    if temperature == 0:
        return "greedy"
    return "filtered" if top_k > 0 or top_p < 1 else "temperature"


def sample_tokens(logits_BV: jax.Array, step: jax.Array, rows_B: jax.Array, sampling: dict,
                  sampler: str = "filtered") -> jax.Array:
    """One token per row: ``greedy`` takes the argmax; ``temperature`` draws from logits / T;
    ``filtered`` also keeps only the ``top_k`` most likely tokens (0: all) and the smallest set of
    probability mass ``top_p`` (the values are arguments: changing them does not recompile). Row
    r's key is ``fold_in(fold_in(key(seed), r), step)``: the draws do not depend on the layout or
    the batch."""
    if sampler == "greedy":
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    scaled = logits_BV / sampling["temperature"]
    if sampler == "filtered":
        V = scaled.shape[-1]
        desc = -jnp.sort(-scaled, axis=-1)
        k = jnp.where(sampling["top_k"] > 0, jnp.minimum(sampling["top_k"], V), V)
        in_k = jnp.arange(V)[None, :] < k
        probs = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf), axis=-1)
        keep = in_k & (jnp.cumsum(probs, axis=-1) - probs < sampling["top_p"])
        cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    base = jax.random.key(sampling["seed"])
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base, r), step))(rows_B)
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)


def _prefill_fn(params, tokens_BP, starts_B, rows_B, sampling, *, cfg, length, rules, sampler):
    with use_rules(rules):
        logits_BV, cache = prefill(params, tokens_BP, starts_B, cfg, length)
    return sample_tokens(logits_BV, jnp.int32(0), rows_B, sampling, sampler), cache


def _decode_fn(params, cache, first_B, starts_B, rows_B, live_B, sampling, *, cfg, prompt_slots, new_tokens, rules,
               sampler):
    """The decode loop: a ``lax.while_loop`` of one-token steps with static shapes, until every row
    has stopped (a stop token, or ``new_tokens``). Rows that stopped emit -1."""
    B = first_B.shape[0]

    def stops(tokens_B):
        return jnp.any(tokens_B[:, None] == sampling["stop"][None, :], axis=-1)

    out_BN = jnp.full((B, new_tokens), -1, jnp.int32)
    out_BN = out_BN.at[:, 0].set(jnp.where(live_B, first_B, -1))
    done_B = ~live_B | stops(first_B)

    def cond(carry):
        i, _, _, done_B, _ = carry
        return (i < new_tokens) & ~jnp.all(done_B)

    def body(carry):
        i, cache, last_B, done_B, out_BN = carry
        with use_rules(rules):
            logits_BV, cache = decode_step(params, cache, last_B, prompt_slots + i - 1, starts_B, cfg)
        token_B = sample_tokens(logits_BV, i, rows_B, sampling, sampler)
        out_BN = jax.lax.dynamic_update_slice(out_BN, jnp.where(done_B, -1, token_B)[:, None], (0, i))
        return i + 1, cache, token_B, done_B | stops(token_B), out_BN

    steps, _, _, _, out_BN = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, first_B, done_B, out_BN))
    return out_BN, steps - 1


class Decoder:
    """The compiled prefill and decode loop of one model config on one mesh, per shape (batch
    rows, prompt slots, new tokens), compiled ahead of time so that runs are timed apart."""

    def __init__(self, cfg: TransformerConfig, mesh, rules: Rules):
        self.cfg, self.mesh, self.rules = cfg, mesh, rules
        self._compiled: dict = {}

    def cache_sharding(self) -> NamedSharding:
        return tree_shardings(KV_CACHE_LOGICAL, self.rules, self.mesh)

    def compiled(self, params, prefill_args: tuple, decode_args: tuple, prompt_slots: int, new_tokens: int,
                 sampler: str):
        """``(prefill, decode, seconds spent compiling now)`` for the shapes of these arguments
        (``prefill_args``: tokens, starts, rows, sampling; ``decode_args``: starts, rows, live,
        sampling) and ``sampler`` (:func:`sampler_of`)."""
        key = (prefill_args[0].shape, new_tokens, sampler, jax.tree.structure(params),
               tuple((leaf.shape, leaf.dtype, leaf.sharding) for leaf in jax.tree.leaves(params)))
        if key in self._compiled:
            return (*self._compiled[key], 0.0)
        start = time.perf_counter()
        cache_sharding = self.cache_sharding()
        rows = batch_sharding(self.mesh, self.rules)
        with jax.set_mesh(self.mesh):
            prefill_jit = jax.jit(functools.partial(_prefill_fn, cfg=self.cfg, length=prompt_slots + new_tokens,
                                                    rules=self.rules, sampler=sampler),
                                  out_shardings=(rows, {"k": cache_sharding, "v": cache_sharding}))
            prefill_exe = prefill_jit.lower(params, *prefill_args).compile()
            first, cache = jax.eval_shape(prefill_jit, params, *prefill_args)
            first = jax.ShapeDtypeStruct(first.shape, first.dtype, sharding=rows)
            cache = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cache_sharding), cache)
            decode_jit = jax.jit(functools.partial(_decode_fn, cfg=self.cfg, prompt_slots=prompt_slots,
                                                   new_tokens=new_tokens, rules=self.rules, sampler=sampler),
                                 out_shardings=(rows, None))
            decode_exe = decode_jit.lower(params, cache, first, *decode_args).compile()
        self._compiled[key] = (prefill_exe, decode_exe)
        return prefill_exe, decode_exe, time.perf_counter() - start


@functools.lru_cache(maxsize=8)
def decoder(cfg: TransformerConfig, mesh, rules: Rules) -> Decoder:
    """The (cached) :class:`Decoder` of ``cfg`` on ``mesh``."""
    return Decoder(cfg, mesh, rules)


def check_generation(prompt_lengths: Sequence[int], max_new_tokens: int, context: int | None) -> None:
    """Rejects, before anything compiles, an empty prompt, a prompt longer than ``context`` (the
    sequence length the model was trained on) or one that leaves no room for ``max_new_tokens``.

    Raises:
      DataError: no prompts, or a prompt that is empty or longer than the context (``subject``
        ``"prompts"``, naming the prompt and its length).
      SettingError: ``max_new_tokens`` < 1, or more than the context leaves after a prompt.
    """
    if not prompt_lengths:
        raise DataError("prompts is empty: nothing to generate from; give at least one prompt",
                        subject="prompts", value=[])
    if max_new_tokens < 1:
        raise SettingError(f"max_new_tokens={max_new_tokens} must be >= 1", subject="max_new_tokens",
                           value=max_new_tokens)
    for i, n in enumerate(prompt_lengths):
        if n < 1:
            raise DataError(f"prompt {i} is empty; every prompt needs at least one token", subject="prompts", value=n)
        if context is not None and n > context:
            raise DataError(f"prompt {i} is {n} tokens long, longer than the model's context of {context} "
                            "tokens (the sequence length it was trained on); shorten the prompt",
                            subject="prompts", value=n)
        if context is not None and n + max_new_tokens > context:
            raise SettingError(f"prompt {i} ({n} tokens) + {max_new_tokens} new tokens = {n + max_new_tokens} "
                               f"exceeds the model's context of {context} tokens; ask for at most {context - n} new "
                               "tokens or shorten the prompt", subject="max_new_tokens", value=max_new_tokens)


def check_sampling(temperature: float, top_k: int, top_p: float, stop_tokens: Sequence[int] = ()) -> None:
    """Rejects sampling settings out of range: ``temperature`` >= 0, ``top_k`` >= 0,
    0 < ``top_p`` <= 1, at most ``MAX_STOP_TOKENS`` stop tokens.

    Raises:
      SettingError: naming the argument and its value (``subject`` is its name).
    """
    for name, value, ok in (("temperature", temperature, temperature >= 0), ("top_k", top_k, top_k >= 0),
                            ("top_p", top_p, 0 < top_p <= 1)):
        if not ok:
            raise SettingError(f"{name}={value} is out of range (temperature >= 0, top_k >= 0, 0 < top_p <= 1)",
                               subject=name, value=value)
    if len(stop_tokens) > MAX_STOP_TOKENS:
        raise SettingError(f"stop_tokens has {len(stop_tokens)} tokens; at most {MAX_STOP_TOKENS}",
                           subject="stop_tokens", value=list(stop_tokens))


def check_decoding_mesh(mesh) -> None:
    """Generation runs on the data, fsdp, expert, context (the KV cache's slots) and tensor axes only.

    Raises:
      LayoutError: a mesh with ``pipeline`` or ``members`` > 1 (``subject`` ``"mesh"``).
    """
    pipeline, members = mesh.shape.get("pipeline", 1), mesh.shape.get("members", 1)
    if pipeline > 1 or members > 1:
        raise LayoutError(f"generation runs on the data, fsdp, expert, context and tensor axes; this mesh has pipeline={pipeline}, "
                          f"members={members}: give a mesh with pipeline=1 and members=1 (the parameters "
                          "reshard onto any layout)", subject="mesh", value=dict(mesh.shape))


def _right_aligned(prompts: Sequence[Sequence[int]], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens [rows, P], starts [rows])``: each prompt at the end of its row, P a multiple of
    ``_PROMPT_BUCKET``; rows past the prompts hold one padding token and never run."""
    P = round_rows(max(len(p) for p in prompts), _PROMPT_BUCKET)
    tokens = np.zeros((rows, P), np.int32)
    starts = np.full(rows, P - 1, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, P - len(prompt):] = np.asarray(prompt, np.int32)
        starts[row] = P - len(prompt)
    return tokens, starts


def _sampling(seed: int, temperature: float, top_k: int, top_p: float, stop_tokens: Sequence[int]) -> dict:
    """The sampler's arguments as fixed-shape arrays (new values do not recompile)."""
    stop = np.full(MAX_STOP_TOKENS, -1, np.int32)
    stop[:len(stop_tokens)] = np.asarray(stop_tokens, np.int32)
    return {"seed": np.uint32(seed), "temperature": np.float32(temperature), "top_k": np.int32(top_k),
            "top_p": np.float32(top_p), "stop": stop}


@dataclasses.dataclass(frozen=True)
class _Placed:
    """A generation's inputs on the devices: rows over the batch axes, the sampling replicated."""

    tokens: jax.Array  # [B, P]
    starts: jax.Array  # [B]
    rows: jax.Array  # [B] row ids (the sampler's keys)
    live: jax.Array  # [B] rows that hold a prompt
    sampling: dict

    @classmethod
    def put(cls, tokens, starts, prompts: int, sampling: dict, mesh, rules: Rules) -> _Placed:
        rows_sharding = batch_sharding(mesh, rules)
        B = len(starts)
        return cls(tokens=jax.device_put(tokens, batch_sharding(mesh, rules, 2)),
                   starts=jax.device_put(starts, rows_sharding),
                   rows=jax.device_put(np.arange(B, dtype=np.int32), rows_sharding),
                   live=jax.device_put(np.arange(B) < prompts, rows_sharding),
                   sampling=jax.device_put(sampling, NamedSharding(mesh, jax.sharding.PartitionSpec())))

    def prefill_args(self) -> tuple:
        return self.tokens, self.starts, self.rows, self.sampling

    def decode_args(self) -> tuple:
        return self.starts, self.rows, self.live, self.sampling


def _run_timed(prefill_exe, decode_exe, params, placed: _Placed, mesh) -> dict:
    """Runs the compiled prefill, then the decode loop, each timed to its last result."""
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        first, cache = prefill_exe(params, *placed.prefill_args())
        jax.block_until_ready(first)
        prefill_s = time.perf_counter() - start
        cache_bytes = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(cache))
        start = time.perf_counter()
        out, steps = decode_exe(params, cache, first, *placed.decode_args())
        out, steps = jax.device_get((out, steps))
        decode_s = time.perf_counter() - start
    return {"out": out, "decode_steps": int(steps), "prefill_seconds": prefill_s, "decode_seconds": decode_s,
            "cache_bytes_per_device": cache_bytes}


def generate(cfg: TransformerConfig | Model, params: Any, prompts: Sequence[Sequence[int]], *, mesh, rules: Rules | None = None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_tokens: Sequence[int] = (), context: int | None = None) -> Generation:
    """Decodes continuations of many prompts of different lengths at once with a sharded KV cache.

    The prompts are right-aligned in one batch (padded to a multiple of the batch shards with rows
    that never run), prefilled in one pass, then decoded by a compiled ``lax.while_loop`` of
    one-token steps with static shapes; a row stops at its first stop token, and the loop ends
    when every row has stopped. The cache [layers, batch, slots, kv heads, head dim] is sharded
    by the rules (batch over ``data`` x ``fsdp``, key/value heads over ``tensor``), like the
    activations in training. Greedy decoding (``temperature=0``) gives the same tokens on every
    layout as a plain forward pass over the whole sequence at each step.

    Args:
      cfg: the transformer's config, or the transformer itself (:func:`shardml.transformer`,
        :func:`shardml.load_hf`).
      params: its parameters, placed by a trainer on ``mesh`` (``trainer.natural(params)``).
      prompts: token ids, one sequence per prompt.
      rules: logical -> mesh axes (default :meth:`Rules.default`); ``mesh`` needs pipeline=1.
      stop_tokens: up to 8 token ids that end a row (kept as its last token).
      context: the longest sequence the model may see (prompt + new tokens); None: no limit.

    Raises:
      DataError, SettingError: before compiling, for a prompt the context cannot hold or sampling
        settings out of range (:func:`check_generation`, :func:`check_sampling`).
      LayoutError: a mesh with a pipeline or members axis (:func:`check_decoding_mesh`).
    """
    rules = rules or Rules.default()
    cfg = cfg.config if isinstance(cfg, Model) else cfg
    if not isinstance(cfg, TransformerConfig):
        raise ModelError("generate decodes transformers (shardml.transformer, shardml.load_hf); this model has no "
                         "TransformerConfig", subject="model", value=None)
    check_generation([len(p) for p in prompts], max_new_tokens, context)
    check_sampling(temperature, top_k, top_p, stop_tokens)
    check_decoding_mesh(mesh)
    tokens, starts = _right_aligned(prompts, round_rows(len(prompts), _batch_shards(mesh, rules)))
    placed = _Placed.put(tokens, starts, len(prompts), _sampling(seed, temperature, top_k, top_p, stop_tokens),
                         mesh, rules)
    prefill_exe, decode_exe, compile_s = decoder(cfg, mesh, rules).compiled(
        params, placed.prefill_args(), placed.decode_args(), tokens.shape[1], max_new_tokens,
        sampler_of(temperature, top_k, top_p))
    run = _run_timed(prefill_exe, decode_exe, params, placed, mesh)
    out = run.pop("out")
    results = [out[row][out[row] >= 0].astype(np.int32) for row in range(len(prompts))]
    return Generation(tokens=results, prompt_tokens=sum(len(p) for p in prompts),
                      new_tokens=sum(len(r) for r in results), compile_seconds=compile_s, **run)
