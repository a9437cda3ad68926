"""The ``shardml`` command: parses arguments, sets up devices, calls :func:`shardml.train.train`.

    shardml train [CONFIG] [key=value ...] [--cpu-devices N] [--quiet] [--fresh]

Exit status: 0 (also after a graceful stop on SIGTERM / SIGINT, checkpoint saved), 1 (the run
stopped: non-finite steps, or no usable checkpoint), 2 (configuration error, nothing trained).
"""

from __future__ import annotations

import argparse
import sys

from shardml.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardml", description="Sharded training on JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model",
                           description="Train a model. CONFIG is a preset name in configs/ (tiny, default) "
                                       "or a YAML file; key=value pairs override single fields.")
    train.add_argument("args", nargs="*", metavar="CONFIG | key=value")
    train.add_argument("--cpu-devices", type=int, default=None,
                       help="emulate N CPU devices (default on a CPU-only machine: 8, "
                            "unless JAX_NUM_CPU_DEVICES is set)")
    train.add_argument("--quiet", action="store_true", help="no progress bar or config print")
    train.add_argument("--fresh", action="store_true",
                       help="start over: move a run found in out_dir to out_dir/previous/ instead of resuming it")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come after options (argparse's intermixed parsing does not support subcommands).
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.args += extra
    preset, overrides = "default", []
    for i, item in enumerate(args.args):
        if "=" in item:
            overrides.append(item)
        elif i == 0:
            preset = item
        else:
            print(f"shardml: error: '{item}' is neither the first argument (CONFIG) nor key=value",
                  file=sys.stderr)
            return 2
    try:
        cfg = load_config(preset, overrides)
        # Device emulation must precede anything that starts JAX's backend.
        from shardml.mesh import default_cpu_devices, emulate_cpu_devices

        devices = args.cpu_devices if args.cpu_devices is not None else default_cpu_devices()
        if devices is not None:
            emulate_cpu_devices(devices)
        from shardml.checkpoint import CheckpointError
        from shardml.train import NonFiniteError, train

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
