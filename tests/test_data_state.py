"""flash_jax.data resume and hosts: saved pipeline state, host layout, seqio's offline cache, TF
kept off the accelerators."""

import collections
import dataclasses
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from configs import base
from flash_jax import data
from flash_jax.config import DataConfig
from flash_jax.data import pipeline, tasks
from scripts.data import cache_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the of and to a in that it was her not be he his as you she with for had".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A PG-19-layout corpus of 9 train books (more than the 4 hosts the tests simulate), 1
    validation and 1 test book; about 20 batches of 4 x 64 bytes per train epoch."""
    root = tmp_path_factory.mktemp("state") / "corpus"
    rng = np.random.default_rng(7)
    for split, sizes in (
        ("train", [300, 40, 250, 13, 333, 90, 120, 7, 210]),
        ("validation", [400]),
        ("test", [60]),
    ):
        (root / split).mkdir(parents=True)
        for i, size in enumerate(sizes):
            words = rng.choice(WORDS, size=size)
            text = "\n".join(" ".join(words[j : j + 12]) for j in range(0, size, 12)) + "\n"
            (root / split / f"{i + 1}.txt").write_text(text, encoding="utf-8")
    return root


def cfg_for(root, **overrides):
    cfg = ml_collections.ConfigDict(base.get_config().data.to_dict())
    cfg.update(data_dir=str(root), vocab="byte", seq_len=64, batch_size=4, shuffle_buffer=64)
    cfg.update(overrides)
    return DataConfig.from_config(cfg)


def take(pipe, n):
    return [next(pipe) for _ in range(n)]


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        for k in data.FEATURES:
            np.testing.assert_array_equal(g[k], w[k])


def tokens(batches):
    rows = {k: np.concatenate([b[k] for b in batches]) for k in ("targets", "segment_ids")}
    return collections.Counter(rows["targets"][rows["segment_ids"] > 0].tolist())


# ---------------------------------------------------------------- saved state


# mlm: the masks' random state too
@pytest.mark.parametrize("objective,saves", [("lm", (0, 5, 45)), ("mlm", (45,))])
def test_restored_state_continues_exactly(corpus, tmp_path, objective, saves):
    """States saved at the start, in the first epoch (the tokenized corpus still being cached in
    memory) and in the third (a reshuffled epoch; about 20 batches per epoch) give the
    uninterrupted batches; saving does not disturb the run that saves; a replay (start_batch)
    gives the same batches."""
    cfg = cfg_for(corpus, objective=objective)
    with data.InputPipeline(cfg, "train", seed=3) as pipe:
        want = []
        for k in range(57):
            if k in saves:
                pipe.save_state(str(tmp_path / f"at_{k}"))
            want.append(next(pipe))
    with data.InputPipeline(cfg, "train", seed=3) as plain:  # no save on the way
        assert_same_batches(take(plain, 57), want)
    for k in saves:
        with data.InputPipeline(cfg, "train", seed=3) as pipe:
            pipe.restore_state(str(tmp_path / f"at_{k}"))
            assert pipe.position == k
            assert_same_batches(take(pipe, 12), want[k : k + 12])
            assert pipe.position == k + 12
    with data.InputPipeline(cfg, "train", seed=3, start_batch=45) as pipe:
        assert_same_batches(take(pipe, 12), want[45:57])


def test_each_host_saves_and_restores_its_own_state(corpus, tmp_path):
    cfg = cfg_for(corpus)
    want = {}
    for host in range(2):
        with data.InputPipeline(cfg, "train", seed=1, shard_index=host, num_shards=2) as pipe:
            take(pipe, 7)
            prefix = pipe.save_state(str(tmp_path))
            assert os.path.basename(prefix) == f"data.process_{host:05d}-of-00002"
            want[host] = take(pipe, 5)
    assert sorted(os.listdir(tmp_path)) == sorted(
        f"data.process_{h:05d}-of-00002{ext}"
        for h in range(2)
        for ext in (".index", ".data-00000-of-00001", ".json")
    )
    assert tokens(want[0]) != tokens(want[1])  # the hosts read different documents
    for host in (1, 0):
        with data.InputPipeline(cfg, "train", seed=1, shard_index=host, num_shards=2) as pipe:
            pipe.restore_state(str(tmp_path))
            assert_same_batches(take(pipe, 5), want[host])
    saved = json.loads((tmp_path / "data.process_00001-of-00002.json").read_text())
    assert saved["position"] == 7
    assert saved["layout"] == pipeline.host_layout(cfg, seed=1, shard_index=1, num_shards=2)


def test_restore_refuses_another_layout_or_a_used_pipeline(corpus, tmp_path):
    cfg = cfg_for(corpus)
    with data.InputPipeline(cfg, "train", seed=1, shard_index=0, num_shards=2) as pipe:
        next(pipe)
        pipe.save_state(str(tmp_path))
        with pytest.raises(ValueError, match="needs a new pipeline"):
            pipe.restore_state(str(tmp_path))
    with pytest.raises(
        ValueError, match="saved by 2 processes and this run has 1: .* restart with 2"
    ):
        data.InputPipeline(cfg, "train", seed=1).restore_state(str(tmp_path))
    with pytest.raises(ValueError, match="resume with --config.seed=1, or start a new workdir"):
        data.InputPipeline(cfg, "train", seed=2, shard_index=0, num_shards=2).restore_state(
            str(tmp_path)
        )
    with pytest.raises(ValueError, match=r"no saved data state for process 1 of 2 in .*-of-00002"):
        data.InputPipeline(cfg, "train", seed=1, shard_index=1, num_shards=2).restore_state(
            str(tmp_path)
        )
    with pytest.raises(ValueError, match="needs a new pipeline"):
        pipe = data.InputPipeline(cfg, "train", seed=1, shard_index=0, num_shards=2, start_batch=3)
        pipe.restore_state(str(tmp_path))


# ---------------------------------------------------------------- host layout


def test_host_layout_records_what_decides_the_batches(corpus):
    cfg = cfg_for(corpus)
    layout = pipeline.host_layout(cfg, seed=5, shard_index=3, num_shards=4)
    assert layout == {
        "processes": 4,
        "process_index": 3,
        "sharded_by": "documents",  # 9 train books >= 4 hosts
        "batch_size": 4,
        "batch_per_host": 1,
        "seed": 5,
        "task": data.task_name(cfg),
        "documents": 9,
        "seq_len": 64,
        "shuffle_buffer": 64,
        "use_cached": "",
    }
    one_book = pipeline.host_layout(cfg, seed=5, split="validation", shard_index=0, num_shards=2)
    assert one_book["sharded_by"] == "windows" and one_book["documents"] == 1
    assert json.loads(json.dumps(layout)) == layout  # what a checkpoint's JSON holds


def test_check_layout_says_what_to_do(corpus):
    cfg = cfg_for(corpus)
    saved = pipeline.host_layout(cfg, seed=5, shard_index=1, num_shards=4)
    # Another process index (hosts renumbered) restores that index's own state: fine.
    assert pipeline.check_layout(saved, {**saved, "process_index": 0}) is None
    assert (
        pipeline.check_layout(saved, {**saved, "processes": 2, "batch_per_host": 2})
        == "the data position was saved by 4 processes and this run has 2: each process's "
        "batches depend on the process count, so restart with 4 processes to resume exactly, "
        "or start a new workdir"
    )
    assert pipeline.check_layout(saved, {**saved, "seq_len": 128}) == (
        "data.seq_len was 64 when the checkpoint was saved and is 128 now: resume with "
        "--config.data.seq_len=64, or start a new workdir"
    )
    other = pipeline.check_layout(saved, {**saved, "task": "flash_jax.c4_lm.tfds.byte"})
    assert other.startswith("the data changed since the checkpoint (the task was ")
    assert "\n" not in other


# ---------------------------------------------------------------- seqio's offline cache


def test_cache_reads_back_as_the_uncached_pipeline(corpus, tmp_path):
    cfg = cfg_for(corpus)
    task_dir = cache_data.write_cache(cfg, str(tmp_path))
    assert task_dir == os.path.join(str(tmp_path), data.task_name(cfg))
    assert os.path.exists(os.path.join(task_dir, "COMPLETED"))
    cached = cfg_for(corpus, use_cached=str(tmp_path))
    assert tasks.cached_task_dir(cached) == task_dir
    stats = json.loads(open(os.path.join(task_dir, "stats.train.json")).read())
    assert stats["examples"] == 9
    # Eval reads documents in file order either way: the same batches.
    for split in ("validation", "train"):
        with data.InputPipeline(cfg, split, shuffle=False, repeat=False) as pipe:
            want = list(pipe)
        with data.InputPipeline(cached, split, shuffle=False, repeat=False) as pipe:
            assert_same_batches(list(pipe), want)
    # Training shuffles files with seqio's reader instead: the same tokens in another order.
    with data.InputPipeline(cfg, "train", seed=2, repeat=False) as pipe:
        want = list(pipe)
    with data.InputPipeline(cached, "train", seed=2, repeat=False) as pipe:
        got = list(pipe)
    assert tokens(got) == tokens(want) and len(got) == len(want)
    # A cached pipeline's state restores exactly too (TFRecord offsets).
    with data.InputPipeline(cached, "train", seed=2) as pipe:
        take(pipe, 9)
        pipe.save_state(str(tmp_path / "state"))
        want = take(pipe, 6)
    with data.InputPipeline(cached, "train", seed=2) as pipe:
        pipe.restore_state(str(tmp_path / "state"))
        assert_same_batches(take(pipe, 6), want)


def test_use_cached_errors_name_the_key(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"data.use_cached: no finished seqio cache .*cache_data"):
        data.InputPipeline(cfg_for(corpus, use_cached=str(tmp_path)), "train")
    untyped = ml_collections.ConfigDict({**dataclasses.asdict(cfg_for(corpus)), "use_cached": True})
    with pytest.raises(ValueError, match="data.use_cached must be a folder"):
        DataConfig.from_config(untyped)  # where a config enters, its values are checked
    untyped = ml_collections.ConfigDict(dataclasses.asdict(cfg_for(corpus)))
    with pytest.raises(TypeError, match="expected a DataConfig, got ConfigDict"):
        data.InputPipeline(untyped, "train")  # the library takes the checked, typed section
    # (mlm: a task this process has not read from a cache yet; seqio keeps the first folder
    # it reads a task from for the life of the process)
    cache_data.write_cache(cfg_for(corpus, objective="mlm"), str(tmp_path), ["validation"])
    with pytest.raises(ValueError, match="data.use_cached: split 'train' is not in"):
        data.InputPipeline(cfg_for(corpus, objective="mlm", use_cached=str(tmp_path)), "train")


@pytest.mark.slow  # tokenizes the shipped validation book and reads it twice: about 10 s
def test_cache_of_the_shipped_corpus(tmp_path):
    """The command docs/data.md documents, on the shipped corpus and its 4k vocabulary."""
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "data", "cache_data.py"),
            "--config=" + os.path.join(REPO, "configs", "quickstart.py"),
            f"--output_dir={tmp_path}",
            "--splits=validation",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),  # this checkout's flash_jax, whatever is installed
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"train with --config.data.use_cached={tmp_path}" in result.stdout
    cfg = dataclasses.replace(DataConfig.from_config(base.get_config().data), seq_len=128)
    with data.InputPipeline(cfg, "validation", shuffle=False, repeat=False) as pipe:
        want = list(pipe)
    cfg = dataclasses.replace(cfg, use_cached=str(tmp_path))
    with data.InputPipeline(cfg, "validation", shuffle=False, repeat=False) as pipe:
        got = list(pipe)
    assert_same_batches(got, want)
    assert sum(b["weights"].sum() for b in got) == 124443  # Northanger Abbey + EOS, 4k vocab


# ---------------------------------------------------------------- TensorFlow off the accelerators


def test_importing_flash_jax_data_hides_accelerators_from_tensorflow():
    """In a fresh process: the hiding call is made for GPU and TPU before TF has initialised its
    devices (the call would fail afterwards on a machine that has them), and TF then lists only
    CPUs."""
    script = """
import json
import tensorflow as tf
from tensorflow.python.eager import context
calls = []
real = tf.config.set_visible_devices
def recording(devices, kind=None):
    calls.append([list(devices), kind, context.context()._initialized])
    return real(devices, kind)
tf.config.set_visible_devices = recording
import flash_jax.data
devices = sorted({d.device_type for d in tf.config.get_visible_devices()})
print(json.dumps({"calls": calls, "visible": devices}))
"""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # [devices, kind, TF's eager context already initialised when the call was made]
    assert out["calls"] == [[[], "GPU", False], [[], "TPU", False]]
    assert out["visible"] == ["CPU"]
