"""Evaluates trained checkpoints on a whole split: loss, perplexity, bits per byte, PG-19 word ppl.

    python eval.py --workdir=runs/quickstart                      # latest checkpoint, validation
    python eval.py --workdir=runs/quickstart --split=test --step=400
    python eval.py --workdir=runs/flash,runs/tfm_pp --all_steps   # every kept checkpoint + a plot
    python eval.py --config=configs/quickstart.py --workdir=runs/quickstart \
        --config.data.batch_size=32 --max_batches=10
    python eval.py --workdir=runs/flash --context=16384 --plot=by_position.png   # long windows
    python eval.py --workdir=runs/tfm_pp --context=2048 --stride=512              # sliding
    python eval.py --workdir=runs/flash --whole_documents                         # state carried

The config defaults to the one saved with each checkpoint (so several runs of different models can
be compared in one call); `--config` (with `--config.*` overrides) replaces it, and must describe
the checkpoint's model. Every window of every document is scored once (`--max_batches` stops
early: then bits per byte and word perplexity, which need the whole split, are null).

Windows (flash_jax.long_context): `--context=N` cuts every document into consecutive windows of N
tokens (default: the training length, today's windows), each scored alone; FLASH, Performer and
Combiner take any N, the models whose cache grows (Transformers, FLASH-Quad) at most model.max_len,
past which `--stride=S` scores sliding windows of N tokens advancing by S (each token with at
least N - S before it). `--whole_documents` (FLASH, Performer, Combiner) scores each document as
one stream, N tokens at a time with the layers' state carried (constant for FLASH and Performer;
Combiner's grows as N / C, one summary per span). Every result has `loss_by_position` (buckets
doubling from the chunk size, or `--bucket=W` wide) and its settings (context, stride,
whole_documents, bucket); without --all_steps, `--plot=PATH` draws perplexity by position, one line
per workdir.

Output: progress on stderr; per checkpoint a summary line and a JSON object on stdout (the last line
printed is the last JSON object), also recorded in `<workdir>/eval/results.jsonl` (one record per
step and settings: the scoring flags, --split, --max_batches, ..., and the data read, in its
"settings") and written as scalars at the checkpoint's step into the run's TensorBoard
(`eval_py/<split>/perplexity`, ...; `eval_py/<split>_first<N>batches/...` with --max_batches). With
`--all_steps`, a PNG of perplexity against step (and training time, from metrics.jsonl) with one
line per workdir: `<workdir>/eval/perplexity_<split>.png` for one workdir, the first workdir's
`eval/compare_<split>.png` for several, or `--plot=PATH`. A step already scored with the same
settings is not scored again: its recorded result is printed (`--rescore` scores it again and
replaces the record). The result is printed before it is recorded: a workdir that cannot be
written gets one warning line, and the result stays on stdout. On a run that is still training
(saving and pruning), a step removed while it is read is skipped (--all_steps) or replaced by the
newest committed one; it is never reported as damaged. Bad input (no checkpoint, unknown step,
a config of another model, a split the dataset lacks, a damaged checkpoint asked for by --step)
gives one line on stderr and exit code 1, and leaves every workdir unchanged. A damaged latest
checkpoint is reported in one line and the newest intact one is evaluated; --all_steps skips
damaged ones (see flash_jax/train/checkpoint_reader.py for what is checked). Several processes:
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` on each (as for train.py);
every process reads its share of the split, process 0 prints and writes the result.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from flash_jax import cli
from flash_jax.cli import console
from flash_jax.train import distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file (optional; default: the config saved with each checkpoint).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_list(
    "workdir", None, "Run directory, or several separated by commas (compared on one plot)."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
_ALL_STEPS = flags.DEFINE_bool(
    "all_steps", False, "Evaluate every kept checkpoint and plot perplexity against step."
)
_SPLIT = flags.DEFINE_string("split", "validation", "Split to evaluate (validation, test, ...).")
_MAX_BATCHES = flags.DEFINE_integer(
    "max_batches", None, "Stop after this many batches (default: the whole split)."
)
_PLOT = flags.DEFINE_string(
    "plot",
    "",
    "Where the PNG goes: --all_steps's, or else perplexity by position (default: see above).",
)
_RESCORE = flags.DEFINE_bool(
    "rescore", False, "Score steps already scored with the same settings again (else reused)."
)
_CONTEXT = flags.DEFINE_integer(
    "context", None, "Window length in tokens (default: the training length)."
)
_STRIDE = flags.DEFINE_integer(
    "stride", None, "Sliding windows of --context tokens advancing by this many."
)
_WHOLE_DOCUMENTS = flags.DEFINE_bool(
    "whole_documents",
    False,
    "Each document one stream, the state carried (FLASH, Performer; Combiner's grows as N / C).",
)
_BUCKET = flags.DEFINE_integer(
    "bucket", None, "Equal position buckets of this width (default: doubling from the chunk)."
)
_DISTRIBUTED = distributed.define_flags()
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show every library's startup lines and INFO logs (TensorFlow, XLA, ...)."
)
flags.mark_flags_as_required(["workdir"])


def _error(message: str, code: int = 1):
    cli.fail("eval.py", message, code)


# eval.py's flags that do not change a score; every other flag it defines is a scoring setting,
# recorded with each result (a result is reused only for the same settings).
NOT_SCORING = ("config", "workdir", "step", "all_steps", "plot", "verbose", "rescore")


def _scoring_flags() -> dict:
    module = flags.FLAGS.find_module_defining_flag(_SPLIT.name)  # this file, however started
    return {
        f.name: f.value
        for f in flags.FLAGS.get_flags_for_module(module)
        if f.name not in NOT_SCORING
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    if _ALL_STEPS.value and _STEP.value is not None:
        _error("--step and --all_steps exclude each other")
    if _MAX_BATCHES.value is not None and _MAX_BATCHES.value < 1:
        _error(f"--max_batches must be >= 1, got {_MAX_BATCHES.value}")
    workdirs = [w for w in _WORKDIR.value if w]
    if not workdirs:
        _error("--workdir is empty")
    for flag in (_CONTEXT, _STRIDE, _BUCKET):
        if flag.value is not None and flag.value < 1:
            _error(f"--{flag.name} must be >= 1, got {flag.value}")

    try:
        distributed.initialize(_DISTRIBUTED)
    except ValueError as e:
        _error(str(e))
    cli.quiet_library_logs("eval.py", verbose=_VERBOSE.value)
    # Imported here: the flags above fail without paying for JAX, Orbax and TensorFlow.
    from flash_jax import evaluation, long_context

    request = evaluation.Request(
        workdirs=workdirs,
        split=_SPLIT.value,
        windows=long_context.Settings(
            _CONTEXT.value, _STRIDE.value, _WHOLE_DOCUMENTS.value, _BUCKET.value
        ),
        scoring_flags=_scoring_flags(),
        config=_CONFIG.value,
        step=_STEP.value,
        all_steps=_ALL_STEPS.value,
        max_batches=_MAX_BATCHES.value,
        rescore=_RESCORE.value,
        plot=_PLOT.value,
    )
    try:
        evaluation.evaluate_runs(request)
    except Exception as e:
        distributed.wait_for_dead_peer()  # several processes: a dead peer is named in one line
        if not isinstance(e, ValueError):
            raise
        _error(str(e))
    return 0


if __name__ == "__main__":
    console.quiet(sys.argv)  # before TensorFlow and XLA load: their startup lines stay off
    app.run(
        cli.interruptible(main, "eval.py"),
        flags_parser=lambda argv: cli.parse_flags(argv, _CONFIG, "eval.py"),
    )
