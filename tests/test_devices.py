"""Mesh construction, device settings, the rules table, and state created already sharded."""

import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import trainer_for
from shardml.core import devices
from shardml.core.devices import CPU_COLLECTIVE_FLAG, avoid_cpu_collective_deadlock, collective_workaround_needed, \
    emulate_cpu_devices, requested_cpu_devices
from shardml.core.errors import LayoutError, ModelError, SettingError
from shardml.core.mesh import layout_name, make_mesh
from shardml.core.sharding import Rules


def test_mesh_axes_in_canonical_order_and_fill():
    mesh = make_mesh({"fsdp": 2, "data": -1})
    assert mesh.axis_names == ("members", "pipeline", "data", "fsdp", "expert", "context", "tensor")
    assert dict(mesh.shape) == {"members": 1, "pipeline": 1, "data": 4, "fsdp": 2, "expert": 1, "context": 1,
                                "tensor": 1}
    assert layout_name(mesh.shape) == "data=4 x fsdp=2"


def test_emulation_after_backend_start_is_a_clear_error():
    emulate_cpu_devices(8)  # what the backend has: accepted
    with pytest.raises(SettingError, match="before any JAX operation.*JAX_NUM_CPU_DEVICES=4"):
        emulate_cpu_devices(4)


def test_every_way_of_asking_for_devices_is_read_and_conflicts_named(monkeypatch):
    from shardml.core import devices

    # This process's JAX config holds the suite's 8; read it as a fresh process would (unset).
    monkeypatch.setattr(devices, "_jax_config_devices", lambda: (None, ""))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    assert requested_cpu_devices() == (4, "XLA_FLAGS --xla_force_host_platform_device_count")
    assert requested_cpu_devices(4)[0] == 4
    with pytest.raises(SettingError, match=r"--cpu-devices asks for 2 .* XLA_FLAGS .* asks for 4"):
        requested_cpu_devices(2)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert requested_cpu_devices() == (None, "")


def test_deadlock_guard_only_below_jaxlib_0_12():
    assert collective_workaround_needed("0.10.2") and collective_workaround_needed("0.11.9")
    assert not collective_workaround_needed("0.12.0.1") and not collective_workaround_needed("1.0.0")


def test_deadlock_guard_sets_nothing_where_not_needed(monkeypatch):
    monkeypatch.setattr(devices, "collective_workaround_needed", lambda: False)
    monkeypatch.delenv("NPROC", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    avoid_cpu_collective_deadlock(8)
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x" and "NPROC" not in os.environ


def test_deadlock_guard_sets_flag_and_pool_but_keeps_user_settings(monkeypatch):
    monkeypatch.setattr(devices, "collective_workaround_needed", lambda: True)
    monkeypatch.delenv("NPROC", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    avoid_cpu_collective_deadlock(8)
    assert os.environ["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x {CPU_COLLECTIVE_FLAG}", "flag not appended"
    assert int(os.environ["NPROC"]) == max(16, os.cpu_count()), "pool not sized at 2 threads per device"
    monkeypatch.setenv("NPROC", "3")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=true")
    avoid_cpu_collective_deadlock(8)
    assert os.environ["NPROC"] == "3", "the user's NPROC was overwritten"
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_concurrency_optimized_scheduler=true", "user's flag overwritten"


def test_rules_map_logical_names_and_reject_reuse():
    rules = Rules.default()
    assert rules.spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert rules.spec(("batch", None)) == P(("data", "fsdp", "expert"), None)
    with pytest.raises(LayoutError, match="mesh axis 'tensor' is mapped from both 'heads' and 'mlp'"):
        rules.spec(("heads", "mlp"))
    with pytest.raises(ModelError, match=r"logical axis 'embd' has no sharding rule.*replace\(embd='tensor'\)"):
        rules.spec(("embd",))


def test_params_and_optimizer_state_created_sharded(tiny_model):
    trainer = trainer_for(tiny_model, {"data": 2, "fsdp": 2, "tensor": 2})
    state = trainer.init(0)
    wq = state.params["layers"]["wq"]  # [L, D, H, E] = ("layers", "embed", "heads", "head_dim")
    assert wq.sharding.spec == P("pipeline", "fsdp", "tensor", None), wq.sharding.spec
    assert wq.addressable_shards[0].data.shape == (2, 16, 2, 8)
    import optax

    for moment in (optax.tree_utils.tree_get(state.opt_state, "mu"), optax.tree_utils.tree_get(state.opt_state, "nu")):
        specs = jax.tree.map(lambda x: x.sharding.spec, moment)
        assert specs == jax.tree.map(lambda x: x.sharding.spec, state.params), "Adam moments not sharded like params"
    # Nothing whole on one device: the init program's outputs are already shards.
    per_device = sum(s.data.nbytes for leaf in jax.tree.leaves(state.params) for s in leaf.addressable_shards
                     if s.device == jax.devices()[0])
    total = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(state.params))
    assert per_device < 0.5 * total, f"device 0 holds {per_device} of {total} parameter bytes"


def test_a_config_update_that_replaced_the_environment_is_a_conflict_named(monkeypatch):
    # JAX read JAX_NUM_CPU_DEVICES at import; this suite's jax.config.update(..., 8) replaced it silently.
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "4")
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.raises(SettingError, match=r'jax.config.update\("jax_num_cpu_devices", ...\) asks for 8 CPU devices '
                                          r"but JAX_NUM_CPU_DEVICES asks for 4"):
        requested_cpu_devices()
    with pytest.raises(SettingError, match=r"shardml_cpu_devices asks for 2 CPU devices but jax.config.update"):
        requested_cpu_devices(2, "shardml_cpu_devices")


def test_nobody_asking_after_jax_started_keeps_its_devices(monkeypatch):
    """An in-process `shardml train` after JAX work: the default count cannot apply any more."""
    from shardml.core import devices

    monkeypatch.setattr(devices, "_jax_config_devices", lambda: (None, ""))
    monkeypatch.setattr(devices, "DEFAULT_CPU_DEVICES", 4)  # what emulating the default would now refuse
    monkeypatch.setattr(devices, "cpu_only", lambda: True)
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    assert devices.setup_cpu_devices() == (8, "JAX's backend (already started)")
