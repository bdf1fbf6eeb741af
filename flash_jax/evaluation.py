"""Evaluation: one evaluator for periodic evaluation in training and for whole splits.

    from flash_jax import evaluation
    from flash_jax.train import checkpoint
    run = checkpoint.restore("runs/quickstart")            # latest checkpoint, its own config
    result = evaluation.evaluate_split(run, "test")        # every window of every document

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

import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from absl import logging

from flash_jax import data, metrics, results
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
) -> dict:
    """Summed NLL and token count over `split` (its first `max_batches` batches, or all of it).

    `config` is the run's (its data, seed and mesh rules). Returns {"nll_sum", "tokens",
    "batches", "complete"}: `complete` when the split ended (every window was scored once; the
    padding rows of the last batch carry weight 0). `progress(batches_done, total_or_None,
    tokens_so_far)` is called after each batch, one batch late, so that the device always has the
    next batch queued.
    """
    key = (data.task_name(config.data), split, config.data.seq_len, config.data.batch_size)
    total = _BATCH_COUNTS.get(key)
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    nll_sum, weight_sum = jnp.float32(0), jnp.float32(0)
    batches, complete, pending = 0, False, None
    with (
        jax.set_mesh(fns.mesh),
        data.InputPipeline(
            config.data,
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
            nll, weight = fns.eval_step(params, rest, step.put_batch(batch, fns.batch_sharding))
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
    return {
        "nll_sum": float(nll_sum),
        "tokens": float(weight_sum),
        "batches": batches,
        "complete": complete,
    }


def evaluate_split(
    run,
    split: str,
    *,
    max_batches: int | None = None,
    progress: Callable[[int, int | None, float], None] | None = None,
) -> dict:
    """Loss, perplexity, bits per byte (and word perplexity for PG-19) of a restored run
    (`checkpoint.restore`) over a whole split, or its first `max_batches` batches (then the byte
    and word figures, which need the whole split, are None); see `evaluate` for `progress`."""
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    cfg = run.config.data
    t0 = time.time()
    sums = evaluate(
        run.fns, run.params, run.rest, run.config, split, max_batches=max_batches, progress=progress
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
        "perplexity": metrics.perplexity(nll_sum, tokens),
        "bits_per_byte": None,
        "bytes": None,
        "seconds": round(seconds, 3),
        "tokens_per_sec": tokens / seconds if seconds > 0 else None,
    }
    if cfg.objective == "lm" and cfg.dataset in WORD_LEVEL_DATASETS:
        result.update(words=None, word_perplexity=None)
    if cfg.objective == "lm" and sums["complete"]:
        stats = data.split_statistics(cfg, split)
        result["bytes"] = stats["bytes"]
        result["bits_per_byte"] = metrics.bits_per_byte(nll_sum, stats["bytes"])
        if cfg.dataset in WORD_LEVEL_DATASETS:
            result["words"] = stats["words"]
            result["word_perplexity"] = metrics.perplexity(nll_sum, stats["words"])
    train_time = results.training_time(run.workdir)
    if train_time is not None:
        result["train_seconds"] = train_time(run.step)
    return result
