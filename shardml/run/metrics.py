"""Run metrics: which steps are logged, a JSONL writer mirrored to TensorBoard, and the progress bar.

    writer = MetricsWriter("runs/x")
    writer.write(10, {"loss": 2.3, "tokens_per_s": 1.2e5, "mfu_vs_matmul": 0.21})
    recorder = Recorder(steps=100, log_every=10, writer=writer, throughput=throughput, bar=None)
    recorder.record(9, metrics, val=None)
"""

from __future__ import annotations

import json
import os

import numpy as np

class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl``; mirrors scalars to TensorBoard
    when ``tensorboardX`` is installed.

    ``start_step``: the step the run starts from (None: append to what is there). Records after it
    (written by an attempt that died before its next checkpoint, or a half-written last line) are
    dropped, since the run writes them again; TensorBoard is told to purge them too. ``records``
    holds the kept records and ``dropped`` counts the others.
    """

    def __init__(self, out_dir: str | None, start_step: int | None = None):
        self.records, self.dropped = [], 0
        self._file = self._tb = None
        if out_dir is None:  # records in memory only
            return
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if start_step is not None:
            self.records, self.dropped = _keep_records(self.path, start_step)
        self._file = open(self.path, "a")  # noqa: SIM115 - open for the writer's lifetime
        try:
            from tensorboardX import SummaryWriter

            purge = start_step + 1 if start_step or self.dropped else None
            self._tb = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=purge)
        except ImportError:
            pass

    def write(self, step: int, values: dict) -> dict:
        record = {"step": int(step), **{k: int(v) if k == "member" else float(v) for k, v in values.items()}}
        self.records.append(record)
        if self._file is None:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, float(value), int(step))
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _keep_records(path: str, last_step: int) -> tuple[list[dict], int]:
    """Rewrites ``path`` keeping the records up to ``last_step``; returns them and the dropped count."""
    if not os.path.exists(path):
        return [], 0
    kept, lines, dropped = [], [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = record["step"] <= last_step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(record)
                lines.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        with open(path + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(path + ".tmp", path)
    return kept, dropped


def progress(total: int, enabled: bool = True):
    """A tqdm progress bar (silent when disabled or when tqdm is missing)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, disable=not enabled, dynamic_ncols=True, leave=True)


# The progress bar's short names of the throughput figures (:mod:`shardml.run.throughput`).
BAR_NAMES = {"tokens_per_s": "tok_s", "examples_per_s": "ex_s"}


class Recorder:
    """Decides which steps are logged and writes their records (JSONL, TensorBoard, progress bar);
    a population writes one record per member per logged step, with a ``member`` field."""

    SHOWN = ("loss", "grad_norm", "accuracy", "bad_steps")

    def __init__(self, steps: int, log_every: int, writer: MetricsWriter, throughput, bar):
        self.steps, self.log_every = steps, log_every
        self.writer, self.throughput, self.bar = writer, throughput, bar

    def due(self, step: int) -> bool:
        return step in (0, self.steps - 1) or (step + 1) % self.log_every == 0

    def record(self, step: int, metrics: dict, val: dict | None) -> None:
        """Writes the record(s) of ``step`` (0-based) if it is a logging or evaluation step."""
        if not (self.due(step) or val is not None):
            return
        values = {k: np.asarray(metrics[k], np.float64) for k in self.SHOWN if k in metrics}
        values.update({f"val_{k}": np.asarray(v, np.float64) for k, v in (val or {}).items()
                       if np.ndim(v) <= 1 and not isinstance(v, dict)})
        shared = self.throughput.rates(step + 1)
        members = values["loss"].shape[0] if values["loss"].ndim else 0
        if not members:
            record = self.writer.write(step + 1, {**values, **shared})
        else:
            for member in range(members):
                one = {k: v[member] if v.ndim else v for k, v in values.items()}
                record = self.writer.write(step + 1, {"member": member, **one, **shared})
            record = {**record, "loss": float(np.mean(values["loss"]))}
        if self.bar is not None:
            t = self.throughput
            self.bar.set_postfix({"loss": f"{record['loss']:.3f}", BAR_NAMES[t.rate_key]: f"{record[t.rate_key]:.3g}",
                                  t.mfu_key: f"{100 * record[t.mfu_key]:.1f}%"})
