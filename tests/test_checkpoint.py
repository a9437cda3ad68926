"""Checkpoints and the run loop in-process: restore onto other meshes, damage detection, non-finite
steps, run directories, graceful stops, and the command line called in-process.

The subprocess tests with real signals and real processes are in ``test_fault_tolerance.py``.
"""

import contextlib
import gc
import io
import json
import os
import pathlib
import re
import shutil
import signal
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import assert_bitwise_equal, host, lm_batch, max_rel_diff, tiny_transformer, trainer_for

from shardml.core.errors import ConfigError
from shardml.core.pipeline import Schedule
from shardml.run import checkpoint as ckpt
from shardml.run import cli, recipe
from shardml.run.loop import LoopSettings, NonFiniteError, run_loop
from shardml.run.preemption import StopRequest
from shardml.run.resume import claim_out_dir, identity, resume_point

SAVED_AT, CONTINUE = 3, 2


def batch(step, seed=0):
    return lm_batch(32, seed=1000 * seed + step, ragged=True)


def poison(batch):
    """One NaN in the mask: the loss and every gradient of the step become NaN."""
    batch["mask"][3, 5] = np.nan
    return batch


class Batches:
    """Test data for the loop: the batch of step s is a pure function of (seed, s); the steps in
    ``poisoned`` (0-based) carry a NaN."""

    def __init__(self, seed=0, poisoned=()):
        self.seed, self.poisoned = seed, set(poisoned)

    @property
    def fingerprint(self):
        return {"kind": "test", "seed": self.seed}

    def batch(self, step):
        b = batch(step, self.seed)
        return poison(b) if step in self.poisoned else b


def settings(out_dir, steps, **changes):
    return LoopSettings(steps=steps, out_dir=str(out_dir), log_every=1, verbose=False, **changes)


@pytest.fixture(scope="module")
def trainer8(tiny_model):
    return trainer_for(tiny_model, {"data": 8})


@pytest.fixture(scope="module")
def saved_run(trainer8, tmp_path_factory):
    """3 steps on data=8, an async checkpoint, then 2 more steps there: the reference continuation."""
    directory = str(tmp_path_factory.mktemp("ckpt") / "checkpoints")
    state = trainer8.init(0)
    for step in range(SAVED_AT):
        state, _ = trainer8.step(state, trainer8.put(batch(step)))
    checkpointer = ckpt.Checkpointer(directory, keep=2, async_save=True)
    checkpointer.save(SAVED_AT, state, meta={})
    saved = host(state)  # read before the next step donates the state; the save already has its copy
    losses = []
    for step in range(SAVED_AT, SAVED_AT + CONTINUE):
        state, metrics = trainer8.step(state, trainer8.put(batch(step)))
        losses.append(float(metrics["loss"]))
    checkpointer.close()
    return os.path.join(directory, str(SAVED_AT)), saved, np.array(losses), host(state.params)


# ----------------------------------------------------------------------------- restore onto any mesh


@pytest.mark.parametrize("name,sizes", [
    pytest.param("data=2 x tensor=4", {"data": 2, "tensor": 4}, marks=pytest.mark.slow, id="data2xtensor4"),
    pytest.param("fsdp=8", {"fsdp": 8}, id="fsdp8"),
    pytest.param("one device", {"data": 1}, marks=pytest.mark.slow, id="one_device"),
])
def test_restore_onto_another_mesh_continues_like_the_original(tiny_model, saved_run, name, sizes):
    step_dir, saved, ref_losses, ref_params = saved_run
    trainer = trainer_for(tiny_model, sizes)
    state, meta = ckpt.restore(step_dir, trainer.abstract_state())
    assert meta.step == SAVED_AT and int(state.step) == SAVED_AT, (meta.step, int(state.step))
    assert_bitwise_equal(state, saved, f"restored on {name} vs saved on data=8")
    assert jax.tree.structure(state) == jax.tree.structure(trainer.state_shardings), "restored state vs shardings"
    for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(trainer.state_shardings)):
        assert leaf.sharding == sharding, f"{name}: restored with {leaf.sharding}, the trainer wants {sharding}"
    losses = []
    for step in range(SAVED_AT, SAVED_AT + CONTINUE):
        state, metrics = trainer.step(state, trainer.put(batch(step)))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5,
                               err_msg=f"losses after restoring on {name} differ from continuing on data=8")
    diff = max_rel_diff(host(state.params), ref_params)
    assert diff < 1e-5, f"{name}: parameters after {CONTINUE} steps differ from data=8 by {diff:.2e}"


def test_load_params_onto_a_mesh_and_to_host(tiny_model, saved_run):
    step_dir, saved, _, _ = saved_run
    trainer = trainer_for(tiny_model, {"data": 2, "fsdp": 2, "tensor": 2})
    params = ckpt.load_params(os.path.dirname(step_dir), trainer.abstract_state().params)
    assert_bitwise_equal(params, saved.params, "load_params onto data=2 x fsdp=2 x tensor=2")
    wq = params["layers"]["wq"]
    assert wq.sharding == trainer.state_shardings.params["layers"]["wq"], wq.sharding
    on_host = ckpt.load_params(step_dir)
    assert isinstance(on_host["embed"], np.ndarray), type(on_host["embed"])
    assert_bitwise_equal(on_host, saved.params, "load_params to the host")


# ----------------------------------------------------------------------------- damaged checkpoints


def _two_checkpoints(trainer, directory):
    """Checkpoints 1 and 2 in ``directory``; returns both states (on the host)."""
    state, saved = trainer.init(0), []
    checkpointer = ckpt.Checkpointer(directory, keep=5, async_save=False)
    for step in (1, 2):
        state, _ = trainer.step(state, trainer.put(batch(step)))
        checkpointer.save(step, state, meta={})
        saved.append(host(state))
    checkpointer.close()
    return saved


def _changed(first, second, item):
    """Names of the arrays of checkpoint ``item`` (``params`` or ``train``: the rest of the state) that
    differ between two states: those a swap of that item between the two checkpoints corrupts."""
    a, b = ckpt.flatten(first), ckpt.flatten(second)
    in_item = [name for name in sorted(a) if name.startswith("params/") == (item == "params")]
    return [name for name in in_item if not np.array_equal(a[name], b[name])]


def _checksum_report(names):
    """The checksum failure naming ``names`` (sorted): their count and the first four."""
    listed = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return re.escape(f"{len(names)} array(s) do not match their saved checksum ({listed})")


def _largest_file(root):
    """The largest array-data file of an Orbax item (OCDBT keeps chunks under ``.../d/``)."""
    files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names if os.path.basename(d) == "d"]
    return max(files, key=os.path.getsize)


# When a read fails (a truncated file), Orbax abandons the restore's other reads as coroutines never
# awaited; garbage-collected later, they print as unraisable exceptions in whichever test runs then.
# Tests that make such reads collect them before they end, under this mark: those, and only those,
# are silenced (the "." stands for a colon, which a filter string cannot hold).
ABANDONED_READS = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <coroutine object _read_array_index_and_device_put"
    ":pytest.PytestUnraisableExceptionWarning")


@pytest.fixture
def abandoned_reads_collected():
    yield
    gc.collect()


def _truncate(step_dir):
    path = _largest_file(os.path.join(step_dir, "params"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _xor_byte(path, offset, bits=0x40):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ bits]))


def _orbax_reads(item_dir):
    """Whether plain Orbax restores an item without an error."""
    try:
        with warnings.catch_warnings(), ocp.PyTreeCheckpointer() as checkpointer:
            warnings.simplefilter("ignore")  # "Sharding info not provided": it is read from the item
            checkpointer.restore(item_dir)
    except Exception:  # Orbax / TensorStore raise many types for damaged files
        return False
    return True


def _flip_a_byte(step_dir):
    """Flips bits of one byte of the ``train`` item where Orbax still reads it without complaint (zstd
    chunks carry no checksum): silent corruption. At the few offsets where the flip makes a chunk
    undecodable Orbax does report it (as ``_truncate`` shows); those are passed over."""
    item = os.path.join(step_dir, "train")
    assert _orbax_reads(item), f"plain Orbax cannot read the undamaged {item}"
    path = _largest_file(item)
    middle = os.path.getsize(path) // 2
    for offset in range(middle, middle + 20):
        _xor_byte(path, offset)
        if _orbax_reads(item):
            return
        _xor_byte(path, offset)
    raise AssertionError(f"every byte flipped in {path} from offset {middle} on was noticed by Orbax")


def _arrays_of_another_state(step_dir, item="train"):
    """A well-formed Orbax checkpoint whose arrays are not the ones its meta describes."""
    other = os.path.join(os.path.dirname(step_dir), "1", item)
    shutil.rmtree(os.path.join(step_dir, item))
    shutil.copytree(other, os.path.join(step_dir, item))


def _unfinished(step_dir):
    os.rename(step_dir, step_dir + ".orbax-checkpoint-tmp")


def _meta_deleted(step_dir):
    os.remove(os.path.join(step_dir, "meta", "metadata"))


def _any_train_array(first, second):
    names = [name for name in ckpt.flatten(second) if not name.startswith("params/")]
    return rf"1 array\(s\) do not match their saved checksum \(({'|'.join(map(re.escape, names))})\)"


# What each damage must be reported as, from the two saved states (step 1, step 2).
@pytest.mark.parametrize("damage,reason", [
    (_truncate, lambda *_: r"Orbax cannot read it \(.+\)"),
    (_flip_a_byte, _any_train_array),
    (_arrays_of_another_state, lambda first, second: _checksum_report(_changed(first, second, "train"))),
    (_meta_deleted, lambda *_: r".*/checkpoints/2: its meta item is missing or unreadable \(\[Errno 2\] .+\)"),
    (_unfinished, lambda *_: None),
], ids=["truncated", "flipped_byte", "arrays_of_another_state", "meta_deleted", "unfinished"])
@ABANDONED_READS
@pytest.mark.usefixtures("abandoned_reads_collected")
def test_damaged_latest_checkpoint_is_reported_and_skipped(trainer8, tmp_path, damage, reason):
    directory = str(tmp_path / "checkpoints")
    first, second = _two_checkpoints(trainer8, directory)
    damage(os.path.join(directory, "2"))
    reports = []
    state, _, step = ckpt.restore_latest(directory, trainer8.abstract_state(), report=reports.append, set_aside=True)
    assert step == 1, f"restored step {step} after damaging step 2 ({damage.__name__}); reports: {reports}"
    assert_bitwise_equal(state, first, "fallback checkpoint")
    assert len(reports) == 1, f"{damage.__name__}: expected one report, got {reports}"
    moved = str(tmp_path / "checkpoints-damaged" / "2")
    if damage is _unfinished:  # not damage: an interrupted save, left where it is
        expected = re.escape("ignoring an unfinished checkpoint write (the process stopped while saving): "
                             f"{directory}/2.orbax-checkpoint-tmp")
    else:
        expected = f"skipping damaged checkpoint step 2: {reason(first, second)}; moved to {re.escape(moved)}"
    assert re.fullmatch(expected, reports[0]), f"{damage.__name__}: the report is not {expected!r}: {reports[0]}"
    if damage is not _unfinished:
        assert os.path.isdir(moved), "damaged checkpoint not kept aside"
        assert ckpt.steps(directory) == [1], "the damaged step is still where Orbax would save step 2 again"


@ABANDONED_READS
@pytest.mark.usefixtures("abandoned_reads_collected")
def test_no_usable_checkpoint_is_an_error(trainer8, tmp_path):
    directory = str(tmp_path / "checkpoints")
    _two_checkpoints(trainer8, directory)
    for step in ("1", "2"):
        _truncate(os.path.join(directory, step))
    with pytest.raises(ckpt.CheckpointError, match=r"none of the 2 checkpoints .* is usable \(steps 2, 1\)"):
        ckpt.restore_latest(directory, trainer8.abstract_state(), report=lambda _: None)


def test_load_params_refuses_a_checksum_mismatch(trainer8, tmp_path):
    """Parameters Orbax reads without complaint, but not the ones the checkpoint's meta describes."""
    directory = str(tmp_path / "checkpoints")
    first, second = _two_checkpoints(trainer8, directory)
    _arrays_of_another_state(os.path.join(directory, "2"), item="params")
    changed = [name[len("params/"):] for name in _changed(first, second, "params")]
    for target in (None, trainer8.abstract_state().params):  # to the host, and onto the mesh
        with pytest.raises(ckpt.CheckpointError, match=f"checkpoints/2: {_checksum_report(changed)}$"):
            ckpt.load_params(directory, target)
    ckpt.load_params(os.path.join(directory, "1"))  # the step whose arrays they are still loads


# ----------------------------------------------------------------------------- non-finite steps


def test_nonfinite_step_is_skipped_and_training_continues_exactly(trainer8):
    state = trainer8.init(0)
    state, _ = trainer8.step(state, trainer8.put(batch(0)))
    before = host(state)
    state, metrics = trainer8.step(state, trainer8.put(poison(batch(1))))
    assert int(metrics["skipped"]) == 1 and not np.isfinite(float(metrics["loss"])), metrics
    assert int(state.step) == 2, "a skipped step still consumes its batch (the data position advances)"
    assert (int(state.bad_steps), int(state.bad_streak)) == (1, 1), (state.bad_steps, state.bad_streak)
    assert_bitwise_equal((state.params, state.opt_state), (before.params, before.opt_state),
                         "state after a non-finite step")
    state, metrics = trainer8.step(state, trainer8.put(batch(2)))
    assert int(metrics["skipped"]) == 0, metrics
    assert (int(state.bad_steps), int(state.bad_streak)) == (1, 0), "a finite step ends the streak, keeps the count"
    # Reference: the same state never saw the bad batch.
    ref = jax.device_put(before, trainer8.state_shardings)
    ref, ref_metrics = trainer8.step(ref, trainer8.put(batch(2)))
    assert float(metrics["loss"]) == float(ref_metrics["loss"])
    assert_bitwise_equal((state.params, state.opt_state), (ref.params, ref.opt_state),
                         "after skipping a bad batch vs never seeing it")


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_loop_stops_after_max_bad_steps_and_the_counters_resume_with_the_state(trainer8, tmp_path):
    out, directory = tmp_path / "run", str(tmp_path / "run" / "checkpoints")
    poisoned = {2, 5, 6, 7}  # 0-based: one isolated bad step, then three in a row
    run = settings(out, 10, checkpoint_every=1, checkpoint_keep=40, max_bad_steps=3)
    stop = (r"steps 6-8: 3 steps in a row \(max_bad_steps=3\).*"
            r"The last checkpoint, \S+/checkpoints/7 \(step 7\), is left as it was")
    with pytest.raises(NonFiniteError, match=stop):
        run_loop(trainer8, Batches(poisoned=poisoned), run)
    bad_steps = [(r["step"], r["bad_steps"]) for r in _records(out)]
    assert bad_steps == list(zip(range(1, 9), [0, 0, 1, 1, 1, 2, 3, 4])), f"bad_steps per logged step: {bad_steps}"
    assert ckpt.steps(directory) == list(range(1, 8)), "a checkpoint was saved after the run had to stop"
    params = {s: ckpt.flatten(ckpt.load_params(os.path.join(directory, str(s)))) for s in range(1, 8)}
    for before, after in ((2, 3), (5, 6), (6, 7)):
        for name, leaf in params[before].items():
            np.testing.assert_array_equal(params[after][name], leaf, err_msg=f"non-finite step {after} changed {name}")
    assert any(not np.array_equal(params[4][n], params[3][n]) for n in params[3]), "finite step 4 changed nothing"
    assert all(np.isfinite(leaf).all() for leaf in params[7].values()), "the last checkpoint is not finite"
    state, _ = ckpt.restore(os.path.join(directory, "7"), trainer8.abstract_state())
    assert (int(state.bad_steps), int(state.bad_streak)) == (3, 2), "counters in checkpoint 7"

    # Run again, step 7 still bad: the streak of 2 restored with the state makes it the third in a row.
    with pytest.raises(NonFiniteError, match=stop):
        run_loop(trainer8, Batches(poisoned=poisoned), run)
    assert [r["step"] for r in _records(out)] == list(range(1, 9)), "the resumed run logged other steps"
    # Once more with step 7 clean: the run finishes; the total keeps counting from the checkpoint's 3.
    summary = run_loop(trainer8, Batches(poisoned={2, 5, 6}), run)
    assert summary.resumed_from == 7 and summary.bad_steps == 3, (summary.resumed_from, summary.bad_steps)
    got = [(r["step"], r["bad_steps"]) for r in _records(out)][6:]
    assert got == [(7, 3), (8, 3), (9, 3), (10, 3)], f"bad_steps after resuming: {got}"
    assert int(summary.state.bad_streak) == 0, "the finite step 8 did not end the streak"


# ----------------------------------------------------------------------------- settings and run directories


@pytest.fixture
def run_dir(trainer8, tmp_path):
    """A run of the loop in out_dir: run.json, metrics.jsonl and checkpoints 1 and 2 (step 2 non-finite)."""
    out = str(tmp_path / "run")
    source = Batches(poisoned={1})
    summary = run_loop(trainer8, source, settings(out, 2, checkpoint_every=1))
    assert ckpt.steps(os.path.join(out, "checkpoints")) == [1, 2]
    return out, identity(trainer8, source.fingerprint), host(summary.state)


def _contents(root):
    """Every file under ``root``: relative path -> bytes."""
    return {str(path.relative_to(root)): path.read_bytes() for path in pathlib.Path(root).rglob("*") if path.is_file()}


def test_out_dir_of_another_run_is_refused_untouched_then_moved_aside_with_fresh(trainer8, run_dir):
    out, ident, _ = run_dir
    before = _contents(out)
    other_model = identity(trainer_for(tiny_transformer(d_ff=128), {"data": 8}), ident.data)
    cases = [
        # Parameter shapes: w_down, w_gate and w_up have a d_ff dimension; the first in order is named.
        (other_model, "auto", (r"holds a run of another model \(transformer with 12 parameter arrays, 3 differing "
                               r"from this transformer's \(first: layers/w_down \[\[2, 64, 32\], 'float32'\] -> "
                               r"\[\[2, 128, 32\], 'float32'\]\)\); it was not touched")),
        (identity(trainer8, {"kind": "test", "seed": 1}), "auto",
         r"cannot resume the run in .*: the data stream differs \(seed: 0 -> 1\)"),
        (ident, "never", r"resume=never, but out_dir .* already holds a run \(checkpoints up to step 2\)"),
    ]
    for other, resume, message in cases:
        with pytest.raises(ConfigError, match=message):
            claim_out_dir(out, other, resume)
        assert _contents(out) == before, f"{message}: out_dir changed although the run was refused"
    claim_out_dir(out, ident, "auto")  # the same run: resumed, nothing to refuse
    notices = []
    claim_out_dir(out, other_model, fresh=True, notice=notices.append)
    assert os.listdir(out) == ["previous"], os.listdir(out)
    (moved,) = os.listdir(os.path.join(out, "previous"))
    assert _contents(os.path.join(out, "previous", moved)) == before, "fresh lost or changed files of the old run"
    assert len(notices) == 1 and "fresh start: moved the previous run" in notices[0], notices


def test_resume_point_restores_state_and_counters(trainer8, run_dir):
    out, ident, saved = run_dir
    notices = []
    start = resume_point(out, "auto", trainer8, ident, notice=notices.append)
    assert start.step == 2 and start.source == os.path.join(out, "checkpoints", "2"), start
    assert_bitwise_equal(start.state, saved, "resume_point")
    assert (int(start.state.bad_steps), int(start.state.bad_streak)) == (1, 1), "non-finite counters not restored"
    assert any(n.startswith("resuming from step 2: ") and n.endswith("(saved on data=8)") for n in notices), notices
    with pytest.raises(ConfigError, match=r"cannot resume from .*: the data stream differs \(seed: 0 -> 1\)"):
        resume_point(out, "auto", trainer8, identity(trainer8, {"kind": "test", "seed": 1}))
    other = trainer_for(tiny_transformer(d_ff=128), {"data": 8})
    with pytest.raises(ConfigError, match=r"holds checkpoints of another model .*first: layers/w_down"):
        resume_point(out, "auto", other, identity(other, ident.data))
    never = resume_point(out, "never", trainer8, ident)
    assert never.step == 0 and never.state is None, never
    explicit = resume_point(out + "-branch", os.path.join(out, "checkpoints", "1"), trainer8, ident)
    assert explicit.step == 1 and int(explicit.state.step) == 1, explicit
    assert ckpt.steps(os.path.join(out, "checkpoints")) == [1, 2], "resume_point changed the checkpoints"


# ----------------------------------------------------------------------------- graceful stops


def test_a_second_ctrl_c_is_not_intercepted():
    """The first SIGINT only asks the loop to stop; a second one raises KeyboardInterrupt."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever pytest set
    term = signal.getsignal(signal.SIGTERM)
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signal == "SIGINT", "the first SIGINT was not recorded"
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
            assert stop.signal == "SIGINT", stop.signal
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the SIGINT handler was not put back"
        assert signal.getsignal(signal.SIGTERM) is term, "the SIGTERM handler was not put back"
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
def test_pipelined_run_checkpoints_and_resumes_exactly(tmp_path):
    """mesh pipeline=2 x data=4, circular with 2 repeats (layers stored regrouped): a run saved at step
    2 and resumed to step 4 ends bitwise equal to the run that never stopped."""
    trainer = trainer_for(tiny_transformer(layers=4), {"pipeline": 2, "data": 4},
                          schedule=Schedule("circular", 2, 2, 2))
    data = Batches()
    first = run_loop(trainer, data, settings(tmp_path / "resumed", 2, checkpoint_every=0))
    assert first.checkpoint == str(tmp_path / "resumed" / "checkpoints" / "2"), first.checkpoint
    saved = ckpt.read_meta(first.checkpoint).arrays["params/layers/wq"]
    assert saved == [[2, 4 // 2, 32, 4, 8], "float32"], f"wq not saved as [repeats, layers / repeats, ...]: {saved}"
    resumed = run_loop(trainer, data, settings(tmp_path / "resumed", 4, checkpoint_every=0))
    whole = run_loop(trainer, data, settings(tmp_path / "whole", 4, checkpoint_every=0))
    assert resumed.resumed_from == 2 and whole.resumed_from is None, (resumed.resumed_from, whole.resumed_from)
    assert [r["loss"] for r in resumed.records] == [r["loss"] for r in whole.records], \
        f"losses resumed {[r['loss'] for r in resumed.records]} vs uninterrupted {[r['loss'] for r in whole.records]}"
    assert_bitwise_equal(host(resumed.state), host(whole.state), "pipelined state resumed vs uninterrupted")
    assert_bitwise_equal(ckpt.load_params(str(tmp_path / "resumed")), host(whole.state.params),
                         "the final pipelined checkpoint vs the uninterrupted parameters")


# ----------------------------------------------------------------------------- the command line, in-process

STEPS, STOP_AT = 10, 4
# The tiny preset made conftest's TINY model, batches and optimizer: the same programs as
# trainer_for(tiny_model, {"data": 8}) and {"data": 2, "tensor": 4}, so XLA's compilation cache has them.
COMMAND = ["train", "tiny", "model.layers=2", "data.seq_len=16", "train.batch_size=32", "optim.warmup=1",
           f"train.steps={STEPS}", "train.log_every=1", "checkpoint.every=0", "--quiet"]


class _Preempted:
    """The data source of a config, sending the process SIGTERM when batch ``at`` is read."""

    def __init__(self, source, at):
        self._source, self._at = source, at

    def __getattr__(self, name):
        return getattr(self._source, name)

    def batch(self, step):
        if step == self._at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self._source.batch(step)


class _Poisoned(_Preempted):
    """The data source of a config with every batch non-finite."""

    def batch(self, step):
        return poison(self._source.batch(step))


def main(argv):
    """``shardml`` in-process: (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(argv)
    return code, err.getvalue()


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """``shardml train tiny`` with checkpoint.every=0 into one out_dir: (1) on data=8, stopped by SIGTERM
    after step STOP_AT; (2) the same command with mesh.data=2 mesh.tensor=4, which resumes it on that
    mesh; (3) the data=8 command with --fresh, which moves that run aside and trains uninterrupted."""
    out = tmp_path_factory.mktemp("cli") / "run"
    command = [*COMMAND, f"out_dir={out}"]
    real = recipe.data_source
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recipe, "data_source", lambda cfg: _Preempted(real(cfg), STOP_AT - 1))
        runs["stopped"] = main(command) + (ckpt.steps(str(out / "checkpoints")),)
    runs["resumed"] = main([*command, "mesh.data=2", "mesh.tensor=4"]) + (ckpt.steps(str(out / "checkpoints")),)
    runs["fresh"] = main([*command, "--fresh"]) + (ckpt.steps(str(out / "checkpoints")),)
    for name, (code, stderr, _) in runs.items():
        assert code == 0, f"run {name}: exit {code}: {stderr[-3000:]}"
    return out, runs


def _moved_aside(out):
    """The one directory --fresh moved the previous run to."""
    moved = os.listdir(out / "previous") if (out / "previous").is_dir() else []
    assert len(moved) == 1, f"expected one previous run in {out}/previous, found {moved}"
    return out / "previous" / moved[0]


def test_cli_checkpoint_every_0_saves_only_when_stopped_and_at_the_end(cli_runs):
    out, runs = cli_runs
    _, stderr, saved = runs["stopped"]
    assert f"stopped by SIGTERM after step {STOP_AT} of {STEPS}; saved checkpoint {out}/checkpoints/{STOP_AT}" \
        in stderr, stderr[-3000:]
    assert saved == [STOP_AT], f"checkpoint.every=0 stopped by a signal after step {STOP_AT} left {saved}"
    assert runs["resumed"][2] == [STOP_AT, STEPS], runs["resumed"][2]
    assert runs["fresh"][2] == [STEPS], f"checkpoint.every=0, {STEPS} steps without a stop saved {runs['fresh'][2]}"


def test_cli_resumes_onto_another_mesh_and_continues_like_the_uninterrupted_run(cli_runs):
    out, runs = cli_runs
    previous = _moved_aside(out)
    stderr = runs["resumed"][1]
    assert f"resuming from step {STOP_AT}: {out}/checkpoints/{STOP_AT} (saved on data=8)" in stderr, stderr[-3000:]
    assert "config differs from the checkpoint's: mesh.data: -1 -> 2; mesh.tensor: 1 -> 4" in stderr, stderr[-3000:]
    resumed, whole = _records(previous), _records(out)  # (1)+(2) were moved aside by (3)
    assert [r["step"] for r in resumed] == [r["step"] for r in whole] == list(range(1, STEPS + 1))
    for a, b in zip(resumed, whole):
        for key in ("loss", "grad_norm"):
            if a["step"] <= STOP_AT:  # the same program on the same mesh
                assert a[key] == b[key], f"step {a['step']}: {key} {a[key]} vs {b[key]} uninterrupted"
            else:
                assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), \
                    f"step {a['step']}: {key} {a[key]} on data=2 x tensor=4 after resuming vs {b[key]} uninterrupted"
    assert abs(resumed[-1]["val_loss"] - whole[-1]["val_loss"]) <= 1e-5 * whole[-1]["val_loss"]
    diff = max_rel_diff(ckpt.load_params(str(previous)), ckpt.load_params(str(out)), "final parameters")
    assert diff <= 1e-5, f"final parameters after resuming on another mesh differ by {diff:.2e}"


def test_cli_fresh_moves_the_previous_run_aside_and_starts_over(cli_runs):
    out, runs = cli_runs
    previous = _moved_aside(out)
    stderr = runs["fresh"][1]
    assert f"fresh start: moved the previous run in {out} to {previous}" in stderr, stderr[-3000:]
    assert "resuming" not in stderr, f"--fresh resumed: {stderr[-3000:]}"
    run_files = {"checkpoints", "config.yaml", "metrics.jsonl", "run.json", "samples.txt"}
    # tb: when tensorboardX is installed; library.log: when a library said something during the run (in
    # the full suite, TensorStore threads of an earlier test's failed read can report while it runs)
    optional = {"tb", "library.log"}
    assert set(os.listdir(previous)) - optional == run_files, f"moved aside: {os.listdir(previous)}"
    assert ckpt.steps(str(previous / "checkpoints")) == [STOP_AT, STEPS], "the previous run's checkpoints"
    assert set(os.listdir(out)) - optional == run_files | {"previous"}, f"the new run: {os.listdir(out)}"


def test_cli_exits_1_after_max_bad_steps(tmp_path, monkeypatch, capsys):
    real = recipe.data_source
    monkeypatch.setattr(recipe, "data_source", lambda cfg: _Poisoned(real(cfg), None))
    code = cli.main([*COMMAND, f"out_dir={tmp_path / 'run'}", "train.max_bad_steps=2"])
    stderr = capsys.readouterr().err
    assert code == 1, f"exit {code} after train.max_bad_steps=2 non-finite steps: {stderr[-3000:]}"
    assert "shardml: error: steps 1-2: 2 steps in a row (max_bad_steps=2) had a non-finite loss" in stderr, stderr
    assert "No checkpoint had been saved" in stderr and "Traceback" not in stderr, stderr
    assert ckpt.steps(str(tmp_path / "run" / "checkpoints")) == [], "a checkpoint was saved after the run stopped"
