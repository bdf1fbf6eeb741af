"""Two processes on this machine (2 CPU devices each, gloo collectives): train.py and eval.py as a
pod slice runs them (flash_jax/train/distributed.py). Every launch starts two JAX processes, so the
checks share launches: one uninterrupted run, one run stopped by SIGTERM and resumed, one eval,
one run whose second process dies. The uninterrupted run gets the distributed flags; the stopped
and resumed ones only what SLURM gives each task (scripts/launch/slurm.sbatch), as on a cluster.
"""

import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from flash_jax import evaluation
from flash_jax.train import checkpoint_reader
from tests.helpers import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT_SECONDS = 10  # a dead process is noticed after this; the survivor exits soon after
# Steps take about 0.05 s here, and the processes agree on a stop step through the coordination
# service about 1 s (10-15 steps) after SIGTERM at step 3: the run needs room to stop before it
# ends (with 12 steps it finished first). 40 leaves over 20 steps of room; more would only
# lengthen the three training launches.
NUM_STEPS = 40
EVAL_BATCH = 64  # eval.py --config.data.batch_size: a few batches cover the validation split

TINY_ARGS = [
    "--config=configs/quickstart.py",
    "--config.model.num_layers=2",
    "--config.model.d_model=32",
    "--config.model.expansion_dim=64",
    "--config.model.qk_dim=16",
    "--config.model.chunk_size=16",
    "--config.model.max_len=32",
    "--config.data.seq_len=32",
    "--config.data.batch_size=8",
    "--config.data.shuffle_buffer=64",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.train.checkpoint_every=1000",
    "--config.train.warmup_steps=5",
]


def slurm_job_id() -> int:
    """A SLURM job id whose coordinator port is free here: JAX's SLURM detection puts process 0's
    coordination service on port 61440 + job id % 4096."""
    for _ in range(100):
        job_id = random.randrange(10**6)
        with socket.socket() as s:
            try:
                s.bind(("localhost", 61440 + job_id % 4096))
                return job_id
            except OSError:
                continue
    raise AssertionError("no free port in 61440-65535 for a SLURM job's coordinator")


def slurm_environment(job_id: int, task: int) -> dict:
    """What SLURM gives task `task` of a job of two tasks on one node (srun), nothing else."""
    return {
        "SLURM_JOB_ID": str(job_id),
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": str(task),
        "SLURM_LOCALID": str(task),
    }


def launch(script, args, logs_dir, name, slurm=False):
    """Processes 0 and 1 of `script`, their output in logs_dir/name.<i>.log; with `slurm`,
    SLURM's environment instead of the distributed flags."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": "2",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    port, job_id = free_port(), slurm_job_id() if slurm else None
    procs, logs = [], []
    for i in range(2):
        log = os.path.join(logs_dir, f"{name}.{i}.log")
        logs.append(log)
        distributed = [
            f"--coordinator_address=localhost:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        ]
        with open(log, "w") as out:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        script,
                        *args,
                        *([] if slurm else distributed),
                        f"--heartbeat_timeout_seconds={HEARTBEAT_SECONDS}",
                    ],
                    cwd=REPO,
                    env={**env, **slurm_environment(job_id, i)} if slurm else env,
                    # train.py: everything in the log; eval.py: results on stdout, the log on stderr
                    stdout=out if script == "train.py" else subprocess.PIPE,
                    stderr=subprocess.STDOUT if script == "train.py" else out,
                )
            )
    return procs, logs


def finish(procs, logs, timeout=300):
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    texts = [open(log).read() for log in logs]
    return codes, texts


def wait_for(log, text, procs, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in open(log).read():
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    for p in procs:
        p.kill()
    raise AssertionError(f"{text!r} never appeared in {log}: {open(log).read()[-3000:]}")


def train(workdir, logs_dir, name, *extra, slurm=False):
    args = [*TINY_ARGS, *extra, f"--workdir={workdir}"]
    return launch("train.py", args, logs_dir, name, slurm)


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow  # four two-process launches
def test_two_processes_train_resume_exactly_and_evaluate_like_one(tmp_path):
    steps = f"--config.train.num_steps={NUM_STEPS}"
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")

    # An uninterrupted run.
    codes, texts = finish(*train(straight, tmp_path, "straight", steps))
    assert codes == [0, 0], texts[0][-3000:] + texts[1][-3000:]

    # Launched as SLURM starts its tasks (no distributed flags), then SIGTERM to both processes,
    # as SLURM preempts a job: they stop at the same step with one checkpoint.
    procs, logs = train(resumed, tmp_path, "stopped", steps, slurm=True)
    wait_for(logs[0], f"step 3/{NUM_STEPS}", procs)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    codes, texts = finish(procs, logs)
    assert codes == [0, 0], texts[0][-3000:] + texts[1][-3000:]
    ckpts = checkpoint_reader.CheckpointReader(resumed)
    stopped = ckpts.latest_step()
    layout = ckpts.read_meta(stopped)["data_layout"]
    ckpts.close()
    assert layout["processes"] == 2
    assert stopped is not None and 3 <= stopped < NUM_STEPS, texts[0][-3000:]
    data_dir = os.path.join(resumed, "checkpoints", str(stopped), "data")
    assert sorted(f for f in os.listdir(data_dir) if f.endswith(".json")) == [
        "data.process_00000-of-00002.json",
        "data.process_00001-of-00002.json",
    ]

    # The rerun resumes there (input streams restored, no replay) and trains exactly as the
    # uninterrupted run: the same programs on the same batches on the same CPU devices.
    codes, texts = finish(*train(resumed, tmp_path, "resume", steps, slurm=True))
    assert codes == [0, 0], texts[0][-3000:] + texts[1][-3000:]
    assert f"resuming from step {stopped} (input stream restored)" in texts[0]
    assert losses(resumed) == losses(straight)
    assert sorted(losses(straight)) == list(range(1, NUM_STEPS + 1))

    # eval.py under two processes: the whole split once, as one process scores it (here, the
    # test's own process on its 8 devices: the same windows in other batches).
    model_args = [a for a in TINY_ARGS if "=configs/" in a or ".model." in a or ".seq_len" in a]
    eval_args = [*model_args, f"--config.data.batch_size={EVAL_BATCH}", f"--workdir={straight}"]
    procs, logs = launch("eval.py", eval_args, tmp_path, "eval")
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    codes, texts = finish(procs, logs)
    assert codes == [0, 0], texts[0][-3000:] + texts[1][-3000:]
    results = [[line for line in out.splitlines() if line.startswith("{")] for out in outputs]
    assert len(results[0]) == 1 and not results[1]  # process 0 reports
    two = json.loads(results[0][0])
    config = checkpoint_reader.restore(straight).config
    config = dataclasses.replace(
        config, data=dataclasses.replace(config.data, batch_size=EVAL_BATCH)
    )
    one = evaluation.evaluate_split(
        checkpoint_reader.restore(straight, config=config), "validation"
    )
    assert two["complete"] and one["complete"]
    assert two["tokens"] == one["tokens"] and two["batches"] == one["batches"]
    # float32 sums of the same per-token losses in another order: relative error of order
    # (number of additions) * 2^-24, about 1e-5 for the few hundred partial sums here.
    np.testing.assert_allclose(two["nll_sum"], one["nll_sum"], rtol=1e-5)
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)


# Two processes that start jax.distributed as train.py and eval.py do, then all-gather in a loop
# until process 1 kills itself (no TensorFlow, no model: a few seconds to start).
DYING = """
import os, signal, sys, types
from flash_jax.train import distributed
flags = dict(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]),
             heartbeat_timeout_seconds=int(sys.argv[3]))
distributed.initialize({k: types.SimpleNamespace(value=v) for k, v in flags.items()})
import numpy as np
from jax.experimental import multihost_utils
for i in range(10**6):
    multihost_utils.process_allgather(np.array(i))
    if i == 20:
        print("all-gathered", flush=True)
        if flags["process_id"] == 1:
            os.kill(os.getpid(), signal.SIGKILL)
"""


# A collective with a peer that died fails at once with gloo's error (a ValueError), before the
# peer watch can tell; `wait_for_dead_peer` gives the watch its time (train.py's error path).
# Process 1 lives 3 s past its last collective, so the watch has seen it stamp.
DYING_IN_A_COLLECTIVE = """
import os, signal, sys, time, types
from flash_jax.train import distributed
flags = dict(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]),
             heartbeat_timeout_seconds=int(sys.argv[3]))
distributed.initialize({k: types.SimpleNamespace(value=v) for k, v in flags.items()})
import numpy as np
from jax.experimental import multihost_utils
try:
    for i in range(10**6):
        multihost_utils.process_allgather(np.array(i))
        if i == 20 and flags["process_id"] == 1:
            print("all-gathered", flush=True)
            time.sleep(3)
            os.kill(os.getpid(), signal.SIGKILL)
except ValueError as e:
    print(f"collective failed: {e}", flush=True)
    distributed.wait_for_dead_peer()
    raise
"""


@pytest.mark.slow  # two JAX processes: about 15 s
def test_a_collective_failing_on_a_dead_peer_ends_with_the_watch_line(tmp_path):
    address = f"localhost:{free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    logs = [str(tmp_path / f"collective.{i}.log") for i in range(2)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as out:
            args = [sys.executable, "-c", DYING_IN_A_COLLECTIVE, address, str(i), "10"]
            procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=out))
    wait_for(logs[1], "all-gathered", procs, timeout=120)
    codes, texts = finish(procs, logs, timeout=60)
    assert codes == [1, -signal.SIGKILL], texts[0][-3000:]
    assert "collective failed" in texts[0] and "Check failure" not in texts[0], texts[0][-3000:]
    assert "error: process 1 of this run of 2 processes died" in texts[0], texts[0][-3000:]


@pytest.mark.slow  # two JAX processes, then up to HEARTBEAT_SECONDS after the kill
def test_a_process_that_dies_stops_the_other_within_the_heartbeat_timeout(tmp_path):
    address = f"localhost:{free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2"}
    logs = [str(tmp_path / f"dies.{i}.log") for i in range(2)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as out:
            args = [sys.executable, "-c", DYING, address, str(i), str(HEARTBEAT_SECONDS)]
            procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=out))
    wait_for(logs[1], "all-gathered", procs, timeout=120)
    assert procs[1].wait(timeout=30) == -signal.SIGKILL
    killed = time.time()
    codes, texts = finish(procs, logs, timeout=HEARTBEAT_SECONDS + 30)
    # Never a hang: the survivor ends, with JAX's one line saying why.
    assert codes[0] != 0 and time.time() - killed < HEARTBEAT_SECONDS + 30
    assert "another task died" in texts[0], texts[0][-3000:]


@pytest.mark.slow  # two train.py processes: about 90 s
def test_a_dead_peer_ends_the_other_trainer_with_one_line_naming_it(tmp_path):
    """Process 1 of a training run is killed: process 0 ends with one line naming process 1, exit
    1, after half the heartbeat timeout (it used to end at the full timeout, aborted by JAX with a
    stack dump, exit -6)."""
    procs, logs = train(str(tmp_path / "run"), tmp_path, "dead", "--config.train.num_steps=100000")
    wait_for(logs[0], "step 3/100000", procs)
    procs[1].kill()
    killed = time.time()
    codes, texts = finish(procs, logs, timeout=HEARTBEAT_SECONDS + 60)
    assert codes == [1, -signal.SIGKILL] and time.time() - killed < HEARTBEAT_SECONDS, texts[0]
    assert "Traceback" not in texts[0] and "Check failure" not in texts[0], texts[0][-3000:]
    last = texts[0].strip().splitlines()[-1]
    assert last.startswith(
        "train.py: error: process 1 of this run of 2 processes died or lost its connection (no "
        "sign of life for 5 s; its log says why); process 0 stopped too."
    ), texts[0][-3000:]
