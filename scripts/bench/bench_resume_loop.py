"""Start-up of a resumed training run at a given step: a tiny model on the shipped corpus, one host.

    .venv/bin/python scripts/bench/bench_resume_loop.py                    # steps 10 and 3000
    .venv/bin/python scripts/bench/bench_resume_loop.py --steps=10,300 --repeats=1

For each step k: a run of `k + 1` steps is stopped by SIGTERM after step k (a checkpoint at k, as
a preemption leaves it), then resumed by rerunning it, --repeats times, each on a fresh copy of
the stopped workdir. Timed: seconds from calling `train_and_evaluate` to the dispatch of the first
resumed step (config and data checks, the state and input stream restored, the train step from the
persistent compilation cache the stopped run filled, the first batch). Each figure is the median of
--repeats runs. What replaying the stream instead would cost: scripts/bench/bench_resume.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import tempfile
import time

from absl import app, flags, logging

from configs import quickstart
from flash_jax.train import loop

_STEPS = flags.DEFINE_list("steps", ["10", "3000"], "steps to resume at")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed resumes per figure (the median is shown)")


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


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    root = tempfile.mkdtemp(prefix="bench_resume_loop_")
    cache = os.path.join(root, "jax_cache")
    rows = []
    try:
        for k in [int(s) for s in _STEPS.value]:
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
            for r in range(_REPEATS.value):
                workdir = os.path.join(root, f"resumed_{k}_{r}")
                shutil.copytree(stopped, workdir)
                seconds.append(resume_seconds(config, workdir))
                shutil.rmtree(workdir)
            rows.append((k, statistics.median(seconds), seconds))
            print(f"step {k}: {statistics.median(seconds):.2f} s {seconds}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\nresume start-up (s, median), first resumed step dispatched:")
    print(f"{'step':>8} {'seconds':>8}")
    for k, median, _ in rows:
        print(f"{k:>8} {median:>8.2f}")


if __name__ == "__main__":
    app.run(main)
