"""Passkey retrieval: a five-digit key hidden in filler text at a given depth, asked for at the
end, scored by log-likelihood (no sampling): a trial is retrieved when the true key is the most
likely of it and `--distractors` other keys as the continuation of the prompt.

    python scripts/passkey.py --workdir=runs/long/flash --lengths=1024,4096,16384 \
        --depths=0,0.25,0.5,0.75,1

Per length (tokens of the prompt and key together) and depth (where in the filler the key sits:
0 at the start, 1 just before the question): the share of `--trials` trials retrieved and the
mean log-likelihood margin of the true key over the best distractor (nats). Models whose state
does not grow with the context (FLASH, Performer, Combiner) take any length; the others at most
model.max_len (one line otherwise). Writes `<out>.json` and `<out>.png` (a heat map of the share
retrieved); `--out` defaults to `<workdir>/eval/passkey`.

Keys and distractors come from a seeded generator (`--seed`), so a run is deterministic. Every
candidate of a trial is one row of one batch: the same prompt, then the candidate's tokens.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import flags

from flash_jax import cli
from flash_jax.cli import console

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "Run (its latest checkpoint).", flag_values=FLAGS)
flags.DEFINE_list(
    "lengths", ["1024", "4096", "16384"], "Prompt lengths in tokens.", flag_values=FLAGS
)
flags.DEFINE_list(
    "depths", ["0", "0.25", "0.5", "0.75", "1"], "Key depths in [0, 1].", flag_values=FLAGS
)
flags.DEFINE_integer("trials", 4, "Keys per length and depth.", flag_values=FLAGS)
flags.DEFINE_integer(
    "distractors", 4, "Wrong keys scored against each true key.", flag_values=FLAGS
)
flags.DEFINE_integer("seed", 0, "Seed of the keys.", flag_values=FLAGS)
flags.DEFINE_string(
    "out", "", "Output path stem (default <workdir>/eval/passkey).", flag_values=FLAGS
)

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and remember it. "
)
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


def prompt_tokens(encode, length: int, depth: float, key: str, key_len: int) -> list[int]:
    """Intro, filler with the needle after `depth` of it, question: `length - key_len` tokens
    (the repeated filler cut to fit)."""
    fixed = len(encode(INTRO)) + len(encode(NEEDLE.format(key=key))) + len(encode(QUESTION))
    room = length - key_len - fixed
    filler_unit = encode(FILLER)
    if room < 0:
        raise ValueError(
            f"--lengths: {length} tokens cannot hold the prompt (at least {fixed + key_len})"
        )
    filler = (filler_unit * (room // len(filler_unit) + 1))[:room]
    cut = int(round(depth * room))
    tokens = (
        encode(INTRO)
        + filler[:cut]
        + encode(NEEDLE.format(key=key))
        + filler[cut:]
        + encode(QUESTION)
    )
    return tokens


def trial_batch(encode, length: int, depth: float, keys: list[str]):
    """Rows (the true key first) of prompt + candidate, inputs starting with 0 as in training,
    and weights on the candidate's tokens: (inputs, targets, weights) [K, T]."""
    candidates = [encode(" " + k) for k in keys]
    width = max(len(c) for c in candidates)
    prompt = prompt_tokens(encode, length, depth, keys[0], width)
    rows = [prompt + c for c in candidates]
    T = max(len(r) for r in rows)
    inputs = np.zeros((len(rows), T), np.int32)
    targets = np.zeros((len(rows), T), np.int32)
    weights = np.zeros((len(rows), T), np.float32)
    for i, row in enumerate(rows):
        inputs[i, 1 : len(row)] = row[:-1]
        targets[i, : len(row)] = row
        weights[i, len(prompt) : len(row)] = 1.0
    return inputs, targets, weights


def score_rows(model, inputs, targets, weights) -> np.ndarray:
    """Summed log-likelihood of each row's weighted tokens. Logits only where the candidates
    are (from the first weighted position on): [K, 16K, vocab] float32 logits would not fit."""
    import jax
    import jax.numpy as jnp

    from flash_jax.layers.basic import float32_logits

    start = int(np.argmax(weights.any(axis=0)))
    hidden = model.hidden(jnp.asarray(inputs))[:, start:]
    logits = float32_logits(hidden, model.head_kernel(hidden.dtype))
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.asarray(targets[:, start:])[..., None], axis=-1)
    return np.asarray(jnp.sum(picked[..., 0] * weights[:, start:], axis=-1), np.float64)


def check_lengths(model_cfg, lengths: list[int]) -> None:
    from flash_jax import long_context

    too_long = [n for n in lengths if n > model_cfg.max_len]
    if model_cfg.name in long_context.GROWING_CACHE and too_long:
        raise ValueError(
            f"--lengths {too_long} exceed model.max_len {model_cfg.max_len} of {model_cfg.name}, "
            "whose cache grows with the context"
        )


def run_probe(
    run, lengths: list[int], depths: list[float], trials: int, distractors: int, seed: int
):
    """{"accuracy": [length][depth], "margin": [length][depth], ...} for a restored run."""
    import jax

    from flash_jax import data

    vocab = data.get_vocabulary(run.config.data)
    encode = lambda text: list(vocab.encode(text))  # noqa: E731
    rng = np.random.default_rng(seed)
    model = run.model()
    accuracy, margin = [], []
    with jax.set_mesh(run.fns.mesh):
        for length in lengths:
            acc_row, margin_row = [], []
            for depth in depths:
                hits, margins = 0, []
                for _ in range(trials):
                    keys = [
                        str(k) for k in rng.choice(90000, distractors + 1, replace=False) + 10000
                    ]
                    ll = score_rows(model, *trial_batch(encode, length, depth, keys))
                    hits += int(ll[0] > ll[1:].max())
                    margins.append(float(ll[0] - ll[1:].max()))
                acc_row.append(hits / trials)
                margin_row.append(float(np.mean(margins)))
                print(f"length {length} depth {depth}: {hits}/{trials} retrieved", flush=True)
            accuracy.append(acc_row)
            margin.append(margin_row)
    return {
        "workdir": run.workdir,
        "model": run.model_config.name,
        "step": run.step,
        "lengths": lengths,
        "depths": depths,
        "trials": trials,
        "distractors": distractors,
        "seed": seed,
        "accuracy": accuracy,
        "margin": margin,
        "chance": 1 / (distractors + 1),
    }


def heat_map(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = np.array(report["accuracy"])
    fig, ax = plt.subplots(
        figsize=(1.2 * len(report["depths"]) + 2, 0.8 * len(report["lengths"]) + 1.5)
    )
    ax.imshow(acc, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(report["depths"])), [f"{d:g}" for d in report["depths"]])
    ax.set_yticks(range(len(report["lengths"])), [f"{n:,}" for n in report["lengths"]])
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            ax.text(
                j,
                i,
                f"{acc[i, j]:.2f}",
                ha="center",
                va="center",
                color="w" if acc[i, j] < 0.6 else "k",
            )
    ax.set_xlabel("depth of the key")
    ax.set_ylabel("prompt length (tokens)")
    ax.set_title(
        f"passkey retrieved ({report['model']}, chance {report['chance']:.2f})", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=()) -> dict:
    args = cli.parse_script_flags(FLAGS, argv, "passkey.py")
    try:
        lengths = [int(n) for n in args.lengths]
        depths = [float(d) for d in args.depths]
    except ValueError:
        cli.fail("passkey.py", "--lengths must be integers and --depths numbers", 2)
    if not args.workdir:
        cli.fail("passkey.py", "--workdir is required", 2)
    if not all(0 <= d <= 1 for d in depths):
        cli.fail("passkey.py", f"--depths must lie in [0, 1], got {depths}", 2)
    if args.trials < 1 or args.distractors < 1:
        cli.fail("passkey.py", "--trials and --distractors must be >= 1", 2)
    from flash_jax import runs
    from flash_jax.train import checkpoint_reader

    try:
        run = checkpoint_reader.restore(args.workdir)
        check_lengths(run.model_config, lengths)
        report = run_probe(run, lengths, depths, args.trials, args.distractors, args.seed)
    except ValueError as e:
        cli.fail("passkey.py", str(e), 1)
    stem = args.out or os.path.join(args.workdir, runs.EVAL_DIR, "passkey")
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as f:
        f.write(runs.to_json(report, indent=2))
    heat_map(report, stem + ".png")
    print(runs.to_json(report))
    print(f"wrote {stem}.json, {stem}.png", file=sys.stderr)
    return report


if __name__ == "__main__":
    console.quiet(sys.argv)
    cli.run_script(main, FLAGS)
