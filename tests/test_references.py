"""Small pieces against references written here: the learning-rate shape against optax's
schedule, the default optimizer against clipped AdamW in NumPy, the MLP classifier's logits, the
language-model figures, and the metrics file kept on resume."""

import json
import math

import jax
import numpy as np
import optax

from conftest import host
from shardml.core.optim import OptimConfig, default_optimizer, lr_shape
from shardml.models import mlp_classifier
from shardml.parallel.inference import lm_metrics
from shardml.run.metrics import MetricsWriter


def test_learning_rate_shape():
    for warmup, steps, ratio in [(3, 20, 0.1), (1, 10, 0.0), (0, 5, 0.5)]:
        want = optax.warmup_cosine_decay_schedule(1.0 / (warmup + 1), 1.0, warmup, steps, end_value=ratio)
        got = [float(lr_shape(c, warmup, ratio, steps)) for c in range(steps + 2)]
        np.testing.assert_allclose(got, [float(want(c)) for c in range(steps + 2)], atol=1e-6,
                                   err_msg=f"warmup={warmup} steps={steps} min_lr_ratio={ratio}")


def test_default_optimizer_is_clipped_adamw_written_here():
    """Global-norm clipping, then Adam's moments (b1, b2), decoupled weight decay, the scheduled lr."""
    cfg = OptimConfig(lr=0.1, warmup=2, min_lr_ratio=0.2, b1=0.8, b2=0.9, weight_decay=0.05, clip_norm=1.0)
    steps = 6
    optimizer = default_optimizer(cfg, steps)
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32)}
    state = optimizer.init(params)
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t in range(steps):
        grads = {k: (rng.normal(size=x.shape) * (3.0 if t % 2 else 0.2)).astype(np.float32) for k, x in params.items()}
        norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
        scale = min(1.0, cfg.clip_norm / norm)
        lr = cfg.lr * float(optax.warmup_cosine_decay_schedule(1 / 3, 1.0, 2, steps, end_value=0.2)(t))
        for k in p:
            g = grads[k] * scale
            m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * g
            v[k] = cfg.b2 * v[k] + (1 - cfg.b2) * g * g
            update = (m[k] / (1 - cfg.b1 ** (t + 1))) / (np.sqrt(v[k] / (1 - cfg.b2 ** (t + 1))) + 1e-8)
            p[k] = p[k] - lr * (update + cfg.weight_decay * p[k])
        updates, state = optimizer.update(grads, state, params)
        params = host(optax.apply_updates(params, updates))
        for k in p:
            np.testing.assert_allclose(params[k], p[k], rtol=1e-5, atol=1e-6, err_msg=f"{k} after step {t + 1}")


def test_mlp_classifier_equals_numpy_written_here():
    model = mlp_classifier(5, 7, 3)
    params = host(model.init(jax.random.key(0)))
    params = {k: v + 0.1 if k.startswith("b_") else v for k, v in params.items()}  # biases start at zero
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    want = np.maximum(x @ params["w_in"] + params["b_in"], 0.0) @ params["w_out"] + params["b_out"]
    np.testing.assert_allclose(np.asarray(jax.jit(model.apply)(params, x)), want, rtol=1e-5, atol=1e-6)


def test_lm_metrics_equal_numpy_written_here():
    got = lm_metrics({"loss": 300.0, "count": 100.0}, predicted_bytes=150.0)
    assert got["loss"] == 3.0 and got["tokens"] == 100
    np.testing.assert_allclose([got["perplexity"], got["bits_per_token"], got["bits_per_byte"]],
                               [math.exp(3.0), 3.0 / math.log(2), 300.0 / math.log(2) / 150.0], rtol=1e-12)


def test_metrics_writer_keeps_the_records_up_to_the_resumed_step(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    for step in (1, 2, 3, 4):
        writer.write(step, {"loss": float(step)})
    writer.close()
    resumed = MetricsWriter(str(tmp_path), start_step=2)
    assert [r["step"] for r in resumed.records] == [1, 2] and resumed.dropped == 2
    resumed.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
