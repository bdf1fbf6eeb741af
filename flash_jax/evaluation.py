"""Evaluation: one evaluator for periodic evaluation in training and for whole splits.

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
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from flash_jax import data, long_context, losses, runs
from flash_jax.train import step

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
