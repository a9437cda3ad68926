"""Test your model's sharding in your own CI: every layout trains as one device does, and the
compiled step communicates as it should.

In ``pytest.ini`` (or ``[tool.pytest.ini_options]`` in ``pyproject.toml``), turn on shardml's pytest
plugin, which sets up fake CPU devices before JAX starts::

    [pytest]
    shardml = true
    shardml_cpu_devices = 8

Then, in a test::

    from shardml.testing import assert_communication, assert_layouts_match

    def test_my_model_shards(shardml_devices):
        assert_layouts_match(model, shardml.classification, batch,
                             layouts=["data=2 x fsdp=2 x tensor=2", "fsdp=8"], steps=3, microbatches=(1, 2))
        assert_communication(model, shardml.classification, batch, "data=2 x fsdp=2 x tensor=2", microbatches=4)

The plugin itself is the top-level module ``_shardml_pytestplugin`` (pytest loads it in every
run, so it imports nothing heavy until a suite asks for it); see the how-to
``docs/howto-test-sharding.md``.
"""

from shardml.testing.communication import CommunicationError, assert_communication, compiled_collectives
from shardml.testing.invariance import LayoutMismatch, as_model, assert_layouts_match, default_layouts
from shardml.testing.layouts import mesh_of, parse_layout

__all__ = [
    "CommunicationError", "LayoutMismatch", "as_model", "assert_communication", "assert_layouts_match",
    "compiled_collectives", "default_layouts", "mesh_of", "parse_layout",
]
