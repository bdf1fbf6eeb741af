"""eval.py and flash_jax.evaluation: whole-split perplexity against a direct computation, coverage,
bad input, --all_steps plot, training time, result files.

One tiny FLASH model is trained for two steps by the project's own loop (`trained_run`, shared
with tests/test_sample.py through a folder of the pytest session) on a small corpus in PG-19
layout that has no test/ folder (the "split the dataset lacks").
"""

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import sentencepiece as spm

from configs import base
from flash_jax import evaluation, runs
from flash_jax.tools import plots
from flash_jax.train import checkpoint_format, checkpoint_reader
from tests.helpers import REPO, SEQ_LEN, error_line, eval_cli, snapshot, train_tiny_run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.getbasetemp() / "eval_tiny_run")


@pytest.fixture(scope="module")
def validation(trained_run):
    workdir, texts = trained_run
    run = checkpoint_reader.restore(workdir)
    return run, texts, evaluation.evaluate_split(run, "validation")


def reference_nll(model, texts):
    """Summed NLL and token count of each document's windows, unpacked, from the model's logits.

    Independent of the pipeline: SentencePiece itself tokenizes, each document ends with EOS (1),
    windows of SEQ_LEN tokens are scored alone, each starting from the input 0 as in training.
    """
    sp = spm.SentencePieceProcessor(model_file=base.SHIPPED_VOCAB)
    windows = []
    for text in texts:
        ids = sp.encode(text) + [sp.eos_id()]
        windows += [ids[i : i + SEQ_LEN] for i in range(0, len(ids), SEQ_LEN)]
    inputs = np.zeros((len(windows), SEQ_LEN), np.int32)
    targets = np.zeros((len(windows), SEQ_LEN), np.int32)
    mask = np.zeros((len(windows), SEQ_LEN), bool)
    for row, w in enumerate(windows):
        inputs[row, 1 : len(w)] = w[:-1]
        targets[row, : len(w)] = w
        mask[row, : len(w)] = True
    # Causal model: the zeros after a short window cannot change the logits before them.
    logits = np.asarray(model(inputs), np.float64)
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return float(nll[mask].sum()), int(mask.sum())


# ----------------------------------------------------------------------------- the numbers


def test_perplexity_equals_exp_of_the_directly_computed_mean_nll(validation):
    run, texts, result = validation
    nll, tokens = reference_nll(run.model(), texts)
    assert result["complete"] and result["tokens"] == tokens
    np.testing.assert_allclose(result["loss"], nll / tokens, rtol=1e-5)
    np.testing.assert_allclose(result["perplexity"], math.exp(nll / tokens), rtol=1e-4)
    num_bytes = sum(len(t.encode()) for t in texts)
    num_words = sum(len(t.split()) for t in texts)
    assert (result["bytes"], result["words"]) == (num_bytes, num_words)
    np.testing.assert_allclose(result["bits_per_byte"], nll / num_bytes / math.log(2), rtol=1e-5)
    np.testing.assert_allclose(result["word_perplexity"], math.exp(nll / num_words), rtol=1e-4)


def test_the_whole_split_is_evaluated_once_padding_excluded(validation):
    run, texts, result = validation
    sp = spm.SentencePieceProcessor(model_file=base.SHIPPED_VOCAB)
    tokens = sum(len(sp.encode(t)) + 1 for t in texts)  # + EOS per document
    assert result["tokens"] == tokens
    # Several batches, the last one padded with weight-0 rows (else this test proves little).
    assert result["batches"] >= 2 and result["batches"] * 8 * SEQ_LEN > tokens


def test_max_batches_stops_early_and_drops_whole_split_figures(validation):
    run, _, full = validation
    part = evaluation.evaluate_split(run, "validation", max_batches=1)
    assert not part["complete"] and part["batches"] == 1
    assert 0 < part["tokens"] <= 8 * SEQ_LEN < full["tokens"]
    assert part["bits_per_byte"] is None and part["word_perplexity"] is None


def test_restore_a_given_step_and_reuse_the_compiled_step(validation):
    run, _, _ = validation
    first = checkpoint_reader.restore(run.workdir, 1)
    assert first.step == 1 and first.meta["step"] == 1
    assert first.fns is run.fns  # same run config: the jitted eval step is shared
    before, after = jax.tree.leaves(first.params), jax.tree.leaves(run.params)
    assert len(before) == len(after) > 0
    # A training step changed the weights.
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


# ----------------------------------------------------------------------------- the CLI


def _damaged_copy(trained_run, tmp_path, damage_meta=False):
    """A copy of the run whose step 2 is damaged: a data file cut in half, or its meta emptied."""
    workdir = str(tmp_path / "damaged")
    shutil.copytree(trained_run[0], workdir)
    step_dir = os.path.join(workdir, "checkpoints", "2")
    if damage_meta:
        with open(os.path.join(step_dir, "meta", "metadata"), "w"):
            pass
        return workdir
    data_files = [
        os.path.join(where, name)
        for where, _, names in os.walk(os.path.join(step_dir, "state"))
        for name in names
        if f"{os.sep}d{os.sep}" in os.path.join(where, name)
    ]
    for path in data_files:
        os.truncate(path, os.path.getsize(path) // 2)
    return workdir


BAD_INPUTS = {
    "no_workdir": ([], "workdir '"),  # ... does not exist (not "no checkpoints in")
    "no_checkpoint": ([], "no checkpoints in"),
    "missing_step": (["--step=7"], "no checkpoint for step 7"),
    "damaged_step": (["--step=2"], "checkpoint step 2 in "),
    "other_model": (["--config=configs/quickstart.py"], "different model config (model.chunk_size"),
    "missing_split": (["--split=test"], "has no test/ folder"),
}


@pytest.mark.parametrize(
    "case",
    [
        "no_workdir",
        "no_checkpoint",
        "missing_step",
        pytest.param("damaged_step", marks=pytest.mark.slow),  # restores: ~15 s
        "other_model",
        pytest.param("missing_split", marks=pytest.mark.slow),  # imports TensorFlow: ~15 s
    ],
)
def test_bad_input_one_line_nonzero_exit_workdir_unchanged(trained_run, tmp_path, case):
    args, message = BAD_INPUTS[case]
    workdir = trained_run[0]
    if case == "no_checkpoint":
        workdir = str(tmp_path / "empty")
        os.makedirs(os.path.join(workdir, "something"))
    if case == "damaged_step":
        workdir = _damaged_copy(trained_run, tmp_path)
    if case == "no_workdir":
        workdir = str(tmp_path / "nowhere")
        message = f"workdir {workdir!r} does not exist"
    before = snapshot(workdir)
    proc = eval_cli(f"--workdir={workdir}", *args)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc)
    assert line.startswith("eval.py: error: ") and message in line, line
    if case == "damaged_step":
        assert "/checkpoints/2 is damaged: " in line
    assert proc.stdout == ""
    assert snapshot(workdir) == before


@pytest.mark.slow  # a fresh process: imports, one compile, 6 small evaluations (~40 s on 2 cores)
def test_all_steps_over_two_workdirs_writes_results_and_a_png(trained_run, validation, tmp_path):
    workdirs = [str(tmp_path / name) for name in ("flash_a", "flash_b")]
    for w in workdirs:
        shutil.copytree(trained_run[0], w)
    plot = tmp_path / "compare.png"
    proc = eval_cli(f"--workdir={','.join(workdirs)}", "--all_steps", f"--plot={plot}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("step", "split", "tokens", "loss", "perplexity", "bits_per_byte", "words"):
        assert key in last
    assert (last["workdir"], last["step"], last["split"]) == (workdirs[1], 2, "validation")
    # One device in the subprocess, eight here: the same numbers.
    _, _, here = validation
    assert last["tokens"] == here["tokens"]
    np.testing.assert_allclose(last["loss"], here["loss"], rtol=1e-5)
    np.testing.assert_allclose(last["word_perplexity"], here["word_perplexity"], rtol=1e-4)
    for w in workdirs:
        with open(runs.results_path(w)) as f:
            assert [json.loads(line)["step"] for line in f] == [1, 2]
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # Progress against the total, known after the first pass.
    assert f"batch {here['batches']}/{here['batches']}," in proc.stderr


# Orbax's coroutines of a failed read are garbage-collected with their errors (reported already).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage_meta", [False, True], ids=["arrays", "meta"])
def test_a_damaged_latest_checkpoint_falls_back_with_one_warning(
    trained_run, tmp_path, caplog, damage_meta
):
    workdir = _damaged_copy(trained_run, tmp_path, damage_meta)
    with caplog.at_level(logging.WARNING):
        run = checkpoint_reader.restore(workdir)  # the latest, i.e. the newest intact one
        with pytest.raises(
            checkpoint_format.DamagedCheckpointError, match="step 2 in .* is damaged"
        ):
            checkpoint_reader.restore(workdir, 2)  # asked for by number: an error
        ckpts = checkpoint_reader.CheckpointReader(workdir)
        assert checkpoint_reader.steps_to_evaluate(ckpts, None, all_steps=False)[0] == [
            1 if damage_meta else 2  # a damaged meta is seen before anything is restored
        ]
        ckpts.close()
    assert run.step == 1
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert f"checkpoint step 2 in {workdir}/checkpoints/2 is damaged" in warnings[0]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))  # nothing deleted


# ----------------------------------------------------------------------------- files and plots


def test_training_time_sums_logged_step_times_last_record_wins(tmp_path):
    records = [
        {"step": 10, "step_time": 0.5},
        {"step": 10, "eval_loss": 3.0},  # an eval record: no step time
        {"step": 20, "step_time": 1.0},
        {"step": 20, "step_time": 2.0},  # the run resumed and logged step 20 again
        {"step": 30, "step_time": -0.1},  # a timing glitch: ignored
    ]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n" + '{"step": 40, "ste')
    at = runs.training_time(str(tmp_path))
    assert at(10) == pytest.approx(5.0)
    assert at(20) == pytest.approx(5.0 + 10 * 2.0)
    assert at(15) == pytest.approx(5.0 + 5 * 2.0)
    assert at(21) is None
    assert runs.training_time(str(tmp_path / "nowhere")) is None


def test_one_record_per_step_and_settings_and_curves_of_one_setting(tmp_path):
    workdir = str(tmp_path)
    validation = {"split": "validation", "max_batches": None, "data": {"seq_len": 32}}
    rows = [
        dict(step=200, settings=validation, perplexity=9.0),
        dict(step=100, settings=validation, perplexity=12.0),
        dict(step=200, settings=validation, perplexity=8.0),  # scored again: replaces 9.0
        dict(step=100, settings={**validation, "split": "test"}, perplexity=1.0),
        dict(step=100, settings={**validation, "max_batches": 5}, perplexity=1.0),
        dict(step=100, settings={**validation, "data": {"seq_len": 64}}, perplexity=1.0),
    ]
    for r in rows:
        runs.record_result(workdir, r)
    records = runs.read_jsonl(runs.results_path(workdir))
    assert len(records) == len(rows) - 1  # step 200's first record was replaced
    got = runs.curve(workdir, validation)
    assert [(r["step"], r["perplexity"]) for r in got] == [(100, 12.0), (200, 8.0)]
    assert runs.recorded_result(workdir, 200, validation)["perplexity"] == 8.0
    assert runs.recorded_result(workdir, 300, validation) is None
    assert runs.recorded_result(workdir, 100, {**validation, "max_batches": 6}) is None


@pytest.mark.slow  # three eval.py processes: about 90 s on 2 busy cores
def test_a_step_scored_with_the_same_settings_is_reused_and_recorded_once(trained_run, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained_run[0], workdir)
    first = eval_cli(f"--workdir={workdir}", "--step=1", "--max_batches=1")
    assert first.returncode == 0, first.stderr[-3000:]
    second = eval_cli(f"--workdir={workdir}", "--all_steps", "--max_batches=1")
    assert second.returncode == 0, second.stderr[-3000:]
    lines = second.stdout.splitlines()
    assert "(recorded before; --rescore scores it again)" in lines[0]  # step 1: reused
    assert json.loads(lines[1]) == json.loads(first.stdout.splitlines()[-1])
    assert "recorded before" not in lines[2]  # step 2: scored
    records = runs.read_jsonl(runs.results_path(workdir))
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["settings"] == {
        "split": "validation",
        "max_batches": 1,
        "context": None,  # the window flags' defaults: windows of the training length
        "stride": None,
        "whole_documents": False,
        "bucket": None,
        "data": records[0]["settings"]["data"],
    }
    assert records[0]["settings"]["data"]["seq_len"] == SEQ_LEN

    # --rescore scores again; a results file that cannot be written (here a folder in its place:
    # root writes through chmod) loses nothing: the result is printed, then one warning line.
    path = runs.results_path(workdir)
    os.rename(path, f"{path}.kept")
    os.makedirs(path)
    third = eval_cli(f"--workdir={workdir}", "--step=1", "--max_batches=1", "--rescore")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "Traceback" not in third.stderr
    assert "recorded before" not in third.stdout
    rescored = json.loads(third.stdout.splitlines()[-1])
    assert rescored["loss"] == pytest.approx(records[0]["loss"], rel=1e-6)
    (warning,) = [line for line in third.stderr.splitlines() if "could not be recorded" in line]
    assert f"the result above could not be recorded in {workdir}/eval (" in warning


def test_plot_curves_writes_a_png_with_a_training_time_panel(tmp_path):
    def points(scale):
        return [
            dict(step=s, perplexity=scale * 400 / s**0.5, train_seconds=s * 3.0)
            for s in (100, 200, 400, 800)
        ]

    path = plots.plot_curves(
        [("flash", points(1.0)), ("transformer_pp", points(1.2))], str(tmp_path / "p.png")
    )
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="nothing to plot"):
        plots.plot_curves([("empty", [])], str(tmp_path / "q.png"))


# ----------------------------------------------------------------------------- a live run


def _prune_on_first_read(ckpts, workdir, save_step=None):
    """Makes `ckpts` see what a live trainer does between a reader's listing and its reading:
    before the first read, step `save_step` is committed (a copy of step 2, written aside and
    renamed as Orbax commits) and steps 1 and 2 are pruned."""
    directory = os.path.join(workdir, "checkpoints")
    read = ckpts.manager.restore
    done = []

    def restore(step, *args, **kwargs):
        if not done:
            done.append(step)
            if save_step is not None:
                aside = os.path.join(directory, f"{save_step}.orbax-checkpoint-tmp")
                shutil.copytree(os.path.join(directory, "2"), aside)
                os.rename(aside, os.path.join(directory, str(save_step)))
            for pruned in ("1", "2"):
                shutil.rmtree(os.path.join(directory, pruned))
        return read(step, *args, **kwargs)

    ckpts.manager.restore = restore
    return done


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_step_pruned_between_listing_and_reading_is_not_damage(trained_run, tmp_path, caplog):
    workdir = str(tmp_path / "live")
    shutil.copytree(trained_run[0], workdir)
    with caplog.at_level(logging.INFO):
        ckpts = checkpoint_reader.CheckpointReader(workdir)
        first_read = _prune_on_first_read(ckpts, workdir, save_step=3)
        steps, config = checkpoint_reader.steps_to_evaluate(ckpts, None, all_steps=False)
        ckpts.close()
    assert first_read == [2]  # the newest listed, pruned before it was read
    assert steps == [3] and config.model.name == "flash"  # listed again: the newest committed
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "step 2 in " in caplog.text and "was removed while it was read" in caplog.text

    # --all_steps: the pruned steps are skipped in one INFO line each, the new one is taken.
    shutil.rmtree(workdir)
    shutil.copytree(trained_run[0], workdir)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        ckpts = checkpoint_reader.CheckpointReader(workdir)
        _prune_on_first_read(ckpts, workdir)
        with pytest.raises(ValueError, match="no checkpoints in"):  # everything went
            checkpoint_reader.steps_to_evaluate(ckpts, None, all_steps=True)
        ckpts.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_advice_to_move_the_checkpoints_of_a_workdir_a_trainer_holds(
    trained_run, tmp_path, monkeypatch
):
    from flash_jax.train import workdir as workdir_lib

    monkeypatch.setattr(checkpoint_reader, "REMOVAL_SECONDS", 0.2)
    workdir = _damaged_copy(trained_run, tmp_path, damage_meta=True)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "1"))  # step 2, damaged, is all there is
    ckpts = checkpoint_reader.CheckpointReader(workdir)
    with pytest.raises(ValueError, match=r"steps \[2\] are damaged .* move .* away"):
        checkpoint_reader.steps_to_evaluate(ckpts, None, all_steps=False)
    assert workdir_lib.holder(workdir) is None
    lock = workdir_lib.lock(workdir)
    try:
        assert workdir_lib.holder(workdir)["pid"] == os.getpid()
        with pytest.raises(ValueError, match="steps \\[2\\] are damaged") as error:
            checkpoint_reader.steps_to_evaluate(ckpts, None, all_steps=False)
        assert "away" not in str(error.value)
        assert f"the run writing it (process {os.getpid()} on host" in str(error.value)
    finally:
        lock.release()
        ckpts.close()


LIVE_TRAINER = [  # the quickstart, smaller, saving every step and keeping 2
    "--config=configs/quickstart.py",
    "--config.model.num_layers=1",
    "--config.model.d_model=32",
    "--config.model.expansion_dim=64",
    "--config.model.qk_dim=16",
    "--config.data.batch_size=2",
    "--config.data.seq_len=64",
    "--config.train.eval_every=0",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=1",
    "--config.train.keep_checkpoints=2",
    "--config.train.num_steps=1000000",
]


@pytest.mark.slow  # a live trainer beside readers: about 90 s on 2 busy cores
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_eval_on_a_live_run_that_saves_every_step(tmp_path, caplog):
    run = str(tmp_path / "live")
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    trainer = subprocess.Popen(
        [sys.executable, "train.py", *LIVE_TRAINER, f"--workdir={run}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while not os.path.isdir(os.path.join(run, "checkpoints", "3")):
            assert trainer.poll() is None and time.time() < deadline, "the trainer did not save"
            time.sleep(0.5)
        steps_read = []
        with caplog.at_level(logging.INFO):
            for _ in range(12):  # each read races the trainer's next save and prune
                restored = checkpoint_reader.restore(run)
                ckpts = checkpoint_reader.CheckpointReader(run)
                steps, _ = checkpoint_reader.steps_to_evaluate(ckpts, None, all_steps=True)
                ckpts.close()
                steps_read += [restored.step, *steps]
        assert len(set(steps_read)) > 3, steps_read  # the trainer went on meanwhile
        assert "damaged" not in caplog.text
        for args in (["--max_batches=2"], ["--max_batches=1", "--all_steps"]):
            proc = eval_cli(f"--workdir={run}", *args)
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert "damaged" not in proc.stderr and "Traceback" not in proc.stderr
            assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] > 3
        assert trainer.poll() is None  # the trainer was never disturbed
    finally:
        trainer.terminate()
        trainer.wait(timeout=120)
