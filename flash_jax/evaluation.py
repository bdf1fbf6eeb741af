"""Evaluation of trained runs: restore a checkpoint, score a whole split, plot the curves.

    from flash_jax import evaluation
    run = evaluation.restore("runs/quickstart")            # latest checkpoint, its own config
    result = evaluation.evaluate_split(run, "test")        # every window of every document
    model = run.model()                                   # an nnx model, e.g. for decoding.generate

A run directory (written by `flash_jax.train.loop`) holds `checkpoints/<step>/` (state + JSON meta
with the model config and the resolved run config), `metrics.jsonl` and `config.json`. Everything
here only reads it, except `append_result`, which writes `eval/results.jsonl`.

Perplexity is teacher-forced: one forward pass per packed batch of windows, exactly the training
loss (incremental decoding, `flash_jax.decoding`, serves sampling, where tokens come one at a time).
Metrics, from the summed NLL (nats) over the split:
  loss = NLL / tokens, perplexity = exp(loss), bits_per_byte = NLL / (bytes * ln 2), and for PG-19
  word_perplexity = exp(NLL / words) (the figure PG-19 papers quote; words are whitespace-separated
  runs of the raw text, `data.split_statistics`). Tokens include each document's EOS.
Byte and word figures need the whole split; with `max_batches` they are None.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath
from flax import nnx

from flash_jax import metrics, results, sharding
from flash_jax.config import ModelConfig, RunConfig
from flash_jax.train import checkpoint, step

# `flash_jax.data` (and `train.loop`, which imports it) pull in TensorFlow, about 10 s of import:
# they are imported where the data is needed, so that a bad workdir, step or config fails fast.

# Datasets whose papers quote word-level perplexity.
WORD_LEVEL_DATASETS = ("pg19",)


# ----------------------------------------------------------------------------- checkpoints


# Opened for reading only, checked on restore: see flash_jax/train/checkpoint.py.
ReadOnlyCheckpoints = checkpoint.ReadOnlyCheckpoints
DamagedCheckpointError = checkpoint.DamagedCheckpointError


# ----------------------------------------------------------------------------- configs


def _tuples(value):
    """JSON lists back to tuples, as the config files write them (mesh.shape, mesh.rules)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def config_from_json(values: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(_tuples(values))


def run_config(ckpts: ReadOnlyCheckpoints, step: int, config=None) -> ml_collections.ConfigDict:
    """The config to evaluate checkpoint `step` with.

    Without `config`: the run config saved in the checkpoint (falling back to the run's
    config.json). With `config`: that one, after checking that its model is the checkpoint's
    (keys that change only how the model is computed, e.g. remat, may differ).
    DamagedCheckpointError if the checkpoint's meta JSON does not read.
    """
    meta = ckpts.read_meta(step)
    saved_model = meta.get("model_config")
    if config is None:
        saved = meta.get("config")
        if saved is None:
            path = epath.Path(ckpts.directory).parent / results.CONFIG_FILE
            if not path.exists():
                raise ValueError(
                    f"checkpoint {step} in {ckpts.directory} holds no run config and there is "
                    f"no {path}; pass --config"
                )
            saved = json.loads(path.read_text())
        config = config_from_json(saved)
    if saved_model is not None:
        current = checkpoint.model_config_dict(config.model)
        diff = checkpoint.differing_keys(saved_model, current)
        if diff:
            details = ", ".join(
                f"model.{k}: checkpoint {saved_model.get(k)!r} vs config {current.get(k)!r}"
                for k in diff
            )
            raise ValueError(
                f"checkpoint {step} in {ckpts.directory} was written by a different model config "
                f"({details}); pass the run's own config, or no --config to use the checkpoint's"
            )
    return config


# ----------------------------------------------------------------------------- restore


@dataclasses.dataclass
class Restored:
    """One checkpoint's parameters, ready for `evaluate_split` or `model()`."""

    workdir: str
    step: int
    config: ml_collections.ConfigDict
    model_config: ModelConfig
    fns: step.StepFns
    params: Any
    rest: Any
    meta: dict

    def model(self) -> nnx.Module:
        """The nnx model holding the restored parameters (for decoding, or a direct forward)."""
        return nnx.merge(self.fns.graphdef, self.params, self.rest)


def steps_to_evaluate(
    ckpts: ReadOnlyCheckpoints, step: int | None, all_steps: bool, config=None
) -> list[int]:
    """The checkpoints eval.py evaluates, each checked for its config (see `run_config`).

    `all_steps`: every step (a damaged one is skipped with one warning line); `step`: that one (a
    damaged one is an error); neither: the newest whose meta reads (falling back over damaged
    ones, one warning line each). ValueError (one line) when there is nothing to evaluate.
    """
    if all_steps:
        steps = []
        for s in ckpts.all_steps():
            try:
                run_config(ckpts, s, config)
            except DamagedCheckpointError as e:
                logging.warning("%s; skipped", e)
                continue
            steps.append(s)
        if not steps:
            raise ValueError(f"no intact checkpoint in {ckpts.directory}")
        return steps
    if step is not None:
        run_config(ckpts, ckpts.resolve_step(step), config)
        return [step]
    newest = ckpts.resolve_step(None)
    candidates = [s for s in reversed(ckpts.all_steps()) if s <= newest]
    found, _ = ckpts.first_intact(candidates, lambda s: run_config(ckpts, s, config))
    return [found]


def restore(
    workdir: str,
    step_number: int | None = None,
    *,
    config=None,
    mesh: jax.sharding.Mesh | None = None,
    single_device: bool = False,
    ckpts: ReadOnlyCheckpoints | None = None,
    fall_back: bool | None = None,
) -> Restored:
    """Restores the parameters of checkpoint `step_number` (the latest by default) of a run.

    `config` defaults to the one saved with the checkpoint (see `run_config`); `mesh` to the
    config's, or with `single_device` to the first device alone (sampling). ValueError (one
    line, naming the path or key) for a workdir without checkpoints, a step that does not exist
    or a config whose model differs from the checkpoint's. The parameters are checked (see
    flash_jax/train/checkpoint.py): a damaged checkpoint, or one holding non-finite parameters,
    is a DamagedCheckpointError, unless `fall_back` (the default when no step is given): then
    the newest intact checkpoint up to `step_number` is restored, with one warning line per
    damaged one.
    """
    from flash_jax.train import loop

    fall_back = step_number is None if fall_back is None else fall_back
    own = ckpts is None
    ckpts = ReadOnlyCheckpoints(workdir) if own else ckpts

    def restore_step(s: int) -> Restored:
        run_cfg = run_config(ckpts, s, config)
        model_config = RunConfig.from_config(run_cfg).model
        run_mesh = mesh
        if run_mesh is None:
            run_mesh = single_device_mesh(run_cfg) if single_device else loop.make_mesh(run_cfg)
        with jax.set_mesh(run_mesh):
            fns = _build(run_cfg, run_mesh)
            params, meta = ckpts.restore_params(fns.abstract_state["params"], s)
            rest = fns.init_rest()
        return Restored(workdir, s, run_cfg, model_config, fns, params, rest, meta)

    try:
        first = ckpts.resolve_step(step_number)
        if not fall_back:
            return restore_step(first)
        candidates = [s for s in reversed(ckpts.all_steps()) if s <= first]
        return ckpts.first_intact(candidates, restore_step)[1]
    finally:
        if own:
            ckpts.close()


# StepFns per (config, mesh): checkpoints of one run share their jitted eval step (one compile).
_STEP_FNS: dict[tuple, step.StepFns] = {}


def _build(config, mesh) -> step.StepFns:
    key = (config.to_json(sort_keys=True), mesh)
    if key not in _STEP_FNS:
        _STEP_FNS[key] = step.build(config, mesh)
    return _STEP_FNS[key]


def single_device_mesh(config) -> jax.sharding.Mesh:
    """A mesh of the first device only, with the config's axis names (sampling, benchmarks)."""
    names = tuple(config.mesh.axis_names)
    return sharding.make_mesh((1,) * len(names), names, devices=jax.devices()[:1])


# ----------------------------------------------------------------------------- evaluation


# Batches per (task, split, seq_len, batch size), learned from a finished pass: later passes in the
# same process (e.g. --all_steps) can show progress against a known total.
_BATCH_COUNTS: dict[tuple, int] = {}


def evaluate_split(
    run: Restored,
    split: str,
    *,
    max_batches: int | None = None,
    progress: Callable[[int, int | None, float], None] | None = None,
) -> dict:
    """Loss, perplexity, bits per byte (and word perplexity for PG-19) over a whole split.

    Every window of every document is scored once; the padding rows of the last batch carry
    weight 0 and count nowhere. `max_batches` stops early (then `complete` is False and the byte
    and word figures, which need the whole split, are None). `progress(batches_done,
    total_or_None, tokens_so_far)` is called after each batch (reading one float per batch; the
    device still has the next batch queued).
    """
    from flash_jax import data

    config = run.config
    cfg = config.data
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    key = (data.task_name(cfg), split, cfg.seq_len, cfg.batch_size)
    total = _BATCH_COUNTS.get(key)
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    nll_sum, weight_sum = jnp.float32(0), jnp.float32(0)
    batches, exhausted, pending = 0, False, None
    t0 = time.time()
    with (
        jax.set_mesh(run.fns.mesh),
        data.InputPipeline(
            cfg,
            split=split,
            mesh=run.fns.mesh,
            seed=config.seed,
            shuffle=False,
            repeat=False,
            rules=config.mesh.rules,
        ) as pipe,
    ):
        it = iter(pipe)
        while max_batches is None or batches < max_batches:
            try:
                batch = next(it)
            except StopIteration:
                exhausted = True
                break
            nll, weight = run.fns.eval_step(
                run.params, run.rest, step.put_batch(batch, run.fns.batch_sharding)
            )
            # Sums accumulate on the device in float32, as in training's eval.
            nll_sum, weight_sum = nll_sum + nll, weight_sum + weight
            batches += 1
            if progress is not None:
                if pending is not None:  # the previous batch's count: never waits on this one
                    progress(*pending)
                pending = (batches, total, weight_sum)
        if not exhausted and max_batches is not None and batches == max_batches:
            # Exactly max_batches: the split is complete only if nothing is left.
            try:
                next(it)
            except StopIteration:
                exhausted = True
    if progress is not None and pending is not None:
        progress(*pending)
    if exhausted:
        _BATCH_COUNTS[key] = batches
    nll_sum, tokens = float(nll_sum), float(weight_sum)
    seconds = time.time() - t0
    result = {
        "workdir": run.workdir,
        "model": run.model_config.name,
        "step": run.step,
        "split": split,
        "dataset": cfg.dataset,
        "seq_len": int(cfg.seq_len),
        "complete": exhausted,
        "max_batches": max_batches,
        "batches": batches,
        "tokens": int(round(tokens)),
        "nll_sum": nll_sum,
        "loss": nll_sum / tokens if tokens > 0 else math.nan,
        "perplexity": metrics.perplexity(nll_sum, tokens),
        "bits_per_byte": None,
        "bytes": None,
        "seconds": round(seconds, 3),
        "tokens_per_sec": tokens / seconds if seconds > 0 else None,
    }
    if exhausted and cfg.objective == "lm":
        stats = data.split_statistics(cfg, split)
        result["bytes"] = stats["bytes"]
        result["bits_per_byte"] = metrics.bits_per_byte(nll_sum, stats["bytes"])
        if cfg.dataset in WORD_LEVEL_DATASETS:
            result["words"] = stats["words"]
            result["word_perplexity"] = metrics.perplexity(nll_sum, stats["words"])
    elif cfg.dataset in WORD_LEVEL_DATASETS and cfg.objective == "lm":
        result["words"] = None
        result["word_perplexity"] = None
    train_time = results.training_time(run.workdir)
    if train_time is not None:
        result["train_seconds"] = train_time(run.step)
    return result
