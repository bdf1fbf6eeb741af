"""Plots of runs and measurements: panels of lines side by side in one PNG (eval.py's curves
and loss by position, the benchmark and replication figures)."""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Sequence

from etils import epath


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
            if len(ticks) > 6:  # more labels than fit side by side on a 5-inch axis: upright
                ax.tick_params(axis="x", labelrotation=90)
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
