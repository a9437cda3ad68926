"""The run harness: configs and presets, the training loop, checkpoints, resume, metrics, the CLI."""
