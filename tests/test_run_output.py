"""What a run shows its user (issue 31): throughput in the unit of the model's kind, the FLOP ratio
named by what it is against, the last logged step's throughput measured over its own step, a short
header (the full config in OUT_DIR/config.yaml, on screen with --verbose), and the libraries'
output about failures shardml handled kept in OUT_DIR/library.log."""

import json
import logging
import sys
import warnings

import numpy as np
import pytest

from shardml.run import library_log, throughput
from shardml.run.cli import main
from shardml.run.config import load_config
from shardml.run.library_log import LibraryLog
from shardml.run.recipe import build

MLP = ("model.kind=mlp", "data.corpus=digits", "optim.lr=1e-2")


def shardml(capfd, *args):
    code = main(list(args))
    out, err = capfd.readouterr()
    return code, out, err


def records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


class Clock:
    """A perf_counter the test moves by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("overrides,unit,per_example", [((), "tokens_per_s", 32), (MLP, "examples_per_s", 1)])
def test_rates_count_tokens_for_language_models_and_examples_for_classifiers(monkeypatch, overrides, unit,
                                                                               per_example):
    parts = build(load_config("tiny", list(overrides)))
    batch = parts.data.batch(0)
    meter = throughput.Throughput(parts.trainer, batch)  # measures the matmul peak with the real clock
    clock = Clock()
    monkeypatch.setattr(throughput.time, "perf_counter", clock)
    rows = batch["inputs"].shape[0]
    assert (meter.rows, meter.tokens_per_example) == (rows, per_example)
    meter.start(1)
    clock.now += 2.0
    rates = meter.rates(5)  # 4 steps in 2 s
    assert set(rates) == {unit, "mfu_vs_matmul"}, f"on CPU: {rates}"
    assert rates[unit] == pytest.approx(4 * rows * per_example / 2.0)
    assert rates["mfu_vs_matmul"] == pytest.approx(4 * rows * meter.flops_per_example / 2.0 / meter.peak)
    # Against a datasheet peak (an accelerator the table knows) the ratio is MFU proper.
    monkeypatch.setattr(throughput, "datasheet_flops", lambda: (1e12, "datasheet test chip x 8"))
    meter = throughput.Throughput(parts.trainer, batch)
    meter.start(1)
    clock.now += 1.0
    assert meter.rates(2) == pytest.approx({unit: rows * per_example, "mfu": rows * meter.flops_per_example / 1e12})


def test_language_model_run_shows_a_short_header_and_logs_tokens_per_s(capfd, tmp_path):
    out = tmp_path / "lm"
    code, stdout, err = shardml(capfd, "train", "tiny", "train.steps=3", "train.log_every=1", "checkpoint.every=0",
                                f"out_dir={out}")
    assert code == 0, err[-3000:]
    header = stdout.split("done:")[0]
    assert f"config: {out / 'config.yaml'} holds the full resolved config (--verbose prints it)" in header, header
    assert "batch_size:" not in header and "rope_base" not in header, f"the resolved config is printed:\n{header}"
    assert len(header.splitlines()) <= 6, header
    assert (out / "config.yaml").read_text().count("\n") > 50, "config.yaml is not the full resolved config"
    got = records(out)
    assert all({"tokens_per_s", "mfu_vs_matmul"} <= r.keys() and not {"examples_per_s", "mfu"} & r.keys()
               for r in got), got
    assert "tok_s=" in err and "mfu_vs_matmul=" in err, "the progress bar does not name its figures"


def test_classifier_run_with_verbose_prints_the_config_and_logs_examples_per_s(capfd, tmp_path):
    out = tmp_path / "mlp"
    code, stdout, err = shardml(capfd, "train", "tiny", *MLP, "train.steps=3", "train.log_every=1",
                                "checkpoint.every=0", f"out_dir={out}", "--verbose")
    assert code == 0, err[-3000:]
    assert "batch_size: 16" in stdout and "kind: mlp" in stdout, "--verbose does not print the resolved config"
    got = records(out)
    assert all("examples_per_s" in r and "tokens_per_s" not in r for r in got), got
    assert "ex_s=" in err and "tok_s" not in err, err[-2000:]


@pytest.mark.parametrize("mode", [
    ("population.kind=ensemble", "population.size=2", "mesh.members=2"),
    ("mesh.members=2", "federated.algorithm=fedavg", "federated.clients=4"),
], ids=["population", "federated"])
def test_population_and_federated_headers_are_short_too(capfd, tmp_path, mode):
    out = tmp_path / "run"
    code, stdout, err = shardml(capfd, "train", "tiny", *MLP, *mode, "train.steps=2", "checkpoint.every=0",
                                f"out_dir={out}")
    assert code == 0, err[-3000:]
    header = stdout.split("done:")[0]
    assert "(--verbose prints it)" in header and "batch_size:" not in header, header
    assert (out / "config.yaml").is_file()


def test_last_logged_step_is_timed_over_its_own_step(capfd, tmp_path):
    """The last step (evaluated) was timed from the previous record, read after the wait for the
    evaluation: the record before held two steps, the last one almost no time (rates 20-30x)."""
    out = tmp_path / "run"
    code, _, err = shardml(capfd, "train", "tiny", "train.steps=10", "train.log_every=1", "checkpoint.every=0",
                           f"out_dir={out}", "--quiet")
    assert code == 0, err[-3000:]
    rates = [r["tokens_per_s"] for r in records(out)]
    typical = np.median(rates[2:-1])  # after the first (compile) and second (warming up) records
    assert rates[-1] < 4 * typical, f"last step {rates[-1]:.3g} tokens/s vs median {typical:.3g}: {rates}"
    assert rates[-2] > typical / 4, f"the step before the last {rates[-2]:.3g} vs median {typical:.3g}: {rates}"


def test_damaged_checkpoint_prints_one_line_and_keeps_orbaxs_traceback_in_library_log(capfd, tmp_path):
    out = tmp_path / "run"
    run = ("train", "tiny", "checkpoint.every=2", f"out_dir={out}", "--quiet")
    code, _, err = shardml(capfd, *run, "train.steps=4")
    assert code == 0, err[-3000:]
    data = [p for p in (out / "checkpoints" / "4" / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    victim = max(data, key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    code, stdout, err = shardml(capfd, *run, "train.steps=6")
    assert code == 0, err[-3000:]
    lines = [line for line in err.splitlines() if "skipping damaged" in line]
    assert len(lines) == 1 and lines[0].startswith("shardml: skipping damaged checkpoint step 4: Orbax cannot"), err
    assert lines[0].endswith(f"(details: {out / 'library.log'})"), lines[0]
    assert "Traceback" not in err + stdout, f"a library traceback reached the user:\n{err[-3000:]}"
    assert "TensorStore details" not in lines[0] and len(lines[0]) < 600, lines[0]
    log = (out / "library.log").read_text()
    assert "handled: checkpoint step 4" in log and "Traceback" in log and "CheckpointError" in log, log[-3000:]


def test_library_log_takes_unraisable_exceptions_library_warnings_and_absl_lines(capfd, tmp_path):
    class Noisy:  # what TensorStore's late callbacks into a closed event loop look like
        def __del__(self):
            raise RuntimeError("Event loop is closed")

    before = sys.unraisablehook
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with LibraryLog(str(tmp_path)):
            Noisy()
            warnings.warn_explicit("orbax says", UserWarning, "/x/site-packages/orbax/checkpoint/a.py", 1)
            logging.getLogger("absl").warning("absl says")
            note = library_log.handled("checkpoint step 3", ValueError("bad bytes"))
            warnings.warn_explicit("user code says", UserWarning, "/x/mine.py", 1)
    assert sys.unraisablehook is before, "the hook is not restored"
    assert [str(w.message) for w in shown] == ["user code says"], "warnings of the user's own code must show"
    assert library_log.handled("after", ValueError()) == "", "a closed log still takes entries"
    out, err = capfd.readouterr()
    assert note == f" (details: {tmp_path / 'library.log'})"
    leaked = [text for text in ("Event loop", "orbax says", "absl says", "bad bytes") if text in err + out]
    assert not leaked, f"{leaked} reached the terminal:\n{err}"
    log = (tmp_path / "library.log").read_text()
    for text in ("RuntimeError: Event loop is closed", "orbax says", "WARNING absl: absl says",
                 "handled: checkpoint step 3", "ValueError: bad bytes"):
        assert text in log, f"{text!r} missing from library.log:\n{log}"
