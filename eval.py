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

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from flash_jax import cli, console
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
    windows = f"context {result.get('context', result['seq_len'])}" + (
        f", stride {result['stride']}" if result.get("stride") is not None else ""
    )
    if result.get("whole_documents"):
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


def _score(workdir, ckpts, step, settings, windows, is_main) -> dict | None:
    """Scores checkpoint `step`, or with None the newest committed one (a live run saves and
    prunes; an earlier one if its arrays turn out damaged); prints and records the result. None
    for a damaged or removed step under --all_steps (skipped)."""
    from flash_jax import evaluation, runs
    from flash_jax.train import checkpoint_format, checkpoint_reader, report

    try:
        run = checkpoint_reader.restore(workdir, step, config=_CONFIG.value, ckpts=ckpts)
    except checkpoint_format.RemovedCheckpointError as e:
        if step is None or not _ALL_STEPS.value:
            raise
        logging.info("%s; skipped", e)
        return None
    except checkpoint_format.DamagedCheckpointError as e:
        if step is None or not _ALL_STEPS.value:
            raise
        logging.warning("%s; skipped", e)
        return None
    label = f"{workdir} step {run.step} {_SPLIT.value}"
    result = evaluation.evaluate_split(
        run,
        _SPLIT.value,
        max_batches=_MAX_BATCHES.value,
        progress=evaluation.progress_logger(label),
        settings=windows,
    )
    result["settings"] = settings
    if not is_main:
        return result
    # Printed first: a workdir that cannot be written (read-only) loses no result.
    print(_summary(result), flush=True)
    print(runs.to_json(result), flush=True)
    try:
        path = runs.record_result(workdir, result)
        tags = report.write_eval_scalars(workdir, result)
    except Exception as e:  # noqa: BLE001 - OSError here, TensorFlow's errors from TensorBoard
        logging.warning(
            "the result above could not be recorded in %s (%s)",
            os.path.join(workdir, runs.EVAL_DIR),
            str(e).splitlines()[0] if str(e) else type(e).__name__,
        )
        return result
    logging.info(
        "recorded in %s; TensorBoard: %s at step %d", path, tags[0].rsplit("/", 1)[0], run.step
    )
    return result


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
    # Imported here: the flags above fail without paying for JAX / Orbax.
    import jax

    from flash_jax.train import checkpoint_reader

    is_main = jax.process_index() == 0  # several processes: process 0 reports and writes

    cli.quiet_library_logs("eval.py", verbose=_VERBOSE.value)

    # ---- resolve every workdir, step and config first: bad input changes nothing anywhere
    jobs, configs = [], []  # (workdir, checkpoints, [steps]); the run config of each
    try:
        for workdir in workdirs:
            ckpts = checkpoint_reader.CheckpointReader(workdir)
            steps, config = checkpoint_reader.steps_to_evaluate(
                ckpts, _STEP.value, _ALL_STEPS.value, _CONFIG.value
            )
            jobs.append((workdir, ckpts, steps))
            configs.append(config)
            logging.info(
                "%s: evaluating step %s on %s", workdir, ", ".join(map(str, steps)), _SPLIT.value
            )
        # TensorFlow (the data pipeline): imported once the cheaper checks have passed.
        from flash_jax import data, long_context, runs
        from flash_jax.tools import plots

        windows = long_context.Settings(
            _CONTEXT.value, _STRIDE.value, _WHOLE_DOCUMENTS.value, _BUCKET.value
        )
        for config in configs:
            long_context.check(windows, config.model, config.data.seq_len)
            long_context.check_one_process(windows)
            data.check_data(config.data, [_SPLIT.value])
    except ValueError as e:
        _error(str(e))

    # ---- evaluate (a step already scored with the same settings is reused, unless --rescore)
    curves, lasts = [], []  # per workdir: its curve (--all_steps), its last result
    try:
        for (workdir, ckpts, steps), config in zip(jobs, configs, strict=True):
            settings = runs.scoring_settings(_scoring_flags(), config.data)
            scored = {}  # step -> result, this call's
            for s in steps:
                result = None if _RESCORE.value else runs.recorded_result(workdir, s, settings)
                if result is None:
                    latest = _STEP.value is None and not _ALL_STEPS.value
                    step = None if latest else s
                    result = _score(workdir, ckpts, step, settings, windows, is_main)
                elif is_main:
                    print(_summary(result) + " (recorded before; --rescore scores it again)")
                    print(runs.to_json(result), flush=True)
                if result is not None:
                    scored[result["step"]] = result
            if not scored:  # --all_steps, and a live run pruned every step listed: its newest
                result = _score(workdir, ckpts, None, settings, windows, is_main)
                scored[result["step"]] = result
            ckpts.close()
            last = scored[max(scored)]
            lasts.append((_label(workdir, last), last))
            if _ALL_STEPS.value:
                points = {r["step"]: r for r in runs.curve(workdir, settings)} | scored
                curves.append((_label(workdir, last), [points[k] for k in sorted(points)]))
    except ValueError as e:
        _error(str(e))
    if _ALL_STEPS.value and is_main:
        plot = _PLOT.value or os.path.join(
            workdirs[0],
            runs.EVAL_DIR,
            f"perplexity_{_SPLIT.value}.png"
            if len(workdirs) == 1
            else f"compare_{_SPLIT.value}.png",
        )
        try:
            plots.plot_curves(curves, plot, title=f"{_SPLIT.value} split")
        except OSError as e:  # a read-only workdir: the results are printed above
            logging.warning("the plot could not be written to %s (%s)", plot, e.strerror or e)
            return 0
        logging.info("plot written to %s", plot)
        # The plot path goes first; the last line printed stays the last JSON object.
        print(f"plot: {plot}", file=sys.stderr)
    elif _PLOT.value and is_main:
        try:
            plots.plot_by_position(lasts, _PLOT.value, title=f"{_SPLIT.value} split")
        except OSError as e:
            logging.warning("the plot could not be written to %s (%s)", _PLOT.value, e)
            return 0
        print(f"plot: {_PLOT.value}", file=sys.stderr)
    return 0


def _label(workdir: str, result: dict) -> str:
    return f"{os.path.basename(os.path.normpath(workdir))} ({result['model']})"


if __name__ == "__main__":
    console.quiet(sys.argv)  # before TensorFlow and XLA load: their startup lines stay off
    app.run(
        cli.interruptible(main, "eval.py"),
        flags_parser=lambda argv: cli.parse_flags(argv, _CONFIG, "eval.py"),
    )
