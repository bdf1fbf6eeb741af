"""The launch files (docs/launch.md): `make launch-tpu` prints well-formed gcloud and xpk commands
for a config and a slice, without touching the network; the SLURM batch file and the printed
restart loop are valid bash. (Two processes started with SLURM's environment alone train, stop and
resume in tests/test_multiprocess.py; the two-slice mesh compiles in tests/test_tpu_compile.py.)
"""

import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GCLOUD_QR = ["gcloud", "compute", "tpus", "queued-resources"]


def make_launch_tpu(*args):
    # -o: the environment exists (a worktree's .venv may look older than its pyproject.toml).
    command = ["make", "-s", "-o", ".venv/.installed", "launch-tpu", f"PY={sys.executable}"]
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run(
        [*command, "ARGS=" + " ".join(args)], cwd=REPO, env=env, capture_output=True, text=True
    )


def flags_of(words: list[str]) -> dict:
    return dict(w[2:].split("=", 1) for w in words if w.startswith("--") and "=" in w)


@pytest.mark.slow  # make, then the config loaded: 5 s alone, 30 s on a shared CPU
def test_make_launch_tpu_prints_the_commands_for_a_config_on_two_slices():
    proc = make_launch_tpu(
        "--config=configs/quickstart.py",
        "--config.train.num_steps=300",
        "--accelerator=v5litepod-16",
        "--num_slices=2",
        "--workdir=gs://bucket/run",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    # The restart loop and every line in it parse as bash; nothing ran (no gcloud here).
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    lines = [shlex.split(line) for line in text.splitlines() if line and not line.startswith("#")]
    (create,) = [w for w in lines if w[:5] == GCLOUD_QR + ["create"]]
    assert flags_of(create) == {
        "project": "PROJECT",
        "zone": "ZONE",
        "accelerator-type": "v5litepod-16",
        "runtime-version": "v2-alpha-tpuv5-lite",
        "node-count": "2",
        "node-prefix": "flash-jax",
    }
    assert lines[0][:4] == ["until", "gcloud", "storage", "ls"]
    assert lines[0][4] == "gs://bucket/run/checkpoints/300"  # the run's last checkpoint

    ssh = [w for w in lines if w[:5] == GCLOUD_QR + ["ssh"]]
    setup, train = (flags_of(w)["command"] for w in ssh)
    assert 'pip install -e . "jax[tpu]==' in setup
    train_words = shlex.split(train)
    assert train_words[:5] == ["cd", "flash-jax", "&&", "python", "train.py"]
    expected_train = {
        "config": "configs/quickstart.py",
        "config.train.num_steps": "300",
        "config.mesh.num_slices": "2",
        "workdir": "gs://bucket/run",
    }
    assert flags_of(train_words) == expected_train

    (xpk,) = [w for w in lines if w[:3] == ["xpk", "workload", "create"]]
    xpk_flags = flags_of(xpk)
    assert xpk_flags["tpu-type"] == "v5litepod-16" and xpk_flags["num-slices"] == "2"
    assert xpk_flags["docker-image"] == "IMAGE"
    assert flags_of(shlex.split(xpk_flags["command"])) == expected_train
    assert "docker build --build-arg ACCELERATOR=tpu -t IMAGE ." in text


@pytest.mark.slow  # as above
def test_bad_launch_arguments_are_one_line():
    proc = make_launch_tpu(
        "--config=configs/quickstart.py", "--accelerator=v9-8", "--workdir=gs://b/r"
    )
    assert proc.returncode != 0 and not proc.stdout
    (line,) = [x for x in proc.stderr.splitlines() if "tpu_commands.py: error:" in x]
    assert "--accelerator 'v9-8' is none of v4-N, v5litepod-N, v5p-N, v6e-N" in line


def test_the_slurm_batch_file_is_bash_with_one_task_per_gpu_and_requeue():
    path = os.path.join(REPO, "scripts", "launch", "slurm.sbatch")
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    directives = [line.split()[1] for line in open(path) if line.startswith("#SBATCH")]
    assert "--gpus-per-task=1" in directives and "--requeue" in directives
    assert any(d.startswith("--ntasks-per-node=") for d in directives)
