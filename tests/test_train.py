"""The training loop: resume exactness, SIGTERM, non-finite loss, bad inputs, and the CLI.

In-process loop tests feed the loop a small deterministic stand-in for `data.InputPipeline`
(tests/helpers.py's SyntheticPipeline; same contract: global batches, `position`, `start_batch`)
so that they take seconds; the slow CLI test runs `train.py` on the real shipped corpus.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from flash_jax import data, models
from flash_jax.config import ModelConfig
from flash_jax.train import checkpoint, checkpoint_reader, flops, loop, report, signals
from tests.helpers import (
    REPO,
    SyntheticPipeline,
    files_under,
    read_jsonl,
    restore_params,
    sigterm_at,
    tiny_train_config,
    train_losses,
)

# The synthetic pipeline stands in for data.InputPipeline; identical runs compile once.
pytestmark = pytest.mark.usefixtures("compile_cache", "synthetic_data")

FAKE_PEAK_FLOPS = 1e12


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """6 steps in one go (shared by the tests that need a finished run)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(data, "InputPipeline", SyntheticPipeline)
    mp.setattr(report, "peak_flops_per_device", lambda kind: FAKE_PEAK_FLOPS)  # so MFU is reported
    workdir = str(tmp_path_factory.mktemp("straight"))
    summary = loop.train_and_evaluate(tiny_train_config(), workdir)
    mp.undo()
    return workdir, summary


def test_run_trains_logs_and_checkpoints(straight_run):
    workdir, summary = straight_run
    assert summary["status"] == "done" and summary["step"] == 6
    losses = train_losses(workdir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1] - 0.1  # learnable data: the loss falls
    records = read_jsonl(workdir)
    train_record = next(r for r in records if r["step"] == 6 and "loss" in r)
    for key in ("perplexity", "learning_rate", "grad_norm", "tokens_per_sec", "step_time"):
        assert key in train_record
    assert train_record["perplexity"] == pytest.approx(np.exp(train_record["loss"]), rel=1e-6)
    # MFU: the analytic model FLOPs of a step (not XLA's count, which sees the scanned layer body
    # once) over step time and the peak of every device.
    config = tiny_train_config()
    model_flops = flops.analytic_flops(
        ModelConfig.from_config(config.model),
        config.data.seq_len,
        config.data.batch_size * config.data.seq_len,
        models.count_params(nnx.eval_shape(lambda: models.create(config.model, rngs=nnx.Rngs(0)))),
    )["total"]
    want_mfu = model_flops / train_record["step_time"] / (FAKE_PEAK_FLOPS * jax.device_count())
    assert train_record["mfu"] == pytest.approx(want_mfu, rel=1e-6)
    # Step times exclude checkpoint saves and evals, and are never negative (saves every 2 steps).
    step_times = [r["step_time"] for r in records if r.get("step_time") is not None]
    assert len(step_times) >= 4 and all(t > 0 for t in step_times), step_times
    evals = [r for r in records if "eval_perplexity" in r]
    assert [r["step"] for r in evals] == [3, 6]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["d_model"] == 32
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    # Checkpoints every 2 steps, kept (keep=5), and the data position saved with them.
    assert sorted(checkpoint.Checkpoints(workdir, 5).all_steps()) == [2, 4, 6]
    _, meta = restore_params(workdir, tiny_train_config())
    assert meta["step"] == 6 and meta["data_position"] == 6


def test_resume_after_sigterm_is_exact(straight_run, tmp_path):
    workdir = str(tmp_path / "resumed")
    config = tiny_train_config()
    first = loop.train_and_evaluate(config, workdir, hooks=[sigterm_at(3)])
    # SIGTERM after step 3: a checkpoint at the next boundary (step 3), then a clean stop.
    assert first["status"] == "preempted" and first["step"] == 3
    assert 3 in checkpoint.Checkpoints(workdir, 5).all_steps()
    second = loop.train_and_evaluate(config, workdir)
    assert second["status"] == "done" and second["step"] == 6

    straight_dir, _ = straight_run
    assert train_losses(workdir) == train_losses(straight_dir)  # bitwise: same floats
    assert [r["step"] for r in read_jsonl(workdir) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    resumed_state, _ = restore_params(workdir, config)
    straight_state, _ = restore_params(straight_dir, config)
    for a, b in zip(jax.tree.leaves(resumed_state), jax.tree.leaves(straight_state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_resume_after_crash_replays_from_checkpoint_without_duplicate_records(
    straight_run, tmp_path
):
    workdir = str(tmp_path / "crashed")
    shutil.copytree(straight_run[0], workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))  # as if killed before saving 6
    summary = loop.train_and_evaluate(tiny_train_config(), workdir)
    assert summary["step"] == 6
    steps = [r["step"] for r in read_jsonl(workdir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # the old records of steps 5-6 were replaced
    assert train_losses(workdir) == train_losses(straight_run[0])


def test_sigterm_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with signals.stop_requests() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.is_set() and stop.reason == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(SyntheticPipeline, "nan_from", 4)  # the 5th batch: step 5 is nan
    workdir = str(tmp_path)
    with pytest.raises(report.NonFiniteLossError, match="non-finite gradient norm .* at step 5"):
        loop.train_and_evaluate(tiny_train_config(), workdir)
    assert checkpoint.Checkpoints(workdir, 5).all_steps() == [2, 4]
    state, _ = restore_params(workdir, tiny_train_config())
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))


def test_workdir_with_other_model_is_refused(straight_run, tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(straight_run[0], workdir)
    before = {p: os.path.getmtime(os.path.join(workdir, p)) for p in os.listdir(workdir)}
    config = tiny_train_config()
    config.model.d_model = 64
    config.model.chunk_size = 16
    with pytest.raises(
        ValueError, match=r"model.chunk_size: checkpoint 8 vs config 16.*model.d_model"
    ):
        loop.train_and_evaluate(config, workdir)
    after = {p: os.path.getmtime(os.path.join(workdir, p)) for p in os.listdir(workdir)}
    assert after == before  # nothing written, config.json not overwritten
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["d_model"] == 32


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.train.update({"bogus": 1}), r"unknown config key\(s\): train.bogus"),
        (lambda c: c.model.update({"chunk_sz": 1}), r"unknown config key\(s\): model.chunk_sz"),
        (lambda c: c.data.update({"batch_size": 12}), r"data.batch_size \(12\).*data-parallel"),
        (lambda c: c.train.update({"grad_accum_steps": 3}), r"data.batch_size \(8\).*grad_accum"),
        (lambda c: c.data.update({"seq_len": 64}), r"data.seq_len \(64\) exceeds model.max_len"),
        (lambda c: c.train.update({"loss_blocks": 3}), r"train.loss_blocks \(3\) must divide"),
        (lambda c: c.model.update({"vocab_size": 1000}), r"model.vocab_size \(1000\).*vocabulary"),
        (lambda c: c.train.update({"optimizer": "sgd"}), r"train.optimizer must be one of"),
        (lambda c: c.train.update({"num_steps": 0}), r"train.num_steps must be an integer >= 1"),
    ],
)
def test_bad_config_fails_before_anything_runs(tmp_path, change, message):
    config = tiny_train_config()
    change(config)
    workdir = str(tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        loop.train_and_evaluate(config, workdir)
    assert not os.path.exists(workdir)  # failed before writing anything


# ----------------------------------------------------------------------------- input stream, layout


def test_checkpoints_hold_the_input_stream_and_its_layout(straight_run):
    workdir, _ = straight_run
    step_dir = os.path.join(workdir, "checkpoints", "6")
    with open(os.path.join(step_dir, "data", "synthetic.json")) as f:
        assert json.load(f) == {"position": 6}
    ckpts = checkpoint_reader.CheckpointReader(workdir)
    meta = ckpts.read_meta(6)
    ckpts.close()
    assert meta["data_layout"]["processes"] == 1 and meta["data_layout"]["batch_size"] == 8
    # Evaluated at step 6 (eval_every=3): its eval loss is saved with it, for keep_best.
    evals = {r["step"]: r["eval_loss"] for r in read_jsonl(workdir) if "eval_loss" in r}
    assert meta["eval_loss"] == pytest.approx(evals[6], rel=1e-6)


class TwoHostLayout(SyntheticPipeline):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layout = {**self.layout, "processes": 2, "batch_per_host": self.layout["batch_size"]}


@pytest.mark.parametrize(
    "change, message",
    [
        (
            "processes",
            "the data position was saved by 1 processes and this run has 2: each process's "
            "batches depend on the process count, so restart with 1 processes to resume exactly, "
            "or start a new workdir",
        ),
        (
            "batch_size",
            "data.batch_size was 8 when the checkpoint was saved and is 16 now: resume with "
            "--config.data.batch_size=8, or start a new workdir",
        ),
    ],
)
def test_another_host_layout_stops_before_any_step_writing_nothing(
    straight_run, tmp_path, monkeypatch, change, message
):
    workdir = str(tmp_path / "run")
    shutil.copytree(straight_run[0], workdir)
    before = {f: open(os.path.join(workdir, f), "rb").read() for f in files_under(workdir)}
    config = tiny_train_config(num_steps=8)
    if change == "processes":
        monkeypatch.setattr(data, "InputPipeline", TwoHostLayout)
    else:
        config.data.batch_size = 16
    with pytest.raises(ValueError) as error:
        loop.train_and_evaluate(config, workdir)
    assert str(error.value) == (
        f"cannot resume from checkpoint 6 in {workdir}/checkpoints: {message}; nothing was written"
    )
    after = {f: open(os.path.join(workdir, f), "rb").read() for f in files_under(workdir)}
    assert after == before


# ----------------------------------------------------------------------------- the CLI


def run_cli(*args, timeout=300, env_extra=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_cli_bad_input_gives_one_line_and_nonzero_exit(tmp_path):
    cases = [
        (
            ["--config=configs/quickstart.py", "--config.model.chunk_sz=3"],
            "unknown config key --config.model.chunk_sz (did you mean 'chunk_size'?)",
        ),
        (["--config=configs/pg19_flash.py:1000"], "context length must be one of"),
        (["--config=configs/nope.py"], "config file 'configs/nope.py' does not exist"),
        (
            ["--config=configs/quickstart.py", "--config.data.seq_len=4096"],
            "data.seq_len (4096) exceeds model.max_len (128)",
        ),
    ]
    for args, message in cases:
        result = run_cli(*args, f"--workdir={tmp_path}/run")
        assert result.returncode != 0
        error_lines = [line for line in result.stderr.splitlines() if "train.py: error:" in line]
        assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]
        assert "Traceback" not in result.stderr


QUICK_ARGS = [
    "--config=configs/quickstart.py",
    "--config.model.num_layers=2",
    "--config.model.d_model=64",
    "--config.model.expansion_dim=128",
    "--config.model.qk_dim=32",
    "--config.model.chunk_size=16",
    "--config.model.max_len=64",
    "--config.data.seq_len=64",
    "--config.data.batch_size=8",
    "--config.train.num_steps=60",
    "--config.train.log_every=5",
    "--config.train.eval_every=60",
    "--config.train.eval_batches=2",
    "--config.train.checkpoint_every=1000",
    "--config.train.warmup_steps=10",
]


@pytest.mark.slow
def test_cli_trains_on_shipped_corpus_survives_sigterm_and_resumes(tmp_path):
    """train.py end to end on the real data: SIGTERM mid-run saves and exits 0; rerun resumes."""
    workdir = str(tmp_path / "run")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(
        [sys.executable, "train.py", *QUICK_ARGS, f"--workdir={workdir}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    for line in proc.stdout:
        output.append(line)
        if re.search(r"step 20/60", line):
            proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    text = "".join(output)
    assert proc.returncode == 0, text[-3000:]
    assert text.count("stopped by SIGTERM") == 1, text[-3000:]  # the summary's line alone
    stopped = checkpoint.Checkpoints(workdir, 3).latest_step()
    assert stopped is not None and 20 <= stopped < 60

    result = run_cli(*QUICK_ARGS, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from step {stopped}" in result.stderr
    records = read_jsonl(workdir)
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert max(losses) == 60
    assert losses[60] < losses[5] - 0.5  # perplexity visibly falls on real text
    assert any("eval_perplexity" in r for r in records)
