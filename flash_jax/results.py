"""What runs and measurements leave on disk and how it is read back: records, curves, training
time, plots, and the machine a measurement ran on (shared by eval.py, the loop and scripts/).

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
import io
import json
import math
import os
import platform
import subprocess
from collections.abc import Callable, Sequence

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
    scoring flags and the data it read; records written before settings existed match none)."""
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
            if not _line_of_setting(line, result["step"], result.get("settings"))
        ]
        path.write_text("".join(line + "\n" for line in [*kept, to_json(result)]))
    return str(path)


def _line_of_setting(line: str, step: int, settings: dict | None) -> bool:
    if settings is None:  # a result without settings replaces nothing
        return False
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


# ----------------------------------------------------------------------------- plots


@dataclasses.dataclass
class Panel:
    """One plot panel: a line per (label, xs, ys); lines of the same index share a colour
    across panels (an empty line keeps its place)."""

    xlabel: str
    ylabel: str
    lines: list[tuple[str, Sequence[float], Sequence[float]]]
    log_x: bool = False  # base 2, ticks at the values plotted (context lengths)
    log_y: bool = True


def plot_panels(path: str, panels: Sequence[Panel], title: str) -> str:
    """Panels side by side in one PNG at `path` (local or gs://); returns `path`."""
    import matplotlib.pyplot as plt

    fig = panels_figure(panels, title)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    out = epath.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png.getvalue())
    return path


# Minor ticks labelled on a log axis spanning less than 1.5 decades (else only the decades are):
# 2, 3 and 5 times a power of ten, which a 4-inch axis shows without overlap.
LOG_MINOR_LABELS = (2, 3, 5)


def _log_minor_label(value: float, _) -> str:
    mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
    if not any(abs(mantissa - m) < 1e-6 for m in LOG_MINOR_LABELS):
        return ""
    return f"{value:,.0f}" if value >= 1000 else f"{value:.4g}"


def panels_figure(panels: Sequence[Panel], title: str):
    """The matplotlib figure of `plot_panels` (tests measure its tick labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    plain = ticker.FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1000 else f"{v:.4g}")
    for ax, panel in zip(axes[0], panels, strict=True):
        for i, (label, xs, ys) in enumerate(panel.lines):
            ax.plot(xs, ys, marker="o", label=label, color=f"C{i}")
        if panel.log_x:
            ticks = sorted({x for _, xs, _ in panel.lines for x in xs})
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [f"{x:,}" for x in ticks])
            ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        if panel.log_y:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)
            low, high = ax.get_ylim()
            # Within 1.5 decades there may be one labelled major tick or none: label a few
            # minor ones.
            minor = _log_minor_label if high / low < 30 else ticker.NullFormatter()
            ax.yaxis.set_minor_formatter(minor)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_curves(curves: Sequence[tuple[str, Sequence[dict]]], path: str, *, title: str = "") -> str:
    """eval.py's plot: perplexity against step (and against training time where known), one
    line per run. `curves` is [(label, results sorted by step)]. Word-level perplexity is plotted
    when every point has it (PG-19), else token-level; the axis label and the title (`title`,
    then the kind) say which. A log scale when the values span more than a factor 3 (early
    checkpoints)."""
    points = [r for _, rs in curves for r in rs]
    if not points:
        raise ValueError("nothing to plot: no evaluation results")
    key = "word_perplexity" if all(r.get("word_perplexity") for r in points) else "perplexity"
    ylabel = "word-level perplexity" if key == "word_perplexity" else "token perplexity"
    values = [float(r[key]) for r in points]
    log_y = min(values) > 0 and max(values) / min(values) > 3
    by_step = [(name, [r["step"] for r in rs], [float(r[key]) for r in rs]) for name, rs in curves]
    panels = [Panel("training step", ylabel, by_step, log_y=log_y)]
    if any(r.get("train_seconds") is not None for r in points):
        by_time = []
        for label, rs in curves:
            timed = [r for r in rs if r.get("train_seconds")]
            by_time.append(
                (label, [r["train_seconds"] / 3600 for r in timed], [float(r[key]) for r in timed])
            )
        xlabel = "training time (hours, excluding eval and checkpoint pauses)"
        panels.append(Panel(xlabel, ylabel, by_time, log_y=log_y))
    return plot_panels(path, panels, f"{title}: {ylabel}" if title else ylabel)


def plot_by_position(lines: Sequence[tuple[str, dict]], path: str, *, title: str = "") -> str:
    """Token perplexity against position in the window (or document): one line per
    (label, eval result with `loss_by_position`), a point per non-empty bucket at its end
    (log2 x axis: the default buckets double)."""
    panel_lines = []
    for label, result in lines:
        buckets = [b for b in result["loss_by_position"] if b["loss"] is not None]
        panel_lines.append(
            (label, [b["end"] for b in buckets], [math.exp(b["loss"]) for b in buckets])
        )
    if not any(xs for _, xs, _ in panel_lines):
        raise ValueError("nothing to plot: no loss by position")
    panel = Panel("position (end of bucket, tokens)", "token perplexity", panel_lines, log_x=True)
    return plot_panels(path, [panel], f"{title}: perplexity by position" if title else "")


# ----------------------------------------------------------------------------- measurements


def machine_info() -> dict:
    """What measurements came from: CPU model, cores, device, jax version, and whether the
    machine was shared (FLASH_JAX_BENCH_SHARED=0 on a dedicated one). Initialises the backend."""
    cpu = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    device = jax.devices()[0]
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "platform": device.platform,
        "device": device.device_kind,
        "num_devices": jax.device_count(),
        "jax_version": jax.__version__,
        "shared": os.environ.get("FLASH_JAX_BENCH_SHARED", "1") == "1",
    }


def device_name(info: dict) -> str:
    """The CPU model on CPU, else the accelerator's kind (for plot titles)."""
    return info["cpu"] if info["platform"] == "cpu" else info["device"]


def machine_line(info: dict) -> str:
    shared = (
        " The machine was shared with other jobs while this ran: timings are noisy."
        if info.get("shared")
        else ""
    )
    return (
        f"Machine: {info['cpu']} ({info['cpu_cores']} cores), {info['num_devices']} x "
        f"{info['platform']} device ({info['device']}), jax {info['jax_version']}.{shared}"
    )


def write_report(stem: str, report: dict, markdown: str) -> list[str]:
    """`<stem>.json` (NaN-safe) and `<stem>.md`; returns their paths."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as f:
        f.write(to_json(report, indent=2))
    with open(stem + ".md", "w") as f:
        f.write(markdown)
    return [stem + ".json", stem + ".md"]
