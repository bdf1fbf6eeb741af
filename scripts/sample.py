"""Samples text from a trained checkpoint with incremental decoding (`flash_jax.decoding`).

    python scripts/sample.py --workdir=runs/quickstart --prompt="It is a truth universally" \
        --num_tokens=200 --temperature=0.8 --top_k=40 --seed=0

Each sample is the prompt followed by `--num_tokens` sampled tokens (cut at the end-of-document
token), printed through the run's vocabulary. The model is conditioned as in training: position 0
sees the start token (id 0, the shifted-in padding), then the prompt. `--temperature=0` is greedy.
FLASH decodes with its constant-size state past its training length; the other models stop at
model.max_len. Runs on one device (the first); the config defaults to the checkpoint's own.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from flash_jax import cli  # noqa: E402

START_ID = 0  # training inputs start every document (and window) with 0: see pack_windows


def define_flags():
    config = config_flags.DEFINE_config_file(
        "config", None, "Config file (optional; default: the checkpoint's own).", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("prompt", "", "Text to continue (empty: start a new document).")
    flags.DEFINE_integer("num_tokens", 100, "Tokens to sample after the prompt.")
    flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 is greedy.")
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("num_samples", 1, "Independent samples (one batch).")
    flags.mark_flags_as_required(["workdir"])
    return config


def sample_text(
    run,
    prompt: str,
    num_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    num_samples: int = 1,
) -> list[str]:
    """Prompt + sampled continuation of a restored run (`checkpoint.restore`), one per sample."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flash_jax import data, decoding

    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    vocab = data.get_vocabulary(run.config.data)
    prompt_ids = [START_ID] + list(vocab.encode(prompt))
    prompt_BP = jnp.tile(jnp.asarray(prompt_ids, jnp.int32)[None], (num_samples, 1))
    with jax.set_mesh(run.fns.mesh):
        tokens_BT, _ = decoding.generate(
            run.model(),
            prompt_BP,
            num_tokens,
            key=jax.random.key(seed),
            temperature=temperature,
            top_k=top_k,
        )
    texts = []
    for row in np.asarray(tokens_BT):
        new = row[len(prompt_ids) :].tolist()
        if vocab.eos_id in new:  # the end of a document: what follows belongs to no text
            new = new[: new.index(vocab.eos_id)]
        texts.append(vocab.decode(prompt_ids[1:] + new))
    return texts


def main(argv, config_flag):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    FLAGS = flags.FLAGS
    from flash_jax.train import checkpoint

    logging.set_verbosity(logging.INFO)
    cli.quiet_library_logs("sample.py")

    try:
        run = checkpoint.restore(
            FLAGS.workdir, FLAGS.step, config=config_flag.value, single_device=True
        )
        logging.info(
            "sampling from %s step %d (%s)", FLAGS.workdir, run.step, run.model_config.name
        )
        t0 = time.time()
        texts = sample_text(
            run,
            FLAGS.prompt,
            FLAGS.num_tokens,
            temperature=FLAGS.temperature,
            top_k=FLAGS.top_k,
            seed=FLAGS.seed,
            num_samples=FLAGS.num_samples,
        )
    except ValueError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 1
    seconds = time.time() - t0
    logging.info(
        "%d x %d tokens in %.1f s (including compilation)",
        FLAGS.num_samples,
        FLAGS.num_tokens,
        seconds,
    )
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"----- sample {i}")
        print(text)
    return 0


if __name__ == "__main__":
    _config = define_flags()
    app.run(lambda argv: main(argv, _config))
