"""Prints (never runs) the commands that train a config on Cloud TPU slices: queued resources
with gcloud, or a GKE cluster with xpk. docs/launch.md explains each step.

    make launch-tpu ARGS="--config=configs/pg19_flash.py:8192 --accelerator=v5litepod-16 \\
        --num_slices=2 --workdir=gs://BUCKET/pg19_flash_8k"

`--config.key=value` overrides are checked here (a bad one is one line, as train.py says it) and
passed on to train.py. With `--num_slices` > 1 the slices are joined by DCN and the config's data
axis spans them (`mesh.num_slices`). Nothing here touches the network.
"""

from __future__ import annotations

import importlib.metadata
import shlex
import sys

from absl import app, flags
from ml_collections import config_flags

from flash_jax import cli
from flash_jax.config import RunConfig

PROGRAM = "tpu_commands.py"
# The TPU VM image of each generation (accelerator types start with these prefixes).
RUNTIME_BY_PREFIX = {
    "v4-": "tpu-ubuntu2204-base",
    "v5litepod-": "v2-alpha-tpuv5-lite",
    "v5p-": "v2-alpha-tpuv5",
    "v6e-": "v2-alpha-tpuv6e",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run config to train.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "gs://BUCKET/RUN: every worker reads and writes it."
)
_ACCELERATOR = flags.DEFINE_string("accelerator", None, "One slice: v5litepod-16, v5p-128, ...")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined by DCN (multi-slice).")
_NAME = flags.DEFINE_string("name", "flash-jax", "The queued resource / xpk workload name.")
_PROJECT = flags.DEFINE_string("project", "PROJECT", "Google Cloud project.")
_ZONE = flags.DEFINE_string("zone", "ZONE", "Zone of the slices.")
_SPOT = flags.DEFINE_bool("spot", False, "Spot slices (cheaper, preemptible).")
_REPO = flags.DEFINE_string("repo", "REPO_URL", "git URL of this project, cloned on each worker.")
_CLUSTER = flags.DEFINE_string("cluster", "CLUSTER", "xpk: the GKE cluster.")
_IMAGE = flags.DEFINE_string("image", "IMAGE", "xpk: the container image (see Dockerfile).")
_MAX_RESTARTS = flags.DEFINE_integer("max_restarts", 10, "xpk: restarts after a failure.")
flags.mark_flags_as_required(["config", "workdir", "accelerator"])


def train_command(argv: list[str], num_slices: int) -> str:
    """train.py with this script's --config and its overrides (as given), on every worker."""
    config_args = [a for a in argv[1:] if a.startswith("--config")]
    if num_slices > 1:
        config_args.append(f"--config.mesh.num_slices={num_slices}")
    args = [*config_args, f"--workdir={_WORKDIR.value}"]
    return "python train.py " + " ".join(shlex.quote(a) for a in args)


def queued_resource_lines(runtime: str, train: str, last_checkpoint: str) -> list[str]:
    name, num_slices = _NAME.value, _NUM_SLICES.value
    where = f"--project={_PROJECT.value} --zone={_ZONE.value}"
    if num_slices == 1:
        nodes = f"--node-id={name}"
    else:
        nodes = f"--node-count={num_slices} --node-prefix={name}"
    spot = " --spot" if _SPOT.value else ""
    ssh = f"gcloud compute tpus queued-resources ssh {name} {where} --node=all --worker=all"
    jax_version = importlib.metadata.version("jax")
    setup = (
        f"git clone {_REPO.value} flash-jax || git -C flash-jax pull; "
        f'cd flash-jax && pip install -e . "jax[tpu]=={jax_version}"'
    )
    return [
        "# Queued resources: the slice(s), the setup on every worker, training (the same command",
        "# on every worker: jax.distributed starts itself); after a preemption (a preempted slice",
        "# is not given back) again from the start, and train.py resumes from the workdir, until",
        "# the last checkpoint is there.",
        f"until gcloud storage ls {last_checkpoint} >/dev/null 2>&1; do",
        f"  gcloud compute tpus queued-resources delete {name} {where} --force --quiet || true",
        f"  gcloud compute tpus queued-resources create {name} {where} "
        f"--accelerator-type={_ACCELERATOR.value} --runtime-version={runtime} {nodes}{spot}",
        f"  until gcloud compute tpus queued-resources describe {name} {where} "
        f"--format='value(state.state)' | grep -qx ACTIVE; do sleep 60; done",
        f"  {ssh} --command={shlex.quote(setup)}",
        f"  {ssh} --command={shlex.quote('cd flash-jax && ' + train)}",
        "done",
    ]


def xpk_lines(train: str) -> list[str]:
    return [
        "# GKE with xpk: the image (Dockerfile), then the workload on the cluster's TPU slices",
        f"docker build --build-arg ACCELERATOR=tpu -t {_IMAGE.value} . && "
        f"docker push {_IMAGE.value}",
        f"xpk workload create --cluster={_CLUSTER.value} --project={_PROJECT.value} "
        f"--zone={_ZONE.value} --workload={_NAME.value} --docker-image={_IMAGE.value} "
        f"--tpu-type={_ACCELERATOR.value} --num-slices={_NUM_SLICES.value} "
        f"--max-restarts={_MAX_RESTARTS.value} --command={shlex.quote(train)}",
    ]


def main(argv):
    if len(argv) > 1:
        cli.fail(PROGRAM, f"unexpected arguments {argv[1:]}", 2)
    runtime = next(
        (r for p, r in RUNTIME_BY_PREFIX.items() if _ACCELERATOR.value.startswith(p)), None
    )
    if runtime is None:
        known = ", ".join(p + "N" for p in RUNTIME_BY_PREFIX)
        cli.fail(PROGRAM, f"--accelerator {_ACCELERATOR.value!r} is none of {known}", 2)
    if not _WORKDIR.value.startswith("gs://"):
        cli.fail(
            PROGRAM, f"--workdir must be gs://... (every worker uses it), got {_WORKDIR.value!r}", 2
        )
    try:
        if _NUM_SLICES.value < 1:
            raise ValueError(f"--num_slices must be >= 1, got {_NUM_SLICES.value}")
        config = RunConfig.from_config(_CONFIG.value)
    except ValueError as e:
        cli.fail(PROGRAM, str(e), 2)
    train = train_command(sys.argv, _NUM_SLICES.value)
    last_checkpoint = f"{_WORKDIR.value.rstrip('/')}/checkpoints/{config.train.num_steps}"
    print(
        "\n".join([*queued_resource_lines(runtime, train, last_checkpoint), "", *xpk_lines(train)])
    )
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, _CONFIG, PROGRAM))
