"""Plausible bugs the tests must catch, one per entry, planted by tests/mutations/run.py.

Each bug is keyed by a code snippet (``original``) that must occur exactly once across
``shardml/**/*.py``, wherever a refactor has moved it; ``mutated`` replaces it. ``tests`` are
pytest selections (node ids, or ``path -k expr``), run in turn with ``-x``: the first failure
catches the bug. Choose the cheapest tests that catch it. When a refactor rewords a snippet,
re-anchor it here (the runner says which); when a bug survives, write the test that catches it:
never delete the bug. Add the bugs of every new feature.
"""

from __future__ import annotations

import dataclasses

AREAS = ("core", "models", "parallel", "run")


@dataclasses.dataclass(frozen=True)
class Mutation:
    id: str
    area: str
    bug: str
    original: str
    mutated: str
    tests: tuple[str, ...]
    # checked after the others, with nothing beside it: its test compares step times within one run
    alone: bool = False

    def __post_init__(self):
        assert self.area in AREAS, self.area
        assert self.original != self.mutated and self.tests, self.id


G = "tests/test_gradients.py"
POP = "tests/test_population_behaviour.py"
SO = "tests/test_sampling_and_optimizers.py"
REF = "tests/test_transformer_reference.py"
UNITS = "tests/test_references.py"
MLP_GRAD = f"{G}::test_mlp_gradient_on_padded_rows_equals_jax_grad"
TRANSFORMER_GRAD = f"{G}::test_transformer_gradient_on_padded_tokens_equals_jax_grad"
DP_STEP = f"{SO}::test_dp_sgd_step_is_the_mean_of_per_example_clipped_gradients"
DP_NOISE = f"{SO}::test_dp_sgd_noise_is_added_once_to_the_sum_of_clipped_gradients"
SAMPLING = f"{SO}::test_filtered_sampling_draws_from_the_tempered_then_filtered_softmax"
PBT = f"{POP}::test_pbt_exploit_copies_the_best_members_parameters_and_optimizer_state_into_the_worst"
PRUNE = f"{POP}::test_sweep_pruning_stops_the_worst_members_and_freezes_their_parameters"
ENSEMBLE = f"{POP}::test_ensemble_metrics_equal_numpy_written_here"
PER_EXAMPLE = f"{POP}::test_per_example_ensemble_and_classifier_metrics_equal_numpy_written_here"
FEDOPT = f"{SO}::test_fedopt_server_optimizers_follow_their_update_rules"
FED = "tests/test_federated.py"
FED_LORA = "tests/test_federated_lora.py"
FED_LORA_STACK = f"{FED_LORA}::test_the_base_is_stored_once_and_never_stacked_per_client"
FED_LORA_ROUND = f"{FED_LORA}::test_a_round_averages_the_clients_adapters_trained_by_plain_sgd_and_leaves_the_base"
OUT = "tests/test_run_output.py"
GROUPS = "tests/test_groups.py"
TRIALS = "tests/test_group_trials.py"
GRESUME = "tests/test_groups_resume.py"
GROUP_SIZES = f"{GROUPS}::test_sizes_are_given_fixed_by_the_layout_or_balanced_by_cost"
API = "tests/test_python_api.py"
FIT_BATCH = f"{API}::test_fit_refuses_an_indivisible_batch_before_compiling_in_the_cli_s_words"
SWEEP_VALUES = f"{API}::test_sweep_values_are_refused_like_single_values"
MEMBER_ALONE = f"{API}::test_a_member_s_overrides_train_it_alone_on_the_same_devices"
LORA = "tests/test_lora.py"
LORA_GRAD = f"{LORA}::test_one_step_adapter_gradients_equal_peft_autograd_on_data_fsdp_tensor"
LORA_EXPORT = f"{LORA}::test_merged_and_peft_exports_give_the_lora_model_s_logits"
LORA_POP = f"{LORA}::test_a_population_of_adapters_stores_the_base_once_and_stacks_the_adapters"
HF = "tests/test_hf.py"
HFCLI = "tests/test_hf_cli.py"
HF_LOGITS = f"{HF}::test_logits_equal_transformers_on_data_fsdp_tensor"
MOE = "tests/test_moe.py"
HF_MOE = "tests/test_hf_moe.py"
HF_MOE_LOGITS = f"{HF_MOE}::test_moe_logits_and_aux_equal_transformers_on_one_device_and_expert_data_tensor"
MOE_DENSE = f"{MOE}::test_moe_layer_equals_dense_loop_values_and_gradients"
A2A = "tests/test_moe_dispatch.py"
A2A_LAYER = f"{A2A}::test_all_to_all_layer_equals_dense_loop_values_and_gradients"
A2A_CAPACITY = f"{A2A}::test_all_to_all_layer_with_capacity_equals_the_loop_in_order"
MOE_HAND = f"{MOE}::test_routing_counts_and_aux_losses_by_hand"
HOST_MEMORY = "tests/test_host_memory.py"

M = Mutation
MUTATIONS: list[Mutation] = [
    # ------------------------------------------------------------------ core: the step and its gradient
    M("step-gradient-halved", "core", "every gradient halved by the step's one division",
      "constrain(g / count, axes)", "constrain(g / (2 * count), axes)", (MLP_GRAD,)),
    M("step-divides-by-rows", "core", "the step divides by the batch's rows, not the real count",
      'count = jnp.maximum(sums["count"], 1.0)\n        grads',
      'count = jnp.asarray(jax.tree.leaves(batch)[0].shape[0], jnp.float32)\n        grads', (MLP_GRAD,)),
    M("step-grad-norm-of-sums", "core", "grad_norm measured on the gradient sums",
      'metrics["grad_norm"] = optax.tree.norm(grads)', 'metrics["grad_norm"] = optax.tree.norm(grad_sums)',
      (MLP_GRAD,)),
    M("step-nonfinite-keeps-new", "core", "a non-finite step applies its update anyway (arguments swapped)",
      "lambda new, old: jnp.where(finite, new, old),\n                                     (params, opt_state)",
      "lambda new, old: jnp.where(finite, old, new),\n                                     (params, opt_state)",
      (MLP_GRAD,)),
    M("loss-token-count-with-padding", "core", "the padding count: masked tokens counted in the divisor",
      '"count": jnp.sum(weights)}', '"count": jnp.asarray(weights.size, jnp.float32)}',
      (f"{TRANSFORMER_GRAD}[fsdp4-mb4]",)),
    M("loss-class-count-with-padding", "core", "padded rows counted in a classifier's divisor",
      '"count": jnp.sum(weights), "correct"', '"count": jnp.asarray(weights.size, jnp.float32), "correct"',
      (MLP_GRAD,)),
    M("loss-accuracy-counts-padding", "core", "padded rows counted as correct or wrong",
      '"correct": jnp.sum(correct * weights)', '"correct": jnp.sum(correct)', (MLP_GRAD,)),
    M("loss-target-logit-by-max", "core", "the target logit picked with a max instead of a sum",
      "- jnp.sum(logits * onehot, axis=-1)", "- jnp.max(logits * onehot, axis=-1)", (MLP_GRAD,)),
    M("loss-weights-ignored", "core", "padded tokens add their loss",
      'weights = _weights(batch, nll)\n    return {"loss": jnp.sum(nll * weights)',
      'weights = _weights(batch, nll)\n    return {"loss": jnp.sum(nll)',
      (f"{TRANSFORMER_GRAD}[fsdp4-mb4]",)),
    M("accumulate-mean-over-shards", "core", "a mean of means over the data shards",
      "return jax.tree.map(lambda x: jnp.sum(x, axis=0), (grads, sums))",
      "return jax.tree.map(lambda x: jnp.mean(x, axis=0), (grads, sums))", (MLP_GRAD,)),
    M("accumulate-last-microbatch-only", "core", "the accumulator keeps only the last microbatch",
      "return jax.tree.map(jnp.add, carry, one(params, microbatch)), None",
      "return jax.tree.map(lambda a, b: b, carry, one(params, microbatch)), None", (MLP_GRAD,)),
    M("accumulate-gradient-halved", "core", "every microbatch gradient halved (the loss intact)",
      "grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)",
      "grads = jax.tree.map(lambda g: (0.5 * g).astype(jnp.float32), grads)", (MLP_GRAD,)),
    M("loss-sum-halved", "core", "a classifier's loss sum halved",
      '"loss": jnp.sum(nll * weights), "count": jnp.sum(weights), "correct"',
      '"loss": 0.5 * jnp.sum(nll * weights), "count": jnp.sum(weights), "correct"', (MLP_GRAD,)),
    M("pipeline-cotangent-sent-forward", "core", "GPipe's backward permute not reversed (swapped arguments)",
      "tuple((dst, src) for src, dst in pairs)", "tuple((src, dst) for src, dst in pairs)",
      ("tests/test_pipeline.py::test_schedule_matches_unpipelined_model[gpipe-2-4-fsdp=2]",)),
    M("pipeline-1f1b-loss-seed-halved", "core", "1F1B seeds every stage's loss with 0.5: every gradient halved",
      "ct_loss = _vary(jnp.ones((), jnp.float32))",
      "ct_loss = _vary(jnp.full((), 0.5, jnp.float32))",
      (f"{G}::test_pipelined_transformer_gradient_equals_jax_grad",)),
    M("privacy-clip-up", "core", "DP-SGD's clip factor also scales small gradients up",
      "factor = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))",
      "factor = jnp.maximum(1.0, max_norm / jnp.maximum(norm, 1e-30))", (DP_STEP,)),
    M("privacy-mean-not-sum", "core", "DP-SGD averages a microbatch's clipped gradients instead of summing",
      "constrain(jnp.sum(g, axis=0), axes), model.logical, grads", "constrain(jnp.mean(g, axis=0), axes), model.logical, grads",
      (DP_STEP,)),
    M("privacy-noise-per-microbatch", "core", "DP-SGD noise added once per microbatch (std x sqrt(k))",
      "noise_multiplier * clip_norm, model.logical)", "noise_multiplier * clip_norm * microbatches ** 0.5, model.logical)",
      (DP_NOISE,)),
    M("privacy-noise-skipped", "core", "DP-SGD's noise dropped",
      "grads = jax.tree.map(jnp.add, grads, noise)", "grads = jax.tree.map(lambda g, n: g, grads, noise)", (DP_NOISE,)),
    M("privacy-epsilon-noise-doubled", "core", "the accountant told twice the noise that was added",
      "event = dp.GaussianDpEvent(noise_multiplier)", "event = dp.GaussianDpEvent(2 * noise_multiplier)",
      ("tests/test_privacy_accounting.py",)),
    M("privacy-epsilon-steps-halved", "core", "the accountant composes half the steps",
      "accountant.compose(dp.SelfComposedDpEvent(event, int(steps)))",
      "accountant.compose(dp.SelfComposedDpEvent(event, int(steps) // 2))", ("tests/test_privacy_accounting.py",)),
    M("optim-warmup-off-by-one", "core", "the warmup starts at 1/warmup instead of 1/(warmup+1)",
      "start = 1.0 / (warmup + 1)", "start = 1.0 / jnp.maximum(warmup, 1)", (f"{UNITS}::test_learning_rate_shape",)),
    M("optim-clip-after-adam", "core", "gradient clipping after Adam's scaling (operations in the wrong order)",
      "optax.clip_by_global_norm(clip_norm),\n        optax.scale_by_adam(b1=b1, b2=b2),",
      "optax.scale_by_adam(b1=b1, b2=b2),\n        optax.clip_by_global_norm(clip_norm),",
      (f"{UNITS}::test_default_optimizer_is_clipped_adamw_written_here",)),
    M("optim-b1-b2-swapped", "core", "AdamW's b1 and b2 swapped", "optax.scale_by_adam(b1=b1, b2=b2)",
      "optax.scale_by_adam(b1=b2, b2=b1)", (f"{UNITS}::test_default_optimizer_is_clipped_adamw_written_here",)),
    # ------------------------------------------------------------------ core: the host allocator on XLA:CPU
    M("host-memory-mmaps-large-blocks", "core", "large blocks still mmapped (and unmapped) at every step",
      "(M_MMAP_MAX, 0)", "(M_MMAP_MAX, 65536)", (HOST_MEMORY,)),
    M("host-memory-trims", "core", "freed memory at the heap's top handed back to the kernel",
      "(M_TRIM_THRESHOLD, -1)", "(M_TRIM_THRESHOLD, 128 * 1024)", (HOST_MEMORY,)),
    M("host-memory-arenas", "core", "a heap per thread: blocks above 64 MiB mapped afresh every step",
      "(M_ARENA_MAX, 1)", "(M_ARENA_MAX, 8)", (HOST_MEMORY,)),
    M("host-memory-overrides-user", "core", "the user's own MALLOC_* settings overridden",
      "own = sorted(k for k in environ if k.startswith(USER_MALLOC_ENV_PREFIX))", "own = []", (HOST_MEMORY,)),
    M("host-memory-unbounded", "core", "the kept heap never handed back, however large it grows",
      '    if ok and hasattr(libc, "malloc_trim"):', "    if False:",
      (f"{HOST_MEMORY}::test_the_setting_starts_its_watcher_at_half_the_host_memory",)),
    M("host-memory-trims-at-the-bound", "core", "free pages handed back at the bound, not past it",
      "if resident() <= limit_bytes:", "if resident() < limit_bytes:",
      (f"{HOST_MEMORY}::test_kept_pages_go_back_only_past_the_bound",)),
    M("host-memory-not-applied", "core", "emulated CPU devices leave glibc's allocator as it is",
      "    avoid_cpu_collective_deadlock(n)\n    if keep_host_memory and cpu_only():\n        keep_freed_host_memory()\n",
      "    avoid_cpu_collective_deadlock(n)\n", (HOST_MEMORY,)),
    # ------------------------------------------------------------------ models
    M("attention-scale", "models", "attention scores divided by E instead of sqrt(E)",
      "scores = scores / math.sqrt(cfg.query_scale or E)", "scores = scores / (cfg.query_scale or E)", (REF,)),
    M("rotary-sign", "models", "rotary positions rotated the other way (the sine's sign)",
      "cos, sin = jnp.cos(angle_BSE)[:, :, None, :], jnp.sin(angle_BSE)[:, :, None, :]",
      "cos, sin = jnp.cos(angle_BSE)[:, :, None, :], -jnp.sin(angle_BSE)[:, :, None, :]", (REF,)),
    M("rotary-frequencies", "models", "rotary angles doubled",
      "return positions_BS.astype(jnp.float32)[:, :, None] * inv_freq",
      "return positions_BS.astype(jnp.float32)[:, :, None] * inv_freq * 2", (REF,)),
    M("rms-norm-axis", "models", "RMS norm over the wrong axis",
      "jnp.mean(x32 * x32, axis=-1, keepdims=True)", "jnp.mean(x32 * x32, axis=-2, keepdims=True)", (REF,)),
    M("rms-norm-scale-ignored", "models", "RMS norm ignores its scale",
      "return (y * scale.astype(jnp.float32)).astype(x.dtype)", "return y.astype(x.dtype)", (REF,)),
    M("causal-mask-flipped", "models", "attention sees the future (the mask transposed)",
      "seen = key_B1T <= query_BS1", "seen = key_B1T >= query_BS1",
      (REF,)),
    M("gqa-grouping", "models", "query heads grouped onto key/value heads in the wrong order",
      'q_BSKGE = q_BSHE.reshape(B, S, K, H // K, E)\n    scores = jnp.einsum("bskge,btke->bkgst", q_BSKGE, k_BTKE',
      'q_BSKGE = q_BSHE.reshape(B, S, H // K, K, E).swapaxes(2, 3)\n    scores = jnp.einsum("bskge,btke->bkgst", '
      'q_BSKGE, k_BTKE', (f"{REF} -k grouped",)),
    M("mlp-activation", "models", "the SwiGLU gate through gelu", "\"silu\": jax.nn.silu,",
      "\"silu\": jax.nn.gelu,", (REF,)),
    M("mlp-residual-skipped", "models", "the MLP's residual connection skipped (a copy skipped)",
      "return constrain(x_BSD + mlp_BSD, ACT_LOGICAL), aux", "return constrain(mlp_BSD, ACT_LOGICAL), aux", (REF,)),
    M("final-norm-skipped", "models", "the final norm skipped",
      'x_BSD = norm(x_BSD, params["final_norm"], cfg)', "x_BSD = x_BSD", (REF,)),
    M("mlp-classifier-bias", "models", "the classifier's hidden bias dropped",
      'x_BI.astype(compute) @ p["w_in"] + p["b_in"]', 'x_BI.astype(compute) @ p["w_in"]',
      (f"{UNITS}::test_mlp_classifier_equals_numpy_written_here",)),
    # ------------------------------------------------------------------ parallel: populations
    M("pbt-exploit-reversed", "parallel", "PBT's exploit reversed: the best copy the worst",
      "best, worst = order[:q], order[n - q:]", "best, worst = order[n - q:], order[:q]", (PBT,)),
    M("pbt-params-not-copied", "parallel", "PBT copies the optimizer state but not the parameters",
      "params, opt_state = jax.tree.map(lambda x: x[sources], (state.params, state.opt_state))",
      "params, opt_state = state.params, jax.tree.map(lambda x: x[sources], state.opt_state)", (PBT,)),
    M("pbt-opt-state-not-copied", "parallel", "PBT copies the parameters but not the optimizer state",
      "params, opt_state = jax.tree.map(lambda x: x[sources], (state.params, state.opt_state))",
      "params, opt_state = jax.tree.map(lambda x: x[sources], state.params), state.opt_state", (PBT,)),
    M("pbt-fraction-off-by-one", "parallel", "PBT replaces one member fewer than its fraction",
      "q = max(1, int(fraction * n))", "q = max(1, int(fraction * n) - 1)", (PBT,)),
    M("pbt-perturbs-everyone", "parallel", "PBT perturbs the hyperparameters of members that kept their place",
      "jnp.where(replaced, hyper[name] * factors[i], hyper[name])",
      "jnp.where(replaced | True, hyper[name] * factors[i], hyper[name])", (PBT,)),
    M("population-seeds", "parallel", "member i initialised from seed + i + 1",
      "return jnp.arange(members, dtype=jnp.uint32) + jnp.asarray(seed, jnp.uint32)",
      "return jnp.arange(members, dtype=jnp.uint32) + jnp.asarray(seed, jnp.uint32) + 1",
      (f"{G}::test_every_population_member_takes_its_own_sgd_step",)),
    M("ensemble-member-entropy", "parallel", "the members' entropy taken from the most uncertain member",
      "(-(probs * logp).sum(-1).mean(0) * weight).sum()", "(-(probs * logp).sum(-1).max(0) * weight).sum()",
      (ENSEMBLE,)),
    M("ensemble-member-entropy-unweighted", "parallel", "padded rows add to the members' entropy",
      "(-(probs * logp).sum(-1).mean(0) * weight).sum()", "(-(probs * logp).sum(-1).mean(0)).sum()", (ENSEMBLE,)),
    M("ensemble-mean-of-logits", "parallel", "the ensemble averages log-probabilities, not probabilities",
      "mean = probs.mean(0)  # the ensemble", "mean = np.exp(logp.mean(0))  # the ensemble",
      (ENSEMBLE,)),
    M("ece-bins-off-by-one", "parallel", "ECE confidence bins of width 1/14",
      "np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)",
      "np.minimum((confidence * (ECE_BINS - 1)).astype(int), ECE_BINS - 1)",
      (f"{POP}::test_ece_bins_confidence_exactly_as_equal_width_bins",)),
    M("ece-without-bins", "parallel", "ECE as |mean confidence - accuracy| (bins summed before the difference)",
      "ece = np.abs(self.bins[:, 1] - self.bins[:, 2]).sum(-1) / n",
      "ece = np.abs(self.bins[:, 1].sum(-1) - self.bins[:, 2].sum(-1)) / n", (ENSEMBLE,)),
    M("ensemble-disagreement-inverted", "parallel", "disagreement counts the members that agree",
      '"disagreement", ((member_pred != pred[None])', '"disagreement", ((member_pred == pred[None])', (ENSEMBLE,)),
    M("predict-member-entropy", "parallel", "per-example members' entropy taken of their mean (mutual information 0)",
      "member_entropy = -(probs * np.log(probs + 1e-30)).sum(-1).mean(0)",
      "member_entropy = -(mean * np.log(mean + 1e-30)).sum(-1)", (PER_EXAMPLE,)),
    # ------------------------------------------------------------------ parallel: sampling
    M("sampling-cut-before-temperature", "parallel", "the top-p cut taken on the untempered distribution",
      "jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf), axis=-1)",
      'jax.nn.softmax(jnp.where(in_k, desc * sampling["temperature"], -jnp.inf), axis=-1)', (SAMPLING,)),
    M("sampling-temperature-multiplies", "parallel", "logits multiplied by the temperature",
      'scaled = logits_BV / sampling["temperature"]', 'scaled = logits_BV * sampling["temperature"]',
      (f"{SO}::test_temperature_sampling_draws_from_the_tempered_softmax",)),
    M("sampling-top-k-off-by-one", "parallel", "top-k keeps k + 1 tokens",
      "in_k = jnp.arange(V)[None, :] < k", "in_k = jnp.arange(V)[None, :] <= k", (SAMPLING,)),
    M("sampling-top-p-drops-crossing-token", "parallel", "top-p drops the token that crosses p",
      'keep = in_k & (jnp.cumsum(probs, axis=-1) - probs < sampling["top_p"])',
      'keep = in_k & (jnp.cumsum(probs, axis=-1) < sampling["top_p"])', (SAMPLING,)),
    # ------------------------------------------------------------------ parallel: federated
    M("fedadam-b1-b2-swapped", "parallel", "FedAdam's b1 and b2 swapped", "optax.adam(lr, b1=0.9, b2=0.99, eps=eps)",
      "optax.adam(lr, b1=0.99, b2=0.9, eps=eps)", (FEDOPT,)),
    M("fedyogi-b2", "parallel", "FedYogi's b2 at optax's default", "optax.yogi(lr, b1=0.9, b2=0.99, eps=eps)",
      "optax.yogi(lr, b1=0.9, b2=0.999, eps=eps)", (FEDOPT,)),
    M("fedadagrad-initial-accumulator", "parallel", "FedAdagrad's accumulator starting at optax's 0.1",
      "optax.adagrad(lr, initial_accumulator_value=0.0, eps=eps)",
      "optax.adagrad(lr, initial_accumulator_value=0.1, eps=eps)", (FEDOPT,)),
    M("fedavg-delta-sign", "parallel", "the pseudo-gradient with the wrong sign",
      "lambda w, wk: w[None] - wk, server_params", "lambda w, wk: wk - w[None], server_params",
      (f"{FED}::test_fedavg_round_with_one_sgd_step_equals_one_large_batch_sgd_step",)),
    M("fedavg-unweighted-divisor", "parallel", "client updates summed by examples but divided by clients",
      "total = jnp.maximum(jnp.sum(weight), 1e-30)", "total = jnp.maximum(jnp.sum(real), 1e-30)",
      (f"{FED}::test_unequal_clients_weigh_by_examples_and_empty_slots_count_nothing",)),
    M("fedlora-base-per-client", "parallel", "federated LoRA clients each get (and the server averages) a copy of the base",
      "shardings, shared = round_shardings(program, algorithm), shared_params(program.parts.model)",
      "shardings, shared = round_shardings(program, algorithm), ()", (FED_LORA_STACK,)),
    M("fedlora-client-optimizer-on-base", "parallel", "federated LoRA clients' optimizer holds state for the base",
      "client = lora_optimizer(algorithm.client) if shared_params(model) else algorithm.client",
      "client = algorithm.client", (FED_LORA_STACK,)),
    M("fedprox-anchor-zero", "parallel", "FedProx pulls the clients towards zero, not the round's global weights",
      'return {"anchor": jax.tree.map(jnp.asarray, params)}', 'return {"anchor": jax.tree.map(jnp.zeros_like, params)}',
      (f"{FED_LORA_ROUND}[fedprox-0.7]",)),
    M("dirichlet-concentration", "parallel", "the Dirichlet split drawn with 1/alpha",
      "rng.dirichlet(np.full(clients, alpha))", "rng.dirichlet(np.full(clients, 1.0 / alpha))",
      (f"{FED}::test_partitions_dirichlet_skew_minimum_size_iid_and_natural",)),
    M("lm-bits-per-token", "parallel", "bits per token multiplied by ln 2",
      '"bits_per_token": loss / math.log(2)', '"bits_per_token": loss * math.log(2)',
      (f"{UNITS}::test_lm_metrics_equal_numpy_written_here",)),
    # ------------------------------------------------------------------ models: open-weights families (test_hf)
    M("hf-llama3-rope-unscaled", "models", "Llama 3's RoPE scaling ignored (the plain frequencies)",
      "inv_freq = llama3_frequencies(inv_freq, *scaling)", "inv_freq = inv_freq", (f"{HF_LOGITS}[llama]",)),
    M("hf-window-off-by-one", "models", "the sliding window lets one more key through",
      "seen &= (query_BS1 - key_B1T < cfg.sliding_window)", "seen &= (query_BS1 - key_B1T <= cfg.sliding_window)",
      (f"{HF_LOGITS}[mistral]",)),
    M("hf-decode-ignores-window", "models", "KV-cache decoding attends past the sliding window",
      "visible_keys(slot, slots_T[None, :], cfg, local)", "(slots_T[None, :] <= slot)",
      (f"{HF}::test_greedy_generation_equals_transformers_token_for_token[mistral]",)),
    M("hf-v-bias-is-k-bias", "models", "the value projection gets the key's bias",
      '(v_BSKE, "bv")', '(v_BSKE, "bk")', (f"{HF_LOGITS}[qwen2]",)),
    M("hf-qk-norm-on-q-only", "models", "QK-norm applied to the queries, the keys left unnormed",
      'norm(k_BSKE, layer["k_norm"], cfg)', "k_BSKE", (f"{HF_LOGITS}[qwen3]",)),
    M("hf-slice-groups-not-reversed", "models", "a transposed tensor's slice taken in shardml's dimension order",
      "tuple(reversed(ranges)) if source.transpose else tuple(ranges)", "tuple(ranges)", (f"{HF_LOGITS}[llama]",)),
    M("hf-slice-offset-per-head", "models", "a block's first row counted in heads, not in rows of head_dim",
      "ranges.append(slice(lead.start * math.prod(inner),", "ranges.append(slice(lead.start,",
      (f"{HF_LOGITS}[llama]",)),
    M("hf-shape-unchecked", "models", "tensors are read without checking their shapes against config.json",
      "if found != want:", "if False:", (f"{HF}::test_a_tensor_that_disagrees_with_config_json_is_named",)),
    M("hf-export-untied", "models", "an export of tied embeddings says they are untied",
      '"tie_word_embeddings": cfg.tie_embed', '"tie_word_embeddings": False',
      (f"{HF}::test_save_hf_loads_in_transformers_with_the_same_logits[qwen2]",)),
    M("hf-export-context-default", "models", "save_hf declares a fixed 4096-token context, not the checkpoint's",
      '"max_position_embeddings": cfg.max_positions or DEFAULT_MAX_POSITIONS',
      '"max_position_embeddings": DEFAULT_MAX_POSITIONS', (f"{HF}::test_a_sharded_bf16_checkpoint_loads_as_its_weights",)),
    M("hf-export-always-f32", "models", "save_hf writes float32 tensors whatever the checkpoint's dtype",
      "value).astype(dtype, copy=False)", "value).astype(np.float32, copy=False)",
      (f"{HF}::test_a_sharded_bf16_checkpoint_loads_as_its_weights",)),
    M("pipeline-stage-layers-from-zero", "core", "every pipeline stage numbers its layers from 0 (Gemma's stage 1 "
      "takes its global layer for a local one)", "stage * jax.tree.leaves(layers)[0].shape[0])", "0)",
      (f"{HF}::test_local_and_global_layers_train_on_a_pipeline_as_torch[gemma2-None]",)),
    M("fsdp-regathers-for-the-backward", "models", "the product's cast weight left where its shards are, so the "
      "partitioner gathers it again for the backward products",
      "return relayout(w_cast, *zip(*(WEIGHT_AXES[c] for c in w_idx)))", "return w_cast",
      ("tests/test_audit_theory.py::test_without_remat_the_backward_reuses_the_forward_s_gathered_weights",)),
    M("fsdp-gathers-widened", "core", "16-bit weights gathered as themselves, which XLA:CPU widens to f32",
      "return jnp.dtype(dtype).itemsize == 2 and jnp.issubdtype(dtype, jnp.floating)", "return False",
      ("tests/test_audit_theory.py::test_bf16_weights_are_gathered_in_16_bits",)),
    M("theory-gathers-twice-without-remat", "run", "the theory counts a backward gather also where nothing is recomputed",
      'w.backward_needs_it and work.remat != "none"', "w.backward_needs_it",
      ("tests/test_audit_theory.py::test_without_remat_the_backward_reuses_the_forward_s_gathered_weights",)),
    M("theory-head-dim-from-d-model", "run", "the theory and the FLOP count take head_dim as d_model / heads",
      "return w.head_dim or w.d_model // w.heads", "return w.d_model // w.heads",
      ("tests/test_audit_theory.py::test_theory_counts_every_parameter[head_dim-set]",)),
    M("gemma-attn-softcap-skipped", "models", "Gemma 2's attention scores not soft-capped",
      "scores = cfg.attn_softcap * jnp.tanh(scores / cfg.attn_softcap)", "scores = scores", (f"{HF_LOGITS}[gemma2]",)),
    M("gemma-final-softcap-unscaled", "models", "the final soft-cap's tanh of the raw logits",
      "cfg.final_softcap * jnp.tanh(logits_BSV / cfg.final_softcap)", "cfg.final_softcap * jnp.tanh(logits_BSV)",
      (f"{HF_LOGITS}[gemma2]",)),
    M("gemma-norm-without-one", "models", "Gemma's RMSNorm scaled by w, not 1 + w",
      "scale + 1.0 if cfg.norm_plus_one else scale", "scale", (f"{HF_LOGITS}[gemma2]",)),
    M("gemma-global-layer-off-by-one", "models", "the global layers counted from 0 (layer 0 global)",
      "(layer_index + 1) % cfg.global_every != 0", "layer_index % cfg.global_every != 0", (f"{HF_LOGITS}[gemma2]",)),
    M("gemma3-local-rope-swapped", "models", "Gemma 3's local RoPE base used in the global layers",
      "jnp.where(local, rotary_angles(", "jnp.where(jnp.logical_not(local), rotary_angles(",
      (f"{HF_LOGITS}[gemma3]",)),
    M("gemma-pre-ffw-norm-name", "models", "the MLP's input norm read from post_feedforward_layernorm",
      '"mlp_norm"), _LAYER + "pre_feedforward_layernorm.weight"', '"mlp_norm"), _LAYER + "post_feedforward_layernorm.weight"',
      (f"{HF_LOGITS}[gemma2]",)),
    M("gemma-embed-scale-d", "models", "Gemma's embeddings scaled by d_model, not its square root",
      "jnp.asarray(math.sqrt(cfg.d_model), dtype)", "jnp.asarray(cfg.d_model, dtype)", (f"{HF_LOGITS}[gemma3]",)),
    M("hf-unknown-rope-accepted", "models", "an unsupported RoPE type loaded as plain RoPE",
      'if rope_type not in ("default", "llama3"):', "if False:",
      (f"{HF}::test_an_option_shardml_cannot_express_is_named",)),
    M("gemma-layer-pattern-unchecked", "models", "irregular local/global layers read as every n-th global",
      "if any(is_local != bool((i + 1) % n) for i, is_local in enumerate(local)):", "if False:",
      (f"{HF}::test_local_and_global_layers_out_of_pattern_are_named",)),
    # ------------------------------------------------------------------ run: the population policy, metrics
    M("prune-stops-the-best", "run", "sweep pruning stops the best members",
      "worst = alive[np.argsort(scores[alive])[::-1][:stop]]", "worst = alive[np.argsort(scores[alive])[:stop]]",
      (PRUNE,)),
    M("prune-may-stop-everyone", "run", "pruning may stop the last member",
      "min(int(self.prune_fraction * len(alive)), len(alive) - 1)", "min(int(self.prune_fraction * len(alive)), len(alive))",
      (f"{POP}::test_pruning_never_stops_the_last_member_and_ensembles_never_prune",)),
    M("prune-due-off-by-one", "run", "pruning one step early", "(step + 1) % self.every == 0",
      "step % self.every == 0", (PRUNE,)),
    M("ensemble-prunes", "run", "ensembles pruned like sweeps",
      'prune_every if kind == "sweep" else 0', "prune_every",
      (f"{POP}::test_pruning_never_stops_the_last_member_and_ensembles_never_prune",)),
    M("diverged-member-scored-best", "run", "a member with a NaN validation loss scored as the best",
      "np.nan_to_num(self._scores(val), nan=np.inf)", "np.nan_to_num(self._scores(val), nan=-np.inf)",
      (f"{POP}::test_a_member_with_a_nan_loss_is_pruned_first",)),
    M("metrics-resume-drops-last-step", "run", "resuming drops the records of the step it resumes from",
      'keep = record["step"] <= last_step', 'keep = record["step"] < last_step',
      (f"{UNITS}::test_metrics_writer_keeps_the_records_up_to_the_resumed_step",)),
    M("pbt-lineage-inverted", "run", "PBT's lineage records the members that kept their place",
      "if source != member:", "if source == member:", (f"{POP}::test_pbt_policy_records_who_copied_whom",)),
    # ------------------------------------------------------------------ run: what a run shows (issue 31)
    M("last-step-timed-after-eval", "run", "the last step's record timed after the evaluation's wait (rate 20-30x)",
      "self.flush()\n        jax.block_until_ready(self.state)", "jax.block_until_ready(self.state)",
      (f"{OUT}::test_last_logged_step_is_timed_over_its_own_step",), alone=True),
    M("classifier-reports-tokens", "run", "a classifier's throughput logged as tokens/s",
      '"tokens_per_s" if self.tokens_per_example > 1 else "examples_per_s"', '"tokens_per_s"',
      (f"{OUT}::test_rates_count_tokens_for_language_models_and_examples_for_classifiers",)),
    M("matmul-ratio-called-mfu", "run", "the ratio to the measured matmul called MFU",
      'self.mfu_key = "mfu_vs_matmul"', 'self.mfu_key = "mfu"',
      (f"{OUT}::test_rates_count_tokens_for_language_models_and_examples_for_classifiers",)),
    M("header-dumps-config", "run", "every run prints its whole resolved config again",
      "lines = [config_lib.dump_yaml(cfg).rstrip()] if full else []", "lines = [config_lib.dump_yaml(cfg).rstrip()]",
      (f"{OUT}::test_language_model_run_shows_a_short_header_and_logs_tokens_per_s",)),
    M("unraisable-to-terminal", "run", "library tracebacks from TensorStore's threads reach the terminal",
      "sys.unraisablehook, warnings.showwarning = self._unraisable, self._warning",
      "warnings.showwarning = self._warning",
      (f"{OUT}::test_library_log_takes_unraisable_exceptions_library_warnings_and_absl_lines",)),
    M("handled-error-not-logged", "run", "the damaged checkpoint's Orbax traceback is lost (not in library.log)",
      "{where}{handled(f'checkpoint step {step}', err)}", "{where}",
      (f"{OUT}::test_damaged_checkpoint_prints_one_line_and_keeps_orbaxs_traceback_in_library_log",)),
    # ------------------------------------------------------------------ parallel: groups of devices
    M("groups-overlap", "parallel", "every group cut from the first devices (groups overlap)",
      "tuple(devices[start:start + size])", "tuple(devices[:size])", (GROUP_SIZES,)),
    M("groups-balance-inverted", "parallel", "balancing gives the next devices to the cheapest group",
      "best = max(fits, key=lambda i: (costs[i] / sizes[i], -i))",
      "best = min(fits, key=lambda i: (costs[i] / sizes[i], -i))", (GROUP_SIZES,)),
    M("groups-partition-undercount", "parallel", "groups that leave devices unused are accepted",
      "if sum(sizes) != n_devices:", "if sum(sizes) > n_devices:",
      (f"{GROUPS}::test_bad_groups_fail_before_anything_compiles",)),
    M("groups-dispatch-blocks", "parallel", "each group's step waited for before the next is dispatched",
      "states[index], metrics[index] = trainer.step(states[index], trainer.put(batches[index]))",
      "states[index], metrics[index] = jax.block_until_ready(trainer.step(states[index], trainer.put(batches[index])))",
      (f"{GROUPS}::test_a_slow_group_does_not_delay_the_dispatch_of_a_fast_one",)),
    M("groups-one-data-source", "parallel", "every group trains on the first group's data",
      "[source(step) for source in sources]", "[sources[0](step) for source in sources]",
      (f"{GROUPS}::test_every_member_equals_the_plain_update_of_its_architecture",)),
    M("groups-ensemble-first-member", "parallel", "a group of members enters the ensemble as its first member only",
      "np.asarray(x, np.float32) if g.trainer.members > 1", "np.asarray(x, np.float32)[:1] if g.trainer.members > 1",
      (f"{GROUPS}::test_a_heterogeneous_ensemble_is_the_mean_of_its_members_probabilities",)),
    M("groups-balance-ignores-batch", "parallel", "balancing picks group sizes whose data axis the batch does not divide",
      "if self.batch_size is None or self.batch_size % split == 0:", "if True:", (GROUP_SIZES,)),
    M("groups-member-seed-dropped", "run", "population.json gives every member of a group the group's first seed",
      'f"train.init_seed={base + m}"],', 'f"train.init_seed={base}"],',
      ("tests/test_groups_config.py::test_a_sweep_of_architectures_trains_each_on_its_own_group",)),
    M("groups-rerun-overwrites", "run", "a groups run trains into out_dir without claiming it (--fresh moves nothing)",
      "ident = claim(cfg, fresh, say)", "ident = identity_of(cfg)[0]",
      ("tests/test_groups_config.py::test_a_rerun_resumes_the_finished_run_and_fresh_moves_it_aside",)),
    M("groups-resume-data-from-zero", "parallel", "a resumed groups run feeds the batches from step 0 again",
      "dispatch(groups, run.states, batches(step), live)", "dispatch(groups, run.states, batches(step - start), live)",
      (f"{GRESUME}::test_sigterm_saves_every_group_and_the_same_command_resumes_bitwise",)),
    M("groups-resume-first-group-only", "parallel", "a resumed groups run restores group 0, the others start afresh",
      "states = list(states) if states is not None else groups.init(seed)",
      "states = list(states)[:1] + groups.init(seed)[1:] if states is not None else groups.init(seed)",
      (f"{GRESUME}::test_sigterm_saves_every_group_and_the_same_command_resumes_bitwise",)),
    M("groups-resume-metrics-dropped", "parallel", "a resumed groups run forgets the metrics of the steps before it",
      "[list(rows) for rows in metrics] if metrics is not None else [[] for _ in groups]", "[[] for _ in groups]",
      (f"{GRESUME}::test_sigterm_saves_every_group_and_the_same_command_resumes_bitwise",)),
    M("groups-optim-search-dropped", "run", "an optim.* sweep over architectures trains every member with optim's value",
      "members=members, hyperparams=hyperparams,", "members=members, hyperparams=None,",
      ("tests/test_groups_config.py::test_an_optimizer_and_architecture_sweep_trains_every_member_as_its_plain_run",)),
    M("groups-checkpoint-every-ignored", "run", "a groups run saves only at the end (checkpoint.every ignored)",
      "return stopping[done] or done == steps or bool(every and done % every == 0)",
      "return stopping[done] or done == steps",
      (f"{GRESUME}::test_killed_between_and_during_saves_resumes_from_the_last_step_every_group_saved",)),
    # ------------------------------------------------------------------ run: Optuna over architectures (test_group_trials)
    M("trials-pruned-group-dispatched", "parallel", "a group every trial of which was pruned is still dispatched",
      "                live.remove(index)", "                pass",
      (f"{TRIALS}::test_the_median_pruner_stops_a_worse_trials_group_and_leaves_the_others",)),
    M("trials-report-step-early", "run", "a trial reports its validation loss one step early (the pruner compares "
      "it with other trials' losses at another step)",
      "handles[p].report(float(of_member(loss, positions.index(p), len(positions))), step + 1)",
      "handles[p].report(float(of_member(loss, positions.index(p), len(positions))), step)",
      (f"{TRIALS}::test_the_median_pruner_stops_a_worse_trials_group_and_leaves_the_others",)),
    M("trials-same-shape-apart", "run", "trials of one shape get a group each instead of sharing one as members",
      "plan.setdefault(tuple(architecture_of(trial.params)), []).append(position)",
      "plan.setdefault((*architecture_of(trial.params), position), []).append(position)",
      (f"{TRIALS}::test_trials_of_one_shape_share_a_group",)),
    M("trials-misfit-unchecked", "run", "a proposed shape the layout cannot split is trained (and fails) instead of "
      "told FAIL and asked again", "why = fit(architecture_of(trial.params))", "why = None",
      (f"{TRIALS}::test_a_shape_the_layout_cannot_split_is_told_fail_and_asked_again",)),
    # ------------------------------------------------------------------ run: model.from and export (test_hf_cli)
    M("hf-from-random-init", "run", "a model.from run starts from random weights, not the checkpoint's",
      "self.init = init or trainer.init", "self.init = trainer.init",
      (f"{HFCLI}::test_first_step_loss_equals_transformers_loss_of_the_checkpoint",)),
    M("hf-from-conflict-unchecked", "run", "a model.* key that disagrees with config.json is silently replaced",
      "if mine != getattr(default, field.name) and mine != value:", "if False:",
      (f"{HFCLI}::test_bad_model_from_exits_2_before_compiling[conflict]",)),
    M("hf-tokenizer-size-unchecked", "run", "a tokenizer one row past the embedding is accepted",
      "if tokenizer.vocab > cfg.model.vocab:", "if tokenizer.vocab > cfg.model.vocab + 100:",
      (f"{HFCLI}::test_a_tokenizer_larger_than_the_embedding_exits_2_before_compiling",)),
    M("hf-export-overwrites", "run", "export writes into a non-empty directory",
      "    check_target(out, fmt)\n", "",
      (f"{HFCLI}::test_export_onto_a_non_empty_directory_exits_2_before_compiling",)),
    # ------------------------------------------------------------------ run: the Python API as careful as the CLI
    M("fit-batch-unchecked", "run", "fit reads the batch size under a name no source has: the check is skipped",
      'rows = getattr(data, "batch_size", None)', 'rows = getattr(data, "rows", None)', (FIT_BATCH,)),
    M("rerun-val-none", "run", "a finished run asked again does not evaluate (val None)",
      "if self.eval_batches:  # a finished run asked again",
      "if self.eval_batches is None:  # a finished run asked again",
      (f"{API}::test_a_finished_fit_asked_again_returns_its_evaluation",)),
    M("sweep-list-first-value-only", "run", "only the first value of a sweep list is range-checked",
      "for value in space if isinstance(space, list) else (space.low, space.high):",
      "for value in space[:1] if isinstance(space, list) else (space.low, space.high):", (SWEEP_VALUES,)),
    M("sweep-distribution-low-end-only", "run", "a distribution's upper end is not range-checked",
      "else (space.low, space.high):", "else (space.low,):", (SWEEP_VALUES,)),
    M("member-mesh-not-folded", "run", "a member's overrides keep the population's data size: the mesh covers "
      "fewer devices", '"data": sizes["data"] * sizes["members"]}', '"data": sizes["data"]}', (MEMBER_ALONE,)),
    # ------------------------------------------------------------------ models: mixture of experts
    M("moe-gates-not-renormalised", "models", "the top-k gates are not renormalised to sum to 1",
      "top_TK = top_TK / jnp.sum(top_TK, axis=-1, keepdims=True)", "top_TK = top_TK", (MOE_DENSE,)),
    M("moe-aux-without-e", "models", "the load-balancing loss misses its factor of the expert count",
      "balance_B = experts * jnp.sum(", "balance_B = jnp.sum(", (MOE_HAND,)),
    M("moe-rows-to-wrong-experts", "models", "the sort puts rows in the wrong expert order for the group sizes",
      "order_A = jnp.argsort(flat_A, stable=True)", "order_A = jnp.argsort(-flat_A, stable=True)", (MOE_DENSE,)),
    M("moe-experts-replicated", "core", "expert weights are replicated instead of split over the expert axis",
      '"experts": "expert",', '"experts": None,', (f"{MOE}::test_bad_moe_input_is_a_clear_error_before_compiling",)),
    M("moe-aux-not-in-loss", "core", "the model's auxiliary loss sums are reported but not added to the loss",
      "sums | {k: sums.get(k, 0.0) + jnp.asarray(v, jnp.float32) for k, v in extra.items()}",
      "{k: jnp.asarray(v, jnp.float32) for k, v in extra.items() if k != 'loss'} | sums",
      (f"{MOE}::test_the_weighted_aux_losses_are_added_to_the_loss_sums",)),
    M("hf-mixtral-w1-w3-swapped", "models", "Mixtral's w1 (gate) and w3 (up) are read into each other's place",
      '{"we_gate": "w1", "we_up": "w3", "we_down": "w2"}', '{"we_gate": "w3", "we_up": "w1", "we_down": "w2"}',
      (f"{HF_MOE_LOGITS}[mixtral]",)),
    M("hf-qwen3moe-norm-topk-ignored", "models", "Qwen3-MoE's norm_topk_prob=false is ignored: gates renormalised",
      'norm_topk=family == "mixtral" or bool(hf.get("norm_topk_prob"))', "norm_topk=True",
      (f"{HF_MOE_LOGITS}[qwen3_moe]",)),
    M("hf-moe-expert-block-from-zero", "models", "each device's block of experts is read from expert 0, not its own",
      "for expert in range(index[0].start, index[0].stop)])", "for expert in range(index[0].stop - index[0].start)])",
      (f"{HF_MOE_LOGITS}[mixtral]",)),
    M("hf-moe-export-one-expert", "models", "save_hf writes expert 0's weights under every expert's name",
      "value if expert is None else value[expert]", "value if expert is None else value[0]",
      (f"{HF_MOE}::test_moe_export_loads_in_transformers_with_the_same_logits[mixtral]",)),
    M("moe-capacity-off-by-one", "models", "each expert takes one pair more than its capacity",
      "return (place_BA < capacity(S, cfg))", "return (place_BA <= capacity(S, cfg))",
      (f"{MOE}::test_capacity_drops_the_later_tokens_like_a_loop_in_order",)),
    M("moe-a2a-combine-without-gates", "models", "the all-to-all dispatch adds the experts' results up without "
      "their gates", 'out_TD = jnp.einsum("tkd,tk->td", y_TKD, gates_BSK.reshape(B * S, K).astype(y_TKD.dtype))',
      "out_TD = jnp.sum(y_TKD, axis=1)", (A2A_LAYER,)),
    M("moe-a2a-results-to-wrong-shard", "models", "the experts' results come back from the next shard's block, not "
      "from the shard the rows went to", "back_ERD = jax.lax.all_to_all(y_ERD, axis, 0, 0, tiled=True)",
      "back_ERD = jnp.roll(jax.lax.all_to_all(y_ERD, axis, 0, 0, tiled=True), 1, axis=0)", (A2A_LAYER,)),
    M("moe-a2a-expert-offset-from-zero", "models", "a shard counts its rows by global expert index, as if its "
      "experts started at 0", ".at[dest_A, sorted_A % n].add(1, mode=\"drop\")",
      ".at[dest_A, jnp.minimum(sorted_A, n - 1)].add(1, mode=\"drop\")", (A2A_LAYER,)),
    M("moe-unsplit-experts-left-to-partitioner", "models", "with the experts not split (fsdp alone), the "
      "partitioner places them (2.7x slower on fsdp=8)",
      "if expert and expert[0] not in batch:", "if not expert or expert[0] not in batch:", (A2A_LAYER,)),
    M("moe-own-tokens-ungated", "models", "each device's own tokens leave the experts without their gates",
      "gates_BSK.reshape(B * S, K),\n                       w_gate", "jnp.ones_like(gates_BSK).reshape(B * S, K),\n"
      "                       w_gate", (A2A_LAYER,)),
    M("moe-a2a-capacity-room-one-expert", "models", "the capacity bound on the send buffer counts one expert per "
      "shard, not N / shards: kept pairs fall off the buffer",
      "room = min(room, (B // rows) * (cfg.experts // shards) * capacity(S, cfg))",
      "room = min(room, (B // rows) * capacity(S, cfg))", (A2A_CAPACITY,)),
    M("theory-a2a-without-top-k", "run", "the theory's all-to-all blocks count tokens, not (token, choice) pairs",
      'pairs = rows * (work.seq_len // sizes.get("context", 1)) * work.top_k',
      'pairs = rows * (work.seq_len // sizes.get("context", 1))',
      (f"{A2A}::test_compiled_all_to_alls_are_the_theory",)),
    # ------------------------------------------------------------------ models / parallel: LoRA
    M("lora-base-gets-gradient", "models", "the frozen base is differentiated (its gradient computed, reduced and "
      "counted in grad_norm) though set_to_zero drops its update",
      "base = jax.lax.stop_gradient(params[BASE])", "base = params[BASE]", (LORA_GRAD,)),
    M("lora-scale-rslora", "models", "the adapters are scaled by alpha / sqrt(rank) (rsLoRA), not peft's alpha / rank",
      "return self.alpha / self.rank", "return self.alpha / math.sqrt(self.rank)", (LORA_GRAD,)),
    M("lora-peft-b-transposed", "models", "the PEFT export writes lora_B [out, r] from B [r, out] reshaped, not "
      "transposed", "np.ascontiguousarray(b[layer].reshape(b.shape[1], -1).T)",
      "np.ascontiguousarray(b[layer].reshape(-1, b.shape[1]))", (LORA_EXPORT,)),
    M("lora-merge-unscaled", "models", "the merged export adds A B without the alpha / rank scale",
      "out[name] = scale * product", "out[name] = product", (LORA_EXPORT,)),
    M("lora-base-per-member", "parallel", "a population of adapters stacks a copy of the base per member",
      "shared = shared_params(program.parts.model)", "shared = ()", (LORA_POP,)),
]

LORA_SWEEP = "tests/test_lora_sweep.py"
LORA_SWEEP_MEMBERS = f"{LORA_SWEEP}::test_each_member_of_an_alpha_and_dropout_sweep_equals_its_plain_lora_model"
MUTATIONS += [
    # ------------------------------------------------------------------ sweeps of adapters over lora.alpha / dropout
    M("lora-sweep-static-alpha", "models", "every member of a sweep scales its adapters by the model's default alpha, "
      "not its own", 'out["scale"] = own["lora_alpha"] / settings.rank', 'out["scale"] = jnp.float32(settings.scale)',
      (LORA_SWEEP_MEMBERS,)),
    M("lora-sweep-dropout-ignored", "models", "a member's own dropout rate is ignored (the model's static rate used)",
      'per_member = "dropout" in (self.member or {})', "per_member = False", (LORA_SWEEP_MEMBERS,)),
    M("lora-sweep-overrides-optim-key", "run", "population.json's overrides give a member's alpha as optim.lora_alpha, "
      "which its plain run cannot take", 'out += [f"{search_key(name)}={value!r}"',
      'out += [f"optim.{name}={value!r}"', (f"{LORA_SWEEP}::test_a_member_s_overrides_give_its_own_alpha_and_dropout",)),
]

SFT = "tests/test_sft.py"
SFT_MASK = f"{SFT}::test_the_mask_counts_exactly_the_completion_tokens"
SFT_ALONE = f"{SFT}::test_no_token_of_a_packed_row_sees_another_example"
MUTATIONS += [
    # ------------------------------------------------------------------ SFT data, packing, document-aware attention
    M("sft-positions-not-restarted", "core", "packed rows number positions through the row, not from 0 per example",
      "segment, np.arange(n)", "segment, np.arange(start, start + n)",
      (f"{SFT}::test_packed_rows_restart_positions_and_number_segments",)),
    M("sft-chat-generation-prompt", "core", "a chat's assistant header (the generation prompt) counts in the loss",
      "render(messages[:i], True)", "render(messages[:i], False)", (SFT_MASK,)),
    M("sft-attends-across-boundary", "models", "a packed token attends to the examples before its own",
      "same_BST = segments_BS[:, :, None] == segments_BS[:, None, :]",
      "same_BST = segments_BS[:, :, None] >= segments_BS[:, None, :]", (SFT_ALONE,)),
    M("sft-loss-on-prompt", "core", "the prompt's tokens count in the loss",
      '[(record["prompt"], False), (record["completion"], True)]',
      '[(record["prompt"], True), (record["completion"], True)]', (SFT_MASK,)),
    M("sft-mask-label-shift", "core", "the packed mask marks completion inputs, not completion targets (off by one)",
      "mask[r, cut], segments[r, cut], positions[r, cut] = examples.completion[i][1:]",
      "mask[r, cut], segments[r, cut], positions[r, cut] = examples.completion[i][:-1]", (SFT_MASK,)),
    M("sft-pad-mask-label-shift", "core", "a padded row's mask marks completion inputs, not completion targets",
      'out["mask"][row, :n] = flags[1:]', 'out["mask"][row, :n] = flags[:-1]',
      ("tests/test_benchmarks.py::test_bench_lora_demo_holds_functions_out_by_name_and_learns_only_their_names",)),
]

LORA_CLI = "tests/test_lora_cli.py"
LORA_BASE = f"{LORA_CLI}::test_only_adapters_train_and_the_base_is_the_checkpoint"
MUTATIONS += [
    # ------------------------------------------------------------------ run: LoRA from the config and the CLI
    M("lora-cli-export-unmerged", "run", "export --merge writes the base without its adapters",
      "save_hf(*merge_lora(run.parts.model, params), out)",
      "save_hf(run.parts.model.config.base, params[\"base\"], out)",
      (f"{LORA_CLI}::test_merged_export_matches_the_lora_model_in_transformers",)),
    M("lora-cli-optimizer-on-base", "run", "a lora.rank run's optimizer updates (and keeps state for) the base",
      "return lora_optimizer(optimizer, model) if cfg.lora.rank else optimizer", "return optimizer", (LORA_BASE,)),
    M("lora-cli-random-base", "run", "a model.from LoRA run starts from its random base, not the checkpoint's",
      "params={**state.params, BASE: base})", "params=state.params)", (LORA_BASE,)),
    M("lora-cli-decode-unmerged", "run", "generate and the end-of-run samples decode the base without its adapters",
      "return jax.jit(merged_params, static_argnums=0, out_shardings=shardings)(parts.model, natural)",
      "return natural[BASE]", (f"{LORA_CLI}::test_generate_decodes_the_merged_weights",)),
    M("fedlora-bytes-whole-model", "run", "federated.json counts the whole model as sent by federated LoRA clients",
      "values = sum(math.prod(x.shape) for x in jax.tree.leaves(trained))", "values = model.num_params",
      (f"{FED_LORA}::test_the_bytes_sent_are_the_adapters_counted_from_their_shapes",)),
    M("lora-rank-off-by-one", "models", "a rank equal to the narrowest targeted width is refused",
      "if not 0 < rank <= width:", "if not 0 < rank < width:", (f"{LORA_CLI}::test_the_widest_rank_builds",)),
    # ------------------------------------------------------------------ run: adapter-only checkpoints
    M("lora-ckpt-saves-base", "run", "the driver hands the loop no Frozen: a model.from LoRA run's checkpoints "
      "still write the base", "policy=mode.policy, init=parts.initial, frozen=parts.frozen)",
      "policy=mode.policy, init=parts.initial, frozen=None)",
      (f"{LORA_CLI}::test_checkpoints_hold_the_adapters_and_name_the_base",)),
    M("lora-ckpt-fingerprint-shapes-only", "run", "a restored base is checked by its shapes only, so other "
      "weights of the same shapes pass", 'if digest != record["fingerprint"]:', 'if arrays != record["arrays"]:',
      (f"{LORA_CLI}::test_a_changed_or_missing_base_is_refused_naming_it",)),
    M("lora-ckpt-resume-without-base", "run", "a resume does not read the base the checkpoints left out",
      "primary=self.primary,\n                             frozen=self.frozen)",
      "primary=self.primary,\n                             frozen=None)",
      (f"{LORA_CLI}::test_killed_and_resumed_it_ends_bitwise_equal_to_the_uninterrupted_run",)),
]

CTX = "tests/test_context.py"
RING_FN = f"{CTX}::test_ring_attention_equals_plain_masked_attention_values_and_gradients"
CTX_STEP = f"{CTX}::test_context_step_equals_one_device_jax_grad"
MUTATIONS += [
    # ------------------------------------------------------------------ context parallelism, ring attention
    M("ring-skips-last-block", "models", "the ring stops one step early: each shard misses the last visiting block",
      "length=shards - 1)", "length=shards - 2)", (RING_FN,)),
    M("ring-causal-within-block", "models", "the causal mask by place within a block, not by global index",
      "visible_ST = k_idx_T[None, :] <= q_idx_S[:, None]",
      "visible_ST = jnp.arange(k_idx_T.shape[0])[None, :] <= jnp.arange(q_idx_S.shape[0])[:, None]", (RING_FN,)),
    M("ring-softmax-not-rescaled", "models", "the online softmax keeps old sums when the running maximum grows",
      "rescale = jnp.exp(m - m_new)", "rescale = jnp.ones_like(m)", (RING_FN,)),
    M("ring-order-not-undone", "models", "the last layer's output stays in the balanced layout, misaligned with the targets",
      "x_BSD[:, np.argsort(order)]", "x_BSD[:, np.arange(len(order))]", (CTX_STEP,)),
    M("ring-rope-at-layout-positions", "models", "tokens rotated at their place in the balanced layout, "
      "not at their position in the sequence",
      "positions_BS = index_S[None, :] if packing is None else packing[1]",
      "positions_BS = jnp.arange(S)[None, :] if packing is None else packing[1]", (CTX_STEP,)),
]

CTX_THEORY = "tests/test_context_theory.py"
RING_PERMUTES = f"{CTX_THEORY}::test_ring_permutes_match_the_theory[context=2xdata=2,remat=dots]"
MUTATIONS += [
    # ------------------------------------------------------------------ the context axis in the theory and audit
    M("ctx-theory-permutes-k-only", "run", "the theory counts the ring's K blocks and forgets the V blocks",
      "sends = 2 * (2 + redo) * (c - 1) * L * passes", "sends = (2 + redo) * (c - 1) * L * passes", (RING_PERMUTES,)),
    M("ctx-theory-no-recomputed-permutes", "run", "the theory forgets that remat recomputes the ring's forward "
      "permutes for the backward", 'redo = 0 if work.remat == "none" else 1', "redo = 0", (RING_PERMUTES,)),
    M("ctx-activations-ignore-context", "run", "the activation estimate keeps the whole sequence on every "
      "context shard", "S = work.seq_len // c  # the positions", "S = work.seq_len  # the positions",
      (f"{CTX_THEORY}::test_the_activation_estimate_falls_as_one_over_context",)),
    M("audit-ignores-trip-counts", "run", "the audit counts an op in a loop body once, not once per iteration",
      "trip = int(found.group(1)) if found else 1", "trip = 1", (RING_PERMUTES,)),
    M("allgather-kv-left-to-the-partitioner", "models", "all-gathered attention no longer gathers K and V: "
      "the partitioner splits the scores over keys and all-reduces softmax sums",
      'k_BSKE, v_BSKE = (constrain(x, ("batch", None, "act_kv_heads", None)) for x in (k_BSKE, v_BSKE))',
      "k_BSKE, v_BSKE = k_BSKE, v_BSKE",
      (f"{CTX_THEORY}::test_allgather_attention_gathers_k_and_v_and_sums_their_gradients_over_context",)),
]

MOE_MEMBERS = "tests/test_moe_compose.py::test_each_moe_member_of_a_sweep_equals_its_own_plain_step"
GROUPED = "tests/test_moe_compose.py::test_grouped_products_under_two_vmaps_equal_a_per_row_loop_values_and_gradients"
MOE_1F1B = "tests/test_moe_compose.py::test_moe_1f1b_with_allgathered_context_equals_one_device"
MUTATIONS += [
    # ------------------------------------------------------------------ experts with members and the pipeline
    M("grouped-dw-reshaped-not-transposed", "models", "the batched expert-weight gradient [N, M, ...] reshaped to "
      "[M, N, ...] instead of transposed: the members' and shards' expert gradients are scrambled",
      'jnp.swapaxes(out, 0, 1) if kind == "contract" else out',
      'out.reshape(out.shape[1], out.shape[0], *out.shape[2:]) if kind == "contract" else out', (GROUPED, MOE_MEMBERS)),
    M("1f1b-stage-sums-dropped", "core", "1F1B drops the experts' auxiliary losses a stage's layers add",
      "sums = _with_stage_sums(sums, extra, True)", "sums = sums", (MOE_1F1B,)),
    M("1f1b-aux-seeded-on-last-stage-only", "core", "1F1B seeds the loss on the last stage only, so the earlier "
      "stages' auxiliary losses add to the loss but get no gradient",
      "ct_loss = _vary(jnp.ones((), jnp.float32))",
      "ct_loss = _vary(jnp.where(last, 1.0, 0.0).astype(jnp.float32))", (MOE_1F1B,)),
    M("expert-sums-mean-per-stage", "models", "each pipeline stage averages the auxiliary losses over its own "
      "layers, so the stages' shares add up to p times the mean",
      "aux, z = jnp.sum(aux_L) / cfg.layers, jnp.sum(z_L) / cfg.layers",
      "aux, z = jnp.mean(aux_L), jnp.mean(z_L)", (MOE_1F1B,)),
]
