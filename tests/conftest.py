"""8 emulated CPU devices for every test, set once before JAX starts; shared tiny fixtures."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache per test session, inherited by the subprocess tests: a program that several
# tests build (the same layout, the tiny preset in each `shardml train` subprocess) compiles once.
# A new directory every session, so nothing from another version of the code is ever loaded.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="shardml-tests-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

from shardml.mesh import emulate_cpu_devices  # noqa: E402

# Also sets XLA_FLAGS and NPROC against an XLA:CPU collective deadlock; `shardml` subprocesses inherit them.
emulate_cpu_devices(8)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from shardml.config import ModelConfig  # noqa: E402
from shardml.models import transformer  # noqa: E402

SEQ = 16


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, f"tests need 8 emulated CPU devices, JAX sees {jax.device_count()}"


@pytest.fixture(scope="session")
def tiny_cfg():
    return ModelConfig(layers=2, d_model=32, heads=4, d_ff=64, dtype="float32")


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
    return transformer(tiny_cfg, SEQ)


def lm_batch(batch_size: int, seed: int = 0, seq: int = SEQ, ragged: bool = False) -> dict:
    """Random tokens; with ``ragged``, each row keeps a different number of real (unmasked) tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (batch_size, seq + 1))
    mask = np.ones((batch_size, seq), np.float32)
    if ragged:
        for row in range(batch_size):
            mask[row, rng.integers(1, seq + 1):] = 0.0
    return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32), "mask": mask}


def max_rel_diff(a, b) -> float:
    """Largest per-leaf max|a-b| / max|b| over two PyTrees."""
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))
                                            / (np.max(np.abs(np.asarray(y))) + 1e-30)), a, b)
    return max(jax.tree.leaves(diffs))
