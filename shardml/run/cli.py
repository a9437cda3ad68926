"""The ``shardml`` command: parses arguments, sets up devices, calls the library.

    shardml train [CONFIG] [key=value ...] [--cpu-devices N] [--quiet | --verbose] [--fresh]
                  [--coordinator HOST:PORT --num-processes N --process-id I] [--heartbeat-timeout S]
    shardml plan  [CONFIG] [key=value ...] [--cpu-devices N] [--device-memory 16GiB]
                  [--compare LAYOUT [LAYOUT ...]]
    shardml eval     RUN_DIR [key=value ...] [--batch-size N]
    shardml predict  RUN_DIR [key=value ...] [--input X.npy] [--output OUT.npz] [--batch-size N]
    shardml generate RUN_DIR --prompt TEXT [--prompt ...] [--max-tokens N] [--temperature T]
                     [--top-k K] [--top-p P] [--seed S] [--stop CHAR] [key=value ...]
    shardml export   RUN_DIR --format hf|peft OUT [--merge] [key=value ...]

Exit status: 0 (also after a graceful stop on SIGTERM / SIGINT, checkpoint saved), 1 (the run
stopped: non-finite steps, or no usable checkpoint), 2 (bad input: nothing trained or loaded, no
traceback; for eval / predict / generate also a run directory without a checkpoint, a prompt longer
than the model's context, a layout the checkpoint's model cannot take; for export a non-empty OUT).
"""

from __future__ import annotations

import argparse
import os
import sys

from shardml.core.errors import ShardmlError
from shardml.run.errors import ConfigError, keyed_error


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
    inference = _inference_parsers(sub)
    export = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face checkpoint",
                            description="Write the newest checkpoint of RUN_DIR to the new directory OUT as a Hugging "
                                        "Face checkpoint (safetensors, config.json, the run's tokenizer files), which "
                                        "transformers.AutoModelForCausalLM.from_pretrained(OUT) loads. " + _ON_ANY_MESH)
    export.add_argument("--format", default="hf", help="hf (a Hugging Face checkpoint, the default) or peft (a LoRA "
                        "run's adapters, for peft.PeftModel.from_pretrained over the base)")
    export.add_argument("--merge", action="store_true", help="with --format hf, a LoRA run's adapters merged into "
                        "its base's weights")
    inference = (*inference, export)
    for command in (train, plan, *inference):
        command.add_argument("args", nargs="*", metavar="RUN_DIR | key=value" if command in inference else
                             "CONFIG | key=value")
        command.add_argument("--cpu-devices", type=int, default=None,
                             help="emulate N CPU devices (default on a CPU-only machine: 8, unless "
                                  "JAX_NUM_CPU_DEVICES or XLA_FLAGS' device count says otherwise)")
    loudness = train.add_mutually_exclusive_group()
    loudness.add_argument("--quiet", action="store_true", help="no header or progress bar (run events still on stderr)")
    loudness.add_argument("--verbose", action="store_true",
                          help="also print the full resolved config (always written to OUT_DIR/config.yaml)")
    train.add_argument("--fresh", action="store_true",
                       help="start over: move a run found in out_dir to out_dir/previous/ instead of resuming it")
    hosts = train.add_argument_group(
        "many processes", "jax.distributed: give all three (or none: a cluster JAX detects - Cloud TPU pod, SLURM, "
                          "Open MPI, Kubernetes - is used, else one process); --cpu-devices counts per process")
    hosts.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address and a free port")
    hosts.add_argument("--num-processes", type=int, default=None, metavar="N",
                       help="processes in the run (1: one plain process, no cluster detection)")
    hosts.add_argument("--process-id", type=int, default=None, metavar="I", help="this process, 0..N-1")
    hosts.add_argument("--heartbeat-timeout", type=int, default=60, metavar="S",
                       help="if a process dies, the others stop within S seconds (default 60)")
    plan.add_argument("--device-memory", default=None, metavar="SIZE",
                      help="memory of one device (16GiB, 80GB, 512MiB, bytes); warns when the plan exceeds it")
    plan.add_argument("--compare", nargs="+", default=None, metavar="LAYOUT",
                      help="plan several layouts side by side; each LAYOUT is comma-separated key=value "
                           "overrides, e.g. mesh.data=8 mesh.fsdp=8 mesh.data=2,mesh.tensor=4 (a layout "
                           "naming a mesh.* key starts from a fresh mesh: data=-1, others 1)")
    return parser


INFERENCE = ("eval", "predict", "generate", "export")
_ON_ANY_MESH = ("RUN_DIR is the out_dir of a trained run; its newest checkpoint is restored onto the mesh that "
                "key=value overrides describe (a mesh.* override starts from a fresh mesh: data=-1, others 1).")


def _inference_parsers(sub) -> tuple:
    ev = sub.add_parser("eval", help="evaluate a run's checkpoint on its whole held-out set",
                        description="Loss, perplexity and bits per byte (accuracy and calibration for "
                                    "classifiers) over the whole held-out set. " + _ON_ANY_MESH)
    pr = sub.add_parser("predict", help="class predictions of a classifier run, in order, as NumPy",
                        description="Predictions of a classifier run (every member and the ensemble for a "
                                    "population) for its held-out set or --input, saved as .npz. " + _ON_ANY_MESH)
    ge = sub.add_parser("generate", help="continue text prompts with a run's language model",
                        description="Decode continuations of text prompts with a sharded KV cache. " + _ON_ANY_MESH)
    for command in (ev, pr):
        command.add_argument("--batch-size", type=int, default=None, metavar="N",
                             help="rows per batch (default: twice the training batch); rounded up to the batch shards")
    pr.add_argument("--input", default=None, metavar="X.npy", help="features [N, ...] (default: the held-out set)")
    pr.add_argument("--output", default=None, metavar="OUT.npz", help="default: RUN_DIR/predictions.npz")
    ge.add_argument("--prompt", action="append", required=True, metavar="TEXT", help="a prompt; repeat for several")
    ge.add_argument("--max-tokens", type=int, default=None, metavar="N",
                    help="new tokens per prompt (default: 64, or what the context leaves)")
    ge.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    ge.add_argument("--top-k", type=int, default=0, help="sample from the K most likely tokens (0: all)")
    ge.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of this probability mass")
    ge.add_argument("--seed", type=int, default=0)
    ge.add_argument("--stop", action="append", default=[], metavar="CHAR",
                    help="a byte that ends a sequence, e.g. '\\n' (repeatable)")
    return ev, pr, ge


def _inference(args, run_dir: str | None, overrides: list[str]) -> int:
    """eval / predict / generate; exit status 1 when the checkpoint cannot be read."""
    if run_dir is None:
        raise ConfigError(f"shardml {args.command} needs RUN_DIR, the out_dir of a trained run (e.g. runs/tiny)")
    from shardml.core.devices import setup_cpu_devices

    setup_cpu_devices(args.cpu_devices)
    from shardml.run import inference
    from shardml.run.checkpoint import CheckpointError

    try:
        if args.command == "export":
            print(f"exported {run_dir} to {_export(args, run_dir, overrides)}")
        elif args.command == "eval":
            print(inference.format_eval(inference.evaluate_run(run_dir, overrides, args.batch_size)))
        elif args.command == "predict":
            out = inference.predict_run(run_dir, overrides, _read_inputs(args.input), args.batch_size)
            path = args.output or os.path.join(run_dir, "predictions.npz")
            import numpy as np

            np.savez(path, **out)
            print(inference.format_predict(out, path))
        else:
            texts, gen = inference.generate_run(run_dir, args.prompt, overrides, args.max_tokens, args.temperature,
                                                args.top_k, args.top_p, args.seed, args.stop)
            print(inference.format_generation(args.prompt, texts, gen))
    except CheckpointError as err:
        print(f"shardml: error: {err}", file=sys.stderr)
        return 1
    return 0


def _export(args, run_dir: str, items: list[str]) -> str:
    """``shardml export RUN_DIR OUT``: OUT is the one argument that is not key=value after RUN_DIR."""
    from shardml.run.export import export_run

    outs = [item for item in items if "=" not in item]
    if len(outs) != 1:
        raise ConfigError(f"shardml export needs RUN_DIR and one OUT directory (got {outs or 'none'}), e.g. "
                          "shardml export runs/x --format hf exported/")
    return export_run(run_dir, outs[0], args.format, [item for item in items if "=" in item], merge=args.merge)


def _read_inputs(path: str | None):
    if path is None:
        return None
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--input {path}: not a readable .npy array ({err})") from None


def _arguments(argv: list[str] | None):
    """(args, preset, overrides); overrides may come after options."""
    parser = _parser()
    # argparse's intermixed parsing does not support subcommands.
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    preset, overrides = None, []
    for i, item in enumerate(args.args + extra):
        if "=" in item or i > 0 and args.command == "export":  # export's OUT: see _export
            overrides.append(item)
        elif i == 0:
            preset = item
        else:
            raise ConfigError(f"'{item}' is neither the first argument (CONFIG) nor key=value")
    return args, preset, overrides


def _plan(cfg, args) -> None:
    from shardml.analysis.plan import format_comparison, format_plan
    from shardml.run.planning import compare_layouts, group_plans, make_plan

    device_memory = _device_memory(args)
    if cfg.population.models:  # one column per group of devices
        print(format_comparison(group_plans(cfg, device_memory)))
    elif args.compare:  # every layout is checked before the first compile
        print(format_comparison(compare_layouts(cfg, args.compare, device_memory)))
    else:
        print(format_plan(make_plan(cfg, device_memory)))


def _device_memory(args) -> int | None:
    from shardml.analysis.plan import parse_bytes

    return parse_bytes(args.device_memory) if getattr(args, "device_memory", None) is not None else None


def main(argv: list[str] | None = None) -> int:
    """The ``shardml`` command; input that cannot work (any :class:`ShardmlError`) ends it with
    status 2 and one line naming the config key, without a traceback."""
    cfg = None
    try:
        args, preset, overrides = _arguments(argv)
        if args.command in INFERENCE:
            return _inference(args, preset, overrides)
        from shardml.run.config import load_config

        cfg = load_config(preset or "default", overrides)
        _device_memory(args)  # a bad size fails before JAX starts
        # Device emulation must precede anything that starts JAX's backend.
        from shardml.core.devices import setup_cpu_devices

        setup_cpu_devices(args.cpu_devices)
        if args.command == "plan":
            _plan(cfg, args)
            return 0
        from shardml.run.checkpoint import CheckpointError
        from shardml.run.distributed import start
        from shardml.run.loop import NonFiniteError
        from shardml.run.train import train

        # Before JAX's backend starts: explicit processes, or a cluster JAX detects, or one process.
        start(args.coordinator, args.num_processes, args.process_id, heartbeat_timeout=args.heartbeat_timeout)
        try:
            train(cfg, verbose=not args.quiet, fresh=args.fresh, full_config=args.verbose)
        except (CheckpointError, NonFiniteError) as err:
            print(f"shardml: error: {err}", file=sys.stderr)
            return 1
        except Exception as err:  # on several processes: stop now, not at the shutdown barrier
            from shardml.run.distributed import abandon, process_count

            if process_count() > 1:
                abandon(err)
            raise
    except ShardmlError as err:
        print(f"shardml: error: {keyed_error(err, cfg)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
