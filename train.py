"""Trains a FLASH / Transformer language model.

    python train.py --config=configs/quickstart.py --workdir=runs/quickstart
    python train.py --config=configs/pg19_flash.py:8192 --workdir=gs://bucket/pg19_flash_8k \
        --config.train.num_steps=1000

Everything a run writes goes under --workdir (checkpoints/, metrics.jsonl, tensorboard/,
config.json); a run started on a workdir with checkpoints resumes from the latest one.
"""

import logging as std_logging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from configs import base
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


class _QuietLibraries(std_logging.Filter):
    """Keeps Orbax's per-save INFO chatter off the console (warnings still show)."""

    def filter(self, record):
        return (
            record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname
        )


def _error(message: str) -> None:
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv):
    """absl's parser, but a bad flag, config file or override gives one line, no traceback."""
    for arg in argv[1:]:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1].split(":", 1)[0]
            if not os.path.isfile(path):
                _error(f"config file {path!r} does not exist")
    try:
        argv = flags.FLAGS(argv)
        _CONFIG.value.keys()  # loads the config file now, inside the try
    except flags.Error as e:
        # config_flags folds the config file's traceback into the message; its last line says it.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        _error(lines[-1] if lines else repr(e))
    except (AttributeError, KeyError) as e:  # an override of a key the config does not have
        words = re.findall(r"\w+", str(e))
        key = words[0] if words else str(e)
        given = [a.split("=")[0] for a in argv if a.startswith("--config.") and f".{key}" in a]
        hint = re.search(r'Did you mean "(\w+)"', str(e))
        _error(
            f"unknown config key {given[0] if given else key}"
            + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
        )
    except Exception as e:  # noqa: BLE001 - e.g. the config file raises on import
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        _error(f"{type(e).__name__}: {lines[-1] if lines else ''}")
    return argv


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    std_logging.getLogger("absl").addFilter(_QuietLibraries())
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
    app.run(main, flags_parser=_parse_flags)
