"""8 emulated CPU devices for every test, set once before JAX starts; shared compiled fixtures and
tree comparisons.

Compiling dominates the suite's time, so trainers are built once per session (:func:`trainer_for`)
and every module that needs the same (model, layout, microbatches, optimizer) gets the same
compiled step.
"""

import atexit
import collections
import functools
import os
import shutil
import tempfile

from _shardml_pytestplugin import fast_compile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache per test session, inherited by the subprocess tests: a program that several
# tests build (the same layout, the tiny preset in each `shardml train` subprocess) compiles once.
# A new directory every session, so nothing from another version of the code is ever loaded.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="shardml-tests-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# XLA:CPU's code generator (LLVM) at -O0 for every program the tests compile, here and in their
# subprocesses (child_env), unless XLA_FLAGS names a level (the plugin's fast_compile, as a user's
# suite gets it): the suite mostly compiles tiny programs, and this cuts tests/test_step.py from
# 67 s to 40 s. The optimized HLO, which the audits, the one-reduction checks and the memory bounds
# read, is the same text at either level (checked on an fsdp step's `compile().as_text()`); only
# the machine code differs, and with it the rounding, which the tests' tolerances allow for.
COMPILE_FLAGS = fast_compile(os.environ)

import jax  # noqa: E402

from shardml.core.devices import emulate_cpu_devices  # noqa: E402

# Below jaxlib 0.12 also sets XLA_FLAGS and NPROC against an XLA:CPU collective deadlock; `shardml`
# subprocesses inherit them. glibc's allocator stays as it is, here and in the `shardml` subprocesses
# of the tests: the suite mostly compiles, which the single arena of shardml.core.host_memory slows
# (tests/test_host_memory.py runs it in a child of its own).
os.environ.setdefault("SHARDML_HOST_MALLOC", "system")
emulate_cpu_devices(8, keep_host_memory=False)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from shardml.core.mesh import make_mesh  # noqa: E402
from shardml.core.optim import OptimConfig, default_optimizer  # noqa: E402
from shardml.core.step import build_trainer  # noqa: E402
from shardml.models import TransformerConfig, transformer  # noqa: E402

SEQ = 16
# Losses are held to 1e-5 relative. Parameters after a few AdamW steps get a looser bound: Adam
# divides each update by the root mean square of its gradients, which turns float noise in
# near-zero gradients (another summation order, another XLA version's fusion) into parameter
# differences of a few 1e-5 of the leaf's scale (seen: up to 1.5e-4 on JAX 0.12 against the
# independent update after 3 steps on fsdp=8 and data=8 with 4 microbatches; a layout error moves
# parameters by O(1) of the leaf's scale).
PARAMS_RTOL = 3e-4
TINY = TransformerConfig(layers=2, d_model=32, heads=4, d_ff=64, dtype="float32")
OPTIM = OptimConfig(lr=3e-3, warmup=1)


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, f"tests need 8 emulated CPU devices, JAX sees {jax.device_count()}"


@pytest.fixture(scope="session")
def tiny_cfg():
    return TINY


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_transformer()


@functools.lru_cache(maxsize=None)
def tiny_transformer(**changes):
    import dataclasses

    return transformer(dataclasses.replace(TINY, **changes), SEQ)


def child_env(user: bool = False, **changes: str) -> dict[str, str]:
    """A separate process's environment: this session's (its compilation cache, COMPILE_FLAGS) less
    its device settings, which the child makes its own (``--cpu-devices``, or its default); with
    ``user``, none of the tests' settings at all (compile flags, allocator): a user's process. Then
    ``changes``."""
    drop = ("JAX_NUM_CPU_DEVICES", "NPROC") + (("XLA_FLAGS", "SHARDML_HOST_MALLOC") if user else ())
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if not user:
        env["XLA_FLAGS"] = COMPILE_FLAGS
    return {**env, **changes}


def mesh_of(sizes: dict, one_device: bool = False):
    return make_mesh(sizes, jax.devices()[:1] if one_device else None)


@functools.lru_cache(maxsize=None)
def _trainer(model, sizes: tuple, microbatches: int, steps: int, one_device: bool, extra: tuple):
    return build_trainer(model, mesh_of(dict(sizes), one_device), default_optimizer(OPTIM, steps),
                         microbatches=microbatches, **dict(extra))


def trainer_for(model, sizes: dict, microbatches: int = 1, steps: int = 10, **extra):
    """The session's trainer of ``model`` on ``sizes`` (``{"data": 1}`` means one device) with the
    tests' AdamW; built, and so compiled, once per session."""
    one_device = sizes == {"data": 1}
    return _trainer(model, tuple(sorted(sizes.items())), microbatches, steps, one_device, tuple(sorted(extra.items())))


def lm_batch(batch_size: int, seed: int = 0, seq: int = SEQ, ragged: bool = False) -> dict:
    """Random tokens; with ``ragged``, each row keeps a different number of real (unmasked) tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (batch_size, seq + 1))
    mask = np.ones((batch_size, seq), np.float32)
    if ragged:
        for row in range(batch_size):
            mask[row, rng.integers(1, seq + 1):] = 0.0
    return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32), "mask": mask}


def _paired(a, b, what: str):
    """Leaves of two trees with their paths, after checking the structures are the same."""
    sa, sb = jax.tree.structure(a), jax.tree.structure(b)
    assert sa == sb, f"{what}: the trees differ in structure:\n{sa}\n{sb}"
    return zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b))


def max_rel_diff(a, b, what: str = "trees") -> float:
    """Largest per-leaf max|a-b| / max|b| over two PyTrees of the same structure."""
    diffs = [float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
                   / (np.max(np.abs(np.asarray(y, np.float64))) + 1e-30)) for (_, x), y in _paired(a, b, what)]
    return max(diffs)


def assert_trees_close(a, b, rtol: float, what: str) -> None:
    """Every leaf of ``a`` within ``rtol`` (relative to the leaf's largest value) of ``b``; names the
    first leaf that is not."""
    for (path, x), y in _paired(a, b, what):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        diff = float(np.max(np.abs(x - y))) / (float(np.max(np.abs(y))) + 1e-30) if x.size else 0.0
        assert diff <= rtol, f"{what}: {jax.tree_util.keystr(path)} differs by {diff:.2e} (relative) > {rtol}"


def assert_bitwise_equal(a, b, what: str) -> None:
    for (path, x), y in _paired(a, b, what):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{what}: {jax.tree_util.keystr(path)}")


def host(tree):
    return jax.tree.map(np.asarray, tree)


@pytest.fixture
def no_compile(monkeypatch):
    """Any XLA compile fails the test ("compiled before rejecting the input"). The hook sits on the
    path every jit takes (JAX's compile_or_get_cached; ``Lowered.compile`` alone misses plain jit
    calls), and is checked to fire on a fresh program first."""
    import jax.numpy as jnp
    from jax._src import compiler

    def refuse(*args, **kwargs):
        raise AssertionError("compiled before rejecting the input")

    monkeypatch.setattr(compiler, "compile_or_get_cached", refuse)
    with pytest.raises(AssertionError, match="compiled before"):
        jax.jit(lambda x: x * 3.0 + 1.0)(jnp.float32(np.random.default_rng().random()))


# Files of a few tests that take minutes each (the README walk, the notebooks, two-process runs; from
# the slow step's durations in CI): given to the workers first, so that none of them starts last and
# runs alone while the other workers idle.
LONGEST_FIRST = ("test_readme_walk.py", "test_notebooks.py", "test_multihost.py")


@pytest.hookimpl(trylast=True)  # after `-m` deselected: counts what runs
def pytest_collection_modifyitems(config, items):
    """Files in the order the workers take them (pyproject's addopts turn off pytest-xdist's own
    order, the files with the most tests first): LONGEST_FIRST, then xdist's order."""
    count = collections.Counter(item.path for item in items)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), -count[item.path], str(item.path)))


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): one worker per core, at most 4 — each holds 8 emulated
    devices, its own copy of the session's compiled fixtures and several GB at peak."""
    return max(1, min(4, os.cpu_count() or 1))
