"""What a run leaves on disk and how it is read back: records, curves, training time (shared by
eval.py, the loop and scripts/; plots are in `flash_jax.tools.plots`).

A run's workdir (written by `flash_jax.train.loop`; paths local or gs://):

    config.json          the resolved run config
    metrics.jsonl        one JSON object per logged step: training records ("loss", "step_time",
                         ...) and periodic-eval records ("eval_loss", "eval_perplexity", ...)
    eval/results.jsonl   eval.py's results, one per line and one per (step, settings): the split,
                         the other scoring flags and the data read (`record_result`)

JSON has no nan / inf literals: every record is written with them as strings (`to_json`), so that
each line parses. Readers skip a line cut by a crash.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable

import jax
import numpy as np
from etils import epath

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
EVAL_DIR = "eval"
RESULTS_FILE = "results.jsonl"


# ----------------------------------------------------------------------------- JSON


def json_safe(value):
    """`value` with nan / inf as strings and numpy scalars as Python numbers, at any depth."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def to_json(value, **kwargs) -> str:
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def read_jsonl(path) -> list[dict]:
    """The records of a JSON-lines file ([] if it does not exist), skipping lines that do not
    parse (a line cut by a crash)."""
    path = epath.Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


# ----------------------------------------------------------------------------- training records


def training_time(workdir: str) -> Callable[[int], float | None] | None:
    """step -> seconds of training up to that step, from the run's metrics.jsonl.

    Sums `step_time` (seconds per step, without eval and checkpoint pauses) over the logged
    windows, so restarts and pauses do not count; None when the run logged no step times. Steps
    after the last logged one give None.
    """
    by_step = {}
    for record in read_jsonl(epath.Path(workdir) / METRICS_FILE):
        step_time = record.get("step_time")
        # A non-positive step time is a timing glitch, not a measurement: skip it.
        if isinstance(step_time, (int, float)) and step_time > 0:
            by_step[int(record["step"])] = float(step_time)  # resumed: last wins
    if not by_step:
        return None
    steps = np.array([0] + sorted(by_step), np.float64)
    per_step = np.array([by_step[int(s)] for s in steps[1:]])
    cumulative = np.concatenate([[0.0], np.cumsum(np.diff(steps) * per_step)])

    def at(step: int) -> float | None:
        if step > steps[-1]:
            return None
        return float(np.interp(step, steps, cumulative))

    return at


def training_curve(workdir: str) -> dict:
    """Periodic evaluation of a run against step and training time, from its metrics.jsonl:
    {"step", "train_time_s", "eval_perplexity", "eval_loss", "train_loss", "train_loss_step",
    "mean_step_time_s"} (lists but the last). The last record of a step wins (a resumed run).
    ValueError (one line) when the run has no metrics, no eval records or no step times.
    """
    path = epath.Path(workdir) / METRICS_FILE
    if not path.exists():
        raise ValueError(f"no {METRICS_FILE} in workdir {workdir!r}")
    train, evals = {}, {}
    for record in read_jsonl(path):
        if "eval_perplexity" in record:
            evals[record["step"]] = record
        elif record.get("step_time") is not None:
            train[record["step"]] = record
    if not evals:
        raise ValueError(f"{path} has no eval records (is train.eval_every > 0?)")
    at = training_time(workdir)
    if not train or at is None:
        raise ValueError(f"{path} has no training records with a step_time")
    eval_steps, train_steps = sorted(evals), sorted(train)
    return {
        "step": [int(s) for s in eval_steps],
        "train_time_s": [at(min(s, train_steps[-1])) for s in eval_steps],
        "eval_perplexity": [float(evals[s]["eval_perplexity"]) for s in eval_steps],
        "eval_loss": [float(evals[s]["eval_loss"]) for s in eval_steps],
        "train_loss": [float(train[s]["loss"]) for s in train_steps],
        "train_loss_step": [int(s) for s in train_steps],
        "mean_step_time_s": at(train_steps[-1]) / train_steps[-1],
    }


# ----------------------------------------------------------------------------- eval results


def results_path(workdir: str) -> epath.Path:
    return epath.Path(workdir) / EVAL_DIR / RESULTS_FILE


# Keys of config.data that do not change a score (how batches are made, not what is read).
_DATA_NOT_SCORING = ("batch_size", "shuffle_buffer", "prefetch", "use_cached")


def scoring_settings(flag_values: dict, data_config) -> dict:
    """What a result depends on besides its checkpoint: eval.py's scoring flags (`flag_values`:
    split, max_batches, ...) and the data read (`data_config`, a DataConfig)."""
    data = {k: v for k, v in dataclasses.asdict(data_config).items() if k not in _DATA_NOT_SCORING}
    return json_safe({**flag_values, "data": data})


def same_setting(record: dict, step: int, settings: dict) -> bool:
    """Whether `record` is the result of checkpoint `step` scored with `settings` (eval.py's
    scoring flags and the data it read)."""
    return record.get("step") == step and record.get("settings") == json_safe(settings)


def recorded_result(workdir: str, step: int, settings: dict) -> dict | None:
    """The result of `step` with `settings` in `workdir/eval/results.jsonl`, if one is there."""
    found = [r for r in read_jsonl(results_path(workdir)) if same_setting(r, step, settings)]
    return found[-1] if found else None


def record_result(workdir: str, result: dict) -> str:
    """Writes `result` (with its "step" and "settings") to `workdir/eval/results.jsonl`, in place
    of an earlier result of the same step and settings: one record each (main process only).
    Returns the file's path; OSError (or the storage's error) if it cannot be written."""
    path = results_path(workdir)
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [
            line
            for line in (path.read_text().splitlines() if path.exists() else [])
            if not _line_of_setting(line, result["step"], result["settings"])
        ]
        path.write_text("".join(line + "\n" for line in [*kept, to_json(result)]))
    return str(path)


def _line_of_setting(line: str, step: int, settings: dict) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False  # a line cut by a crash is kept as it is (readers skip it)
    return isinstance(record, dict) and same_setting(record, step, settings)


def curve(workdir: str, settings: dict) -> list[dict]:
    """The results of `workdir` scored with `settings`, one per step, sorted by step.

    Includes earlier evaluations of checkpoints that have since been deleted, so a run evaluated
    now and then gets a full curve although only the last K checkpoints are kept.
    """
    wanted = json_safe(settings)
    by_step = {
        r["step"]: r for r in read_jsonl(results_path(workdir)) if r.get("settings") == wanted
    }
    return [by_step[s] for s in sorted(by_step)]
