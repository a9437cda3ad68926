"""Analysis tools: read a compiled program (its collectives, matmuls and memory), set it against the
closed-form theory of a layout, and plan a layout before running it.

    step = shardml.analysis.compiled_step(trainer, shardml.abstract_batch(parts))   # nothing allocated
    report = shardml.analysis.collectives(step.compiled.as_text(), trainer.mesh)
    print(shardml.analysis.format_plan(shardml.analysis.plan_of(step, device_memory=16 * 2**30)))
    theory = shardml.analysis.layout_theory(shardml.workload(parts.cfg), parts.sizes)

The names below are public; the modules that define them (``audit``, ``flops``, ``peak``, ``plan``,
``theory``) are internal.
"""

from shardml.analysis.audit import (DTYPE_BYTES, KINDS, Collective, CollectiveReport, Dot, MemoryReport, collectives,
                                    dots, memory)
from shardml.analysis.flops import dot_flops, dot_inventory, inventory_flops, training_flops_per_example
from shardml.analysis.peak import PEAK_FLOPS, measured_matmul_flops, peak_flops
from shardml.analysis.plan import (CompiledStep, Plan, compiled_step, format_bytes, format_comparison, format_plan,
                                   parse_bytes, plan_of, sent_per_device)
from shardml.analysis.theory import SHORT, LayoutTheory, Workload, layout_theory

__all__ = [
    # the HLO audit
    "DTYPE_BYTES", "KINDS", "Collective", "CollectiveReport", "Dot", "MemoryReport", "collectives", "dots", "memory",
    # matmul FLOPs and the machine's peak
    "PEAK_FLOPS", "dot_flops", "dot_inventory", "inventory_flops", "measured_matmul_flops", "peak_flops",
    "training_flops_per_example",
    # plans
    "CompiledStep", "Plan", "compiled_step", "format_bytes", "format_comparison", "format_plan", "parse_bytes",
    "plan_of", "sent_per_device",
    # the closed-form theory
    "SHORT", "LayoutTheory", "Workload", "layout_theory",
]
