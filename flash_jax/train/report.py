"""Training metrics: the loop's bookkeeping (`StepMetrics`) and where they go (`Reporter`:
TensorBoard events through clu with the run's hyperparameters, `metrics.jsonl`, a console line with
an ETA, and the run's Weights & Biases run, `wandb_run.py`, when `log.wandb_project` is set);
eval.py's results as TensorBoard scalars (`write_eval_scalars`); the summary a run ends with
(`run_summary`)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import logging
from etils import epath

from flash_jax import losses, runs
from flash_jax.runs import METRICS_FILE
from flash_jax.train import memory
from flash_jax.train.flops import peak_flops_per_device  # a name here: tests stand in a peak

TENSORBOARD_DIR = "tensorboard"
FLOAT32_MAX = float(np.finfo(np.float32).max)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


SCIENTIFIC_FROM = 1e6  # figures this large are printed as 1.234e+07, never as 200 digits


def figure(value, spec: str = ".2f", scientific_from: float | None = SCIENTIFIC_FROM) -> str:
    """A figure for the console: `value` formatted with `spec`; inf and nan as such, also when
    they come back from metrics.jsonl as the strings "inf" / "nan"; a magnitude from
    `scientific_from` on (None: never) in scientific notation; anything else as its text."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return str(number)
    if scientific_from is not None and abs(number) >= scientific_from:
        return f"{number:.3e}"
    return format(number, spec)


def _record_step(line: str) -> int | None:
    try:
        record = json.loads(line)
        return int(record["step"])
    except (ValueError, KeyError, TypeError):  # a line cut by a crash, or not a record
        return None


def _drop_records_after(path: epath.Path, step: int) -> int:
    """A run that starts at `step` replays the steps after it: drop their old records. Returns
    the last step recorded before (0 without records): W&B keeps what it got up to there."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept, last = [], 0
    for line in lines:
        record_step = _record_step(line)
        if record_step is not None:
            last = max(last, record_step)
            if record_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    if kept != lines:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)
    return last


def loggable(value: float) -> float:
    """A finite value beyond float32's range (TensorBoard's) becomes +-inf, in both outputs."""
    if math.isfinite(value) and abs(value) > FLOAT32_MAX:
        return math.copysign(math.inf, value)
    return value


class Reporter:
    """Writes scalars for one run; only the main process writes files.

    Records of steps after `start_step` (those the run is about to replay, or all of them for a
    run from scratch) are removed from metrics.jsonl first, so no step is logged twice. Failing
    to open or write an output (a full disk, a read-only file, a TensorBoard error) is one warning
    line for that output; the run goes on.
    """

    def __init__(
        self,
        workdir: str,
        num_steps: int,
        *,
        is_main: bool = True,
        start_step: int = 0,
        config=None,
        wandb_run=None,
        wandb_continued: bool = False,
    ):
        """`config` (a RunConfig): written as TensorBoard hyperparameters. `wandb_run`
        (`wandb_run.start`'s) also gets the records; its starter finishes it
        (`wandb_run.finish`). `wandb_continued`: the W&B run is the workdir's earlier one."""
        self.num_steps = num_steps
        self.is_main = is_main
        self._writer = None
        self._jsonl = None
        self._wandb = wandb_run if is_main else None
        # W&B's history only grows: when the W&B run continues (`wandb_continued`), the records
        # of the steps this run replays, up to the last one recorded before, are not sent again
        # (W&B would drop each with a warning).
        self._wandb_after = 0
        self._failed: set[str] = set()
        # epath: local paths and gs:// alike (TPU pod workdirs live on GCS).
        workdir = epath.Path(workdir)
        if is_main:
            last_recorded = self._safely(
                METRICS_FILE, lambda: _drop_records_after(workdir / METRICS_FILE, start_step)
            )
            self._wandb_after = (last_recorded or 0) if wandb_continued else 0
            # Imported here: clu's TF summary writer pulls in TensorFlow. Synchronous (a few
            # scalars per record): clu's AsyncWriter logs a traceback for each failed write.
            from clu import metric_writers

            self._writer = self._safely(
                "TensorBoard events",
                lambda: metric_writers.SummaryWriter(str(workdir / TENSORBOARD_DIR)),
            )
            self._jsonl = self._safely(METRICS_FILE, (workdir / METRICS_FILE).open, "a")
            if config is not None:
                hparams = flat_hparams(config.to_dict())
                self._safely("TensorBoard events", self._write_hparams, hparams)

    def _safely(self, what: str, write: Callable[..., object], *args):
        """`write(*args)`'s result, or None when it fails: the first failure of each output is
        one warning line, later ones are silent."""
        try:
            return write(*args)
        except Exception as e:  # noqa: BLE001 - metrics must never stop training
            if what not in self._failed:
                self._failed.add(what)
                logging.warning("could not write %s (%s); training goes on", what, e)
            return None

    def _write_hparams(self, hparams: dict) -> None:
        if self._writer is not None:
            self._writer.write_hparams(hparams)

    def _write_scalars(self, step: int, scalars: dict) -> None:
        if self._writer is not None:
            self._writer.write_scalars(step, scalars)

    def _write_line(self, line: str) -> None:
        if self._jsonl is not None:
            self._jsonl.write(line)
            self._jsonl.flush()

    def write(self, step: int, scalars: dict) -> None:
        """One record: TensorBoard scalars and one JSON line {"step": ..., **scalars}."""
        scalars = {k: loggable(float(v)) for k, v in scalars.items() if v is not None}
        if not self.is_main:
            return
        self._safely("TensorBoard events", self._write_scalars, step, scalars)
        line = runs.to_json({"step": step, "time": time.time(), **scalars}) + "\n"
        self._safely(METRICS_FILE, lambda: self._write_line(line))
        if self._wandb is not None and step > self._wandb_after:
            self._safely("W&B records", lambda: self._wandb.log(scalars, step=step))

    def console(self, step: int, scalars: dict, seconds_per_step: float | None) -> None:
        parts = [f"step {step}/{self.num_steps}"]
        for key, spec, scientific_from in (
            ("loss", ".4f", SCIENTIFIC_FROM),
            ("perplexity", ".2f", SCIENTIFIC_FROM),
            ("learning_rate", ".2e", None),
            ("grad_norm", ".3f", SCIENTIFIC_FROM),
            ("tokens_per_sec", ",.0f", None),
            ("mfu", ".1%", None),
        ):
            if scalars.get(key) is not None:
                text = figure(scalars[key], spec, scientific_from)
                parts.append(f"{key.replace('_', ' ')} {text}")
        if scalars.get("peak_bytes_in_use") is not None:
            parts.append(f"peak memory {memory.gib(scalars['peak_bytes_in_use'])}")
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


def flat_hparams(config: dict, prefix: str = "") -> dict:
    """{"model.name": "flash", ...}: TensorBoard's hyperparameter values are bool, int, float or
    str; tuples (the mesh) become their JSON text."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = runs.to_json(runs.json_safe(value))
    return flat


def windows_tag(result: dict) -> str:
    """ "" for windows of the training length, else "_context<N>[_stride<S>]" or
    "_whole_documents<N>": results of other windows go to tags of their own."""
    if result.get("whole_documents"):
        return f"_whole_documents{result['context']}"
    if result.get("stride") is not None:
        return f"_context{result['context']}_stride{result['stride']}"
    if result.get("context") not in (None, result.get("seq_len")):
        return f"_context{result['context']}"
    return ""


def write_eval_scalars(workdir: str, result: dict) -> list[str]:
    """eval.py's result for one checkpoint as scalars at its step in the run's TensorBoard
    (main process only): `eval_py/<split>/{loss,perplexity,bits_per_byte,word_perplexity}`, or
    `eval_py/<split>_first<N>batches/...` for a partial pass (--max_batches), with `windows_tag`
    after the split, and `.../perplexity_by_position/<start>-<end>` per bucket. Returns the
    tags."""
    split = (
        result["split"]
        if result["complete"]
        else f"{result['split']}_first{result['batches']}batches"
    )
    split += windows_tag(result)
    scalars = {
        f"eval_py/{split}/{key}": float(result[key])
        for key in ("loss", "perplexity", "bits_per_byte", "word_perplexity")
        if result.get(key) is not None
    }
    for bucket in result.get("loss_by_position") or []:
        if bucket["loss"] is not None:
            tag = f"eval_py/{split}/perplexity_by_position/{bucket['start']}-{bucket['end']}"
            scalars[tag] = math.exp(bucket["loss"])
    if jax.process_index() == 0:
        from clu import metric_writers

        writer = metric_writers.SummaryWriter(str(epath.Path(workdir) / TENSORBOARD_DIR))
        writer.write_scalars(int(result["step"]), scalars)
        writer.close()
    return sorted(scalars)


def last_records(workdir: str) -> tuple[dict | None, dict | None]:
    """The last training record (with a loss) and the last periodic-eval record of a run's
    metrics.jsonl."""
    train = evaluation = None
    for record in runs.read_jsonl(epath.Path(workdir) / METRICS_FILE):
        if "eval_perplexity" in record:
            evaluation = record
        elif "loss" in record:
            train = record
    return train, evaluation


def _command(program: str, *args: str) -> str:
    """A command line with this interpreter, as the user can paste it (`.venv/bin/python ...`
    from the repository)."""
    return shlex.join([_relative(sys.executable), program, *args])


def run_summary(summary: dict, workdir: str, config) -> str:
    """The lines a run ends with: what happened, the final train and eval figures (from the run's
    metrics.jsonl), where the checkpoint is, and the commands to evaluate, sample and view it."""
    status, step = summary["status"], summary["step"]
    if status == "finished":
        head = (
            f"{workdir} already finished: its checkpoint of step {step} reaches "
            f"train.num_steps={config.train.num_steps}; nothing to do (train longer with "
            f"--config.train.num_steps=N)"
        )
    elif status == "preempted":
        where = (
            f"at step {step}; checkpoint saved in {summary['checkpoint_dir']}"
            if summary["saved"] is not None
            else f"before its first step (at step {step}); nothing new to save"
        )
        head = f"stopped by {summary['stopped_by']} {where}; rerun the same command to resume"
    else:
        head = f"done: {step} steps in {workdir}"
    lines = [f"train.py: {head}"]
    train, evaluation = last_records(workdir)
    if train is not None:
        lines.append(
            f"  train  (step {train['step']}): loss {figure(train['loss'], '.4f')}, "
            f"token perplexity {figure(train.get('perplexity'))}"
        )
    if evaluation is not None:
        lines.append(
            f"  eval   (step {evaluation['step']}, {config.train.eval_split}, "
            f"{figure(evaluation.get('eval_tokens', 0), ',.0f', None)} tokens): "
            f"loss {figure(evaluation.get('eval_loss'), '.4f')}, "
            f"token perplexity {figure(evaluation['eval_perplexity'])}"
        )
    saved = summary.get("saved") or (step if status == "finished" else None)
    if saved is not None:
        lines.append(f"  checkpoint: {_relative(summary['checkpoint_dir'])}/{saved}")
    if status != "preempted":
        tensorboard = os.path.join(os.path.dirname(sys.executable), "tensorboard")
        if not os.path.exists(tensorboard):
            tensorboard = "tensorboard"
        lines += [
            "  next:  " + _command("eval.py", f"--workdir={workdir}"),
            "         "
            + _command("scripts/sample.py", f"--workdir={workdir}", "--prompt=It is a truth"),
            "         " + shlex.join([_relative(tensorboard), f"--logdir={workdir}"]),
        ]
    return "\n".join(lines)


def _relative(path: str) -> str:
    """`path` relative to the working directory when it lies inside it, else as it is."""
    if not os.path.isabs(path):
        return path
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became nan / inf; the run stopped, keeping only checkpoints
    whose own loss is finite."""


class StepMetrics:
    """The loop's metrics between two records, and the checks on them.

    `push(k, metrics)` queues step k's device metrics; the loop reads them (`drain`) before it
    dispatches step k + 1, so that a stop asked while step k runs saves step k (the device waits
    for the host between two steps: a batch transfer and a dispatch). Every
    loss is checked (`check_loss`: a non-finite one stops the run). Losses are averaged over the
    steps between records (the first step of the run or resume, every `train.log_every` steps, the
    first after `train.log_every_seconds` and the last); step time counts neither
    the first step (compile, warm-up) nor the evaluation and checkpoint pauses (`paused`).
    """

    def __init__(
        self,
        config,
        reporter: Reporter,
        keep_by_loss: Callable[[int, float], str],
        model_flops: float,
    ):
        """`keep_by_loss(step, loss)` gets the loss computed from the state after `step`, and
        returns what a stop then leaves (`Checkpoints.keep_by_loss`, which keeps or removes that
        state's checkpoint by it)."""
        self.config, self.reporter, self.keep_by_loss = config.train, reporter, keep_by_loss
        self.tokens_per_step = config.data.batch_size * config.data.seq_len
        self.model_flops = model_flops
        peak = peak_flops_per_device(jax.devices()[0].device_kind)
        self.peak_flops = peak * jax.device_count() if peak else None
        self.last: dict = {}  # the last record written, with its step
        self._pending = None  # (step, device metrics) not yet read
        self._losses: list[float] = []  # since the last record
        self._since: tuple[float, int] | None = None  # (time, step) the timing window starts at
        self._last_record = time.time()

    def push(self, done: int, device_metrics) -> None:
        self.drain()
        self._pending = (done, device_metrics)

    def drain(self) -> None:
        """Reads the queued step's metrics: checks the loss, writes a record at log steps."""
        if self._pending is None:
            return
        done, device_metrics = self._pending
        self._pending = None
        host = jax.device_get(device_metrics)
        loss, grad_norm = float(host["loss"]), float(host["grad_norm"])
        self.check_loss(done, loss, grad_norm)
        now = time.time()
        self._losses.append(loss)
        first = self._since is None
        if first:  # timing starts after the first step (warm-up)
            self._since = (now, done)
        if not (first or self._record_due(done, now)):
            return
        steps = done - self._since[1]
        step_time = (now - self._since[0]) / steps if steps else None
        mean_loss = sum(self._losses) / len(self._losses)
        scalars = {
            "loss": mean_loss,
            "perplexity": losses.perplexity(mean_loss, 1.0),
            "learning_rate": float(host["learning_rate"]),
            "grad_norm": grad_norm,
            "step_time": step_time,
            "tokens_per_sec": self.tokens_per_step / step_time if step_time else None,
            "mfu": self.model_flops / step_time / self.peak_flops
            if step_time and self.peak_flops
            else None,
            # Where the backend reports it (not on CPU): the most any local device has held.
            "peak_bytes_in_use": memory.peak_bytes(),
        }
        self.reporter.write(done, scalars)
        self.reporter.console(done, scalars, step_time)
        self.last = {**scalars, "step": done}
        self._losses, self._since, self._last_record = [], (now, done), now

    def _record_due(self, done: int, now: float) -> bool:
        """Every `log_every`-th step, the last one, and the first after `log_every_seconds`."""
        t = self.config
        if done % t.log_every == 0 or done == t.num_steps:
            return True
        return bool(t.log_every_seconds) and now - self._last_record >= t.log_every_seconds

    def check_loss(self, done: int, loss: float, grad_norm: float | None = None) -> None:
        """Step `done`'s loss is the loss of the state after step done - 1: `keep_by_loss`
        decides by it whether that state's checkpoint (if any) is kept. NonFiniteLossError for
        nan / inf."""
        kept = self.keep_by_loss(done - 1, loss)
        if math.isfinite(loss):
            if grad_norm is None or math.isfinite(grad_norm):
                return
            problem = f"non-finite gradient norm ({grad_norm}) at step {done}"
        else:
            problem = (
                f"non-finite loss ({loss}) at step {done}, computed from the state after step "
                f"{done - 1}"
            )
        raise NonFiniteLossError(f"{problem}; {kept}; stopped, nothing more saved")

    @contextlib.contextmanager
    def paused(self):
        """Evaluation and checkpointing inside do not count as step time."""
        start = time.time()
        yield
        if self._since is not None:
            # drain() may have restarted the window during the pause: then only the rest of the
            # pause is excluded.
            since, step = self._since
            self._since = (since + time.time() - max(start, since), step)
