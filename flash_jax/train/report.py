"""Where metrics go: TensorBoard events (clu), `metrics.jsonl`, and a console line with an ETA."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable

import numpy as np
from absl import logging
from etils import epath

from flash_jax import results
from flash_jax.results import METRICS_FILE

TENSORBOARD_DIR = "tensorboard"
FLOAT32_MAX = float(np.finfo(np.float32).max)

# Dense bf16 peak FLOP/s per chip, matched against `jax.devices()[0].device_kind` (lowercased;
# first match wins, so the more specific names come first). Vendor data sheets; the H100 and H200
# figures are the SXM parts (the PCIe H100 peaks near 756 TFLOP/s).
PEAK_FLOPS = (
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports itself as "TPU v5"
    ("tpu v4", 275e12),
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
)


def peak_flops_per_device(device_kind: str) -> float | None:
    kind = device_kind.lower()
    for name, flops in PEAK_FLOPS:
        if name in kind:
            return flops
    return None


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _record_step(line: str) -> int | None:
    try:
        record = json.loads(line)
        return int(record["step"])
    except (ValueError, KeyError, TypeError):  # a line cut by a crash, or not a record
        return None


def _drop_records_after(path: epath.Path, step: int) -> None:
    """A run that starts at `step` replays the steps after it: drop their old records."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        record_step = _record_step(line)
        if record_step is not None and record_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept != lines:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


def loggable(value: float) -> float:
    """A finite value beyond float32's range (TensorBoard's) becomes +-inf, in both outputs."""
    if math.isfinite(value) and abs(value) > FLOAT32_MAX:
        return math.copysign(math.inf, value)
    return value


class Reporter:
    """Writes scalars for one run; only the main process writes files.

    Records of steps after `start_step` (those the run is about to replay, or all of them for a
    run from scratch) are removed from metrics.jsonl first, so no step is logged twice. Failing
    to write (a full disk, a TensorBoard error) is one warning line; the run goes on.
    """

    def __init__(self, workdir: str, num_steps: int, *, is_main: bool = True, start_step: int = 0):
        self.num_steps = num_steps
        self.is_main = is_main
        self._writer = None
        self._jsonl = None
        self._failed: set[str] = set()
        # epath: local paths and gs:// alike (TPU pod workdirs live on GCS).
        workdir = epath.Path(workdir)
        if is_main:
            _drop_records_after(workdir / METRICS_FILE, start_step)
            # Imported here: clu's TF summary writer pulls in TensorFlow.
            from clu import metric_writers

            self._writer = metric_writers.AsyncWriter(
                metric_writers.SummaryWriter(str(workdir / TENSORBOARD_DIR))
            )
            self._jsonl = (workdir / METRICS_FILE).open("a")

    def _safely(self, what: str, write: Callable[[], object]) -> None:
        try:
            write()
        except Exception as e:  # noqa: BLE001 - metrics must never stop training
            if what not in self._failed:
                self._failed.add(what)
                logging.warning("could not write %s (%s); training goes on", what, e)

    def _write_line(self, line: str) -> None:
        self._jsonl.write(line)
        self._jsonl.flush()

    def write(self, step: int, scalars: dict) -> None:
        """One record: TensorBoard scalars and one JSON line {"step": ..., **scalars}."""
        scalars = {k: loggable(float(v)) for k, v in scalars.items() if v is not None}
        if not self.is_main:
            return
        self._safely("TensorBoard events", lambda: self._writer.write_scalars(step, scalars))
        line = results.to_json({"step": step, "time": time.time(), **scalars}) + "\n"
        self._safely(METRICS_FILE, lambda: self._write_line(line))

    def console(self, step: int, scalars: dict, seconds_per_step: float | None) -> None:
        parts = [f"step {step}/{self.num_steps}"]
        for key, fmt in (
            ("loss", "{:.4f}"),
            ("perplexity", "{:.2f}"),
            ("learning_rate", "{:.2e}"),
            ("grad_norm", "{:.3f}"),
            ("tokens_per_sec", "{:,.0f}"),
            ("mfu", "{:.1%}"),
        ):
            if scalars.get(key) is not None:
                parts.append(f"{key.replace('_', ' ')} {fmt.format(scalars[key])}")
        if seconds_per_step:
            eta = (self.num_steps - step) * seconds_per_step
            parts.append(f"{seconds_per_step:.3f} s/step, ETA {format_duration(eta)}")
        logging.info(" | ".join(parts))

    def close(self) -> None:
        if self._writer is not None:
            self._safely("TensorBoard events", self._writer.flush)
            self._safely("TensorBoard events", self._writer.close)
        if self._jsonl is not None:
            self._safely(METRICS_FILE, self._jsonl.close)
