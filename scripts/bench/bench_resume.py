"""Start-up of a run resumed at a given step, saved input state against replay: the input pipeline
alone (the default), or (--scope=run) a whole resumed training run.

    .venv/bin/python scripts/bench/bench_resume.py                  # quickstart, steps 10, 3000
    python scripts/bench/bench_resume.py --config=configs/pg19_flash.py:smoke --steps=10,30000
    .venv/bin/python scripts/bench/bench_resume.py --scope=run      # steps 10 and 3000
    .venv/bin/python scripts/bench/bench_resume.py --scope=run --steps=10,300 --repeats=1

For each step k, on one host, each of --modes:
- restore: the input stream's state as a pipeline saved it after k batches (what a resumed run
  pays: the same at any k);
- replay: no saved state: the stream is rebuilt and its first k batches are dropped (what
  resuming cost before the state was saved; grows with k).
Each figure is the median of --repeats runs.

--scope=pipeline: the seconds from building the train pipeline of --config to holding batch k
(the first batch a run resumed after k steps trains on): `InputPipeline(...)` +
`restore_state(dir)`, or `InputPipeline(..., start_batch=k)`, then the first batch. Process-wide
one-time costs (TensorFlow start, vocabulary load) are paid once before any timing. The saved
state's size is printed too; the first batch of every timed pipeline is checked against batch k
of an uninterrupted pipeline.

--scope=run: a tiny model on the shipped corpus, restore mode only (a checkpoint always holds its
input stream; replay is what --scope=pipeline measures). A run of `k + 1` steps is stopped by
SIGTERM after step k (a checkpoint at k, as a preemption leaves it), then resumed by rerunning it,
each time on a fresh copy of the stopped workdir. Timed: seconds from calling `train_and_evaluate`
to the dispatch of the first resumed step (config and data checks, the state and input stream
restored, the train step from the persistent compilation cache the stopped run filled, the first
batch).
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import tempfile
import time

import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from configs import quickstart
from flash_jax import cli, data
from flash_jax.config import RunConfig
from flash_jax.train import loop

PROGRAM = "bench_resume.py"
MODES = ("restore", "replay")
FLAGS = flags.FlagValues()
flags.DEFINE_enum("scope", "pipeline", ["pipeline", "run"], "What is resumed.", flag_values=FLAGS)
config_flags.DEFINE_config_file(
    "config", "configs/quickstart.py", "pipeline: the run config.", flag_values=FLAGS
)
cli.define_int_list("steps", [10, 3000], "Steps to resume at.", FLAGS)
flags.DEFINE_list("modes", list(MODES), "restore and/or replay.", flag_values=FLAGS)
flags.DEFINE_integer(
    "repeats", 3, "Timed runs per figure (the median is shown).", flag_values=FLAGS
)


# ----------------------------------------------------------------------------- --scope=pipeline


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


def resume_pipeline(args) -> list[tuple]:
    """(step, mode, median seconds to batch k, saved state MB or "-") per step and mode."""
    config, steps = RunConfig.from_config(args.config), sorted(args.steps)
    # One uninterrupted pipeline: the reference batches and, at each step, the saved state.
    states, want = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        with _pipeline(config) as pipe:
            for step in steps:
                while pipe.position < step:
                    next(pipe)
                if "restore" in args.modes:
                    states[step] = os.path.join(tmp, f"step_{step}")
                    pipe.save_state(states[step])
                want[step] = next(pipe)
        rows = []
        for step in steps:
            makes = {}
            if "restore" in args.modes:

                def restored(step=step):
                    pipe = _pipeline(config)
                    pipe.restore_state(states[step])
                    return pipe

                makes["restore"] = restored
            if "replay" in args.modes:
                makes["replay"] = lambda step=step: _pipeline(config, start_batch=step)
            for mode, make in makes.items():
                times = []
                for _ in range(args.repeats):
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
        f"{os.path.basename(str(d.vocab))} (median of {args.repeats}):\n"
    )
    print("| step | mode | seconds to batch k | saved state (MB) |")
    print("|---:|---|---:|---:|")
    for step, mode, seconds, size in rows:
        print(f"| {step:,} | {mode} | {seconds:.2f} | {size} |")
    return rows


# ----------------------------------------------------------------------------- --scope=run


def tiny_config(num_steps: int, cache: str):
    config = quickstart.get_config()
    m = config.model
    m.num_layers, m.d_model, m.expansion_dim, m.qk_dim = 2, 32, 64, 16
    m.chunk_size, m.max_len = 16, 32
    config.data.seq_len, config.data.batch_size = 32, 8
    t = config.train
    t.num_steps, t.log_every, t.eval_every, t.warmup_steps = num_steps, 1000, 0, 5
    t.checkpoint_every, t.keep_checkpoints = 100_000, 1
    t.compilation_cache_dir = cache
    return config


def resume_seconds(config, workdir: str) -> float:
    start = time.perf_counter()
    first: list[float] = []

    def hook(done):
        if not first:
            first.append(time.perf_counter() - start)

    loop.train_and_evaluate(config, workdir, hooks=[hook])
    return first[0]


def resume_run(args) -> list[tuple]:
    """(step, mode, median seconds to the first resumed step, every run's seconds)."""
    logging.set_verbosity(logging.WARNING)
    root = tempfile.mkdtemp(prefix="bench_resume_run_")
    cache = os.path.join(root, "jax_cache")
    rows = []
    try:
        for k in args.steps:
            config = tiny_config(k + 1, cache)
            stopped = os.path.join(root, f"stopped_{k}")

            def stop_at_k(done, k=k):
                if done == k:
                    os.kill(os.getpid(), signal.SIGTERM)

            t0 = time.perf_counter()
            summary = loop.train_and_evaluate(config, stopped, hooks=[stop_at_k])
            assert summary["status"] == "preempted" and summary["step"] == k, summary
            print(f"step {k}: trained and stopped in {time.perf_counter() - t0:.0f} s", flush=True)
            seconds = []
            for r in range(args.repeats):
                workdir = os.path.join(root, f"resumed_{k}_{r}")
                shutil.copytree(stopped, workdir)
                seconds.append(resume_seconds(config, workdir))
                shutil.rmtree(workdir)
            rows.append((k, "restore", statistics.median(seconds), seconds))
            print(f"step {k}: {statistics.median(seconds):.2f} s {seconds}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\nresume start-up (s, median), first resumed step dispatched:")
    print(f"{'step':>8} {'mode':>8} {'seconds':>8}")
    for k, mode, median, _ in rows:
        print(f"{k:>8} {mode:>8} {median:>8.2f}")
    return rows


def main(argv=()):
    args = cli.parse_script_flags(FLAGS, argv, PROGRAM)
    unknown = [mode for mode in args.modes if mode not in MODES]
    if unknown or not args.modes:
        cli.fail(PROGRAM, f"--modes must name some of {', '.join(MODES)}, got {args.modes}", 2)
    if args.scope == "run" and FLAGS["config"].present:
        cli.fail(PROGRAM, "--config is for --scope=pipeline (the run scope trains a tiny model)", 2)
    if args.scope == "run" and "replay" in args.modes and FLAGS["modes"].present:
        cli.fail(PROGRAM, "--modes=replay is for --scope=pipeline (checkpoints hold the stream)", 2)
    return resume_pipeline(args) if args.scope == "pipeline" else resume_run(args)


if __name__ == "__main__":
    cli.run_script(main, FLAGS)
