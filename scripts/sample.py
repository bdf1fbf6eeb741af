"""Samples text from a trained checkpoint with incremental decoding (`flash_jax.decoding`).

    python scripts/sample.py --workdir=runs/quickstart --prompt="It is a truth universally" \
        --num_tokens=200 --temperature=0.8 --top_k=40 --seed=0

Each sample is the prompt followed by `--num_tokens` sampled tokens (cut at the end-of-document
token), printed through the run's vocabulary. The model is conditioned as in training: position 0
sees the start token (id 0, the shifted-in padding), then the prompt. `--temperature=0` is greedy.
FLASH decodes with its constant-size state past its training length; the other models stop at
model.max_len. Runs on one device (the first); the config defaults to the checkpoint's own.
"""

import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from flash_jax import cli
from flash_jax.cli import console

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (optional; default: the checkpoint's own).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_PROMPT = flags.DEFINE_string("prompt", "", "Text to continue (empty: start a new document).")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 100, "Tokens to sample after the prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Independent samples (one batch).")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show every library's startup lines and INFO logs (TensorFlow, XLA, ...)."
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from flash_jax import decoding
    from flash_jax.train import checkpoint_reader

    logging.set_verbosity(logging.INFO)
    cli.quiet_library_logs("sample.py", verbose=_VERBOSE.value)
    try:
        run = checkpoint_reader.restore(
            _WORKDIR.value, _STEP.value, config=_CONFIG.value, single_device=True
        )
        logging.info(
            "sampling from %s step %d (%s)", _WORKDIR.value, run.step, run.model_config.name
        )
        t0 = time.time()
        texts = decoding.sample_text(
            run,
            _PROMPT.value,
            _NUM_TOKENS.value,
            temperature=_TEMPERATURE.value,
            top_k=_TOP_K.value,
            seed=_SEED.value,
            num_samples=_NUM_SAMPLES.value,
        )
    except ValueError as e:
        cli.fail("sample.py", str(e), 1)
    logging.info(
        "%d x %d tokens in %.1f s (including compilation)",
        _NUM_SAMPLES.value,
        _NUM_TOKENS.value,
        time.time() - t0,
    )
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"----- sample {i}")
        print(text)
    return 0


if __name__ == "__main__":
    console.quiet(sys.argv)  # before TensorFlow and XLA load: their startup lines stay off
    app.run(
        cli.interruptible(main, "sample.py"),
        flags_parser=lambda argv: cli.parse_flags(argv, _CONFIG, "sample.py"),
    )
