"""shardml.testing as a user meets it: the pytest plugin (entry point ``pytest11``) run on user-style
test files with ``pytester``, and the invariance and communication assertions on planted sharding
bugs (a ``shard_map`` block that forgets its ``psum``, dropout drawn from one key per device, a
weight left whole on fsdp, a gradient reduced inside the microbatch loop).

JAX starts once per process, so what needs a fresh JAX (the plugin setting up devices, or failing
to) runs in a subprocess: four, three of them without any compiling. Everything else runs here,
on the suite's 8 devices.
"""

import os
import pathlib
import re

import flax.linen as nn
import numpy as np
import pytest
from flax import nnx

import _shardml_pytestplugin as plugin
import shardml
from shardml.core import accumulate
from shardml.core.errors import ConfigError
from shardml.testing import (CommunicationError, LayoutMismatch, as_model, assert_communication,
                             assert_layouts_match, default_layouts, mesh_of, parse_layout)
from shardml.testing.invariance import _first_difference, _Trajectory

pytest_plugins = ["pytester"]

# A user's models: an MLP whose output layer is a hand-written row-parallel shard_map block (with
# or without its psum; check_vma=False, as users write it when the checker is in the way: with
# the checker JAX itself refuses a missing psum), and dropout drawn per example (right) or from the
# batch's first key (wrong: each device, or microbatch, draws its own mask).
MODELS = '''
import jax
import numpy as np
from jax.sharding import PartitionSpec as P

import shardml
from shardml import ParamSpec, from_specs

SPECS = {"w_in": ParamSpec((8, 16), ("embed", "mlp")), "b_in": ParamSpec((16,), ("mlp",), "zeros"),
         "w_out": ParamSpec((16, 4), ("mlp", "embed"))}


def row_parallel(h, w, psum):
    def local(h_l, w_l):
        y = h_l @ w_l
        return jax.lax.psum(y, "tensor") if psum else y

    return jax.shard_map(local, in_specs=(P(None, "tensor"), P("tensor", None)), out_specs=P(),
                         check_vma=False)(h, w)


def mlp(psum=True, dropout=None, specs=SPECS):
    def apply(p, x, rng=None):
        h = jax.nn.relu(x @ p["w_in"] + p["b_in"])
        if dropout == "per_example":
            h = shardml.per_example(lambda h_1, key: h_1 * jax.random.bernoulli(key, 0.5, h_1.shape) * 2)(h, rng)
        elif dropout == "batch_key":
            h = h * jax.random.bernoulli(rng[0], 0.5, h.shape) * 2
        return row_parallel(h, p["w_out"], psum)

    return from_specs(specs, apply, uses_rng=dropout is not None)


def batch(rows=16):
    rng = np.random.default_rng(0)
    return {"inputs": rng.normal(size=(rows, 8)).astype(np.float32),
            "targets": rng.integers(0, 4, rows).astype(np.int32)}
'''

HOWTO = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "howto-test-sharding.md").read_text()
user = {}
exec(compile(MODELS, "models.py", "exec"), user)  # noqa: S102 - the same models, here in-process
LAYOUT = "data=2 x fsdp=2 x tensor=2"


@pytest.fixture
def fresh_env(monkeypatch, request):
    """A subprocess that asks for no device count through the environment (this suite's 8 are set
    through JAX's config, which a subprocess does not inherit)."""
    assert request.config.pluginmanager.has_plugin("shardml"), (
        "shardml's pytest plugin is not registered: reinstall the package (pip install -e .) so that its "
        "pytest11 entry point is installed")
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    flags = re.sub(rf"--{plugin.XLA_DEVICE_FLAG}=\d+", "", os.environ.get("XLA_FLAGS", ""))
    monkeypatch.setenv("XLA_FLAGS", flags.strip())


def outcome_line(result, name: str) -> str:
    return next((line for line in result.outlines if name in line and ("PASSED" in line or "FAILED" in line)), "")


# ----------------------------------------------------------------------------- the plugin, in user suites


def howto_block(after: str, language: str = "python") -> str:
    """The first ``language`` block after the text ``after`` in the how-to."""
    return re.search(re.escape(after) + rf".*?```{language}\n(.*?)```", HOWTO, re.DOTALL).group(1)


@pytest.mark.slow
def test_the_howto_runs_as_written_a_correct_model_passes_and_a_forgotten_psum_is_named(pytester, fresh_env):
    """The how-to's ini, its test file and its planted bug, in a user's suite (8 devices by default)."""
    pytester.makefile(".ini", pytest=howto_block("## 1. Turn on the plugin", "ini"))
    pytester.makeconftest("import jax  # a user's conftest may import JAX: the devices were asked for before\n")
    tests = howto_block("## 2. Assert that every layout trains as one device")
    bug = howto_block("## 3. What a failure looks like")
    pytester.makepyfile(test_sharding=tests + "\n\n" + bug + '''

import pytest


def test_eight_fake_devices(shardml_devices):
    assert len(shardml_devices) == jax.device_count() == 8


@pytest.mark.parametrize("shardml_mesh", ["data=2 x tensor=4", {"fsdp": 8}], indirect=True)
def test_meshes_of_any_layout(shardml_mesh):
    assert shardml_mesh.devices.size == 8 and dict(shardml_mesh.shape)["tensor"] in (1, 4)
''')
    result = pytester.runpytest_subprocess("-rA", timeout=300)
    out = result.stdout.str()
    assert "shardml: 8 fake CPU devices (the plugin's default)" in out, out[-3000:]
    result.assert_outcomes(passed=5, failed=1)
    assert "FAILED" in outcome_line(result, "test_a_forgotten_psum"), out[-3000:]
    # The failure the how-to shows, numbers aside.
    shown = howto_block("and the test fails with the layout", "text").splitlines()
    assert len(shown) == 4 and "LayoutMismatch: layout data=2 x fsdp=2 x tensor=2 with 1 microbatch" in shown[0]
    result.stdout.fnmatch_lines([re.sub(r"-?\d+\.\d+(e[-+]\d+)?|\(\d+,\)", "*", line) for line in shown])
    amount = float(re.search(r"parameter 'b_in' differs by (\S+)", out).group(1))
    assert amount > 1e-2, f"a missing psum over tensor=2 should change b_in by far more than rtol: {amount}"
    result.stdout.fnmatch_lines(["collective *axes *where *count *executions *bytes/run *dtypes",
                                 "all-reduce *data *step *1 *1 *"])  # the table the communication test prints


def test_marker_asks_for_devices_after_test_modules_import_jax(pytester, fresh_env):
    pytester.makepyfile(test_marked='''
import jax
import jax.numpy as jnp  # imported at collection; no JAX operation yet
import pytest

pytestmark = pytest.mark.shardml


def test_devices():
    assert jax.device_count() == 8 and jnp.ones(8).sharding.device_set
''')
    result = pytester.runpytest_subprocess(timeout=120)
    result.assert_outcomes(passed=1)


def test_jax_started_with_fewer_devices_fails_loudly(pytester, fresh_env):
    pytester.makeconftest("import jax\nONES = jax.numpy.ones(3)  # a JAX operation at import: 1 device\n")
    pytester.makepyfile(test_marked="import pytest\n\n\n@pytest.mark.shardml\ndef test_sharded():\n    pass\n")
    result = pytester.runpytest_subprocess(timeout=120)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, (result.ret, result.stderr.str())
    result.stderr.fnmatch_lines([
        ("ERROR: shardml: the tests need 8 CPU devices (the plugin's default) but JAX was initialised with 1 (cpu): "
        "JAX's backend started before the plugin could ask for them*`shardml = true`*"),
    ])


def test_suites_that_do_not_ask_are_untouched(pytester, fresh_env):
    pytester.makepyfile(test_plain='''
import os
import sys


def test_nothing_imported_or_set(request):
    assert request.config.pluginmanager.has_plugin("shardml")
    assert "jax" not in sys.modules and "shardml" not in sys.modules, "the plugin imported JAX or shardml"
    assert "JAX_NUM_CPU_DEVICES" not in os.environ
''')
    result = pytester.runpytest_subprocess(timeout=120)
    result.assert_outcomes(passed=1)
    assert "shardml:" not in result.stdout.str()


def test_fast_compile_is_asked_for_by_the_suite_and_a_users_level_is_kept(pytester, fresh_env, monkeypatch):
    """``shardml_fast_compile = true`` puts LLVM -O0 in XLA_FLAGS before JAX starts; without it, or
    when XLA_FLAGS names a level, the level is left alone."""
    monkeypatch.setenv("XLA_FLAGS", plugin.OPTIMIZATION_LEVEL.sub("", os.environ["XLA_FLAGS"]).strip())
    pytester.makepyfile(test_level='''
import os
import jax


def test_level():
    assert jax.device_count() == 8
    print("XLA_FLAGS=" + os.environ.get("XLA_FLAGS", ""))
''')
    for ini, level in (("shardml_fast_compile = true", "0"), ("", None)):
        pytester.makeini(f"[pytest]\nshardml = true\n{ini}\n")
        result = pytester.runpytest_subprocess("-s", timeout=120)
        result.assert_outcomes(passed=1)
        found = re.findall(r"xla_backend_optimization_level=(\S+)", result.stdout.str())
        assert found == ([level, level] if level else []), (ini, found)  # the header, then the test
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_backend_optimization_level=3"}
    assert plugin.fast_compile(env) == "--xla_backend_optimization_level=3" and "=0" not in env["XLA_FLAGS"]
    env = {}
    assert plugin.fast_compile(env) == plugin.FAST_COMPILE_FLAG == env["XLA_FLAGS"]


def test_device_count_from_the_suite_or_the_environment_and_conflicts_named(monkeypatch):
    ini = (4, "shardml_cpu_devices (pytest ini)")
    xla = {"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4"}
    assert plugin.choose_devices((None, ""), {}) == (8, "the plugin's default")
    assert plugin.choose_devices((None, ""), xla) == (4, "XLA_FLAGS --xla_force_host_platform_device_count")
    assert plugin.choose_devices((None, ""), {"JAX_NUM_CPU_DEVICES": "2"}) == (2, "JAX_NUM_CPU_DEVICES")
    assert plugin.choose_devices(ini, xla) == ini
    with pytest.raises(pytest.UsageError, match=r"shardml_cpu_devices \(pytest ini\) asks for 8 CPU devices but "
                                                r"XLA_FLAGS --xla_force_host_platform_device_count asks for 4"):
        plugin.choose_devices((8, ini[1]), xla)
    with pytest.raises(pytest.UsageError, match="JAX_NUM_CPU_DEVICES asks for 2 .* XLA_FLAGS .* asks for 4"):
        plugin.choose_devices((None, ""), {"JAX_NUM_CPU_DEVICES": "2", **xla})

    from shardml.core.devices import collective_workaround_needed

    assert plugin._workaround_needed() == collective_workaround_needed(), "the plugin's copy of the jaxlib gate differs"
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    monkeypatch.setattr(plugin, "_workaround_needed", lambda: False)  # jaxlib >= 0.12
    plugin._prepare_environment(4, "shardml_cpu_devices (pytest ini)", env)
    assert env == {"XLA_FLAGS": "--xla_dump_to=/tmp/x", "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4"}, env
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    monkeypatch.setattr(plugin, "_workaround_needed", lambda: True)
    plugin._prepare_environment(4, "shardml_cpu_devices (pytest ini)", env)
    assert env == {"XLA_FLAGS": f"--xla_dump_to=/tmp/x {plugin.CPU_COLLECTIVE_FLAG}", "JAX_PLATFORMS": "cpu",
                   "JAX_NUM_CPU_DEVICES": "4", "NPROC": env["NPROC"]} and int(env["NPROC"]) >= 8, env
    env = dict(xla, JAX_PLATFORMS="cuda")
    plugin._prepare_environment(4, "XLA_FLAGS --xla_force_host_platform_device_count", env)
    assert "JAX_NUM_CPU_DEVICES" not in env and env["JAX_PLATFORMS"] == "cuda", "the user's own settings replaced"


def test_an_explicit_count_that_jax_already_contradicts_is_a_usage_error(pytester):
    """In this process JAX runs 8 devices (set through jax.config by the suite's conftest)."""
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest_inprocess("-o", "shardml_cpu_devices=4")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([("ERROR: shardml: shardml_cpu_devices (pytest ini) asks for 4 CPU devices but "
                                 "jax.config.update(\"jax_num_cpu_devices\", ...) asks for 8*")])


# ----------------------------------------------------------------------------- layouts


def test_layouts_are_read_as_written():
    assert parse_layout("data=2 x fsdp=2 x tensor=2") == parse_layout("data=2,fsdp=2, tensor=2") == \
        parse_layout("data = 2 × fsdp=2 × tensor=2") == {"data": 2, "fsdp": 2, "tensor": 2}
    assert parse_layout({"fsdp": 4}) == {"fsdp": 4} and parse_layout("one device") == {}
    assert parse_layout(None) == {"data": -1}
    with pytest.raises(ConfigError, match=r"unknown mesh axes \['dta'\]"):
        parse_layout("dta=2")
    with pytest.raises(ConfigError, match="cannot read layout 'data:2'"):
        parse_layout("data:2")
    assert dict(mesh_of("fsdp=4 x tensor=2").shape) == {"members": 1, "pipeline": 1, "data": 1, "fsdp": 4,
                                                        "expert": 1, "context": 1, "tensor": 2}
    assert mesh_of("tensor=2").devices.size == 2 and mesh_of(None).devices.size == 8
    with pytest.raises(ConfigError, match="layout data=16 needs 16 devices but 8 are available"):
        mesh_of("data=16")
    assert default_layouts(8) == ("data=2 x fsdp=2 x tensor=2", "data=4 x tensor=2", "fsdp=8")


# ----------------------------------------------------------------------------- layout invariance


def trajectory(losses, *params):
    return _Trajectory(list(losses), [dict(p) for p in params])


def test_the_first_step_and_parameter_that_differ_are_named():
    a0, b0 = {"a": np.ones(3), "b": np.ones(2)}, {"a": np.ones(3), "b": np.ones(2)}
    want = trajectory([2.0, 1.0], a0, {"a": np.full(3, 0.5), "b": np.ones(2)}, {"a": np.full(3, 0.25), "b": np.ones(2)})
    same = trajectory([2.0, 1.0], b0, *want.params[1:])
    assert _first_difference("L", 1, same, want, 1e-5) is None
    # Step 2 only: 'a' by 0.05 / 0.25, then 'b' (after it in tree order) by 0.5.
    late = trajectory([2.0, 1.0], b0, want.params[1], {"a": np.full(3, 0.3), "b": np.array([1.0, 1.5])})
    err = _first_difference("L", 1, late, want, 1e-5)
    assert (err.step, err.parameter, round(err.difference, 6)) == (2, "a", 0.2), str(err)
    assert "at step 2 of 2:" in str(err) and "parameter 'a' differs by 2.00e-01" in str(err) and \
        "also differ: 'b' (5.0e-01)" in str(err), str(err)
    # The initial parameters, a loss alone, a NaN and a missing parameter are differences too.
    init = trajectory([2.0, 1.0], {"a": np.ones(3) * 2, "b": np.ones(2)}, *want.params[1:])
    assert _first_difference("L", 1, init, want, 1e-5).step == 0
    loss = _first_difference("L", 1, trajectory([2.0, 1.1], *want.params), want, 1e-5)
    assert (loss.step, loss.parameter) == (2, None) and "every parameter after the step agrees" in str(loss)
    nan = trajectory([2.0, 1.0], b0, {"a": np.array([0.5, np.nan, 0.5]), "b": np.ones(2)}, want.params[2])
    assert _first_difference("L", 1, nan, want, 1e-5).parameter == "a"
    missing = trajectory([2.0, 1.0], {"a": np.ones(3)}, *want.params[1:])
    assert "parameter 'b' has shape None here" in str(_first_difference("L", 1, missing, want, 1e-5))


def test_random_numbers_drawn_per_device_are_named():
    with pytest.raises(LayoutMismatch) as caught:
        assert_layouts_match(user["mlp"](dropout="batch_key"), shardml.classification, user["batch"](), [LAYOUT],
                             steps=2)
    err = caught.value
    assert (err.layout, err.microbatches, err.step, err.parameter) == (LAYOUT, 1, 1, "b_in"), str(err)
    assert err.difference > 1e-2 and f"layout {LAYOUT} with 1 microbatch differs from one device at step 1" in str(err)


class NNXMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.hidden = nnx.Linear(8, 16, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs)
        self.out = nnx.Linear(16, 4, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")), rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def test_a_flax_nnx_module_matches_one_device_with_microbatches():
    report = assert_layouts_match(shardml.from_nnx(NNXMLP), shardml.classification, user["batch"](), [LAYOUT],
                                  steps=2, microbatches=2)
    assert list(report) == [f"{LAYOUT} with 2 microbatches"] and report[f"{LAYOUT} with 2 microbatches"] < 1e-5
    with nnx.use_eager_sharding(False):  # a built module is adapted too
        built = as_model(NNXMLP(nnx.Rngs(0)), user["batch"]()["inputs"])
    assert built.logical["hidden"]["kernel"] == ("embed", "mlp"), built.logical
    with pytest.raises(TypeError, match="cannot train a dict: pass a shardml.Model"):
        as_model({}, None)


# ----------------------------------------------------------------------------- communication


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        h = nn.relu(nn.Dense(16, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")))(x))
        return nn.Dense(4, kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")))(h)


def test_communication_of_a_linen_module_and_where_it_breaks(monkeypatch):
    batch = user["batch"]()
    report = assert_communication(LinenMLP(), shardml.classification, batch, LAYOUT, microbatches=2)
    after = report.select("all-reduce", in_loop=False, axis="data")
    assert after and not report.select(in_loop=True, axis="data"), report.table()

    # A weight left whole on fsdp (its logical axes name nothing the rules map to fsdp).
    whole = user["mlp"](specs={**user["SPECS"], "w_out": shardml.ParamSpec((16, 4), ("mlp", None))})
    with pytest.raises(CommunicationError, match=r"1 parameter\(s\) replicated on fsdp .*'w_out' \(shape \(16, 4\), "
                                                 r"logical axes \('mlp', None\), spec P\('tensor', None\)\)"):
        assert_communication(whole, shardml.classification, batch, LAYOUT)

    # An accumulator that keeps its per-shard sums over fsdp instead of data: every microbatch's
    # gradient is then reduced over data inside the loop.
    monkeypatch.setattr(accumulate, "REDUCE_ONCE_AXIS", "fsdp")
    with pytest.raises(CommunicationError, match=r"(?s)gradients are not reduced once per step: the reductions over "
                                                 r"data move [\d,]+ bytes per step, [\d,]+ with 1 microbatch \(\d+ "
                                                 r"inside a loop\).*all-reduce over data"):
        assert_communication(LinenMLP(), shardml.classification, batch, LAYOUT, microbatches=2)
    with pytest.raises(CommunicationError, match=r"collective\(s\) over data inside a loop"):
        assert_communication(LinenMLP(), shardml.classification, batch, LAYOUT, microbatches=2, reduced_once=False)

