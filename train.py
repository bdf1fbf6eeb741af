"""Trains a FLASH / Transformer language model.

    python train.py --config=configs/quickstart.py --workdir=runs/quickstart
    python train.py --config=configs/pg19_flash.py:8192 --workdir=gs://bucket/pg19_flash_8k \
        --config.train.num_steps=1000

Everything a run writes goes under --workdir (checkpoints/, metrics.jsonl, tensorboard/,
config.json, and LOCK while it runs); a run started on a workdir with checkpoints resumes from the
newest intact one. SIGTERM or Ctrl-C save a checkpoint of the step in flight and exit 0; a
second Ctrl-C exits at once. Several processes: `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I` on each (JAX's cluster detection is the default on TPU pods and SLURM; see
flash_jax/train/distributed.py and the README's "Pod-scale runs"). Errors (bad input, a workdir in
use, divergence, a failed save) are one line on stderr and exit code 1. Every run ends with a
summary on stderr (final train and eval figures, the checkpoint, the eval / sample / TensorBoard
commands); a finished run rerun says so and returns without compiling. Library startup lines are
filtered out (flash_jax/cli/console.py); --verbose shows them.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from flash_jax import cli
from flash_jax.cli import console
from flash_jax.train import (
    distributed,
    signals,  # light: JAX and TensorFlow are imported in main()
)

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, optionally with an argument: configs/pg19_flash.py:8192",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for everything the run writes (checkpoints, metrics, config)."
)
_DISTRIBUTED = distributed.define_flags()
_VERBOSE = flags.DEFINE_bool(
    "verbose",
    False,
    "Show every library's startup lines and INFO logs (TensorFlow, XLA, CUDA probes, Orbax).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    cli.quiet_library_logs("train.py", verbose=_VERBOSE.value)
    import jax

    from flash_jax.config import RunConfig
    from flash_jax.train import checkpoint, loop, report

    try:
        distributed.initialize(_DISTRIBUTED)
        config = RunConfig.from_config(_CONFIG.value)
        summary = loop.train_and_evaluate(config, _WORKDIR.value)
    except Exception as e:
        # Several processes: a collective with a peer that died fails at once (gloo's error is a
        # ValueError); the peer watch then ends this process with one line naming the peer.
        distributed.wait_for_dead_peer()
        if not isinstance(
            e, (ValueError, report.NonFiniteLossError, checkpoint.CheckpointSaveError)
        ):
            raise
        # One clear line instead of a traceback: the user's input, a workdir in use or damaged,
        # a diverged run, a checkpoint that could not be saved.
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    message = ""
    if jax.process_index() == 0:
        # On stderr, after the log lines it follows (stdout is not ordered with them).
        message = report.run_summary(summary, _WORKDIR.value, config)
    if jax.process_count() > 1:  # the others wait for this one at jax.distributed's shutdown
        if message:
            print(message, file=sys.stderr, flush=True)
        return 0
    # Everything the run writes is closed: the teardown of TensorFlow's and XLA's threads would
    # only delay the exit (seconds; a preemption grants a bounded time).
    signals.exit_now(0, message)


if __name__ == "__main__":
    # Before anything slow (the config files import JAX): a Ctrl-C or SIGTERM from here on stops
    # the run cleanly, never with a KeyboardInterrupt traceback (flash_jax/train/signals.py).
    console.quiet(sys.argv)  # before TensorFlow and XLA load: their startup lines stay off
    with signals.stop_requests("train.py"):
        app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, _CONFIG, "train.py"))
