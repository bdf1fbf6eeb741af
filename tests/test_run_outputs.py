"""Where a run's results go and how it ends: the end-of-run summary, a finished run rerun, the
TensorBoard hyperparameters, W&B (offline mode), eval.py's TensorBoard scalars, the sweep table,
the perplexity plot, and the quiet console's stderr filter.

In-process runs use tests/helpers.py's synthetic pipeline and tiny config (seconds each).
"""

import glob
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from flash_jax import data, runs
from flash_jax.cli import console
from flash_jax.config import RunConfig
from flash_jax.tools import plots
from flash_jax.train import loop, report, wandb_run
from scripts import sweep
from tests.helpers import SyntheticPipeline, sigterm_at, tiny_train_config

pytestmark = pytest.mark.usefixtures("compile_cache")  # the module's runs compile once

WANDB_PROJECT = "flash-jax-test"


def run_config(wandb_project=WANDB_PROJECT):
    config = tiny_train_config()
    t = config.train
    t.num_steps, t.log_every, t.checkpoint_every, t.eval_every, t.eval_batches = 4, 1, 2, 2, 1
    config.log.wandb_project = wandb_project
    return config


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A W&B-tracked run (offline) of 4 steps, stopped by SIGTERM after 2 and resumed:
    (workdir, both summaries)."""
    pytest.importorskip("wandb")
    mp = pytest.MonkeyPatch()
    mp.setattr(data, "InputPipeline", SyntheticPipeline)
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_CONSOLE", "off")  # W&B leaves pytest's capture of stdout alone
    mp.setenv("WANDB_SILENT", "true")
    workdir = str(tmp_path_factory.mktemp("tracked"))
    first = loop.train_and_evaluate(run_config(), workdir, hooks=[sigterm_at(2)])
    second = loop.train_and_evaluate(run_config(), workdir)
    mp.undo()
    return workdir, first, second


# ----------------------------------------------------------------------------- endings


@pytest.mark.slow  # the module's two tracked runs: about 30 s together
def test_a_finished_run_rerun_returns_at_once_with_a_summary(tracked_run, monkeypatch, capsys):
    workdir, first, second = tracked_run
    assert first["status"] == "preempted" and first["step"] == 2
    assert second["status"] == "done" and second["step"] == 4

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run checks no data and compiles nothing")

    for module, name in ((data, "check_data"), (loop, "compile_train_step")):
        monkeypatch.setattr(module, name, must_not_run)
    config = RunConfig.from_config(run_config(wandb_project=""))
    summary = loop.train_and_evaluate(config, workdir)
    assert summary["status"] == "finished" and summary["step"] == 4

    text = report.run_summary(summary, workdir, config)
    records = runs.read_jsonl(os.path.join(workdir, runs.METRICS_FILE))
    train = [r for r in records if "loss" in r][-1]
    evaluation = [r for r in records if "eval_perplexity" in r][-1]
    assert text.splitlines()[0] == (
        f"train.py: {workdir} already finished: its checkpoint of step 4 reaches "
        "train.num_steps=4; nothing to do (train longer with --config.train.num_steps=N)"
    )
    assert f"train  (step 4): loss {train['loss']:.4f}" in text
    assert f"eval   (step 4, validation, 256 tokens): loss {evaluation['eval_loss']:.4f}" in text
    assert f"checkpoint: {workdir}/checkpoints/4" in text
    assert f"eval.py --workdir={workdir}" in text and "scripts/sample.py" in text
    assert f"--logdir={workdir}" in text

    done = report.run_summary(second, workdir, config)
    assert done.splitlines()[0] == f"train.py: done: 4 steps in {workdir}"
    preempted = {**second, "status": "preempted", "stopped_by": "SIGTERM", "saved": 4}
    assert report.run_summary(preempted, workdir, config).splitlines()[0] == (
        f"train.py: stopped by SIGTERM at step 4; checkpoint saved in {workdir}/checkpoints; "
        "rerun the same command to resume"
    )


def test_mlm_with_a_causal_model_is_refused():
    config = tiny_train_config()
    config.data.objective = "mlm"
    with pytest.raises(ValueError, match=r"^data.objective='mlm' needs a bidirectional model"):
        RunConfig.from_config(config)
    config.model.causal = False
    RunConfig.from_config(config)


# ----------------------------------------------------------------------------- TensorBoard


def tensorboard_events(workdir):
    import tensorflow as tf

    for path in sorted(glob.glob(os.path.join(workdir, report.TENSORBOARD_DIR, "events.*"))):
        yield from tf.compat.v1.train.summary_iterator(path)


@pytest.mark.slow
def test_every_run_writes_its_config_as_tensorboard_hparams(tracked_run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    workdir, _, _ = tracked_run
    sessions = []
    for event in tensorboard_events(workdir):
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == "hparams":
                data_ = plugin_data_pb2.HParamsPluginData.FromString(
                    value.metadata.plugin_data.content
                )
                if data_.HasField("session_start_info"):
                    sessions.append(data_.session_start_info.hparams)
    assert len(sessions) == 2  # the first run and the resumed one
    hparams = sessions[-1]
    assert hparams["model.name"].string_value == "flash"
    assert hparams["model.d_model"].number_value == 32
    assert hparams["train.num_steps"].number_value == 4
    assert hparams["log.wandb_project"].string_value == WANDB_PROJECT
    assert json.loads(hparams["mesh.shape"].string_value) == [-1, 1, 1]


def test_eval_results_become_scalars_at_the_checkpoint_step(tmp_path):
    result = {"split": "test", "complete": True, "batches": 3, "step": 40, "loss": 2.5}
    result.update(perplexity=float(np.exp(2.5)), bits_per_byte=0.9, word_perplexity=None)
    partial = {**result, "complete": False, "step": 60, "loss": 2.0}
    assert report.write_eval_scalars(str(tmp_path), result) == [
        "eval_py/test/bits_per_byte",
        "eval_py/test/loss",
        "eval_py/test/perplexity",
    ]
    report.write_eval_scalars(str(tmp_path), partial)
    import tensorflow as tf

    got = {
        (value.tag, event.step): float(tf.make_ndarray(value.tensor))
        for event in tensorboard_events(str(tmp_path))
        for value in event.summary.value
    }
    assert got[("eval_py/test/loss", 40)] == 2.5
    assert got[("eval_py/test/perplexity", 40)] == pytest.approx(np.exp(2.5), rel=1e-6)
    assert got[("eval_py/test_first3batches/loss", 60)] == 2.0


# ----------------------------------------------------------------------------- W&B


def wandb_records(run_file):
    """The records of a W&B transaction log (`run-<id>.wandb`): a 7-byte header (":W&B", magic,
    version), then LevelDB's log format: 32 KiB blocks of chunks (crc32 4, length 2, type 1:
    1 full, 2 first, 3 middle, 4 last), a block's tail under 7 bytes being padding."""
    from wandb.proto import wandb_internal_pb2

    with open(run_file, "rb") as f:
        raw = f.read()
    assert raw[:4] == b":W&B"
    records, chunks, offset, block = [], [], 7, 32768
    while offset + 7 <= len(raw):
        if block - offset % block < 7:  # padding at the end of a block
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[offset : offset + 7])
        chunks.append(raw[offset + 7 : offset + 7 + length])
        offset += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(b"".join(chunks)))
            chunks = []
    return records


def wandb_history_and_configs(workdir):
    """The W&B run of a workdir, from its offline transaction logs: how many there are (one per
    process that ran), its history as (step, has train loss, has eval perplexity) in log order,
    and its config updates."""
    with open(os.path.join(workdir, wandb_run.ID_FILE)) as f:
        run_id = f.read().strip()
    run_files = sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb")))
    assert {os.path.basename(p) for p in run_files} == {f"run-{run_id}.wandb"}
    steps, configs = [], []
    for path in run_files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
                steps.append((items["_step"], "loss" in items, "eval_perplexity" in items))
            elif kind == "run":
                configs.append({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                configs.append({i.key: json.loads(i.value_json) for i in record.config.update})
    return len(run_files), steps, configs


@pytest.mark.slow
def test_wandb_run_gets_the_config_and_records_and_resumes_the_same_run(tracked_run):
    workdir, _, _ = tracked_run
    num_files, steps, configs = wandb_history_and_configs(workdir)
    assert num_files == 2  # the stopped run and its resumption: one W&B run
    resolved = RunConfig.from_config(run_config()).to_dict()
    assert configs and all(c["model"] == resolved["model"] for c in configs)
    assert all(c["log"] == {"wandb_project": WANDB_PROJECT} for c in configs)
    train_steps = sorted({s for s, is_train, _ in steps if is_train})
    eval_steps = sorted({s for s, _, is_eval in steps if is_eval})
    assert train_steps == [1, 2, 3, 4] and eval_steps == [2, 4]


class Crash(Exception):
    pass


def crash_at(step_to_crash):
    def hook(done):
        if done == step_to_crash:
            raise Crash(f"crashed after step {done}")

    return hook


# The crashed run tracked by W&B too (its W&B run continues), or not (a new W&B run: it gets the
# replayed steps, never sent before).
@pytest.mark.slow  # two short runs: about 10 s
@pytest.mark.parametrize("first_tracked, resumed_steps", [(True, [1, 2, 3, 4]), (False, [3, 4])])
def test_wandb_gets_each_step_once_when_a_crashed_run_replays_steps(
    tmp_path, monkeypatch, first_tracked, resumed_steps
):
    """A run that crashes after step 4 has logged step 3 (records trail the steps by one), but
    its last checkpoint is step 2: the resumed run replays steps 3 and 4 and their records. The
    metrics file drops its old records of the replayed steps; W&B, whose history only grows,
    gets no record of a step up to the last one it has (W&B would drop each with a warning,
    online), so every train step reaches it once."""
    pytest.importorskip("wandb")
    monkeypatch.setattr(data, "InputPipeline", SyntheticPipeline)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = run_config(wandb_project=WANDB_PROJECT if first_tracked else "")
    config.train.eval_every = 100  # no eval: the train records alone
    with pytest.raises(Crash):
        loop.train_and_evaluate(config, str(tmp_path), hooks=[crash_at(4)])
    config.log.wandb_project = WANDB_PROJECT
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["status"] == "done" and summary["step"] == 4
    num_files, steps, _ = wandb_history_and_configs(str(tmp_path))
    assert num_files == (2 if first_tracked else 1)
    assert [s for s, is_train, _ in steps if is_train] == resumed_steps
    with open(os.path.join(str(tmp_path), runs.METRICS_FILE)) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- sweep table


def write_run(root, name, model, records):
    workdir = os.path.join(root, name)
    os.makedirs(workdir)
    with open(os.path.join(workdir, runs.CONFIG_FILE), "w") as f:
        json.dump(
            {"model": {"name": model}, "train": {"eval_split": "validation", "eval_batches": 4}}, f
        )
    with open(os.path.join(workdir, runs.METRICS_FILE), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_sweep_table_lists_final_eval_perplexity_and_speed(tmp_path, monkeypatch, capsys):
    runs = [{"model.name": "flash"}, {"model.name": "transformer_pp"}, {"model.name": "performer"}]
    write_run(
        tmp_path,
        "name=flash",
        "flash",
        [
            {"step": 10, "loss": 5.0, "tokens_per_sec": 100.0, "step_time": 0.5},
            {"step": 20, "loss": 4.0, "tokens_per_sec": 300.0, "step_time": 0.2},
            {"step": 20, "eval_loss": 4.5, "eval_perplexity": 90.0, "eval_tokens": 512},
            {"step": 30, "loss": 3.0, "tokens_per_sec": 200.0, "step_time": 0.25},
            {"step": 30, "eval_loss": 4.25, "eval_perplexity": 70.1, "eval_tokens": 512},
        ],
    )
    write_run(
        tmp_path,
        "name=transformer_pp",
        "transformer_pp",
        [{"step": 30, "loss": 3.5, "tokens_per_sec": 150.0, "step_time": 0.3}],
    )
    monkeypatch.setattr(sweep, "load_sweep", lambda path: runs)
    assert sweep.main(["configs/quickstart.py", f"--workdir={tmp_path}", "--table"]) == 0
    with open(tmp_path / "sweep.json") as f:
        rows = json.load(f)["runs"]
    flash, tpp, performer = rows
    assert flash["eval_perplexity"] == 70.1 and flash["eval_step"] == 30
    assert flash["tokens_per_sec"] == 200.0 and flash["step_time"] == 0.25  # medians
    assert flash["step"] == 30 and flash["train_loss"] == 3.0 and flash["model"] == "flash"
    assert "eval_perplexity" not in tpp and tpp["tokens_per_sec"] == 150.0
    assert performer["status"] == "missing"
    markdown = (tmp_path / "sweep.md").read_text()
    assert "| name=flash | flash | 30 | 70.10 | 4.2500 | 3.0000 | 200 | 0.250 |" in markdown
    assert "| name=performer | missing |" in markdown
    assert "validation, 4 batches" in markdown
    assert "table: " in capsys.readouterr().out


# ----------------------------------------------------------------------------- the plot


@pytest.mark.parametrize("low,high", [(60.0, 500.0), (20.0, 190.0), (40.0, 6000.0), (8.0, 7000)])
def test_perplexity_plot_names_its_kind_and_its_labels_do_not_overlap(tmp_path, low, high):
    steps = [100, 200, 400, 800]
    values = np.geomspace(high, low, len(steps))
    curves = [
        ("run", [{"step": s, "perplexity": float(v)} for s, v in zip(steps, values, strict=True)])
    ]
    path = plots.plot_curves(curves, str(tmp_path / "p.png"), title="validation split")
    assert os.path.getsize(path) > 0
    panels = [plots.Panel("training step", "token perplexity", [("run", steps, list(values))])]
    fig = plots.panels_figure(panels, "validation split: token perplexity")
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.get_ylabel() == "token perplexity" and ax.get_yscale() == "log"
    renderer = fig.canvas.get_renderer()
    boxes = [
        label.get_window_extent(renderer)
        for tick in ax.yaxis.get_major_ticks() + ax.yaxis.get_minor_ticks()
        for label in [tick.label1]
        if label.get_visible()
        and label.get_text()
        and low <= tick.get_loc() * 1.2
        and tick.get_loc() <= high * 1.2
    ]
    assert len(boxes) >= 2  # the axis is readable
    boxes.sort(key=lambda b: b.y0)
    for below, above in zip(boxes, boxes[1:], strict=False):
        assert below.y1 <= above.y0, (low, high)


# ----------------------------------------------------------------------------- quiet console


def test_stderr_filter_drops_only_known_noise_and_keeps_order():
    lines = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1795793386.605714    3768 cudart_stub.cc:31] Could not find cuda drivers on "
        "your machine, GPU will not be used.",
        "E0000 00:00:1795793387.733292    3768 cuda_platform.cc:52] failed call to cuInit: "
        "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
        "I1127 15:30:01.551864 140186797808512 loop.py:223] compiled the train step in 5.1 s",
        "E0000 00:00:1795793401.878120    3975 util.cc:131] oneDNN supports DT_INT64 only on "
        "platforms with AVX-512. Falling back to the default Eigen-based implementation.",
        "normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty. use identity normalization.",
        "W0000 00:00:1795793401.878120    3975 gpu_device.cc:12] a real TensorFlow warning",
        "E0000 00:00:1795793401.878120    3975 other.cc:1] a real error",
        "I1127 15:29:49.562042 140186797808512 xla_bridge.py:849] Unable to initialize backend "
        "'tpu': INTERNAL: Failed to open libtpu.so",
        "W0000 00:00:1795798571.466535    3584 google_auth_provider.cc:196] All attempts to get "
        "a Google authentication bearer token failed, returning an empty token.",
        "train.py: error: data.vocab ...",
    ]
    proc = subprocess.run(
        [sys.executable, "-I", console.__file__],
        input=("\n".join(lines) + "\nno newline at the end").encode(),
        capture_output=True,
        timeout=60,
    )
    assert proc.stdout.decode().splitlines() == [
        lines[3],
        lines[6],
        lines[7],
        lines[10],
        "no newline at the end",
    ]


def test_verbose_changes_nothing(monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    console.quiet(["train.py", "--config=x", "--verbose"])
    assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ and console.wants_verbose(["a", "--verbose"])


def test_position_plot_tick_labels_do_not_overlap():
    """Buckets that double from 128 up to a whole book (11 ticks on a log2 axis): each position
    label is drawn clear of its neighbours."""
    ends = [128 * 2**i for i in range(10)] + [124_443]
    panels = [plots.Panel("position", "token perplexity", [("run", ends, [100.0] * 11)], True)]
    fig = plots.panels_figure(panels, "")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in fig.axes[0].get_xticklabels()]
    assert len(boxes) == len(ends)
    for left, right in zip(boxes, boxes[1:], strict=False):
        assert not left.overlaps(right), (left, right)
