"""The ``shardml`` command: parses arguments, sets up devices, calls the library.

    shardml train [CONFIG] [key=value ...] [--cpu-devices N] [--quiet] [--fresh]
    shardml plan  [CONFIG] [key=value ...] [--cpu-devices N] [--device-memory 16GiB]
                  [--compare LAYOUT [LAYOUT ...]]

Exit status: 0 (also after a graceful stop on SIGTERM / SIGINT, checkpoint saved), 1 (the run
stopped: non-finite steps, or no usable checkpoint), 2 (bad input: nothing trained, no traceback).
"""

from __future__ import annotations

import argparse
import sys

from shardml.core.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardml", description="Sharded training on JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model",
                           description="Train a model. CONFIG is a preset name (tiny, default) or a YAML "
                                       "file; key=value pairs override single fields.")
    plan = sub.add_parser("plan", help="memory and communication of a layout, without training",
                          description="Lower and compile the train step for a layout, without training, and "
                                      "print per-device memory and per-step communication. CONFIG and "
                                      "key=value as for 'shardml train'.")
    for command in (train, plan):
        command.add_argument("args", nargs="*", metavar="CONFIG | key=value")
        command.add_argument("--cpu-devices", type=int, default=None,
                             help="emulate N CPU devices (default on a CPU-only machine: 8, unless "
                                  "JAX_NUM_CPU_DEVICES or XLA_FLAGS' device count says otherwise)")
    train.add_argument("--quiet", action="store_true", help="no progress bar or config print")
    train.add_argument("--fresh", action="store_true",
                       help="start over: move a run found in out_dir to out_dir/previous/ instead of resuming it")
    plan.add_argument("--device-memory", default=None, metavar="SIZE",
                      help="memory of one device (16GiB, 80GB, 512MiB, bytes); warns when the plan exceeds it")
    plan.add_argument("--compare", nargs="+", default=None, metavar="LAYOUT",
                      help="plan several layouts side by side; each LAYOUT is comma-separated key=value "
                           "overrides, e.g. mesh.data=8 mesh.fsdp=8 mesh.data=2,mesh.tensor=4 (a layout "
                           "naming a mesh.* key starts from a fresh mesh: data=-1, others 1)")
    return parser


def _arguments(argv: list[str] | None):
    """(args, preset, overrides); overrides may come after options."""
    parser = _parser()
    # argparse's intermixed parsing does not support subcommands.
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    preset, overrides = "default", []
    for i, item in enumerate(args.args + extra):
        if "=" in item:
            overrides.append(item)
        elif i == 0:
            preset = item
        else:
            raise ConfigError(f"'{item}' is neither the first argument (CONFIG) nor key=value")
    return args, preset, overrides


def _plan(cfg, args) -> None:
    from shardml.analysis.plan import format_comparison, format_plan
    from shardml.run.planning import compare_layouts, make_plan

    device_memory = _device_memory(args)
    if args.compare:  # every layout is checked before the first compile
        print(format_comparison(compare_layouts(cfg, args.compare, device_memory)))
    else:
        print(format_plan(make_plan(cfg, device_memory)))


def _device_memory(args) -> int | None:
    from shardml.analysis.plan import parse_bytes

    return parse_bytes(args.device_memory) if getattr(args, "device_memory", None) is not None else None


def main(argv: list[str] | None = None) -> int:
    try:
        args, preset, overrides = _arguments(argv)
        from shardml.run.config import load_config

        cfg = load_config(preset, overrides)
        _device_memory(args)  # a bad size fails before JAX starts
        # Device emulation must precede anything that starts JAX's backend.
        from shardml.core.devices import setup_cpu_devices

        setup_cpu_devices(args.cpu_devices)
        if args.command == "plan":
            _plan(cfg, args)
            return 0
        from shardml.run.checkpoint import CheckpointError
        from shardml.run.loop import NonFiniteError
        from shardml.run.train import train

        try:
            train(cfg, verbose=not args.quiet, fresh=args.fresh)
        except (CheckpointError, NonFiniteError) as err:
            print(f"shardml: error: {err}", file=sys.stderr)
            return 1
    except ConfigError as err:
        print(f"shardml: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
