"""Trains a FLASH / Transformer language model.

    python train.py --config=configs/quickstart.py --workdir=runs/quickstart
    python train.py --config=configs/pg19_flash.py:8192 --workdir=gs://bucket/pg19_flash_8k \
        --config.train.num_steps=1000

Everything a run writes goes under --workdir (checkpoints/, metrics.jsonl, tensorboard/,
config.json); a run started on a workdir with checkpoints resumes from the latest one.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from configs import base
from flash_jax import cli
from flash_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, optionally with an argument: configs/pg19_flash.py:8192",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for everything the run writes (checkpoints, metrics, config)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    cli.quiet_library_logs("train.py")
    loop.initialize_distributed()
    try:
        summary = loop.train_and_evaluate(
            _CONFIG.value, _WORKDIR.value, reference=base.get_config()
        )
    except (ValueError, loop.NonFiniteLossError) as e:
        # One clear line instead of a traceback: these are the user's input or a diverged run.
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    if summary["status"] == "preempted":
        print(
            f"train.py: stopped by SIGTERM at step {summary['step']}; checkpoint saved in "
            f"{summary['checkpoint_dir']}; rerun the same command to resume",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, _CONFIG, "train.py"))
