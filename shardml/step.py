"""Train state and the compiled train / eval steps: explicit shardings, donated state, abstract init.

    trainer = build_trainer(model, mesh, optimizer=default_optimizer(OptimConfig(), steps=100),
                            microbatches=4)
    state = trainer.init(seed=0)                 # created already sharded
    state, metrics = trainer.step(state, batch)  # (state, batch) -> (state, metrics)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from shardml.accumulate import accumulate_gradients, model_loss
from shardml.config import OptimConfig, PipelineConfig
from shardml.models.base import Model, abstract_params, init_params, logical_axes
from shardml.pipeline import Pipeline, Schedule, pipeline_logical
from shardml.sharding import Rules, batch_sharding, replicated, tree_shardings, use_rules


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything that changes during training; a PyTree (jit, checkpoints and vmap take it as is).

    ``rng`` holds raw key data (uint32) so the state saves and restores without key adapters.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def default_optimizer(cfg: OptimConfig, steps: int) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay, after global-norm clipping."""
    warmup = min(cfg.warmup, max(steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=cfg.lr / (warmup + 1), peak_value=cfg.lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay),
    )


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The compiled functions of one (model, mesh, optimizer, microbatches) combination.

    Attributes:
      state_shardings: TrainState of NamedShardings (parameters and optimizer state by the rules).
      batch_sharding: sharding of every batch leaf (leading dim over the batch axes).
      pipeline: the :class:`shardml.pipeline.Pipeline` when the mesh has ``pipeline > 1`` (its
        ``natural`` / ``layout`` convert parameters between the model's and the pipeline's layout).
    """

    model: Model
    mesh: Any
    rules: Rules
    optimizer: optax.GradientTransformation
    microbatches: int
    state_shardings: TrainState
    batch_sharding: NamedSharding
    _init: Any
    _step: Any
    _eval: Any
    pipeline: Pipeline | None = None

    def init(self, seed: int = 0) -> TrainState:
        """A fresh state, every array created directly in its shards."""
        with jax.set_mesh(self.mesh):
            return self._init(jnp.asarray(seed, jnp.uint32))

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One optimizer step on a global batch; ``state`` is donated.

        ``metrics["skipped"]`` is 1 when the loss or the gradients were not finite: the step then
        left ``params`` and ``opt_state`` unchanged (``step`` still counts the batch).
        """
        with jax.set_mesh(self.mesh):
            return self._step(state, batch)

    def evaluate(self, params: Any, batch: dict) -> dict:
        """Summed loss and token count of a batch (divide sums over batches once, at the end)."""
        with jax.set_mesh(self.mesh):
            return self._eval(params, batch)

    def lower_step(self, state: Any, batch: Any):
        """``jax.stages.Lowered`` of the step, for audits (accepts ShapeDtypeStructs)."""
        with jax.set_mesh(self.mesh):
            return self._step.lower(state, batch)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs (with shardings) of the state, without allocating it."""
        with jax.set_mesh(self.mesh):
            shapes = jax.eval_shape(self._init, jnp.asarray(0, jnp.uint32))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_shardings)


def build_trainer(
    model: Model,
    mesh,
    optimizer: optax.GradientTransformation,
    microbatches: int = 1,
    rules: Rules | None = None,
    loss_fn=None,
    pipeline: PipelineConfig | None = None,
) -> Trainer:
    """Compiles-on-first-use the init, train and eval steps of ``model`` on ``mesh``.

    Args:
      model: a :class:`shardml.models.Model`.
      mesh: from :func:`shardml.make_mesh`.
      optimizer: any optax transformation.
      microbatches: k, the accumulator's split of each device's rows.
      rules: logical -> mesh axes; default :meth:`Rules.default`.
      loss_fn: ``loss(params, batch) -> (summed loss, count)``; default: token cross-entropy of
        ``model.apply`` on ``batch["inputs"]``, ``batch["targets"]``, optional ``batch["mask"]``.
      pipeline: schedule, microbatches and repeats when ``mesh`` has a ``pipeline`` axis > 1; each of
        the ``microbatches`` accumulation chunks is then one pipelined pass.
    """
    rules = rules or Rules.default()
    pipe = None
    if mesh.shape.get("pipeline", 1) > 1:
        if loss_fn is not None:
            raise ValueError("loss_fn cannot be combined with mesh.pipeline > 1: the pipeline computes the "
                             "model's token cross-entropy in its last stage")
        pc = pipeline or PipelineConfig()
        stages = mesh.shape["pipeline"]
        pipe = Pipeline(model, mesh, Schedule(pc.schedule, stages, pc.microbatches or stages, pc.repeats),
                        passes=microbatches, rules=rules)
        rules = pipe.effective_rules
    loss_fn = loss_fn or model_loss(model.apply)
    layout = pipe.layout if pipe is not None else (lambda params: params)
    param_logical = logical_axes(model.specs)
    if pipe is not None:
        param_logical = pipeline_logical(param_logical, pipe.key, pipe.schedule.repeats)
    param_shardings = tree_shardings(param_logical, rules, mesh)
    abstract_opt = jax.eval_shape(lambda p: optimizer.init(layout(p)), abstract_params(model.specs))
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, abstract_opt, param_shardings,
        transform_non_params=lambda _: replicated(mesh),
    )
    state_shardings = TrainState(step=replicated(mesh), params=param_shardings,
                                 opt_state=opt_shardings, rng=replicated(mesh))
    data_sharding = batch_sharding(mesh, rules, 1)
    if pipe is not None:
        grad_fn, eval_fn = pipe.gradients, pipe.loss_sums
    else:
        grad_fn, eval_fn = accumulate_gradients(loss_fn, microbatches, mesh, param_logical), loss_fn

    def init(seed):
        key = jax.random.key(seed)
        params = layout(init_params(model.specs, jax.random.fold_in(key, 0)))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                          rng=jax.random.key_data(jax.random.fold_in(key, 1)))

    def train_step(state: TrainState, batch):
        with use_rules(rules):
            grads, loss, tokens = grad_fn(state.params, batch)
        grads = jax.tree.map(jax.lax.with_sharding_constraint, grads, param_shardings)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        # A non-finite loss or gradient leaves parameters and optimizer state as they were; the
        # step counter (the data position) still advances: the batch is consumed, not retried.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                         (params, opt_state), (state.params, state.opt_state))
        metrics = {"loss": loss, "tokens": tokens, "grad_norm": grad_norm,
                   "skipped": 1 - finite.astype(jnp.int32)}
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    def eval_step(params, batch):
        with use_rules(rules):
            loss_sum, count = eval_fn(params, batch)
        return {"loss_sum": loss_sum, "tokens": count}

    metric_sharding = replicated(mesh)
    return Trainer(
        model=model, mesh=mesh, rules=rules, optimizer=optimizer, microbatches=microbatches,
        state_shardings=state_shardings, batch_sharding=data_sharding,
        _init=jax.jit(init, out_shardings=state_shardings),
        _step=jax.jit(train_step, in_shardings=(state_shardings, data_sharding),
                      out_shardings=(state_shardings, metric_sharding), donate_argnums=0),
        _eval=jax.jit(eval_step, in_shardings=(param_shardings, data_sharding), out_shardings=metric_sharding),
        pipeline=pipe,
    )


def put_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Host numpy batch -> global arrays sharded over the batch axes (multi-host aware)."""
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
