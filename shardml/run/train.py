"""``shardml train`` from Python (the names older code imports; see :mod:`shardml.run.driver`).

    from shardml import load_config, train
    summary = train(load_config("tiny", ["train.steps=20"]))
"""

from shardml.run.driver import describe_parts, drive, loop_settings, train, train_optuna

__all__ = ["describe_parts", "drive", "loop_settings", "train", "train_optuna"]
