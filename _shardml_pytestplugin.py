"""shardml's pytest plugin: fake CPU devices set up before JAX starts, and mesh fixtures, for
sharding tests in a user's own suite (the assertions are :mod:`shardml.testing`).

It does nothing unless a suite asks for it, in one of two ways:

- for the whole suite, in ``pytest.ini`` / ``pyproject.toml`` (``[tool.pytest.ini_options]``)::

      shardml = true             # N fake CPU devices, set before any conftest.py runs
      shardml_cpu_devices = 8    # N (default: what JAX_NUM_CPU_DEVICES or XLA_FLAGS ask for, else 8)
      shardml_fast_compile = true  # optional: XLA:CPU's generated code at LLVM -O0 (fast_compile)

  or ``pytest --shardml-cpu-devices=8 [--shardml-fast-compile]``;
- per test or module, with the marker ``@pytest.mark.shardml`` (or by requesting one of the
  fixtures below): the devices are set once every test module is imported, which works as long
  as nothing ran a JAX operation at import time.

Either way JAX ends up with N CPU devices (``JAX_PLATFORMS`` defaults to ``cpu``) or the session
stops with an error that says why: a setting that asks for another count (``XLA_FLAGS``'
``--xla_force_host_platform_device_count``, ``JAX_NUM_CPU_DEVICES``,
``jax.config.update("jax_num_cpu_devices", n)``), or a JAX backend that already started with
fewer devices.

Fixtures: ``shardml_devices`` (the N devices), ``shardml_mesh`` (a mesh; parametrize it
indirectly with layouts such as ``"data=2 x tensor=2"`` or ``{"fsdp": 4}``; default: every device
on ``data``) and ``shardml_make_mesh`` (a factory: ``shardml_make_mesh("fsdp=2 x tensor=2")``).

This module sits outside the ``shardml`` package on purpose: pytest imports every installed
plugin in every run, and importing ``shardml`` imports JAX, which reads its environment variables
once, at import. So the plugin imports nothing of JAX or shardml until a suite asks for it, and
does its first work through the environment only, before a ``conftest.py`` imports JAX.
(Hypothesis ships its plugin as a top-level module for the same reason.)
"""

from __future__ import annotations

import os
import re
import sys

import pytest

DEFAULT_CPU_DEVICES = 8
MARKER = "shardml"
FIXTURES = ("shardml_devices", "shardml_mesh", "shardml_make_mesh")
XLA_DEVICE_FLAG = "xla_force_host_platform_device_count"
# Also in shardml.core.devices (CPU_COLLECTIVE_FLAG, THREADS_PER_DEVICE, WORKAROUND_BEFORE_JAXLIB),
# which cannot be imported here without importing JAX: see that module for why emulated devices
# need them, and on which jaxlib.
CPU_COLLECTIVE_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
THREADS_PER_DEVICE = 2
WORKAROUND_BEFORE_JAXLIB = (0, 12)
# XLA:CPU hands the code it generates to LLVM at this level (default 2 or more); see fast_compile.
OPTIMIZATION_LEVEL = re.compile(r"--xla_backend_optimization_level=\S+")
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"

_STATE = pytest.StashKey[dict]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("shardml", "shardml: fake CPU devices for sharding tests")
    group.addoption("--shardml-cpu-devices", type=int, default=None, metavar="N", dest="shardml_cpu_devices",
                    help="enable shardml's plugin with N fake CPU devices, set before JAX starts")
    parser.addini("shardml", type="bool", default=False,
                  help="enable shardml's plugin for the whole suite: fake CPU devices set before any conftest.py")
    parser.addini("shardml_cpu_devices", type="string", default="",
                  help="how many fake CPU devices shardml's plugin sets up (default: what JAX_NUM_CPU_DEVICES or "
                       f"XLA_FLAGS ask for, else {DEFAULT_CPU_DEVICES}); setting it enables the plugin")
    group.addoption("--shardml-fast-compile", action="store_true", default=None, dest="shardml_fast_compile",
                    help="with the plugin on for the whole suite: XLA:CPU's generated code at LLVM -O0, for "
                         "suites that mostly compile")
    parser.addini("shardml_fast_compile", type="bool", default=False,
                  help="with the plugin on for the whole suite: XLA:CPU's generated code at LLVM -O0 "
                       "(compiles faster, runs slower; the optimized HLO is the same)")


def _explicit(config: pytest.Config) -> tuple[int | None, str]:
    """The count the suite gave the plugin, and where: the command line, then the ini file."""
    cli = getattr(config.known_args_namespace, "shardml_cpu_devices", None)
    if cli is None:
        cli = getattr(config.option, "shardml_cpu_devices", None)
    if cli is not None:
        source = "--shardml-cpu-devices"
        value = cli
    else:
        raw = str(config.getini("shardml_cpu_devices")).strip()
        if not raw:
            return None, ""
        source = "shardml_cpu_devices (pytest ini)"
        if not raw.isdigit():
            raise pytest.UsageError(f"{source} = {raw!r} must be a positive number of devices")
        value = int(raw)
    if value <= 0:
        raise pytest.UsageError(f"{source} = {value} must be a positive number of devices")
    return value, source


def _enabled_for_suite(config: pytest.Config) -> bool:
    return bool(config.getini("shardml")) or _explicit(config)[0] is not None


def _environment_requests(environ) -> list[tuple[int, str]]:
    """The device counts the environment asks for (read before JAX is imported)."""
    asked = []
    raw = environ.get("JAX_NUM_CPU_DEVICES", "")
    if raw:
        if not raw.isdigit() or int(raw) <= 0:
            raise pytest.UsageError(f"JAX_NUM_CPU_DEVICES={raw!r} must be a positive number of devices")
        asked.append((int(raw), "JAX_NUM_CPU_DEVICES"))
    match = re.search(rf"--{XLA_DEVICE_FLAG}=(\d+)", environ.get("XLA_FLAGS", ""))
    if match:
        asked.append((int(match.group(1)), f"XLA_FLAGS --{XLA_DEVICE_FLAG}"))
    return asked


def choose_devices(explicit: tuple[int | None, str], environ) -> tuple[int, str]:
    """(N, where it came from): the suite's count, else the environment's, else 8.

    Raises:
      pytest.UsageError: two settings ask for different counts, naming both.
    """
    asked = ([explicit] if explicit[0] is not None else []) + _environment_requests(environ)
    for count, source in asked[1:]:
        if count != asked[0][0]:
            raise pytest.UsageError(
                f"shardml: {asked[0][1]} asks for {asked[0][0]} CPU devices but {source} asks for {count}; "
                "keep one of the two settings (or make them agree)")
    return asked[0] if asked else (DEFAULT_CPU_DEVICES, "the plugin's default")


def fast_compile(environ) -> str:
    """Asks XLA:CPU (through ``XLA_FLAGS``, before its backend starts) to hand its generated code
    to LLVM at -O0, unless ``XLA_FLAGS`` names a level already; returns the level flag in effect.

    For test suites that mostly compile small programs (shardml's tests/test_step.py: 40 s instead
    of 67 s). The optimized HLO, which sharding assertions read (collectives, memory), is the same
    text at either level; the machine code runs slower and may round differently (by an ulp or so)::

        fast_compile(os.environ)  # in a conftest.py, before importing JAX
    """
    _add_xla_flag(environ, FAST_COMPILE_FLAG, unless=OPTIMIZATION_LEVEL)
    return OPTIMIZATION_LEVEL.search(environ["XLA_FLAGS"]).group(0)


def _add_xla_flag(environ, flag: str, unless: re.Pattern) -> None:
    """Appends ``flag`` to ``XLA_FLAGS`` unless they already match ``unless`` (the user's setting)."""
    flags = environ.get("XLA_FLAGS", "")
    if not unless.search(flags):
        environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def _fast_compile_asked(config: pytest.Config) -> bool:
    cli = getattr(config.known_args_namespace, "shardml_fast_compile", None)
    return bool(cli) or bool(config.getini("shardml_fast_compile"))


def _workaround_needed() -> bool:
    """shardml.core.devices.collective_workaround_needed, without importing JAX."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return True
    return tuple(int(n) for n in re.findall(r"\d+", version)[:2]) < WORKAROUND_BEFORE_JAXLIB


def _prepare_environment(count: int, source: str, environ) -> None:
    """What JAX reads when it is imported and when its backend starts (nothing is imported here)."""
    environ.setdefault("JAX_PLATFORMS", "cpu")
    if not source.startswith("XLA_FLAGS"):
        environ["JAX_NUM_CPU_DEVICES"] = str(count)
    if not _workaround_needed():
        return
    _add_xla_flag(environ, CPU_COLLECTIVE_FLAG, unless=re.compile("xla_cpu_enable_concurrency_optimized_scheduler"))
    if count > 1 and "NPROC" not in environ:
        environ["NPROC"] = str(max(THREADS_PER_DEVICE * count, os.cpu_count() or 1))


def _set_up(config: pytest.Config, when: str) -> None:
    """Asks for the devices: through the environment before JAX is imported, through JAX's config
    after (before its backend starts). Idempotent; the check comes later (:func:`_check`)."""
    state = config.stash.setdefault(_STATE, {})
    if "count" in state:
        return
    explicit = _explicit(config)
    if "jax" not in sys.modules:
        count, source = choose_devices(explicit, os.environ)
        _prepare_environment(count, source, os.environ)
    else:
        from shardml.core import devices
        from shardml.core.errors import ConfigError

        try:
            count, source = devices.requested_cpu_devices(explicit[0], explicit[1] or "shardml")
            if count is None:
                count, source = DEFAULT_CPU_DEVICES, "the plugin's default"
            if not devices.backend_started():
                import jax

                if not os.environ.get("JAX_PLATFORMS") and not jax.config.jax_platforms:
                    jax.config.update("jax_platforms", "cpu")  # fake devices are CPU devices
                if source.startswith("XLA_FLAGS"):
                    devices.avoid_cpu_collective_deadlock(count)
                else:  # the allocator as it is: a test suite mostly compiles (shardml.core.host_memory)
                    devices.emulate_cpu_devices(count, keep_host_memory=False)
        except ConfigError as err:
            raise pytest.UsageError(f"shardml: {err}") from None
    if when == "suite" and _fast_compile_asked(config):
        state["compile"] = fast_compile(os.environ)
    state.update(count=count, source=source, when=when)


def _check(config: pytest.Config) -> int:
    """Starts JAX's backend and fails the session loudly when it has fewer than N devices."""
    state = config.stash[_STATE]
    if "checked" in state:
        return state["count"]
    import jax

    have = jax.device_count()
    count = state["count"]
    if have < count:
        if state["when"] == "suite":
            cause = ("something set another count after the plugin (a conftest.py calling "
                     "jax.config.update('jax_num_cpu_devices', ...) or shardml.emulate_cpu_devices)")
        else:
            cause = ("JAX's backend started before the plugin could ask for them (a conftest.py or a test module "
                     "ran a JAX operation at import time). Enable the plugin for the whole suite, so it sets the "
                     "devices before any conftest.py runs: `shardml = true` in the [pytest] section of pytest.ini "
                     "(or [tool.pytest.ini_options] in pyproject.toml), or `pytest --shardml-cpu-devices="
                     f"{count}`; or move the JAX operation into a fixture or test")
        raise pytest.UsageError(
            f"shardml: the tests need {count} CPU devices ({state['source']}) but JAX was initialised with "
            f"{have} ({jax.devices()[0].platform}): {cause}")
    state["checked"] = True
    return count


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser, args) -> None:
    if _enabled_for_suite(early_config):
        _set_up(early_config, "suite")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}: the test needs shardml's fake CPU devices (shardml_cpu_devices, default "
                   f"{DEFAULT_CPU_DEVICES}); see shardml.testing")


def _asks(item: pytest.Item) -> bool:
    return item.get_closest_marker(MARKER) is not None or any(f in FIXTURES for f in getattr(item, "fixturenames", ()))


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    state = config.stash.get(_STATE, {})
    if "count" in state:
        if any(_asks(item) for item in items) or state["when"] == "suite" and items:
            _check(config)
    elif any(_asks(item) for item in items):
        _set_up(config, "marker")
        _check(config)


def pytest_report_header(config: pytest.Config) -> str | None:
    state = config.stash.get(_STATE, {})
    if "count" in state:
        compile_level = f"; XLA_FLAGS {state['compile']}" if "compile" in state else ""
        return f"shardml: {state['count']} fake CPU devices ({state['source']}){compile_level}"
    return None


# ----------------------------------------------------------------------------- fixtures


def _devices(config: pytest.Config) -> list:
    if "count" not in config.stash.get(_STATE, {}):
        _set_up(config, "marker")
    count = _check(config)
    import jax

    return jax.devices()[:count]


@pytest.fixture(scope="session")
def shardml_devices(pytestconfig: pytest.Config) -> list:
    """The N devices of the plugin (``shardml_cpu_devices``, default 8)."""
    return _devices(pytestconfig)


@pytest.fixture(scope="session")
def shardml_make_mesh(pytestconfig: pytest.Config):
    """``make(layout=None)``: a mesh of ``layout`` (``"data=2 x tensor=2"``, ``"fsdp=4,tensor=2"``, a dict of
    axis sizes; ``-1`` fills; None: every device on data) on the first devices it needs."""
    devices = _devices(pytestconfig)
    from shardml.testing import mesh_of

    return lambda layout=None: mesh_of(layout, devices)


@pytest.fixture
def shardml_mesh(request: pytest.FixtureRequest, shardml_make_mesh):
    """A mesh: every device on ``data``, or the layout given by indirect parametrization::

        @pytest.mark.parametrize("shardml_mesh", ["data=8", "fsdp=4 x tensor=2"], indirect=True)
        def test_step(shardml_mesh): ...
    """
    return shardml_make_mesh(getattr(request, "param", None))
