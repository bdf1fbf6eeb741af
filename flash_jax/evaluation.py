"""Evaluation: one evaluator for periodic evaluation in training and for whole splits, and
eval.py's runs (`evaluate_runs`).

    from flash_jax import evaluation
    from flash_jax.train import checkpoint_reader
    run = checkpoint_reader.restore("runs/quickstart")  # latest checkpoint, its own config
    result = evaluation.evaluate_split(run, "test")     # every window of every document

Perplexity is teacher-forced: one forward pass per packed batch of windows, exactly the training
loss (incremental decoding, `flash_jax.decoding`, serves sampling, where tokens come one at a time).
Summed NLL and token counts accumulate on the device in float32. Metrics, from the summed NLL
(nats) over the split:
  loss = NLL / tokens, perplexity = exp(loss), bits_per_byte = NLL / (bytes * ln 2), and for PG-19
  word_perplexity = exp(NLL / words) (the figure PG-19 papers quote; words are whitespace-separated
  runs of the raw text, `data.split_statistics`). Tokens include each document's EOS.
Byte and word figures need the whole split; with `max_batches` they are None.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from flash_jax import data, long_context, losses, runs
from flash_jax.train import checkpoint_format, checkpoint_reader, report, step

# Datasets whose papers quote word-level perplexity.
WORD_LEVEL_DATASETS = ("pg19",)
# Batches per (task, split, seq_len, batch size), learned from a finished pass: later passes in the
# same process (e.g. --all_steps) can show progress against a known total.
_BATCH_COUNTS: dict[tuple, int] = {}
PROGRESS_SECONDS = 10.0  # at most one progress line per this many seconds


def progress_logger(
    label: str, *, at_ends: bool = True
) -> Callable[[int, int | None, float], None]:
    """A `progress` callback for `evaluate` that logs "label: batch k/n, tokens, tokens/s" at
    most every PROGRESS_SECONDS; with `at_ends`, also after the first and the last batch (eval.py),
    else only once the evaluation has run that long (training's periodic evaluation, whose
    result line follows)."""
    start = time.time()
    state = {"last": start}

    def report(done: int, total: int | None, tokens: float) -> None:
        now = time.time()
        end = at_ends and (done == 1 or done == total)
        if not end and now - state["last"] < PROGRESS_SECONDS:
            return
        state["last"] = now
        tokens = float(tokens)
        rate = tokens / max(now - start, 1e-9)
        of = f"/{total}" if total else " (total unknown until the split ends)"
        logging.info(
            "%s: batch %d%s, %s tokens, %s tokens/s",
            label,
            done,
            of,
            f"{tokens:,.0f}",
            f"{rate:,.0f}",
        )

    return report


def evaluate(
    fns: step.StepFns,
    params,
    rest,
    config,
    split: str,
    *,
    max_batches: int | None = None,
    progress: Callable[[int, int | None, float], None] | None = None,
    data_config=None,
    buckets: long_context.Buckets | None = None,
) -> dict:
    """Summed NLL and token count over `split` (its first `max_batches` batches, or all of it).

    `config` is the run's (its data, seed and mesh rules); `data_config` replaces its data config
    (windows of another length). Returns {"nll_sum", "tokens", "batches", "complete"}: `complete`
    when the split ended (every window was scored once; the padding rows of the last batch carry
    weight 0); with `buckets`, also the summed NLL and tokens per position bucket ("bucket_nll",
    "bucket_tokens") and "span" (the window length). `progress(batches_done, total_or_None,
    tokens_so_far)` is called after each batch, one batch late, so that the device always has the
    next batch queued.
    """
    data_config = config.data if data_config is None else data_config
    key = (data.task_name(data_config), split, data_config.seq_len, data_config.batch_size)
    total = _BATCH_COUNTS.get(key)
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    nll_sum, weight_sum = jnp.float32(0), jnp.float32(0)
    if buckets is not None:
        num_buckets = buckets.count(data_config.seq_len)
        bucket_nll, bucket_tokens = jnp.zeros(num_buckets), jnp.zeros(num_buckets)
    batches, complete, pending = 0, False, None
    with (
        jax.set_mesh(fns.mesh),
        data.InputPipeline(
            data_config,
            split=split,
            mesh=fns.mesh,
            seed=config.seed,
            shuffle=False,
            repeat=False,
            rules=config.mesh.rules,
        ) as pipe,
    ):
        while max_batches is None or batches < max_batches:
            batch = next(pipe, None)
            if batch is None:
                complete = True
                break
            batch = step.put_batch(batch, fns.batch_sharding)
            if buckets is None:
                nll, weight = fns.eval_step(params, rest, batch)
            else:
                nll, weight, by_bucket, tokens = long_context.score_windows(
                    fns.graphdef, params, rest, batch, buckets, num_buckets
                )
                bucket_nll, bucket_tokens = bucket_nll + by_bucket, bucket_tokens + tokens
            nll_sum, weight_sum = nll_sum + nll, weight_sum + weight
            batches += 1
            if progress is not None and pending is not None:
                progress(*pending)
            pending = (batches, total, weight_sum)
        if not complete:  # exactly max_batches: the split is complete only if nothing is left
            complete = next(pipe, None) is None
    if progress is not None and pending is not None:
        progress(*pending)
    if complete:
        _BATCH_COUNTS[key] = batches
    sums = {
        "nll_sum": float(nll_sum),
        "tokens": float(weight_sum),
        "batches": batches,
        "complete": complete,
    }
    if buckets is not None:
        sums.update(
            bucket_nll=np.asarray(bucket_nll, np.float64),
            bucket_tokens=np.asarray(bucket_tokens, np.float64),
            span=data_config.seq_len,
        )
    return sums


def evaluate_split(
    run,
    split: str,
    *,
    max_batches: int | None = None,
    progress: Callable[[int, int | None, float], None] | None = None,
    settings: long_context.Settings | None = None,
) -> dict:
    """Loss, perplexity, bits per byte (and word perplexity for PG-19) of a restored run
    (`checkpoint_reader.restore`) over a whole split, or its first `max_batches` batches (then the
    byte and word figures, which need the whole split, are None); see `evaluate` for `progress`.

    `settings` (`long_context.Settings`; default: windows of the training length) say how the
    split is cut: windows of another length, sliding windows, or whole documents (there
    `max_batches` counts documents). The result carries them and `loss_by_position`."""
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    cfg = run.config.data
    settings = long_context.check(
        settings or long_context.Settings(), run.model_config, cfg.seq_len
    )
    long_context.check_one_process(settings)
    buckets = long_context.Buckets(run.model_config.chunk_size, settings.bucket)
    t0 = time.time()
    if settings.whole_documents or settings.stride is not None:
        score = (
            long_context.score_whole_documents
            if settings.whole_documents
            else long_context.score_sliding_windows
        )
        sums = score(run, split, settings, buckets, max_batches=max_batches, progress=progress)
    else:
        rows = long_context.window_rows(
            run.config, settings.context, run.fns.mesh, run.config.mesh.rules
        )
        windows = dataclasses.replace(cfg, seq_len=settings.context, batch_size=rows)
        sums = evaluate(
            run.fns,
            run.params,
            run.rest,
            run.config,
            split,
            max_batches=max_batches,
            progress=progress,
            data_config=windows,
            buckets=buckets,
        )
    seconds = time.time() - t0
    nll_sum, tokens = sums["nll_sum"], sums["tokens"]
    result = {
        "workdir": run.workdir,
        "model": run.model_config.name,
        "step": run.step,
        "split": split,
        "dataset": cfg.dataset,
        "seq_len": int(cfg.seq_len),
        "complete": sums["complete"],
        "max_batches": max_batches,
        "batches": sums["batches"],
        "tokens": int(round(tokens)),
        "nll_sum": nll_sum,
        "loss": nll_sum / tokens if tokens > 0 else math.nan,
        "perplexity": losses.perplexity(nll_sum, tokens),
        "bits_per_byte": None,
        "bytes": None,
        "seconds": round(seconds, 3),
        "tokens_per_sec": tokens / seconds if seconds > 0 else None,
        **settings.as_dict(),
        "loss_by_position": buckets.summary(
            sums["bucket_nll"], sums["bucket_tokens"], sums["span"]
        ),
    }
    if cfg.objective == "lm" and cfg.dataset in WORD_LEVEL_DATASETS:
        result.update(words=None, word_perplexity=None)
    if cfg.objective == "lm" and sums["complete"]:
        stats = data.split_statistics(cfg, split)
        result["bytes"] = stats["bytes"]
        result["bits_per_byte"] = losses.bits_per_byte(nll_sum, stats["bytes"])
        if cfg.dataset in WORD_LEVEL_DATASETS:
            result["words"] = stats["words"]
            result["word_perplexity"] = losses.perplexity(nll_sum, stats["words"])
    train_time = runs.training_time(run.workdir)
    if train_time is not None:
        result["train_seconds"] = train_time(run.step)
    return result


# ----------------------------------------------------------------------------- eval.py's runs


@dataclasses.dataclass(frozen=True)
class Request:
    """What eval.py asks for (its flags): which runs and steps, and how they are scored."""

    workdirs: Sequence[str]
    split: str
    windows: long_context.Settings
    scoring_flags: dict  # eval.py's flags that change a score, recorded with each result
    config: Any = None  # a ConfigDict replacing each checkpoint's own config
    step: int | None = None  # None: the newest committed checkpoint
    all_steps: bool = False
    max_batches: int | None = None
    rescore: bool = False  # score steps already recorded with the same settings again
    plot: str = ""  # the PNG's path ("": --all_steps's default, else no plot)


@dataclasses.dataclass
class _Job:
    """One workdir of a request: its checkpoints, the steps to score, its run config."""

    workdir: str
    ckpts: checkpoint_reader.CheckpointReader
    steps: list[int]
    config: Any


def evaluate_runs(request: Request) -> None:
    """eval.py: scores the requested steps of every workdir, prints and records each result, and
    plots them (see eval.py's docstring for what goes where).

    Every workdir, step and config is resolved before anything is scored: bad input is a
    ValueError (one line) that changes nothing anywhere. Several processes: every process reads
    its share of the split, process 0 prints and writes."""
    is_main = jax.process_index() == 0
    jobs = _resolve(request)
    curves, lasts = [], []  # per workdir: its curve (--all_steps), its last result
    for job in jobs:
        settings = runs.scoring_settings(request.scoring_flags, job.config.data)
        scored = _score_job(request, job, settings, is_main)
        last = scored[max(scored)]
        label = f"{os.path.basename(os.path.normpath(job.workdir))} ({last['model']})"
        lasts.append((label, last))
        if request.all_steps:
            points = {r["step"]: r for r in runs.curve(job.workdir, settings)} | scored
            curves.append((label, [points[k] for k in sorted(points)]))
    if is_main:
        _plot(request, curves, lasts)


def _plot(request: Request, curves: list, lasts: list) -> None:
    """--all_steps: perplexity against step, one line per workdir; else with --plot, perplexity
    by position. A plot that cannot be written is one warning line: the results are printed."""
    if not (request.all_steps or request.plot):
        return
    # Imported here: the plots serve eval.py alone; training never imports flash_jax.tools.
    from flash_jax.tools import plots

    title = f"{request.split} split"
    if request.all_steps:
        name = "perplexity" if len(request.workdirs) == 1 else "compare"
        path = request.plot or os.path.join(
            request.workdirs[0], runs.EVAL_DIR, f"{name}_{request.split}.png"
        )
        try:
            plots.plot_curves(curves, path, title=title)
        except OSError as e:  # a read-only workdir
            logging.warning("the plot could not be written to %s (%s)", path, e.strerror or e)
            return
        logging.info("plot written to %s", path)
    else:
        path = request.plot
        try:
            plots.plot_by_position(lasts, path, title=title)
        except OSError as e:
            logging.warning("the plot could not be written to %s (%s)", path, e)
            return
    # The plot path goes first; the last line printed stays the last JSON object.
    print(f"plot: {path}", file=sys.stderr)


def _resolve(request: Request) -> list[_Job]:
    jobs = []
    for workdir in request.workdirs:
        ckpts = checkpoint_reader.CheckpointReader(workdir)
        steps, config = checkpoint_reader.steps_to_evaluate(
            ckpts, request.step, request.all_steps, request.config
        )
        jobs.append(_Job(workdir, ckpts, steps, config))
        logging.info(
            "%s: evaluating step %s on %s", workdir, ", ".join(map(str, steps)), request.split
        )
    for job in jobs:
        long_context.check(request.windows, job.config.model, job.config.data.seq_len)
        long_context.check_one_process(request.windows)
        data.check_data(job.config.data, [request.split])
    return jobs


def _score_job(request: Request, job: _Job, settings: dict, is_main: bool) -> dict:
    """step -> result of every step of `job` this call scored or found recorded (a step already
    scored with the same settings is reused, unless `request.rescore`)."""
    scored = {}
    for s in job.steps:
        result = None if request.rescore else runs.recorded_result(job.workdir, s, settings)
        if result is None:
            latest = request.step is None and not request.all_steps
            result = _score(request, job, None if latest else s, settings, is_main)
        elif is_main:
            print(summary_line(result) + " (recorded before; --rescore scores it again)")
            print(runs.to_json(result), flush=True)
        if result is not None:
            scored[result["step"]] = result
    if not scored:  # --all_steps, and a live run pruned every step listed: its newest
        result = _score(request, job, None, settings, is_main)
        scored[result["step"]] = result
    job.ckpts.close()
    return scored


def _score(request: Request, job: _Job, step: int | None, settings, is_main) -> dict | None:
    """Scores checkpoint `step`, or with None the newest committed one (a live run saves and
    prunes; an earlier one if its arrays turn out damaged); prints and records the result. None
    for a damaged or removed step under --all_steps (skipped)."""
    try:
        run = checkpoint_reader.restore(job.workdir, step, config=request.config, ckpts=job.ckpts)
    except checkpoint_format.RemovedCheckpointError as e:
        if step is None or not request.all_steps:
            raise
        logging.info("%s; skipped", e)
        return None
    except checkpoint_format.DamagedCheckpointError as e:
        if step is None or not request.all_steps:
            raise
        logging.warning("%s; skipped", e)
        return None
    label = f"{job.workdir} step {run.step} {request.split}"
    result = evaluate_split(
        run,
        request.split,
        max_batches=request.max_batches,
        progress=progress_logger(label),
        settings=request.windows,
    )
    result["settings"] = settings
    if is_main:
        _report(job.workdir, result)
    return result


def _report(workdir: str, result: dict) -> None:
    # Printed first: a workdir that cannot be written (read-only) loses no result.
    print(summary_line(result), flush=True)
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
        return
    logging.info(
        "recorded in %s; TensorBoard: %s at step %d",
        path,
        tags[0].rsplit("/", 1)[0],
        result["step"],
    )


def summary_line(result: dict) -> str:
    """One line of a result for the console: where, which windows, and the figures."""
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
