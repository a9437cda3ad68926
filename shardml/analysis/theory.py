"""What a layout should cost, in closed form from the model's shape and the batch alone: per-device memory and per-step
communication by the scaling-book formulas, to hold the compiled program against.

Nothing here reads shardml's sharding rules, the model code or a compiled program; the weights
and the mesh axes that divide them are written out again from the architecture (ZeRO-3 divides
the model dimension over ``fsdp``; Megatron divides heads, MLP hidden and vocabulary over
``tensor``; the pipeline divides the stacked layers; the ``expert`` axis divides the experts of a
mixture-of-experts layer, which the batch is split over too; norm scales and the router's expert
dimension are replicated). Shape letters: B global batch, S sequence, D model, H query heads, K
key/value heads, E head dim, F MLP hidden (Fe each expert's), V vocabulary, L layers, X experts;
N_x is the size of mesh axis x.

Communication per device and step (bytes a device *sends*, ring algorithms on a group of N):

* DP: the f32 gradients are all-reduced once per step over the batch axes, 2(N-1)/N x gradient
  (also with k accumulation ``microbatches``: accumulate, then reduce once).
* FSDP: every weight sharded over ``fsdp`` is all-gathered in the compute dtype for each forward
  ((N-1)/N x the gathered weight) and, where remat recomputes the forward (``dots``, ``full``),
  again for its backward; without remat the backward uses the forward's copy (the embedding's
  backward needs no weight at all). Its f32 gradient is reduce-scattered once ((N-1)/N x the
  gradient). Replicated weights (norm scales) are all-reduced over the batch axes.
* TP (Megatron): per layer two all-reduces of the activations [B/(N_data N_fsdp), S, D] in the
  forward (attention and MLP outputs) and five in the backward (the input gradient of each
  column-parallel product: q, k, v, gate and up; shardml keeps them separate products, as stacking
  their weights to reduce once costs more than the three reductions it saves), one more
  when ``remat="full"`` recomputes the forward (the attention output, which the MLP's backward
  needs; the block's own output is not needed by its backward, so its reduction is not redone;
  ``dots`` saves both matmul outputs); one forward all-reduce for the vocab-parallel
  embedding, one backward for the unembedding's input gradient, and three f32 [rows, S]
  reductions of the vocab-parallel cross-entropy (max, sum of exponentials, target logit).
* Pipeline: each microbatch's activation [rows / (k m), S, D] crosses v·p - 1 stage boundaries
  forward and its cotangent as many backward: 2 m (v p - 1) sends per pass, k passes per step;
  per device that is the total over the p stages / p (sends = the array, no ring factor).
* Context (the sequence split over C shards, :func:`_context_traffic`): ring attention permutes
  each layer's K and V blocks C - 1 times forward, dK and dV as often backward (and the forward's
  again where remat recomputes the layer); all-gathered attention gathers K and V per layer and
  reduce-scatters their gradients. Every weight's gradient is all-reduced over context apart.
* Experts (``moe_dispatch="all_to_all"``, N_e = N_expert > 1): per MoE layer and microbatch,
  all-to-alls over ``expert`` of [N_e, room, D] (room: a device's B S top_k / (N_batch N_context k)
  pairs, dropless, or with a capacity at most rows x X / N_e x C): rows and results forward, their
  cotangents backward, and under remat the forward's two again; plus the int32 counts [X] forward
  (and recomputed). (N_e - 1) / N_e of each is sent. With ``gspmd`` the partitioner's choice is
  not modelled (see :mod:`shardml.models.transformer_moe`).

Memory per device (activations: of the S / N_context positions a device holds): every weight's f32
bytes / the product of the mesh sizes dividing it (an expert layer's X experts / N_expert per
device); AdamW keeps two f32 moments like the parameters (its two step counters are left out).

    work = Workload(d_model=512, heads=8, kv_heads=8, d_ff=2048, vocab=256, layers=4, dtype="bfloat16",
                    remat="full", seq_len=256, batch_size=32)
    theory = layout_theory(work, {"data": 2, "fsdp": 1, "tensor": 4, "pipeline": 1})
    theory.params_bytes, theory.comm_bytes("all-reduce", ("tensor",))

A run config's :class:`Workload` is built by :func:`shardml.run.planning.workload`.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from shardml.core.errors import SettingError
from shardml.core.mesh import MESH_AXES

SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
BATCH_AXES = ("data", "fsdp", "expert")


@dataclasses.dataclass(frozen=True)
class Weight:
    """One weight of the decoder; ``axes`` names the mesh axis dividing each dimension (or None)."""

    name: str
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    per_layer: bool
    backward_needs_it: bool = True  # its input's gradient is computed with it (not the embedding's one-hot)


@dataclasses.dataclass(frozen=True)
class Workload:
    """What the theory needs of a run: the decoder's shape, the compute dtype and remat policy, and
    how the global batch of ``batch_size`` sequences of ``seq_len`` is split (``microbatches`` k
    accumulation steps; under a pipeline, ``schedule``, ``pipeline_microbatches`` m per pass (0:
    one per stage) and ``repeats`` v). Plain values: the oracle shares no code with the run."""

    d_model: int
    heads: int
    kv_heads: int  # 0: as many as heads
    d_ff: int
    vocab: int
    layers: int
    dtype: str  # numpy-style: float32, bfloat16
    remat: str  # none | full | dots
    seq_len: int
    batch_size: int
    microbatches: int = 1
    schedule: str = "1f1b"
    pipeline_microbatches: int = 0
    repeats: int = 1
    head_dim: int = 0  # E; 0: d_model / heads (Qwen3 and Gemma set it apart)
    experts: int = 0  # X; 0: a dense MLP in each layer
    expert_d_ff: int = 0  # Fe; 0: d_ff
    shared_experts: int = 0  # experts every token passes through: a dense MLP of shared_experts x Fe
    top_k: int = 2  # experts each token is sent to
    capacity_factor: float = 0.0  # 0: dropless; c: at most ceil(c S top_k / X) pairs per expert and sequence
    moe_dispatch: str = "all_to_all"  # all_to_all: the hand-written dispatch over expert; gspmd: not modelled
    context_attention: str = "allgather"  # attention over a sequence split over ``context``: allgather | ring

    def __post_init__(self):
        if self.remat not in ("none", "full", "dots"):
            raise SettingError(f"remat={self.remat!r}: the theory needs none, full or dots (an 'auto' choice "
                               "resolved first)", subject="remat", value=self.remat)
        if self.context_attention not in ("allgather", "ring"):
            raise SettingError(f"context_attention={self.context_attention!r}: the theory knows allgather and ring",
                               subject="context_attention", value=self.context_attention)


def pipeline_microbatches(w: Workload, stages: int) -> int:
    """m: ``pipeline_microbatches``, one per stage when 0."""
    return 1 if stages <= 1 else w.pipeline_microbatches or stages


def head_dim(w: Workload) -> int:
    """E: ``head_dim`` where the workload sets it, else ``d_model / heads``."""
    return w.head_dim or w.d_model // w.heads


def weights(w: Workload) -> list[Weight]:
    """The decoder's weights, one layer's worth for ``per_layer`` ones."""
    D, H, F, V = w.d_model, w.heads, w.d_ff, w.vocab
    K, E = w.kv_heads or H, head_dim(w)
    col, row, norm = ("fsdp", "tensor"), ("tensor", "fsdp"), (None,)
    return [
        Weight("embed", (V, D), ("tensor", "fsdp"), False, backward_needs_it=False),
        Weight("attn_norm", (D,), norm, True), Weight("wq", (D, H * E), col, True),
        Weight("wk", (D, K * E), col, True), Weight("wv", (D, K * E), col, True),
        Weight("wo", (H * E, D), row, True), Weight("mlp_norm", (D,), norm, True),
        *(_mlp_weights(w) if w.experts else _dense_mlp("w_", F, D)),
        Weight("final_norm", (D,), norm, False), Weight("unembed", (D, V), col, False),
    ]


def _dense_mlp(prefix: str, width: int, D: int) -> list[Weight]:
    """A SwiGLU MLP of hidden ``width``: gate and up column-parallel, down row-parallel."""
    return [Weight(f"{prefix}gate", (D, width), ("fsdp", "tensor"), True),
            Weight(f"{prefix}up", (D, width), ("fsdp", "tensor"), True),
            Weight(f"{prefix}down", (width, D), ("tensor", "fsdp"), True)]


def _mlp_weights(w: Workload) -> list[Weight]:
    """A mixture-of-experts layer: the router [D, X] (its expert dimension whole: every token
    scores every expert), X SwiGLU experts split over ``expert`` and the shared experts' MLP."""
    D, X, Fe = w.d_model, w.experts, w.expert_d_ff or w.d_ff
    out = [Weight("router", (D, X), ("fsdp", None), True),
           Weight("we_gate", (X, D, Fe), ("expert", "fsdp", "tensor"), True),
           Weight("we_up", (X, D, Fe), ("expert", "fsdp", "tensor"), True),
           Weight("we_down", (X, Fe, D), ("expert", "tensor", "fsdp"), True)]
    return out + (_dense_mlp("ws_", w.shared_experts * Fe, D) if w.shared_experts else [])


@dataclasses.dataclass(frozen=True)
class Traffic:
    """One kind of collective on one set of mesh axes for one purpose, per device and step.

    ``elements`` is the size of the full array the ring formula applies to (the gathered weight,
    the reduced gradient or activation), summed over ``count`` arrays; ``sent_elements`` applies
    the formula (for permutes it is already the per-device average).
    """

    kind: str
    axes: tuple[str, ...]
    what: str
    count: float
    elements: float
    dtype: str  # numpy-style name: float32, bfloat16
    group: int

    @property
    def sent_elements(self) -> float:
        n = self.group
        factor = {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n,
                  "reduce-scatter": (n - 1) / n, "all-to-all": (n - 1) / n}.get(self.kind, 1.0)
        return factor * self.elements

    @property
    def sent_bytes(self) -> float:
        return self.sent_elements * jnp.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class LayoutTheory:
    """Per-device memory and per-step communication of one layout (see the module docstring)."""

    sizes: dict[str, int]
    params_bytes: int  # f32 parameters per device
    opt_state_bytes: int  # AdamW's two f32 moments per device
    activation_bytes: int  # rough: what the remat policy keeps for the backward (see activation_estimate)
    traffic: tuple[Traffic, ...]

    def comm_bytes(self, kind: str | None = None, axes: tuple[str, ...] | None = None) -> float:
        """Bytes one device sends per step (ring convention) of a kind and/or over exactly ``axes``."""
        return sum(t.sent_bytes for t in self.traffic
                   if (kind is None or t.kind == kind) and (axes is None or t.axes == axes))


def _ordered(axes) -> tuple[str, ...]:
    return tuple(a for a in MESH_AXES if a in axes)


def _divisor(w: Weight, sizes: dict[str, int], skip: tuple[str, ...] = ()) -> int:
    return math.prod(sizes.get(a, 1) for a in w.axes if a is not None and a not in skip)


def _copies(w: Weight, work: Workload, sizes: dict[str, int]) -> int:
    """Layers of ``w`` a device holds: the pipeline divides the stack; shared weights: one."""
    return work.layers // sizes["pipeline"] if w.per_layer else 1


def param_elements(work: Workload, sizes: dict[str, int]) -> int:
    """Parameter elements one device holds."""
    return sum(_copies(w, work, sizes) * math.prod(w.shape) // _divisor(w, sizes) for w in weights(work))


def activation_estimate(work: Workload, sizes: dict[str, int]) -> int:
    """Bytes of activations kept for the backward at the peak, per device (a rough guide).

    Per layer and token, in the compute dtype: ``full`` keeps the block input (D); ``dots`` also
    the matmul outputs q, k, v, the attention projection, gate, up and down (3D + (H + 2K) E / N_t
    + 2F / N_t); ``none`` also the norms, attention probabilities and the SwiGLU product. Tokens:
    one accumulation microbatch of this device's rows, of its S / N_context positions (``none``
    keeps each local query's probabilities over all S keys under ``allgather``; ring attention
    recomputes each block's scores and keeps instead the f32 running sums (E + 2 per query head)
    of each of its N_context steps). Plus the f32 logits of that microbatch (also S / N_context).
    Under a pipeline: the stage inputs a schedule keeps (GPipe and circular v m + p - 1, 1F1B
    2p - 1 pipeline microbatches) plus one pipeline microbatch's residuals of this stage's layers.
    """
    m, t, c = work, sizes["tensor"], sizes.get("context", 1)
    item = jnp.dtype(m.dtype).itemsize
    H, K, E = m.heads, m.kv_heads or m.heads, head_dim(m)
    S = work.seq_len // c  # the positions this device holds: context splits every activation's sequence
    per_token = {"full": m.d_model,
                 "dots": 3 * m.d_model + (H + 2 * K) * E // t + 2 * m.d_ff // t}
    attention = ((H // t) * c * (E + 2) * 4 // item if m.context_attention == "ring" and c > 1
                 else (H // t) * work.seq_len * (item + 4) // item)
    per_token["none"] = per_token["dots"] + 2 * m.d_model + attention + m.d_ff // t
    rows = work.batch_size // (batch_split(sizes) * work.microbatches)
    p = sizes["pipeline"]
    layers = m.layers // p
    logits = 4 * rows * S * m.vocab // t
    if p == 1:
        return layers * rows * S * per_token[m.remat] * item + logits
    micro = pipeline_microbatches(work, sizes["pipeline"])
    rows //= micro
    held = 2 * p - 1 if work.schedule == "1f1b" else work.repeats * micro + p - 1
    return (held * rows * S * m.d_model + layers * rows * S * per_token[m.remat]) * item + logits // micro


def batch_split(sizes: dict[str, int]) -> int:
    """How many ways the batch is split: over ``data``, ``fsdp`` and ``expert``."""
    return math.prod(sizes.get(a, 1) for a in BATCH_AXES)


def _gradient_traffic(work: Workload, sizes: dict[str, int]) -> list[Traffic]:
    out = []
    fsdp = sizes["fsdp"]
    for w in weights(work):
        copies = _copies(w, work, sizes)
        grad = copies * math.prod(w.shape) // _divisor(w, sizes, skip=("fsdp",))  # before any fsdp scatter
        # the batch axes that do not divide the weight (an expert's gradient stays on its experts' devices)
        rest = [a for a in BATCH_AXES if a != "fsdp" and sizes.get(a, 1) > 1 and a not in w.axes]
        if "fsdp" in w.axes and fsdp > 1:
            out.append(Traffic("reduce-scatter", ("fsdp",), "f32 gradients", copies, grad, "float32", fsdp))
            if rest:
                out.append(Traffic("all-reduce", _ordered(rest), "f32 gradients", copies, grad // fsdp, "float32",
                                   math.prod(sizes[a] for a in rest)))
            continue
        axes = [a for a in BATCH_AXES if sizes.get(a, 1) > 1 and a not in w.axes]
        if not w.per_layer and sizes["pipeline"] > 1:
            axes.append("pipeline")  # shared weights are replicated on every stage
        if axes:
            group = math.prod(sizes[a] for a in axes)
            out.append(Traffic("all-reduce", _ordered(axes), "f32 gradients", copies, grad, "float32", group))
    return out


def _fsdp_traffic(work: Workload, sizes: dict[str, int]) -> list[Traffic]:
    fsdp = sizes["fsdp"]
    if fsdp == 1:
        return []
    passes = work.microbatches * pipeline_microbatches(work, sizes["pipeline"])
    out = []
    for w in weights(work):
        if "fsdp" not in w.axes:
            continue
        copies = _copies(w, work, sizes)
        gathered = copies * math.prod(w.shape) // _divisor(w, sizes, skip=("fsdp",))
        times = passes * (2 if w.backward_needs_it and work.remat != "none" else 1)
        out.append(Traffic("all-gather", ("fsdp",), f"{SHORT[work.dtype]} weights", times * copies,
                           times * gathered, work.dtype, fsdp))
    return out


def _tensor_traffic(work: Workload, sizes: dict[str, int]) -> list[Traffic]:
    t = sizes["tensor"]
    if t == 1:
        return []
    m, p = work, sizes["pipeline"]
    passes = work.microbatches * pipeline_microbatches(work, sizes["pipeline"])
    rows = work.batch_size // batch_split(sizes)
    act = rows * work.seq_len // sizes.get("context", 1) * m.d_model  # one activation of the rows and positions here
    per_layer = 2 + 5 + (1 if m.remat == "full" else 0)
    layers = m.layers // p
    dtype = SHORT[m.dtype]
    recomputed = ", 1 recomputed forward (remat=full)" if m.remat == "full" else ""
    return [
        Traffic("all-reduce", ("tensor",), f"{dtype} activations per layer: 2 forward, 5 backward{recomputed}",
                per_layer * layers * passes, per_layer * layers * act, m.dtype, t),
        # Embedding (first stage) and unembedding (last stage): averaged over the p stages.
        Traffic("all-reduce", ("tensor",), f"{dtype} activations: embedding forward, unembedding backward",
                2 * passes / p, 2 * act / p, m.dtype, t),
        Traffic("all-reduce", ("tensor",), "f32 cross-entropy [rows, S]: max, sum, target",
                3 * passes / p, 3 * rows * work.seq_len / p, "float32", t),
    ]


def _pipeline_traffic(work: Workload, sizes: dict[str, int]) -> list[Traffic]:
    p = sizes["pipeline"]
    if p == 1:
        return []
    micro, k = pipeline_microbatches(work, sizes["pipeline"]), work.microbatches
    rows = work.batch_size // (batch_split(sizes) * k * micro)
    sends = 2 * micro * (work.repeats * p - 1) * k  # per pipeline (one set of p stages)
    act = rows * work.seq_len * work.d_model  # replicated over tensor: every device sends it
    return [Traffic("collective-permute", ("pipeline",), f"{SHORT[work.dtype]} activations and cotangents",
                    sends / p, sends * act / p, work.dtype, p)]


def expert_room(work: Workload, sizes: dict[str, int]) -> int:
    """Rows of each destination's block in one expert all-to-all: all of a device's (token,
    choice) pairs of one microbatch (dropless: they may all go to one shard), or with a capacity
    C = ceil(c S top_k / X) per expert and sequence at most rows x (X / N_expert) x C."""
    rows = work.batch_size // (batch_split(sizes) * work.microbatches)
    pairs = rows * (work.seq_len // sizes.get("context", 1)) * work.top_k
    if not work.capacity_factor:
        return pairs
    cap = math.ceil(work.capacity_factor * work.seq_len * work.top_k / work.experts)
    return min(pairs, rows * (work.experts // sizes["expert"]) * cap)


def _expert_traffic(work: Workload, sizes: dict[str, int]) -> list[Traffic]:
    """The all-to-all dispatch of :mod:`shardml.models.transformer_moe` over ``expert`` (N_e
    shards), per layer and microbatch: forward the int32 counts [N_e, X / N_e] (X elements), the
    routed rows and the experts' results, each [N_e, room, D] in the compute dtype; backward the
    rows' and results' cotangents; with remat (``dots`` or ``full``) the forward's three again.
    Not inside a pipeline's stages, where the partitioner places the experts (not modelled)."""
    e = sizes.get("expert", 1)
    if not work.experts or e == 1 or work.moe_dispatch != "all_to_all" or sizes["pipeline"] > 1:
        return []
    passes = work.microbatches * pipeline_microbatches(work, sizes["pipeline"])
    layers = work.layers // sizes["pipeline"]
    again = 0 if work.remat == "none" else 1
    rows = e * expert_room(work, sizes) * work.d_model
    dtype = SHORT[work.dtype]
    recomputed = " + 2 recomputed (remat)" if again else ""
    n_rows, n_counts = (4 + 2 * again) * layers * passes, (1 + again) * layers * passes
    return [Traffic("all-to-all", ("expert",), f"{dtype} routed rows and results: 2 forward + 2 backward{recomputed}",
                    n_rows, n_rows * rows, work.dtype, e),
            Traffic("all-to-all", ("expert",), "int32 rows per (shard, expert)", n_counts, n_counts * work.experts,
                    "int32", e)]


def layout_theory(work: Workload, sizes: dict[str, int]) -> LayoutTheory:
    """Closed-form memory and communication of the workload ``work`` on the resolved mesh ``sizes``."""
    params = 4 * param_elements(work, sizes)
    traffic = (_gradient_traffic(work, sizes) + _fsdp_traffic(work, sizes) + _tensor_traffic(work, sizes)
               + _pipeline_traffic(work, sizes) + _expert_traffic(work, sizes) + _context_traffic(work, sizes))
    return LayoutTheory(sizes=dict(sizes), params_bytes=params, opt_state_bytes=2 * params,
                        activation_bytes=activation_estimate(work, sizes), traffic=tuple(traffic))


def _context_traffic(work: Workload, sizes: dict[str, int]) -> list[Traffic]:
    """The ``context`` axis (C shards of the sequence), per pass (accumulation microbatch) of this
    device's rows; a whole K (or V) is [rows, S, K / N_t, E] in the compute dtype, a block S / C of it.

    Ring attention: each layer's forward passes the K and V blocks C - 1 times round the ring
    (collective-permutes; each device sends its block), the backward sends dK and dV back as many
    times and, under ``remat`` (full or dots), first recomputes the forward's permutes; the int32
    global indices of the blocks travel too (C - 1: the same in every layer, so hoisted out of the
    layer loop, plus C - 1 per recomputed layer). Restoring the natural order of the last layer's
    output [rows, S, D] (before the unembedding) all-gathers it over context; its backward
    all-reduces its gradient.
    All-gathered attention gathers K and V per layer forward, again when remat recomputes the
    layer, and reduce-scatters dK and dV in the backward. Either way every weight's f32 gradient
    is summed over context on its own (an all-reduce apart from the batch axes').

        _context_traffic(work, {**sizes, "context": 4})
    """
    c, t = sizes.get("context", 1), sizes["tensor"]
    if c == 1:
        return []
    passes, L, dtype = work.microbatches, work.layers, work.dtype
    rows = work.batch_size // (batch_split(sizes) * passes)
    K = work.kv_heads or work.heads
    kv = rows * work.seq_len * (K // t if K % t == 0 else K) * head_dim(work)  # one whole K (or V)
    redo = 0 if work.remat == "none" else 1  # the layer's forward runs again for its backward
    grads = Traffic("all-reduce", ("context",), "f32 gradients", 1, param_elements(work, sizes), "float32", c)
    if work.context_attention != "ring":
        gathers = 2 * (1 + redo) * L * passes
        return [Traffic("all-gather", ("context",), f"{SHORT[dtype]} K and V per layer: forward{', recomputed' * redo}",
                        gathers, gathers * kv, dtype, c),
                Traffic("reduce-scatter", ("context",), f"{SHORT[dtype]} dK and dV per layer", 2 * L * passes,
                        2 * L * passes * kv, dtype, c), grads]
    sends = 2 * (2 + redo) * (c - 1) * L * passes  # K and V: forward, backward, recomputed forward
    index_sends = (c - 1) * (1 + redo * L * passes)
    out = rows * work.seq_len * work.d_model * passes  # the last layer's output, whole
    return [Traffic("collective-permute", ("context",), f"{SHORT[dtype]} K and V blocks: forward, dK and dV back"
                    f"{', recomputed forward' * redo}", sends, sends * kv / c, dtype, c),
            Traffic("collective-permute", ("context",), "int32 block indices", index_sends,
                    index_sends * work.seq_len / c, "int32", c),
            Traffic("all-gather", ("context",), f"{SHORT[dtype]} output to the natural order", passes, out, dtype, c),
            Traffic("all-reduce", ("context",), f"{SHORT[dtype]} output's gradient", passes, out, dtype, c), grads]
