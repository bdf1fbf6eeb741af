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
least N - S before it). `--whole_documents` (FLASH) scores each document as one stream, N tokens at
a time with the cross-chunk state carried. Every result has `loss_by_position` (buckets doubling
from the chunk size, or `--bucket=W` wide) and its settings (context, stride, whole_documents,
bucket); without --all_steps, `--plot=PATH` draws perplexity by position, one line per workdir.

Output: progress on stderr; per checkpoint a summary line and a JSON object on stdout (the last line
printed is the last JSON object), also appended to `<workdir>/eval/results.jsonl` and written as
scalars at the checkpoint's step into the run's TensorBoard (`eval_py/<split>/perplexity`, ...;
`eval_py/<split>_first<N>batches/...` with --max_batches). With
`--all_steps`, a PNG of perplexity against step (and training time, from metrics.jsonl) with one
line per workdir: `<workdir>/eval/perplexity_<split>.png` for one workdir, the first workdir's
`eval/compare_<split>.png` for several, or `--plot=PATH`. Bad input (no checkpoint, unknown step,
a config of another model, a split the dataset lacks, a damaged checkpoint asked for by --step)
gives one line on stderr and exit code 1, and leaves every workdir unchanged. A damaged latest
checkpoint is reported in one line and the newest intact one is evaluated; --all_steps skips
damaged ones (see flash_jax/train/checkpoint.py for what is checked). Several processes:
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` on each (as for train.py);
every process reads its share of the split, process 0 prints and writes the result.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from flash_jax import cli, console, distributed

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
_CONTEXT = flags.DEFINE_integer(
    "context", None, "Window length in tokens (default: the training length)."
)
_STRIDE = flags.DEFINE_integer(
    "stride", None, "Sliding windows of --context tokens advancing by this many."
)
_WHOLE_DOCUMENTS = flags.DEFINE_bool(
    "whole_documents", False, "Each document one stream, the state carried (FLASH)."
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


def _summary(result: dict) -> str:
    windows = f"context {result['context']}" + (
        f", stride {result['stride']}" if result["stride"] is not None else ""
    )
    if result["whole_documents"]:
        windows = f"whole documents, windows of {result['context']}"
    parts = [
        f"{result['workdir']} step {result['step']} {result['split']} ({windows}): "
        f"{result['tokens']:,} tokens, loss {result['loss']:.4f}, "
        f"perplexity {result['perplexity']:.3f}"
    ]
    if result.get("bits_per_byte") is not None:
        parts.append(f"{result['bits_per_byte']:.4f} bits/byte ({result['bytes']:,} bytes)")
    if result.get("word_perplexity") is not None:
        parts.append(
            f"{result['words']:,} words, word-level perplexity {result['word_perplexity']:.3f}"
        )
    if not result["complete"]:
        parts.append(f"partial: first {result['batches']} batches")
    return ", ".join(parts)


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
    if _CONTEXT.value is not None and _CONTEXT.value < 1:
        _error(f"--context must be >= 1, got {_CONTEXT.value}")
    if _STRIDE.value is not None and _STRIDE.value < 1:
        _error(f"--stride must be >= 1, got {_STRIDE.value}")
    if _BUCKET.value is not None and _BUCKET.value < 1:
        _error(f"--bucket must be >= 1, got {_BUCKET.value}")

    try:
        distributed.initialize(_DISTRIBUTED)
    except ValueError as e:
        _error(str(e))
    # Imported here: the flags above fail without paying for JAX / Orbax.
    import jax

    from flash_jax.train import checkpoint, report

    is_main = jax.process_index() == 0  # several processes: process 0 reports and writes

    cli.quiet_library_logs("eval.py", verbose=_VERBOSE.value)

    # ---- resolve every workdir, step and config first: bad input changes nothing anywhere
    jobs = []  # (workdir, checkpoints, [steps])
    try:
        for workdir in workdirs:
            ckpts = checkpoint.Checkpoints(workdir, read_only=True)
            steps = checkpoint.steps_to_evaluate(
                ckpts, _STEP.value, _ALL_STEPS.value, _CONFIG.value
            )
            jobs.append((workdir, ckpts, steps))
        configs = [checkpoint.run_config(c, steps[-1], _CONFIG.value) for _, c, steps in jobs]
        # TensorFlow (the data pipeline): imported once the cheaper checks have passed.
        from flash_jax import data, evaluation, long_context, results

        settings = long_context.Settings(
            _CONTEXT.value, _STRIDE.value, _WHOLE_DOCUMENTS.value, _BUCKET.value
        )
        for config in configs:
            long_context.check(settings, config.model, config.data.seq_len)
            long_context.check_one_process(settings)
            data.check_data(config.data, [_SPLIT.value])
    except ValueError as e:
        _error(str(e))

    # ---- evaluate
    curves, lasts = [], []
    try:
        for workdir, ckpts, steps in jobs:
            result = None
            for s in steps:
                try:
                    # The latest: an earlier step if this one's arrays turn out damaged.
                    run = checkpoint.restore(
                        workdir,
                        s,
                        config=_CONFIG.value,
                        ckpts=ckpts,
                        fall_back=_STEP.value is None and not _ALL_STEPS.value,
                    )
                except checkpoint.DamagedCheckpointError as e:
                    if not _ALL_STEPS.value:
                        raise
                    logging.warning("%s; skipped", e)
                    continue
                label = f"{workdir} step {run.step} {_SPLIT.value}"
                result = evaluation.evaluate_split(
                    run,
                    _SPLIT.value,
                    max_batches=_MAX_BATCHES.value,
                    progress=evaluation.progress_logger(label),
                    settings=settings,
                )
                if is_main:
                    path = results.append_result(workdir, result)
                    tags = report.write_eval_scalars(workdir, result)
                    print(_summary(result), flush=True)
                    print(results.to_json(result), flush=True)
                    logging.info(
                        "appended to %s; TensorBoard: %s at step %d",
                        path,
                        tags[0].rsplit("/", 1)[0],
                        run.step,
                    )
            ckpts.close()
            if result is not None:
                lasts.append((_label(workdir, result), result))
            if result is None:  # --all_steps, and every step turned out damaged
                raise ValueError(f"no intact checkpoint in {ckpts.directory}")
            if _ALL_STEPS.value:
                points = results.curve(workdir, _SPLIT.value, result["seq_len"], _MAX_BATCHES.value)
                curves.append((_label(workdir, result), points))
    except ValueError as e:
        _error(str(e))
    if _ALL_STEPS.value and is_main:
        plot = _PLOT.value or os.path.join(
            workdirs[0],
            results.EVAL_DIR,
            f"perplexity_{_SPLIT.value}.png"
            if len(workdirs) == 1
            else f"compare_{_SPLIT.value}.png",
        )
        results.plot_curves(curves, plot, title=f"{_SPLIT.value} split")
        logging.info("plot written to %s", plot)
        # The plot path goes first; the last line printed stays the last JSON object.
        print(f"plot: {plot}", file=sys.stderr)
    elif _PLOT.value and is_main:
        results.plot_by_position(lasts, _PLOT.value, title=f"{_SPLIT.value} split")
        print(f"plot: {_PLOT.value}", file=sys.stderr)
    return 0


def _label(workdir: str, result: dict) -> str:
    return f"{os.path.basename(os.path.normpath(workdir))} ({result['model']})"


if __name__ == "__main__":
    console.quiet(sys.argv)  # before TensorFlow and XLA load: their startup lines stay off
    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, _CONFIG, "eval.py"))
