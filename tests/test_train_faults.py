"""Faults lose nothing (a fault-injection pass's probes): divergence, damaged checkpoints, a busy
workdir, failed saves, Ctrl-C, restarts and metrics.jsonl, bad data and workdirs.

In-process runs use tests/helpers.py's synthetic pipeline and tiny config (seconds each); the
CLI tests run train.py on the shipped corpus (slow).
"""

import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec
from orbax.checkpoint._src.checkpointers import async_checkpointer

from flash_jax import data, sharding
from flash_jax.config import RunConfig
from flash_jax.train import (
    checkpoint,
    checkpoint_format,
    checkpoint_reader,
    loop,
    report,
    signals,
    step,
    workdir,
)
from tests.helpers import (
    REPO,
    SyntheticPipeline,
    read_jsonl,
    restore_params,
    tiny_train_config,
    train_losses,
)

pytestmark = pytest.mark.usefixtures("compile_cache", "synthetic_data")

REAL_BUILD = step.build


def checkpoint_dir(run):
    return os.path.join(run, "checkpoints")


def steps_of(run):
    ckpts = checkpoint_reader.CheckpointReader(run)
    try:
        return ckpts.all_steps()
    finally:
        ckpts.close()


def own_losses(run, config):
    """Each kept checkpoint's own loss: its parameters on the batch its next step would take."""
    mesh = loop.make_mesh(config)
    losses = {}
    with jax.set_mesh(mesh):
        fns = REAL_BUILD(config, mesh)
        rest = fns.init_rest()
        ckpts = checkpoint_reader.CheckpointReader(run)
        for s in ckpts.all_steps():
            state, meta = ckpts.restore({"params": fns.abstract_state["params"]}, s, partial=True)
            params = state["params"]
            pipe = SyntheticPipeline(config.data, mesh=mesh, start_batch=meta["data_position"])
            nll, weight = fns.eval_step(params, rest, next(pipe))
            losses[s] = float(nll) / float(weight)
        ckpts.close()
    return losses


def blow_up_params_after(blown_step, factor=1e30):
    """A `step.build` whose train step multiplies the parameters by `factor` in step `blown_step`:
    a state with finite parameters and a non-finite loss, what too high a learning rate makes."""

    def build(config, mesh):
        fns = REAL_BUILD(config, mesh)
        inner = fns.train_step

        def train_step(state, rest, batch):
            new, step_metrics = inner(state, rest, batch)
            scale = jnp.where(new["step"] == blown_step, factor, 1.0)
            params = jax.tree.map(lambda p: p * scale, new["params"])
            return {**new, "params": params}, step_metrics

        return dataclasses.replace(fns, train_step=jax.jit(train_step, donate_argnums=(0,)))

    return build


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """tiny_train_config's 6 steps in one go (checkpoints 2, 4, 6)."""
    run = str(tmp_path_factory.mktemp("finished"))
    patch = pytest.MonkeyPatch()
    patch.setattr(data, "InputPipeline", SyntheticPipeline)
    loop.train_and_evaluate(tiny_train_config(), run)
    patch.undo()
    return run


def messages(caplog, level=logging.WARNING):
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


# ----------------------------------------------------------------------------- divergence


@pytest.mark.slow  # two runs with their own compile: 15-35 s on 2 busy cores
def test_divergence_keeps_only_checkpoints_whose_own_loss_is_finite(tmp_path, monkeypatch):
    monkeypatch.setattr(step, "build", blow_up_params_after(4))
    run = str(tmp_path / "run")
    config = tiny_train_config(checkpoint_every=1, eval_every=0)
    expected = (
        r"non-finite loss \((nan|inf)\) at step 5, computed from the state after step 4; its "
        r"checkpoint was removed; .* the newest checkpoint with a finite loss is step 3 in "
    )
    with pytest.raises(report.NonFiniteLossError, match=expected):
        loop.train_and_evaluate(config, run)
    # Step 4's state was saved before its loss was known, then removed when it was not finite.
    assert steps_of(run) == [1, 2, 3]
    assert all(np.isfinite(loss) for loss in own_losses(run, config).values())
    # A rerun resumes from step 3 (not from a bad state) and meets the same divergence.
    with pytest.raises(report.NonFiniteLossError, match=expected):
        loop.train_and_evaluate(config, run)
    assert steps_of(run) == [1, 2, 3]


def test_divergence_from_the_first_update_says_no_checkpoint_is_kept(tmp_path):
    """The fault pass's probe: learning rate 1e4 saving every step; no "step None"."""
    run = str(tmp_path / "run")
    config = tiny_train_config(learning_rate=1e4, warmup_steps=0, checkpoint_every=1, eval_every=0)
    with pytest.raises(report.NonFiniteLossError) as error:
        loop.train_and_evaluate(config, run)
    message = str(error.value)
    assert "at step 2, computed from the state after step 1; its checkpoint was removed" in message
    assert "no checkpoint with a finite loss is kept in" in message and "None" not in message
    assert steps_of(run) == []


@pytest.mark.slow  # a run with its own compile: about 15 s on 2 busy cores
def test_the_final_state_is_checked_before_it_is_kept(tmp_path, monkeypatch):
    # No later step computes the last state's loss: a forward pass on the next batch does.
    monkeypatch.setattr(step, "build", blow_up_params_after(6))
    run = str(tmp_path / "run")
    config = tiny_train_config(checkpoint_every=2, eval_every=0)
    with pytest.raises(
        report.NonFiniteLossError, match=r"after step 6; its checkpoint was removed"
    ):
        loop.train_and_evaluate(config, run)
    assert steps_of(run) == [2, 4]


# ----------------------------------------------------------------------------- damaged checkpoints


def _largest_data_file(step_dir):
    files = [
        os.path.join(where, name)
        for where, _, names in os.walk(os.path.join(step_dir, "state"))
        for name in names
        if os.sep + "d" + os.sep in os.path.join(where, name)
    ]
    return max(files, key=os.path.getsize)


def _truncate(step_dir):
    path = _largest_data_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)


def _flip_one_bit(step_dir):
    path = _largest_data_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x01]))  # the lowest mantissa bit of some float, typically


def _write_meta(text):
    def damage(step_dir):
        with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
            f.write(text)

    return damage


DAMAGES = {
    "truncated data file": (_truncate, "OUT_OF_RANGE"),
    "flipped bit": (_flip_one_bit, ""),
    "empty meta JSON": (_write_meta(""), "meta JSON cannot be read"),
    "garbled meta JSON": (_write_meta('{"step": 6, "data_'), "meta JSON cannot be read"),
    "missing _METADATA": (lambda d: os.remove(os.path.join(d, "state", "_METADATA")), ""),
    "missing state": (lambda d: shutil.rmtree(os.path.join(d, "state")), ""),
}


@pytest.fixture(scope="module")
def abstract_state():
    config = tiny_train_config()
    mesh = loop.make_mesh(config)
    with jax.set_mesh(mesh):
        fns = REAL_BUILD(config, mesh)
    return mesh, fns.abstract_state


# Orbax's coroutines of a failed read are garbage-collected with their errors (reported already).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_step_is_named_and_the_newest_intact_one_restored(
    finished_run, abstract_state, tmp_path, caplog, damage
):
    run = str(tmp_path / "copy")
    shutil.copytree(finished_run, run)
    step_dir = os.path.join(checkpoint_dir(run), "6")
    damage_fn, reason = DAMAGES[damage]
    damage_fn(step_dir)
    mesh, abstract = abstract_state
    ckpts = checkpoint.Checkpoints(run, 5)
    try:
        with jax.set_mesh(mesh), caplog.at_level(logging.WARNING):
            # Asked for by number: one line naming step and path.
            with pytest.raises(checkpoint_format.DamagedCheckpointError) as error:
                ckpts.restore(abstract, 6)
            assert str(error.value).startswith(f"checkpoint step 6 in {step_dir} is damaged: ")
            assert reason in str(error.value) and "\n" not in str(error.value)
            state, meta, restored = ckpts.restore_newest(abstract)
    finally:
        ckpts.close()
    assert restored == 4 and meta["step"] == 4
    warnings = [m for m in messages(caplog) if "is damaged" in m]
    assert len(warnings) == 1 and f"checkpoint step 6 in {step_dir} is damaged" in warnings[0]
    assert os.path.isdir(step_dir)  # nothing deleted
    assert int(state["step"]) == 4


def test_one_flipped_bit_in_an_array_fails_its_checksum():
    # The data files are compressed: a flipped bit there may fail decompression instead (the
    # case above); a flip that decompresses into another value is the checksum's to catch.
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    sums, _ = checkpoint_format.inspect_arrays({"params": {"w": x}})
    flipped = x.copy()
    flipped.view(np.uint32)[123] ^= 1  # the lowest mantissa bit: finite, one ulp off
    with pytest.raises(
        checkpoint_format.DamagedCheckpointError,
        match=r"step 7 in here is damaged: array data differs from the checksum saved with it "
        r"\(params/w\)",
    ):
        checkpoint_format.check_arrays(7, "here", {"params": {"w": flipped}}, sums)
    checkpoint_format.check_arrays(7, "here", {"params": {"w": x}}, sums)  # intact: no error


def test_checksums_do_not_depend_on_the_mesh():
    x = np.arange(64, dtype=np.float32).reshape(8, 8) / 7
    words = x.view(np.uint32).astype(np.uint64).sum() % 2**32  # numpy reference
    mesh = sharding.make_mesh((8,), ("data",))
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    for tree in ({"a": x}, {"a": sharded}):
        sums, non_finite = checkpoint_format.inspect_arrays(tree)
        assert sums == {"a": int(words)} and non_finite == []
    _, non_finite = checkpoint_format.inspect_arrays(
        {"a": x, "b": np.array([1.0, np.inf], np.float32)}
    )
    assert non_finite == ["b"]


def test_non_finite_parameters_are_refused_with_the_step_named(finished_run, tmp_path):
    import orbax.checkpoint as ocp

    run = str(tmp_path / "copy")
    shutil.copytree(finished_run, run)
    config = tiny_train_config()
    state, meta = restore_params(run, config)
    state["params"] = jax.tree.map(lambda p: p * np.float32(np.nan), state["params"])
    # Checksums of the nan values themselves: only the finiteness check can tell.
    meta["checksums"] = checkpoint_format.inspect_arrays(state)[0]
    manager = ocp.CheckpointManager(checkpoint_dir(run))
    manager.save(
        8,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    )
    manager.close()
    mesh = loop.make_mesh(config)
    with jax.set_mesh(mesh):
        fns = REAL_BUILD(config, mesh)
        ckpts = checkpoint_reader.CheckpointReader(run)
        with pytest.raises(
            checkpoint_format.DamagedCheckpointError, match=r"step 8 .*non-finite values"
        ):
            ckpts.restore({"params": fns.abstract_state["params"]}, 8, partial=True)
        ckpts.close()


@pytest.mark.parametrize("version, found", [(None, "none"), (2, "2")])
def test_a_checkpoint_of_another_format_version_is_one_line_naming_both(
    finished_run, tmp_path, version, found
):
    """A missing or different `format_version` in the meta is refused (not damage, no fall back):
    by a reader and by a trainer resuming, in one line naming the version found and the one
    expected."""
    run = str(tmp_path / "copy")
    shutil.copytree(finished_run, run)
    for step_ in (2, 4, 6):
        path = os.path.join(checkpoint_dir(run), str(step_), "meta", "metadata")
        with open(path) as f:
            meta = json.load(f)
        assert meta.pop("format_version") == checkpoint_format.FORMAT_VERSION
        with open(path, "w") as f:
            json.dump(meta if version is None else {**meta, "format_version": version}, f)
    expected = (
        rf"checkpoint step 6 in \S+ has format version {found}; this flash_jax reads format "
        rf"version {checkpoint_format.FORMAT_VERSION} only"
    )
    ckpts = checkpoint_reader.CheckpointReader(run)
    with pytest.raises(ValueError, match=expected):
        ckpts.read_meta(6)
    ckpts.close()
    with pytest.raises(ValueError, match=expected):
        checkpoint_reader.restore(run)
    with pytest.raises(ValueError, match=expected):
        loop.train_and_evaluate(tiny_train_config(num_steps=8), run)


# Orbax's coroutines of a failed read are garbage-collected with their errors (reported already).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_training_falls_back_and_moves_the_damaged_step_aside_when_it_comes_again(
    finished_run, tmp_path, caplog
):
    run = str(tmp_path / "copy")
    shutil.copytree(finished_run, run)
    step_dir = os.path.join(checkpoint_dir(run), "6")
    _truncate(step_dir)
    with caplog.at_level(logging.INFO):
        summary = loop.train_and_evaluate(tiny_train_config(), run)
    assert summary["status"] == "done" and summary["step"] == 6
    log = messages(caplog, logging.INFO)
    assert any(f"checkpoint step 6 in {step_dir} is damaged" in m for m in log)
    assert any("resuming from step 4" in m for m in log)
    # Nothing deleted: the damaged step was moved aside when step 6 was saved again.
    assert os.path.isdir(os.path.join(run, checkpoint.DAMAGED_DIR, "6"))
    assert steps_of(run) == [2, 4, 6]
    # Steps 5 and 6 were replayed exactly, once each in metrics.jsonl.
    assert train_losses(run) == train_losses(finished_run)
    assert [r["step"] for r in read_jsonl(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    resumed, _ = restore_params(run, tiny_train_config())
    straight, _ = restore_params(finished_run, tiny_train_config())
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_state_of_another_layout_is_a_config_error_not_damage(finished_run, tmp_path):
    run = str(tmp_path / "copy")
    shutil.copytree(finished_run, run)
    with pytest.raises(ValueError, match="laid out differently from this config's") as error:
        loop.train_and_evaluate(tiny_train_config(optimizer="adafactor"), run)
    assert not isinstance(error.value, checkpoint_format.DamagedCheckpointError)
    assert steps_of(run) == [2, 4, 6]
    assert not os.path.exists(os.path.join(run, checkpoint.DAMAGED_DIR))


# ----------------------------------------------------------------------------- failed saves


def fail_commit_of(monkeypatch, failing_step, *, and_later=False):
    """Orbax's background commit of `failing_step` (and of every later one with `and_later`)
    fails as on a full disk: the arrays are written, then committing them raises ENOSPC, so the
    step never appears."""
    real = async_checkpointer._background_wait_for_commit_futures

    def commit(directory, commit_futures, on_commit_callback, **kwargs):
        saving = int(epath.Path(directory).name)
        if saving == failing_step or (and_later and saving > failing_step):

            def on_commit_callback():
                raise OSError(errno.ENOSPC, "No space left on device (simulated)")

        return real(directory, commit_futures, on_commit_callback, **kwargs)

    monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures", commit)


def test_a_failed_save_is_one_line_before_the_next_save_and_training_goes_on(
    tmp_path, monkeypatch, caplog
):
    fail_commit_of(monkeypatch, 4)
    run = str(tmp_path / "run")
    with caplog.at_level(logging.INFO):
        summary = loop.train_and_evaluate(tiny_train_config(eval_every=0), run)
    assert summary["status"] == "done" and steps_of(run) == [2, 6]
    log = messages(caplog, logging.INFO)
    failed = [i for i, m in enumerate(log) if "step 4 could not be saved" in m]
    saved = {int(m.split()[4]): i for i, m in enumerate(log) if m.startswith("checkpoint saved at")}
    assert len(failed) == 1 and "No space left on device" in log[failed[0]]
    assert "newest committed checkpoint is step 2" in log[failed[0]]
    assert sorted(saved) == [2, 6]  # "saved" only for committed steps
    assert failed[0] < saved[6]  # reported before the next save started


def test_a_failed_final_save_is_an_error_naming_the_last_committed_step(tmp_path, monkeypatch):
    fail_commit_of(monkeypatch, 6)
    run = str(tmp_path / "run")
    with pytest.raises(
        checkpoint.CheckpointSaveError,
        match=r"checkpoint of step 6 could not be saved .* newest committed checkpoint is step 4",
    ):
        loop.train_and_evaluate(tiny_train_config(eval_every=0), run)
    assert steps_of(run) == [2, 4]


@pytest.mark.slow  # four saves, two of them committed: about 15 s on 2 busy cores
def test_saves_failing_in_a_row_stop_the_run_keeping_the_last_committed_one(tmp_path, monkeypatch):
    """From step 3 on every save fails (a full disk): the run stops at the second failure in a
    row (train.max_failed_saves=2) instead of training on to lose everything; step 2 is kept, and
    the failed saves leave no temporary folder behind."""
    fail_commit_of(monkeypatch, 3, and_later=True)
    run = str(tmp_path / "run")
    config = tiny_train_config(eval_every=0, checkpoint_every=1, num_steps=50, max_failed_saves=2)
    with pytest.raises(
        checkpoint.CheckpointSaveError,
        match=r"^2 checkpoints in a row could not be saved in .*\(the last, step 4: OSError: "
        r"\[Errno 28\] No space left on device \(simulated\)\); stopped \(train.max_failed_"
        r"saves=2\); the newest committed checkpoint is step 2$",
    ):
        loop.train_and_evaluate(config, run)
    assert steps_of(run) == [1, 2]
    assert sorted(os.listdir(checkpoint_dir(run))) == ["1", "2"]  # no *.orbax-checkpoint-tmp*
    assert len(read_jsonl(run)) < 10  # it stopped early


def test_a_full_disk_that_fails_every_save_and_orbaxs_close_ends_in_one_error(
    tmp_path, monkeypatch
):
    """Every save fails (ENOSPC) and closing Orbax's manager raises ENOSPC again: the run ends
    with the one CheckpointSaveError (no OSError chained after it), saying that no checkpoint is
    committed yet (it said "step None")."""
    fail_commit_of(monkeypatch, 0, and_later=True)
    real_close = checkpoint.ocp.CheckpointManager.close

    def close(self):
        real_close(self)
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "close", close)
    run = str(tmp_path / "run")
    with pytest.raises(checkpoint.CheckpointSaveError) as error:
        loop.train_and_evaluate(tiny_train_config(eval_every=0, max_failed_saves=0), run)
    assert str(error.value).endswith("; no checkpoint is committed yet"), error.value
    assert steps_of(run) == [] and os.listdir(checkpoint_dir(run)) == []


def test_a_workdir_too_long_for_a_checkpoint_stops_before_training(tmp_path, monkeypatch):
    """A workdir of 3,989 characters (each folder name under 256) can be created and locked, but
    a checkpoint's paths run past the system's limit: one line before anything is compiled, and
    the workdir the run created is removed again."""
    parent = str(tmp_path)
    while len(parent) < 3989 - 250:
        parent = os.path.join(parent, "d" * 200)
    os.makedirs(parent)
    run = os.path.join(parent, "r" * (3989 - len(parent) - 1))
    assert len(run) == 3989

    def must_not_run(*args, **kwargs):
        raise AssertionError("nothing is compiled for a workdir that cannot hold a checkpoint")

    monkeypatch.setattr(loop, "compile_train_step", must_not_run)
    with pytest.raises(ValueError, match=r"cannot hold a checkpoint: writing a 4\d\d\d-character"):
        loop.train_and_evaluate(tiny_train_config(), run)
    assert not os.path.exists(run)


# ----------------------------------------------------------------------------- metrics.jsonl


def test_a_restart_without_checkpoint_logs_each_step_once(tmp_path):
    run = str(tmp_path / "run")
    config = tiny_train_config(eval_every=0)
    loop.train_and_evaluate(config, run)
    shutil.rmtree(checkpoint_dir(run))  # as if killed before its first save
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 7, "lo')  # and cut in the middle of a line
    loop.train_and_evaluate(config, run)
    assert [r["step"] for r in read_jsonl(run)] == [1, 2, 3, 4, 5, 6]


def test_extreme_values_are_logged_alike_in_jsonl_and_tensorboard(tmp_path):
    from flash_jax.train import report

    reporter = report.Reporter(str(tmp_path), 10)
    values = {"loss": 1000.0, "perplexity": 1e300, "grad_norm": float("nan"), "x": -1e39}
    reporter.write(1, values)
    reporter.write(2, {"loss": float("inf")})
    reporter.close()  # clu's asynchronous writer raised here for 1e300
    records = read_jsonl(str(tmp_path))
    assert records[0]["perplexity"] == "inf" and records[0]["x"] == "-inf"
    assert records[0]["grad_norm"] == "nan" and records[0]["loss"] == 1000.0
    assert records[1]["loss"] == "inf"
    import tensorflow as tf

    tb = {}
    for path in tf.io.gfile.glob(str(tmp_path / "tensorboard" / "*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                tb[(event.step, v.tag)] = float(tf.make_ndarray(v.tensor))
    assert tb[(1, "perplexity")] == np.inf and tb[(1, "x")] == -np.inf
    assert np.isnan(tb[(1, "grad_norm")]) and tb[(1, "loss")] == 1000.0


def test_an_overflowing_loss_is_printed_in_scientific_notation_and_ends_in_a_summary(
    tmp_path, caplog
):
    """A loss of 450 (what learning_rate=30 gives) has a perplexity of about 2.7e195: finite in
    float64, past float32 (metrics.jsonl holds "inf"). The console line shows it in scientific
    notation; the summary reads the "inf" and "nan" strings back without failing."""
    from flash_jax import losses

    run = str(tmp_path)
    reporter = report.Reporter(run, 12)
    scalars = {"loss": 450.0, "perplexity": losses.perplexity(450.0, 1.0), "grad_norm": 3e7}
    with caplog.at_level(logging.INFO):
        reporter.write(12, scalars)
        reporter.console(12, scalars, 1.0)
    nan = float("nan")
    reporter.write(12, {"eval_loss": nan, "eval_perplexity": nan, "eval_tokens": 2048})
    reporter.close()
    (line,) = [m for m in messages(caplog, logging.INFO) if m.startswith("step 12/12")]
    assert "loss 450.0000 | perplexity 2.707e+195" in line and "grad norm 3.000e+07" in line
    assert not re.search(r"\d{10}", line), line  # no figure of hundreds of digits
    summary = {"status": "done", "step": 12, "saved": 12, "checkpoint_dir": f"{run}/checkpoints"}
    text = report.run_summary(summary, run, tiny_train_config())
    assert "train  (step 12): loss 450.0000, token perplexity inf" in text
    assert "eval   (step 12, validation, 2,048 tokens): loss nan, token perplexity nan" in text
    assert report.figure("inf") == "inf" and report.figure(None) == "None"


def test_unwritable_metrics_at_the_start_are_one_warning_each_and_training_goes_on(
    tmp_path, caplog
):
    """metrics.jsonl and tensorboard/ that cannot be opened (here a folder and a file in their
    places) are one warning each; the run trains and checkpoints all the same."""
    run = tmp_path / "run"
    (run / "metrics.jsonl").mkdir(parents=True)
    (run / "tensorboard").write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        summary = loop.train_and_evaluate(tiny_train_config(eval_every=0, num_steps=2), str(run))
    assert summary["status"] == "done" and steps_of(str(run)) == [2]
    warnings = messages(caplog)
    assert len([m for m in warnings if "could not write metrics.jsonl" in m]) == 1, warnings
    assert len([m for m in warnings if "could not write TensorBoard events" in m]) == 1, warnings


def test_tensorboard_write_failures_are_one_warning_without_tracebacks(
    tmp_path, monkeypatch, caplog
):
    """A TensorBoard writer that fails every write (a full disk): one warning line, no traceback
    (clu's AsyncWriter logged one per failed write, from its thread)."""
    from clu import metric_writers

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    for name in ("write_scalars", "flush"):
        monkeypatch.setattr(metric_writers.SummaryWriter, name, full)
    with caplog.at_level(logging.INFO):
        reporter = report.Reporter(str(tmp_path), 10)
        for step_ in range(1, 6):
            reporter.write(step_, {"loss": 1.0})
        reporter.close()
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    (warning,) = messages(caplog)
    assert "could not write TensorBoard events ([Errno 28] No space left" in warning
    assert [r["step"] for r in read_jsonl(str(tmp_path))] == [1, 2, 3, 4, 5]


def test_slow_steps_are_logged_first_and_then_at_least_every_log_every_seconds(
    tmp_path, monkeypatch
):
    """log_every=100 with steps of 25 s: records at the first step, then at the first step at
    least 60 s (log_every_seconds) after the last record, and the last step; a resumed run's
    first step is recorded too (it used to be silent until step 100)."""
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(report.time, "time", lambda: clock.now)
    config = RunConfig.from_config(
        tiny_train_config(num_steps=8, log_every=100, log_every_seconds=60)
    )

    def recorded_steps(start, end):
        reporter = report.Reporter(str(tmp_path), 8, is_main=False)
        metrics_ = report.StepMetrics(config, reporter, lambda step, loss: "", model_flops=1.0)
        for done in range(start + 1, end + 1):
            clock.now += 25.0
            metrics_.push(done, {"loss": 2.0, "grad_norm": 1.0, "learning_rate": 1e-3})
            metrics_.drain()
            yield metrics_.last.get("step")

    # Steps at 25, 50, ... s: step 1 (first), 4 (100 s: 75 s after step 1), 7, 8 (the last).
    assert sorted(set(recorded_steps(0, 8))) == [1, 4, 7, 8]
    assert sorted(set(recorded_steps(5, 8))) == [6, 8]  # a resume at step 5


# ----------------------------------------------------------------------------- Ctrl-C, the lock


def test_ctrl_c_saves_at_the_next_step_boundary_like_sigterm(tmp_path):
    run = str(tmp_path / "run")

    def ctrl_c_at_3(done):
        if done == 3:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    summary = loop.train_and_evaluate(tiny_train_config(eval_every=0), run, hooks=[ctrl_c_at_3])
    assert summary["status"] == "preempted" and summary["stopped_by"] == "Ctrl-C"
    assert summary["step"] == summary["saved"] == 3 and 3 in steps_of(run)
    assert signal.getsignal(signal.SIGINT) is before  # pytest's own handler is back
    assert not os.path.exists(os.path.join(run, workdir.LOCK_FILE))


def test_sigterm_while_a_step_runs_saves_that_step_and_runs_no_other(tmp_path, monkeypatch):
    """SIGTERM while step 3 runs (the loop is waiting for its loss): the checkpoint is of step 3
    and step 4 is never dispatched (it used to be, and its state saved instead)."""
    real_drain = report.StepMetrics.drain

    def drain(self):
        if self._pending is not None and self._pending[0] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # step 3 is in flight, not yet read
        real_drain(self)

    monkeypatch.setattr(report.StepMetrics, "drain", drain)
    dispatched = []
    run = str(tmp_path / "run")
    config = tiny_train_config(eval_every=0, checkpoint_every=100)
    summary = loop.train_and_evaluate(config, run, hooks=[dispatched.append])
    assert summary["status"] == "preempted" and summary["stopped_by"] == "SIGTERM"
    assert summary["step"] == summary["saved"] == 3 and steps_of(run) == [3]
    assert dispatched == [1, 2, 3]


def test_a_busy_workdir_stops_a_second_trainer_before_it_writes(tmp_path):
    run = str(tmp_path / "run")
    os.makedirs(run)
    held = workdir.lock(run)
    try:
        with pytest.raises(ValueError, match=rf"in use by process {os.getpid()} on host "):
            loop.train_and_evaluate(tiny_train_config(), run)
    finally:
        held.release()
    assert os.listdir(run) == []  # no metrics, no config.json, no checkpoints/


# ----------------------------------------------------------------------------- bad data, workdir


def _corpus(root, files):
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return str(root)


GOOD = b"the of and to a in that it was her not be he his as you she\n" * 20
BAD_INPUTS = {
    "missing data folder": (None, "does not exist"),
    "bad metadata.csv": (
        {"train/1.txt": GOOD, "validation/2.txt": GOOD, "metadata.csv": b"book_id,title\n"},
        "metadata.csv line 1",
    ),
    "train split of one empty file": (
        {"train/1.txt": b"", "validation/2.txt": GOOD},
        r"split 'train' .* has no readable text: .*1.txt is empty",
    ),
    "binary train split": (
        {"train/1.txt": b"\x89PNG\r\n\x1a\n\0\0", "validation/2.txt": GOOD},
        r"1.txt is not text",
    ),
    "empty validation split": (
        {"train/1.txt": GOOD, "validation/2.txt": b""},
        r"split 'validation' .* has no readable text",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_data_is_one_line_before_anything_is_written(tmp_path, case):
    files, message = BAD_INPUTS[case]
    config = tiny_train_config()
    config.data.data_dir = (
        str(tmp_path / "nowhere") if files is None else _corpus(tmp_path / "corpus", files)
    )
    run = str(tmp_path / "run")
    with pytest.raises(ValueError, match=message) as error:
        loop.train_and_evaluate(config, run)
    assert "\n" not in str(error.value)
    assert not os.path.exists(run)


@pytest.mark.parametrize("where", ["is a file", "under a file"])
def test_a_workdir_that_cannot_be_a_directory_is_one_line(tmp_path, where):
    (tmp_path / "file").write_text("x")
    run = str(tmp_path / "file") if where == "is a file" else str(tmp_path / "file" / "run")
    with pytest.raises(ValueError, match=r"workdir .*(is a file|cannot be created)"):
        loop.train_and_evaluate(tiny_train_config(), run)


def test_orbax_echoes_of_a_reported_failure_are_not_printed():
    """The CLI reports a failed save or restore in one line; Orbax's own tracebacks of it (its
    error logs, its failed coroutines, TensorStore's 'Event loop is closed') are not shown."""
    from flash_jax import cli

    def raised_in(filename):
        try:
            exec(compile("raise ValueError('OUT_OF_RANGE')", filename, "exec"), {})
        except ValueError as e:
            return e

    def unraisable(error):
        return types.SimpleNamespace(exc_value=error, exc_traceback=error.__traceback__)

    orbax_file = os.path.join(os.sep, "site-packages", "orbax", "x.py")
    assert cli._echo_of_a_reported_failure(unraisable(RuntimeError("Event loop is closed")))
    assert cli._echo_of_a_reported_failure(unraisable(raised_in(orbax_file)))
    assert not cli._echo_of_a_reported_failure(unraisable(raised_in("mine.py")))
    quiet = cli.QuietLibraries(("train.py",))
    failed = (ValueError, ValueError("x"), None)
    assert not quiet.filter(
        logging.LogRecord("absl", logging.ERROR, orbax_file, 1, "Failed", None, failed)
    )
    assert quiet.filter(
        logging.LogRecord("absl", logging.WARNING, orbax_file, 1, "slow", None, None)
    )
    # asyncio's report of a future of Orbax's failed save whose exception nobody retrieved
    # (garbage-collected at a moment that varies from run to run; TensorStore's futures carry no
    # traceback), and an asyncio line without an exception.
    asyncio_file = os.path.join(os.sep, "lib", "asyncio", "base_events.py")
    for error in (raised_in(orbax_file), ValueError("OUT_OF_RANGE")):
        exc_info = (ValueError, error, error.__traceback__)
        assert not quiet.filter(
            logging.LogRecord("asyncio", logging.ERROR, asyncio_file, 1, "never", None, exc_info)
        )
    assert quiet.filter(
        logging.LogRecord("asyncio", logging.WARNING, asyncio_file, 1, "slow", None, None)
    )


# ----------------------------------------------------------------------------- the CLI


TINY_ARGS = [  # the quickstart, smaller (about 0.6M parameters)
    "--config=configs/quickstart.py",
    "--config.model.num_layers=2",
    "--config.model.d_model=64",
    "--config.model.expansion_dim=128",
    "--config.model.qk_dim=32",
    "--config.data.batch_size=2",
    "--config.data.seq_len=128",
    "--config.train.eval_every=0",
]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}


def start_train(run, *args):
    return subprocess.Popen(
        [sys.executable, "train.py", *TINY_ARGS, *args, f"--workdir={run}"],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_until(proc, pattern, output):
    for line in proc.stdout:
        output.append(line)
        if pattern in line:
            return True
    return False


@pytest.mark.slow  # two processes: about 30 s
def test_cli_a_second_trainer_on_a_busy_workdir_stops_at_once(tmp_path):
    run = str(tmp_path / "run")
    first = start_train(run, "--config.train.num_steps=5000")
    out = []
    assert read_until(first, "model flash", out), "".join(out)[-3000:]  # it holds the lock
    first.send_signal(signal.SIGSTOP)  # paused meanwhile: the CPU is the second one's
    try:
        second = subprocess.run(
            [sys.executable, "train.py", *TINY_ARGS, f"--workdir={run}"],
            cwd=REPO,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        first.send_signal(signal.SIGCONT)
    first.send_signal(signal.SIGTERM)  # the first one was never disturbed: it stops cleanly
    out += list(first.stdout)
    assert first.wait(timeout=300) == 0 and "Traceback" not in "".join(out), "".join(out)[-3000:]
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    (line,) = [x for x in second.stderr.splitlines() if "train.py: error:" in x]
    assert f"is in use by process {first.pid} on host " in line and "since" in line
    assert not os.path.exists(os.path.join(run, workdir.LOCK_FILE))


@pytest.mark.slow  # about 15 s each
@pytest.mark.parametrize("presses,existing", [(1, False), (2, True)])
def test_cli_ctrl_c_while_compiling(tmp_path, presses, existing):
    """One Ctrl-C: a clean stop before the first step (exit 0, one line); two: exit at once.
    Either way nothing was saved: a workdir the run created is removed, a folder that was there
    before is kept with its own files (and without the run's lock)."""
    run = tmp_path / "run"
    if existing:
        run.mkdir()
        (run / "notes.txt").write_text("mine")
    proc = start_train(str(run), "--config.train.num_steps=50")
    out = []
    assert read_until(proc, "model flash", out), "".join(out)[-3000:]  # compiling now
    t0 = time.time()
    for _ in range(presses):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
    out += list(proc.stdout)
    code = proc.wait(timeout=120)
    text = "".join(out)
    assert "Traceback" not in text and "Segmentation" not in text, text[-3000:]
    if presses == 1:
        assert code == 0, text[-3000:]
        assert "train.py: stopped by Ctrl-C before its first step" in text
    else:
        assert code == signals.IMMEDIATE_EXIT_CODE, text[-3000:]
        assert "train.py: interrupted twice: stopped at once without saving" in text
        assert "compiled the train step" not in text and time.time() - t0 < 10
    if existing:
        assert (run / "notes.txt").read_text() == "mine"
        assert not (run / workdir.LOCK_FILE).exists()
    else:
        assert not run.exists()


@pytest.mark.slow  # about 15 s
def test_cli_saves_that_cannot_be_written_are_one_line_each(tmp_path):
    """A file-size limit of 1 MiB, below the checkpoint's data file (the corpus's books are
    smaller), makes every save fail as a full disk does: one warning per save, then one error
    line, exit 1."""
    run = str(tmp_path / "run")
    limited = (  # a child that limits its file size, then becomes train.py
        "import os, resource, signal, sys; "
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "  # EFBIG instead of a kill
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.RLIM_INFINITY)); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    args = ["--config.train.num_steps=4", "--config.train.checkpoint_every=2"]
    args.append("--config.train.max_failed_saves=0")  # each failure, up to the final one
    proc = subprocess.run(
        [sys.executable, "-c", limited, "train.py", *TINY_ARGS, *args, f"--workdir={run}"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = proc.stderr
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    failures = [line for line in err.splitlines() if "could not be saved in" in line]
    # Steps 2 and 4 (4 retried as the final save), each one line; no "saved" ever.
    assert len(failures) >= 3 and "checkpoint saved" not in err, err[-3000:]
    assert any("step 2 could not be saved" in line for line in failures)
    last = err.strip().splitlines()[-1]
    assert last.startswith("train.py: error: the checkpoint of step 4 could not be saved")
