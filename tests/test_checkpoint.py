"""Checkpoints in-process: restore onto other meshes, damage detection, non-finite steps, run directories.

The subprocess tests with real signals are in ``test_fault_tolerance.py``.
"""

import importlib
import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import lm_batch, max_rel_diff

from shardml import checkpoint as ckpt
from shardml.config import ConfigError, OptimConfig, dump_yaml, load_config, validate
from shardml.mesh import make_mesh
from shardml.resume import checkpoint_meta, claim_out_dir, resume_point
from shardml.step import build_trainer, default_optimizer, put_batch

SAVED_AT, CONTINUE = 3, 2


def batch(step):
    return lm_batch(32, seed=step, ragged=True)


def make_trainer(model, sizes, devices=None):
    return build_trainer(model, make_mesh(sizes, devices), default_optimizer(OptimConfig(lr=3e-3, warmup=1), 10))


def host(tree):
    return jax.tree.map(np.asarray, tree)


def assert_bitwise_equal(a, b, what):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{what}: {jax.tree_util.keystr(path)}")


@pytest.fixture(scope="module")
def trainer8(tiny_model):
    return make_trainer(tiny_model, {"data": 8})


@pytest.fixture(scope="module")
def saved_run(trainer8, tmp_path_factory):
    """3 steps on data=8, an async checkpoint, then 2 more steps there: the reference continuation."""
    directory = str(tmp_path_factory.mktemp("ckpt") / "checkpoints")
    state = trainer8.init(0)
    for step in range(SAVED_AT):
        state, _ = trainer8.step(state, put_batch(batch(step), trainer8.batch_sharding))
    checkpointer = ckpt.Checkpointer(directory, keep=2, async_save=True)
    checkpointer.save(SAVED_AT, state, meta={})
    saved = host(state)  # read before the next step donates the state; the save already has its copy
    losses = []
    for step in range(SAVED_AT, SAVED_AT + CONTINUE):
        state, metrics = trainer8.step(state, put_batch(batch(step), trainer8.batch_sharding))
        losses.append(float(metrics["loss"]))
    checkpointer.close()
    return os.path.join(directory, str(SAVED_AT)), saved, np.array(losses), host(state.params)


@pytest.mark.parametrize("name,sizes,one_device", [
    ("data=2 x tensor=4", {"data": 2, "tensor": 4}, False),
    ("fsdp=8", {"fsdp": 8}, False),
    ("one device", {"data": 1}, True),
], ids=["data2xtensor4", "fsdp8", "one_device"])
def test_restore_onto_another_mesh_continues_like_the_original(tiny_model, saved_run, name, sizes, one_device):
    step_dir, saved, ref_losses, ref_params = saved_run
    trainer = make_trainer(tiny_model, sizes, jax.devices()[:1] if one_device else None)
    state, meta = ckpt.restore(step_dir, trainer.abstract_state())
    assert meta["step"] == SAVED_AT and int(state.step) == SAVED_AT
    assert_bitwise_equal(state, saved, f"restored on {name} vs saved on data=8")
    for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(trainer.state_shardings)):
        assert leaf.sharding == sharding, f"{name}: restored with {leaf.sharding}, the trainer wants {sharding}"
    losses = []
    for step in range(SAVED_AT, SAVED_AT + CONTINUE):
        state, metrics = trainer.step(state, put_batch(batch(step), trainer.batch_sharding))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5,
                               err_msg=f"losses after restoring on {name} differ from continuing on data=8")
    diff = max_rel_diff(host(state.params), ref_params)
    assert diff < 1e-5, f"{name}: parameters after {CONTINUE} steps differ from data=8 by {diff:.2e}"


def test_load_params_onto_a_mesh_and_to_host(tiny_model, saved_run):
    step_dir, saved, _, _ = saved_run
    trainer = make_trainer(tiny_model, {"data": 2, "fsdp": 2, "tensor": 2})
    params = ckpt.load_params(os.path.dirname(step_dir), trainer.abstract_state().params)
    assert_bitwise_equal(params, saved.params, "load_params onto data=2 x fsdp=2 x tensor=2")
    wq = params["layers"]["wq"]
    assert wq.sharding == trainer.state_shardings.params["layers"]["wq"], wq.sharding
    on_host = ckpt.load_params(step_dir)
    assert isinstance(on_host["embed"], np.ndarray), type(on_host["embed"])
    assert_bitwise_equal(on_host, saved.params, "load_params to the host")


def _two_checkpoints(trainer, directory):
    state = trainer.init(0)
    checkpointer = ckpt.Checkpointer(directory, keep=5, async_save=False)
    for step in (1, 2):
        state, _ = trainer.step(state, put_batch(batch(step), trainer.batch_sharding))
        checkpointer.save(step, state, meta={})
        if step == 1:
            first = host(state)
    checkpointer.close()
    return first


def _largest_file(root):
    """The largest array-data file of an Orbax item (OCDBT keeps chunks under ``.../d/``)."""
    files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names if os.path.basename(d) == "d"]
    return max(files, key=os.path.getsize)


def _truncate(step_dir):
    path = _largest_file(os.path.join(step_dir, "params"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_a_byte(step_dir):
    path = _largest_file(os.path.join(step_dir, "train"))
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))


def _arrays_of_another_state(step_dir):
    """A well-formed Orbax checkpoint whose arrays are not the ones its meta describes."""
    other = os.path.join(os.path.dirname(step_dir), "1", "train")
    shutil.rmtree(os.path.join(step_dir, "train"))
    shutil.copytree(other, os.path.join(step_dir, "train"))


def _unfinished(step_dir):
    os.rename(step_dir, step_dir + ".orbax-checkpoint-tmp")


@pytest.mark.parametrize("damage,reason", [
    (_truncate, ""), (_flip_a_byte, ""), (_arrays_of_another_state, "checksum"), (_unfinished, "unfinished")])
def test_damaged_latest_checkpoint_is_reported_and_skipped(trainer8, tmp_path, damage, reason):
    directory = str(tmp_path / "checkpoints")
    first = _two_checkpoints(trainer8, directory)
    damage(os.path.join(directory, "2"))
    reports = []
    state, _, step = ckpt.restore_latest(directory, trainer8.abstract_state(), report=reports.append, set_aside=True)
    assert step == 1, f"restored step {step} after damaging step 2 ({damage.__name__}); reports: {reports}"
    assert_bitwise_equal(state, first, "fallback checkpoint")
    assert len(reports) == 1 and reason in reports[0], reports
    if damage is not _unfinished:
        assert "skipping damaged checkpoint step 2" in reports[0], reports
        assert os.path.isdir(str(tmp_path / "checkpoints-damaged" / "2")), "damaged checkpoint not kept aside"
        assert ckpt.steps(directory) == [1], "the damaged step is still where Orbax would save step 2 again"


def test_no_usable_checkpoint_is_an_error(trainer8, tmp_path):
    directory = str(tmp_path / "checkpoints")
    _two_checkpoints(trainer8, directory)
    for step in ("1", "2"):
        _truncate(os.path.join(directory, step))
    with pytest.raises(ckpt.CheckpointError, match="none of the 2 checkpoints .* is usable"):
        ckpt.restore_latest(directory, trainer8.abstract_state(), report=lambda _: None)


def test_nonfinite_step_is_skipped_and_training_continues_exactly(trainer8):
    state = trainer8.init(0)
    state, _ = trainer8.step(state, put_batch(batch(0), trainer8.batch_sharding))
    before = host(state)
    bad = batch(1)
    bad["mask"][3, 5] = np.nan  # one poisoned token: loss and every gradient become NaN
    state, metrics = trainer8.step(state, put_batch(bad, trainer8.batch_sharding))
    assert int(metrics["skipped"]) == 1 and not np.isfinite(float(metrics["loss"])), metrics
    assert int(state.step) == 2, "a skipped step still consumes its batch (the data position advances)"
    assert_bitwise_equal((state.params, state.opt_state), (before.params, before.opt_state),
                         "state after a non-finite step")
    state, metrics = trainer8.step(state, put_batch(batch(2), trainer8.batch_sharding))
    assert int(metrics["skipped"]) == 0
    # Reference: the same state never saw the bad batch.
    ref = jax.device_put(before, trainer8.state_shardings)
    ref, ref_metrics = trainer8.step(ref, put_batch(batch(2), trainer8.batch_sharding))
    assert float(metrics["loss"]) == float(ref_metrics["loss"])
    assert_bitwise_equal((state.params, state.opt_state), (ref.params, ref.opt_state),
                         "after skipping a bad batch vs never seeing it")


@pytest.mark.parametrize("override,message", [
    ("checkpoint.keep=0", r"checkpoint.keep=0 must be positive"),
    ("checkpoint.every=-1", r"checkpoint.every=-1 must be >= 0"),
    ("train.max_bad_steps=0", r"train.max_bad_steps=0 must be positive"),
    ("train.resume=", r"train.resume is empty"),
])
def test_bad_checkpoint_settings_fail_with_named_values(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config("tiny", [override]), n_devices=8)


@pytest.fixture
def run_dir(trainer8, tmp_path):
    """A run of the tiny preset in out_dir: config.yaml, metrics.jsonl and checkpoint 2."""
    cfg = load_config("tiny", [f"out_dir={tmp_path / 'run'}"])
    os.makedirs(cfg.out_dir)
    with open(os.path.join(cfg.out_dir, "config.yaml"), "w") as f:
        f.write(dump_yaml(cfg))
    with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "w") as f:
        f.write('{"step": 1, "loss": 5.5}\n{"step": 2, "loss": 5.4}\n')
    state = trainer8.init(0)
    state, _ = trainer8.step(state, put_batch(batch(0), trainer8.batch_sharding))
    state, _ = trainer8.step(state, put_batch(batch(1), trainer8.batch_sharding))
    checkpointer = ckpt.Checkpointer(os.path.join(cfg.out_dir, "checkpoints"), async_save=False)
    checkpointer.save(2, state, checkpoint_meta(cfg, 2, {"bad_steps": 1, "bad_in_a_row": 0},
                                                 trainer8.mesh.shape))
    checkpointer.close()
    return cfg, host(state)


def _listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names)


def test_out_dir_of_another_run_is_refused_untouched_then_moved_aside_with_fresh(run_dir):
    cfg, _ = run_dir
    before = _listing(cfg.out_dir)
    cases = [(["model.d_model=64"], r"holds a run of another model \(model.d_model: 32 -> 64\)"),
             (["train.seed=1"], r"the data stream differs \(train.seed: 0 -> 1\)"),
             (["train.resume=never"], r"train.resume=never, but out_dir .* holds a run \(checkpoints up to step 2\)")]
    for overrides, message in cases:
        other = load_config("tiny", [f"out_dir={cfg.out_dir}", *overrides])
        with pytest.raises(ConfigError, match=message):
            claim_out_dir(other)
        assert _listing(cfg.out_dir) == before, f"{overrides}: out_dir changed although the run was refused"
    notices = []
    claim_out_dir(load_config("tiny", [f"out_dir={cfg.out_dir}", "model.d_model=64"]), fresh=True,
                  notice=notices.append)
    assert os.listdir(cfg.out_dir) == ["previous"], os.listdir(cfg.out_dir)
    (moved,) = os.listdir(os.path.join(cfg.out_dir, "previous"))
    assert _listing(os.path.join(cfg.out_dir, "previous", moved)) == before, "--fresh lost files of the old run"
    assert len(notices) == 1 and "moved the previous run" in notices[0], notices


def test_resume_point_restores_state_and_counters(trainer8, run_dir):
    cfg, saved = run_dir
    notices = []
    start = resume_point(cfg, trainer8, notice=notices.append)
    assert start.step == 2 and start.counters == {"bad_steps": 1, "bad_in_a_row": 0}, start
    assert_bitwise_equal(start.state, saved, "resume_point")
    assert any("resuming from step 2" in n for n in notices), notices
    changed = load_config("tiny", [f"out_dir={cfg.out_dir}", "data.seq_len=16"])
    with pytest.raises(ConfigError, match=r"data stream differs \(data.seq_len: 32 -> 16\)"):
        resume_point(changed, trainer8)
    assert resume_point(load_config("tiny", [f"out_dir={cfg.out_dir}", "train.resume=never"]), trainer8).step == 0
    explicit = load_config("tiny", [f"out_dir={cfg.out_dir}-branch",
                                    f"train.resume={os.path.join(cfg.out_dir, 'checkpoints', '2')}"])
    assert resume_point(explicit, trainer8, notice=notices.append).step == 2


def test_train_skips_nonfinite_steps_and_stops_after_max_bad_steps(tmp_path, monkeypatch):
    train_lib = importlib.import_module("shardml.train")  # the module; shardml.train is the function
    real_batch = train_lib.train_batch
    poisoned = {2, 5, 6, 7}  # 0-based: one isolated bad step, then three in a row

    def batch_with_nan(corpus, step, *args, **kwargs):
        batch = real_batch(corpus, step, *args, **kwargs)
        if step in poisoned:
            batch["mask"] = batch["mask"].copy()
            batch["mask"][0, 0] = np.nan
        return batch

    monkeypatch.setattr(train_lib, "train_batch", batch_with_nan)
    out = tmp_path / "run"
    # train.steps as in test_fault_tolerance: the same program, compiled once per session.
    cfg = load_config("tiny", [f"out_dir={out}", "train.steps=60", "train.log_every=1", "checkpoint.every=1",
                               "checkpoint.keep=40", "train.max_bad_steps=3"])
    with pytest.raises(train_lib.NonFiniteError, match=r"steps 6-8: 3 steps in a row \(train.max_bad_steps=3\).*"
                                                        r"The last checkpoint, \S+/checkpoints/7 \(step 7\), is left as it was"):
        train_lib.train(cfg, verbose=False)
    with open(out / "metrics.jsonl") as f:
        bad_steps = [json.loads(line)["bad_steps"] for line in f]
    assert bad_steps == [0, 0, 1, 1, 1, 2, 3, 4], f"bad_steps per logged step: {bad_steps}"
    directory = str(out / "checkpoints")
    assert ckpt.steps(directory) == list(range(1, 8)), "a checkpoint was saved after the run had to stop"
    params = {s: ckpt.flatten(ckpt.load_params(os.path.join(directory, str(s)))) for s in range(1, 8)}
    for before, after in ((2, 3), (5, 6), (6, 7)):
        for name, leaf in params[before].items():
            np.testing.assert_array_equal(params[after][name], leaf,
                                          err_msg=f"non-finite step {after} changed {name}")
    assert any(not np.array_equal(params[4][n], params[3][n]) for n in params[3]), "finite step 4 changed nothing"
    assert all(np.isfinite(leaf).all() for leaf in params[7].values()), "the last checkpoint is not finite"
    assert ckpt.read_meta(os.path.join(directory, "7"))["counters"] == {"bad_steps": 3, "bad_in_a_row": 2}
