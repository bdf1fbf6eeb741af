"""Input-pipeline start-up when a run resumes at a given step: saved state against replay.

    .venv/bin/python scripts/bench/bench_resume.py                  # quickstart, steps 10, 3000
    python scripts/bench/bench_resume.py --config=configs/pg19_flash.py:smoke --steps=10,30000

For each step k, the seconds from building the train pipeline to holding batch k (the first batch
a run resumed after k steps trains on), on one host:
- restore: `InputPipeline(...)` + `restore_state(dir)` with the state a pipeline saved after k
  batches (`save_state(dir)`), then the first batch. What a resumed run pays: the same at any k.
- replay: `InputPipeline(..., start_batch=k)`, then the first batch (the stream is rebuilt and its
  first k batches are dropped: what resuming cost before the state was saved). Grows with k.
Process-wide one-time costs (TensorFlow start, vocabulary load) are paid once before any timing.
Each figure is the median of --repeats runs; the saved state's size is printed too. The first
batch of every timed pipeline is checked against batch k of an uninterrupted pipeline.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from flash_jax import data

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "run config")
_STEPS = flags.DEFINE_list("steps", ["10", "3000"], "steps to resume at")
_MODES = flags.DEFINE_list("modes", ["restore", "replay"], "restore and/or replay")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs per figure (the median is shown)")


def _pipeline(config, **kw) -> data.InputPipeline:
    return data.InputPipeline(
        config.data, "train", seed=config.seed, shard_index=0, num_shards=1, **kw
    )


def _same(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in data.FEATURES)


def _timed(make) -> tuple[float, dict]:
    start = time.perf_counter()
    pipe = make()
    batch = next(pipe)
    seconds = time.perf_counter() - start
    pipe.close()
    return seconds, batch


def _size_mb(directory: str) -> float:
    return sum(e.stat().st_size for e in os.scandir(directory)) / 2**20


def main(argv):
    del argv
    config = _CONFIG.value
    steps = sorted(int(s) for s in _STEPS.value)
    # One uninterrupted pipeline: the reference batches and, at each step, the saved state.
    states, want = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        with _pipeline(config) as pipe:
            for step in steps:
                while pipe.position < step:
                    next(pipe)
                if "restore" in _MODES.value:
                    states[step] = os.path.join(tmp, f"step_{step}")
                    pipe.save_state(states[step])
                want[step] = next(pipe)
        rows = []
        for step in steps:
            makes = {}
            if "restore" in _MODES.value:

                def restored(step=step):
                    pipe = _pipeline(config)
                    pipe.restore_state(states[step])
                    return pipe

                makes["restore"] = restored
            if "replay" in _MODES.value:
                makes["replay"] = lambda step=step: _pipeline(config, start_batch=step)
            for mode, make in makes.items():
                times = []
                for _ in range(_REPEATS.value):
                    seconds, batch = _timed(make)
                    if not _same(batch, want[step]):
                        raise AssertionError(f"{mode} at step {step}: not the uninterrupted batch")
                    times.append(seconds)
                size = f"{_size_mb(states[step]):.1f}" if mode == "restore" else "-"
                rows.append((step, mode, statistics.median(times), size))
    d = config.data
    print(
        f"\nresume start-up, train split of {os.path.basename(d.data_dir)}, seq_len {d.seq_len}, "
        f"batch {d.batch_size}, shuffle_buffer {d.shuffle_buffer}, vocab "
        f"{os.path.basename(str(d.vocab))} (median of {_REPEATS.value}):\n"
    )
    print("| step | mode | seconds to batch k | saved state (MB) |")
    print("|---:|---|---:|---:|")
    for step, mode, seconds, size in rows:
        print(f"| {step:,} | {mode} | {seconds:.2f} | {size} |")


if __name__ == "__main__":
    app.run(main)
