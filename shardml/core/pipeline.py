"""Pipeline parallelism on the ``pipeline`` mesh axis: GPipe, circular and 1F1B in one compiled step.

The stacked layers of a model are cut into p stages, one per device along ``pipeline``; a step
runs inside ``shard_map`` (manual over ``pipeline`` and ``data``, automatic over ``fsdp`` and
``tensor``, so FSDP and tensor parallelism keep working inside each stage) as a loop of *ticks*:
in each tick every stage works on one microbatch, then sends activations to its neighbour with
``ppermute``. The embedding runs on the first stage and the output head and loss on the last, so
only [microbatch, sequence, d_model] activations (and their cotangents) cross stage boundaries;
the vocabulary-sized one-hots and logits never do.

Schedules (p stages, m microbatches per pass, v virtual stages per device):

* ``gpipe``: all forwards, then all backwards (``jax.grad`` of the forward loop). Each tick saves
  only its stage input and recomputes the stage in the backward (as the GPipe paper does), so
  activation memory is m + p - 1 stage inputs. Bubble (p-1)/(m+p-1).
* ``circular``: the layers are dealt round-robin in v chunks per device; microbatches go round
  the ring v times, in groups of p, so the last stage's output arrives at the first stage exactly
  when it is needed (no circular storage). Bubble (p-1)/(v·m+p-1); needs m divisible by p.
* ``1f1b``: after p-1 warm-up ticks every stage alternates one forward and one backward, with an
  explicit per-microbatch ``jax.vjp``. A stage keeps its last 2p-1 stage inputs in a ring buffer
  and recomputes the stage from them in the backward, so activation memory does not grow with m.
  Idle slots are skipped with ``lax.cond`` (not computed and masked), which keeps the lock-step
  loop's bubble at (p-1)/(m+p-1) instead of twice that.

Ticks whose sends are the same are run as one ``lax.scan``; the few warm-up and cool-down ticks
(O(p), independent of m) are unrolled, so idle slots send nothing and compile time stays flat in
m. Gradients are accumulated in f32 per device and reduced once per step, after the loop: over
``data`` for every parameter and over ``pipeline`` for the embedding and head.

Accumulation (``passes = k``) composes: each device's rows are split into k accumulation chunks,
each run as one pipelined pass of m microbatches, inside the same shard_map; the reductions above
still happen once per step.

    pipe = Pipeline(model, mesh, Schedule("1f1b", stages=4, microbatches=16))
    params = pipe.layout(params)                             # no-op unless repeats > 1
    loss, grads = jax.value_and_grad(pipe.loss)(params, batch)   # under jax.set_mesh(mesh)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from shardml.core.errors import LayoutError, ModelError, SettingError
from shardml.core.losses import Loss, check_sums, token_cross_entropy
from shardml.core.sharding import constrain, is_axes, moves_as_words
from shardml.core.strategy import GradientStrategy

PIPE, DATA = "pipeline", "data"
MANUAL = (PIPE, DATA)
SCHEDULES = ("gpipe", "circular", "1f1b")


# ----------------------------------------------------------------------------- the schedule


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which stage does what at each tick. Indices work on Python ints and on traced ints alike."""

    name: str  # gpipe | circular | 1f1b
    stages: int
    microbatches: int
    repeats: int = 1

    def __post_init__(self):
        p, m, v = self.stages, self.microbatches, self.repeats
        if self.name not in SCHEDULES:
            raise SettingError(f"schedule='{self.name}' is not a schedule; use {', '.join(SCHEDULES)}",
                               subject="schedule", value=self.name)
        if min(p, m, v) < 1:
            raise SettingError(f"pipeline stages={p}, microbatches={m}, repeats={v} must all be positive")
        if v > 1 and self.name != "circular":
            raise SettingError(f"repeats={v} needs schedule=circular (got '{self.name}'); "
                               "set repeats=1 or choose the circular schedule", subject="repeats", value=v)
        if v > 1 and m % p:
            raise LayoutError(f"microbatches={m} is not a multiple of stages={p}; the circular "
                              "schedule sends microbatches round the ring in groups of one per stage",
                              subject="microbatches", value=m)

    @property
    def ticks(self) -> int:
        p, m, v = self.stages, self.microbatches, self.repeats
        return m + 2 * p - 2 if self.name == "1f1b" else v * m + p - 1

    @property
    def bubble(self) -> float:
        """Theoretical idle fraction of a stage, (p-1)/(v·m+p-1)."""
        p, m, v = self.stages, self.microbatches, self.repeats
        return (p - 1) / (v * m + p - 1)

    def forward_slot(self, t, s):
        """(valid, microbatch, repeat) of stage ``s``'s forward at tick ``t``.

        Stage 0 starts work item u = t - s at tick u; items go in groups of p microbatches through
        all v repeats before the next group starts (v = 1: item u is microbatch u).
        """
        p, m, v = self.stages, self.microbatches, self.repeats
        u = t - s
        valid = (u >= 0) & (u < v * m)
        u = jnp.clip(u, 0, v * m - 1) if isinstance(u, jax.Array) else min(max(u, 0), v * m - 1)
        return valid, (u // (v * p)) * p + u % p, (u % (v * p)) // p

    def backward_slot(self, t, s):
        """(valid, microbatch) of stage ``s``'s backward at tick ``t`` (1F1B)."""
        b = t - (2 * self.stages - 2 - s)
        valid = (b >= 0) & (b < self.microbatches)
        b = jnp.clip(b, 0, self.microbatches - 1) if isinstance(b, jax.Array) else min(max(b, 0), self.microbatches - 1)
        return valid, b

    def work(self, t: int) -> tuple[bool, bool]:
        """(any stage runs a forward, any stage runs a backward) at tick ``t`` (1F1B), so ticks of
        the warm-up and cool-down only trace the half they need."""
        p = self.stages
        return (any(self.forward_slot(t, s)[0] for s in range(p)),
                any(self.backward_slot(t, s)[0] for s in range(p)))

    def sends(self, t: int) -> tuple:
        """The static (sender, receiver) pairs that carry real data at tick ``t``.

        1F1B: (forward pairs, backward pairs). Otherwise: forward pairs only (the last stage sends
        round the ring to the first unless the microbatch has finished its last repeat).
        """
        p, v = self.stages, self.repeats
        if self.name == "1f1b":
            fwd = tuple((s, s + 1) for s in range(p - 1) if self.forward_slot(t, s)[0])
            bwd = tuple((s, s - 1) for s in range(1, p) if self.backward_slot(t, s)[0])
            return fwd, bwd, self.work(t)
        pairs = []
        for s in range(p):
            valid, _, r = self.forward_slot(t, s)
            if valid and not (s == p - 1 and r == v - 1):
                pairs.append((s, (s + 1) % p))
        return (tuple(pairs),)

    def period(self) -> int:
        """Ticks after which the steady-state send pattern repeats."""
        return self.stages * self.repeats if self.repeats > 1 else 1


def _periodic_window(signatures: list, period: int) -> tuple[int, int]:
    """(start, repetitions) of the longest run of whole periods with identical signatures."""
    best = (0, 0)
    n_ticks = len(signatures)
    for start in range(n_ticks):
        reps = 0
        block = signatures[start:start + period]
        while start + (reps + 1) * period <= n_ticks and \
                signatures[start + reps * period:start + (reps + 1) * period] == block:
            reps += 1
        if reps > best[1]:
            best = (start, reps)
    return best


def run_ticks(tick, carry, schedule: Schedule):
    """Runs ``tick(carry, t, sends) -> carry`` for every tick of ``schedule``.

    The longest stretch of repeating send patterns becomes one ``lax.scan`` (its body unrolls one
    period); the O(p) ticks before and after it are unrolled, so their idle pairs send nothing.
    """
    signatures = [schedule.sends(t) for t in range(schedule.ticks)]
    period = schedule.period()
    start, reps = _periodic_window(signatures, period)
    if reps < 2:
        start, reps = schedule.ticks, 0
    for t in range(start):
        carry = tick(carry, jnp.int32(t), signatures[t])
    if reps:
        def block(carry, index):
            first = start + index * period
            for j in range(period):
                carry = tick(carry, first + j, signatures[start + j])
            return carry, None

        carry, _ = jax.lax.scan(block, carry, jnp.arange(reps, dtype=jnp.int32))
    for t in range(start + reps * period, schedule.ticks):
        carry = tick(carry, jnp.int32(t), signatures[t])
    return carry


# ----------------------------------------------------------------------------- shard_map helpers


def _vary(tree):
    """Marks every leaf as varying over the manual axes, so a vjp inside stays local (no implicit
    psum per tick) and loop carries type-check; the one reduction happens after the loop."""

    def one(x):
        have = jax.typeof(x).manual_axis_type.varying
        missing = tuple(a for a in MANUAL if a not in have)
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(one, tree)


def _zeros(like):
    return _vary(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), like))


def _send(x, pairs):
    if not pairs:
        return _zeros(x)
    return _permute(x, tuple(pairs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _permute(x, pairs):
    """``ppermute`` over ``pipeline`` that moves 16-bit floats as raw 16-bit words.

    XLA:CPU widens every bf16 collective to f32 (convert, f32 permute, convert), doubling the bytes;
    a permute only moves bits, so sending them as uint16 keeps the wire in the compute dtype. The
    bitcast is not differentiable, hence the custom VJP: the cotangent goes back along the reversed
    pairs, as ``ppermute``'s own transpose does.
    """
    if not moves_as_words(x.dtype):
        return jax.lax.ppermute(x, PIPE, list(pairs))
    words = jax.lax.bitcast_convert_type(x, jnp.uint16)
    return jax.lax.bitcast_convert_type(jax.lax.ppermute(words, PIPE, list(pairs)), x.dtype)


def _permute_fwd(x, pairs):
    return _permute(x, pairs), None


def _permute_bwd(pairs, _, g):
    return (_permute(g, tuple((dst, src) for src, dst in pairs)),)


_permute.defvjp(_permute_fwd, _permute_bwd)


def _zero_sums(names: tuple[str, ...]):
    return _zeros({name: jax.ShapeDtypeStruct((), jnp.float32) for name in names})


def _head_sums(stages, loss: Loss, names, shared, h, micro, index):
    """The loss sums of microbatch ``index`` from the last stage's activations ``h`` (zero for the
    ``names`` only the layers add)."""
    rows = jax.tree.map(lambda x: x[index], {k: v for k, v in micro.items() if k != "inputs"})
    return _zero_sums(names) | check_sums(loss(stages.head(shared, h), rows), "the pipeline's loss")


# ----------------------------------------------------------------------------- the passes


def _stage_layers(stages, layers, h, first):
    """A stage's layers on ``h`` and the sums they add to the loss sums (``{}`` for most models);
    ``first``: the model-wide index of their first layer, for models whose layers differ by it
    (``Stages.layers_from``) or add sums (``Stages.layers_sums``: a mixture of experts' auxiliary
    losses, added on the stage that runs the layers, where a pipeline stage differentiates them)."""
    if stages.layers_sums is not None:
        return stages.layers_sums(layers, h, first)
    if stages.layers_from is None:
        return stages.layers(layers, h), {}
    return stages.layers_from(layers, h, first), {}


def _with_stage_sums(sums, extra, valid):
    """The loss sums plus a stage's own (zero in an idle slot, selected so nothing it computed on
    zeros reaches them)."""
    return sums | {k: sums[k] + jnp.where(valid, jnp.asarray(v, jnp.float32), 0.0) for k, v in extra.items()}


def forward_pass(stages, loss: Loss, names, schedule: Schedule, chunks, shared, micro):
    """Per-device forward loop (GPipe / circular): returns the loss sums (``names``) of the pass.

    ``chunks``: this device's layers, leaves [v, layers per chunk, ...]; ``micro``: inputs,
    targets[, mask] with leaves [m, microbatch, ...]. Differentiate it for the GPipe backward.
    Idle slots compute on zeros and their results are discarded; the head and the loss run only
    where the last stage finishes a microbatch (``lax.cond``), so nothing an idle slot computed
    (NaN from layers that fail on zeros, say) reaches the loss, nor the gradients through 0 x NaN
    in the head's backward.
    """
    p, v = schedule.stages, schedule.repeats
    stage = jax.lax.axis_index(PIPE)
    per_chunk = jax.tree.leaves(chunks)[0].shape[1]  # chunk r of stage s: layers from (r p + s) x per_chunk
    h_shape = jax.eval_shape(stages.embed, shared, micro["inputs"][0])

    @jax.checkpoint  # keep only the tick's input; the backward recomputes the stage
    def compute(h_recv, t):
        valid, i, r = schedule.forward_slot(t, stage)
        first = (stage == 0) & (r == 0)
        h_in = jnp.where(first, stages.embed(shared, micro["inputs"][i]), h_recv)
        h_in = jnp.where(valid, h_in, jnp.zeros_like(h_in))  # idle slots compute on zeros, whatever they hold
        h_out, extra = _stage_layers(stages, jax.tree.map(lambda w: w[r], chunks), h_in,
                                     (r * p + stage) * per_chunk)
        last = valid & (stage == p - 1) & (r == v - 1)
        sums = jax.lax.cond(last, lambda: _head_sums(stages, loss, names, shared, h_out, micro, i),
                            lambda: _zero_sums(names))
        return h_out, _with_stage_sums(sums, extra, valid)

    def tick(carry, t, sends):
        h, sums = carry
        h_out, tick_sums = compute(h, t)
        return _send(h_out, sends[0]), jax.tree.map(jnp.add, sums, tick_sums)

    _, sums = run_ticks(tick, (_zeros(h_shape), _zero_sums(names)), schedule)
    return sums


def _one_f_one_b_stage(stages, loss: Loss, names, p: int, slots: int, layers, shared, micro):
    """This device's 1F1B stage: ``forward(h_in, index)`` and ``backward(stash, recv_b, index)``
    (layer grads, shared grads, input cotangent, loss sums)."""
    stage = jax.lax.axis_index(PIPE)

    def forward(layers, shared, h_in, index):
        h_in = jax.lax.cond(stage == 0, lambda: stages.embed(shared, micro["inputs"][index]).astype(h_in.dtype),
                            lambda: h_in)
        return _stage_layers(stages, layers, h_in, stage * jax.tree.leaves(layers)[0].shape[0])

    def forward_and_loss(layers, shared, h_in, index):
        h_out, extra = forward(layers, shared, h_in, index)
        sums = jax.lax.cond(stage == p - 1, lambda: _head_sums(stages, loss, names, shared, h_out, micro, index),
                            lambda: _zero_sums(names))
        sums = _with_stage_sums(sums, extra, True)  # backward runs only in valid slots
        return (h_out, sums["loss"]), sums

    def backward(stash, recv_b, index):
        fn = functools.partial(forward_and_loss, index=index)
        _, vjp_fn, sums = jax.vjp(fn, layers, shared, stash[index % slots], has_aux=True)
        last = stage == p - 1
        # Every stage seeds its own loss (the head's on the last, the layers' sums on each where the
        # model adds them); the others receive the cotangent of their output. Selecting (not
        # multiplying) keeps whatever an idle receive holds out of the gradients.
        ct_h = jnp.where(last, jnp.zeros_like(recv_b), recv_b)
        ct_loss = _vary(jnp.ones((), jnp.float32))
        g_layers, g_shared, d_h = vjp_fn((ct_h, ct_loss))
        return g_layers, g_shared, d_h, sums

    return (lambda h_in, index: forward(layers, shared, h_in, index)[0]), backward


def one_f_one_b_pass(stages, loss: Loss, names, schedule: Schedule, chunks, shared, micro):
    """Per-device 1F1B loop: returns (loss sums, (layer grads, shared grads)), f32 sums.

    Stage s runs the forward of microbatch t - s and the backward of microbatch t - (2p - 2 - s) at
    tick t; the last stage does both for the same microbatch (its forward only stashes the input:
    the backward's vjp recomputes it together with the head and the loss).
    """
    p = schedule.stages
    slots = 2 * p - 1  # stage s holds 2(p - 1 - s) + 1 microbatches between their forward and backward
    stage = jax.lax.axis_index(PIPE)
    layers = jax.tree.map(lambda w: w[0], chunks)
    h_shape = jax.eval_shape(stages.embed, shared, micro["inputs"][0])
    stage_forward, backward = _one_f_one_b_stage(stages, loss, names, p, slots, layers, shared, micro)

    def tick(carry, t, sends):
        recv_f, recv_b, stash, acc, sums = carry
        f_valid, f, _ = schedule.forward_slot(t, stage)
        b_valid, b = schedule.backward_slot(t, stage)
        any_forward, any_backward = sends[2]
        h_out = d_h = None
        if any_forward:
            slot = f % slots
            stash = stash.at[slot].set(jnp.where(f_valid, recv_f, stash[slot]))  # before the backward reads it
            h_out = jax.lax.cond(f_valid & (stage < p - 1), lambda: stage_forward(recv_f, f),
                                 lambda: _zeros(recv_f))
        if any_backward:
            zero_grads = (*_zeros((layers, shared, recv_b)), _zero_sums(names))
            g_layers, g_shared, d_h, b_sums = jax.lax.cond(
                b_valid, lambda: backward(stash, recv_b, b), lambda: zero_grads)
            acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, (g_layers, g_shared))
            sums = jax.tree.map(jnp.add, sums, b_sums)
        return (_send(h_out if h_out is not None else recv_f, sends[0]),
                _send(d_h if d_h is not None else recv_b, sends[1]), stash, acc, sums)

    h0 = jnp.zeros(h_shape.shape, h_shape.dtype)
    acc0 = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), (layers, shared))
    carry = (*_vary((h0, h0, jnp.broadcast_to(h0, (slots, *h0.shape)), acc0)), _zero_sums(names))
    _, _, _, (g_layers, g_shared), sums = run_ticks(tick, carry, schedule)
    return sums, (jax.tree.map(lambda g: g[None], g_layers), g_shared)


def pass_gradients(stages, loss: Loss, names, schedule: Schedule, chunks, shared, micro):
    """(loss sums, (chunk grads, shared grads)) of one pipelined pass, per device, f32."""
    if schedule.name == "1f1b":
        return one_f_one_b_pass(stages, loss, names, schedule, chunks, shared, micro)

    def loss_fn(chunks, shared):
        sums = forward_pass(stages, loss, names, schedule, chunks, shared, micro)
        return sums["loss"], sums

    grads, sums = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)(chunks, shared)
    return sums, jax.tree.map(lambda g: g.astype(jnp.float32), grads)


# ----------------------------------------------------------------------------- layout


def to_pipeline_layout(params: dict, key: str, repeats: int) -> dict:
    """Stacked layers [L, ...] -> [v, L/v, ...] (v = repeats > 1), so that sharding the second axis
    over ``pipeline`` deals chunk r·p + s to device s; a plain reshape back restores layer order."""
    if repeats == 1:
        return params
    stack = jax.tree.map(lambda w: w.reshape(repeats, w.shape[0] // repeats, *w.shape[1:]), params[key])
    return {**params, key: stack}


def from_pipeline_layout(params: dict, key: str, repeats: int) -> dict:
    """Inverse of :func:`to_pipeline_layout`."""
    if repeats == 1:
        return params
    return {**params, key: jax.tree.map(lambda w: w.reshape(-1, *w.shape[2:]), params[key])}


def pipeline_logical(param_logical: dict, key: str, repeats: int) -> dict:
    """Logical axes of the parameters in the pipeline layout (``repeats`` axis is never sharded)."""
    if repeats == 1:
        return param_logical
    return {**param_logical, key: jax.tree.map(lambda axes: ("repeats",) + tuple(axes), param_logical[key],
                                                is_leaf=is_axes)}


# ----------------------------------------------------------------------------- the public object


def _split(batch, passes: int, microbatches: int):
    """Per-device rows [n, ...] -> [passes, m, n/(passes·m), ...], strided (row j goes to split j mod
    passes·m), so under fsdp every microbatch keeps the rows its shard already holds."""

    def one(x):
        n = x.shape[0]
        per = n // (passes * microbatches)
        x = x.reshape(per, passes, microbatches, *x.shape[1:])
        x = jnp.moveaxis(x, 0, 2)
        return constrain(x, (None, None, "batch") + (None,) * (x.ndim - 3))

    return jax.tree.map(one, batch)


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A model pipelined over ``mesh``'s ``pipeline`` axis with one schedule.

    Methods must be traced under ``jax.set_mesh(mesh)`` (the trainer does this, and activates its
    rules, which map the stacked ``layers`` axis to ``pipeline``). ``params`` are in the pipeline
    layout (:meth:`layout`); ``batch`` holds ``inputs``, ``targets`` and optionally ``mask``, with
    the leading (batch) axis sharded over ``data`` x ``fsdp``.

    Attributes:
      loss: ``loss(outputs, batch) -> sums`` computed on the last stage (default: token
        cross-entropy).
      passes: accumulation chunks per step (the accumulator's ``microbatches``), each one pipelined pass.
    """

    model: Any
    mesh: Any
    schedule: Schedule
    passes: int = 1
    loss_fn: Loss = token_cross_entropy

    def __post_init__(self):
        stages = self.mesh.shape[PIPE]
        name = self.model.name
        if self.model.stages is None:
            raise ModelError(f"pipeline={stages}: {name} has no Stages (embed / layers / head), so it "
                             "cannot be cut into pipeline stages; use pipeline=1", subject="pipeline", value=stages)
        if self.model.uses_rng:
            raise ModelError(f"pipeline={stages}: {name} draws random numbers, which the pipeline does "
                             "not pass to stages yet; use pipeline=1", subject="pipeline", value=stages)
        if self.schedule.stages != stages:
            raise LayoutError(f"the schedule has {self.schedule.stages} stages but the mesh has pipeline={stages}",
                              subject="pipeline", value=stages)
        n_layers = jax.tree.leaves(self.model.abstract_params[self.key])[0].shape[0]
        chunks = stages * self.schedule.repeats
        if n_layers % chunks:
            raise LayoutError(
                f"layers={n_layers} is not divisible by pipeline x repeats = {stages} x "
                f"{self.schedule.repeats} = {chunks}; every stage needs the same number of layers, so use a "
                f"multiple of {chunks}", subject="layers", value=n_layers)

    @property
    def key(self) -> str:
        return self.model.stages.key

    def layout(self, params: dict) -> dict:
        """Natural parameters -> the pipeline layout (a reshape; identity unless repeats > 1)."""
        return to_pipeline_layout(params, self.key, self.schedule.repeats)

    def natural(self, params: dict) -> dict:
        """The pipeline layout -> the model's natural parameters (what an unpipelined apply takes)."""
        return from_pipeline_layout(params, self.key, self.schedule.repeats)

    def _layer_spec(self):
        return P(PIPE) if self.schedule.repeats == 1 else P(None, PIPE)

    def _sum_names(self, params, batch) -> tuple[str, ...]:
        """The names of the loss's sums (traced on global shapes, outside ``shard_map``)."""
        def sums(params, batch):
            outputs, extra = self.model.outputs_and_sums(self.natural(params), batch["inputs"])
            return check_sums(self.loss_fn(outputs, batch)) | extra

        return tuple(sorted(jax.eval_shape(sums, params, batch)))

    def _sharded(self, local_fn, out_specs, params, batch):
        key, v = self.key, self.schedule.repeats
        names = self._sum_names(params, batch)
        stack = params[key]
        shared = {k: w for k, w in params.items() if k != key}
        layer_spec = self._layer_spec()
        in_specs = (jax.tree.map(lambda _: layer_spec, stack), jax.tree.map(lambda _: P(), shared),
                    jax.tree.map(lambda _: P(DATA), batch))

        def local(stack, shared, batch):
            chunks = stack if v > 1 else jax.tree.map(lambda w: w[None], stack)
            return local_fn(names, _vary(chunks), _vary(shared), batch)

        fn = jax.shard_map(local, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs(layer_spec, stack, shared),
                           axis_names=set(MANUAL))
        return fn(stack, shared, batch)

    def gradient_sums(self, params: dict, batch: dict):
        """(f32 gradient sums, loss sums) of the global batch, reduced once."""
        if isinstance(batch["inputs"], dict):  # the stages take token ids only: embed(params, tokens)
            raise ModelError(f"packed inputs ({sorted(batch['inputs'])}, shardml.pack_examples) are not pipelined yet; "
                             "give each example its own row (shardml.pad_examples) or use no pipeline",
                             subject="pipeline", value=self.schedule.stages)
        stages, schedule, passes, loss = self.model.stages, self.schedule, self.passes, self.loss_fn
        v, key = schedule.repeats, self.key

        def local(names, chunks, shared, batch):
            split = _split(batch, passes, schedule.microbatches)

            def one_pass(micro):
                return pass_gradients(stages, loss, names, schedule, chunks, shared, micro)

            if passes == 1:
                sums, (g_chunks, g_shared) = one_pass(jax.tree.map(lambda x: x[0], split))
            else:
                def body(total, micro):
                    return jax.tree.map(jnp.add, total, one_pass(micro)), None

                zero = (_zero_sums(names), _zeros(jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                                                               (chunks, shared))))
                (sums, (g_chunks, g_shared)), _ = jax.lax.scan(body, zero, split)
            # The reductions of the step: every gradient over data, the replicated ones over pipeline.
            g_chunks = jax.lax.psum(g_chunks, DATA)
            g_shared = jax.lax.psum(g_shared, MANUAL)
            sums = jax.lax.psum(sums, MANUAL)
            g_stack = g_chunks if v > 1 else jax.tree.map(lambda g: g[0], g_chunks)
            return g_stack, g_shared, sums

        def out_specs(layer_spec, stack, shared):
            return (jax.tree.map(lambda _: layer_spec, stack), jax.tree.map(lambda _: P(), shared), P())

        g_stack, g_shared, sums = self._sharded(local, out_specs, params, batch)
        return {**g_shared, key: g_stack}, sums

    def loss_sums(self, params: dict, batch: dict):
        """Loss sums with the forward-only loop (evaluation), whatever the schedule."""
        stages, passes, loss = self.model.stages, self.passes, self.loss_fn
        forward = Schedule("circular" if self.schedule.repeats > 1 else "gpipe", self.schedule.stages,
                           self.schedule.microbatches, self.schedule.repeats)

        def local(names, chunks, shared, batch):
            split = _split(batch, passes, forward.microbatches)

            def body(total, micro):
                return jax.tree.map(jnp.add, total, forward_pass(stages, loss, names, forward, chunks, shared, micro)), None

            sums, _ = jax.lax.scan(body, _zero_sums(names), split)
            return jax.lax.psum(sums, MANUAL)

        return self._sharded(local, lambda *_: P(), params, batch)

    def strategy(self) -> GradientStrategy:
        """This pipeline as the train step's :class:`GradientStrategy`."""
        return GradientStrategy(
            gradient_sums=lambda params, batch, rng_rows=None: self.gradient_sums(params, batch),
            loss_sums=self.loss_sums,
            param_logical=pipeline_logical(self.model.logical, self.key, self.schedule.repeats),
            layout=self.layout, natural=self.natural)

    @functools.cached_property
    def loss(self):
        """``loss(params, batch)``: mean loss per token, differentiable with ``jax.grad``.

        A ``custom_vjp``: called alone it runs the forward-only loop; under ``jax.grad`` its forward
        rule runs the chosen schedule (1F1B included) and keeps the gradients, which the backward
        rule scales by the incoming cotangent. No forward-mode or higher-order derivatives.
        """

        def mean(sums):
            return sums["loss"] / jnp.maximum(sums["count"], 1.0)

        @jax.custom_vjp
        def loss(params, batch):
            return mean(self.loss_sums(params, batch))

        def fwd(params, batch):
            grad_sums, sums = self.gradient_sums(params, batch)
            count = jnp.maximum(sums["count"], 1.0)
            return mean(sums), jax.tree.map(lambda g: g / count, grad_sums)

        def bwd(grads, g):
            return jax.tree.map(lambda x: (g * x).astype(x.dtype), grads), None

        loss.defvjp(fwd, bwd)
        return loss
