"""The trainer's checkpoints: asynchronous saves, which steps stay, resumable exactly.

A checkpoint's items and meta, and what a restore checks, are in `checkpoint_format` and
`checkpoint_reader`; `Checkpoints` is the reader of a run the trainer holds, which also saves.

Resuming needs the saved host layout (`check_data_layout`): another process count, batch size,
seed or data stops the run before its first step with one line saying what to do (rerun with the
saved settings, or start a new workdir); nothing is written.

Which steps stay. A saved state is *unverified* until the loop has computed a loss from it (the
next step's loss): `keep_by_loss` keeps it when that loss is finite and removes it when not, so no
kept checkpoint ever has a non-finite loss. A state holding non-finite values is never written.
Among the confirmed, intact steps, Orbax's preservation policies decide (`retention_policy`): the
newest `keep`, plus every multiple of `keep_every_steps` (kept for good, for `eval.py
--all_steps` curves), plus the `keep_best` with the lowest eval loss; the newest step is kept
while it is being verified. A damaged step is never deleted: it is moved to
`workdir/damaged_checkpoints/` when the run saves that step again.

Saving is asynchronous: `poll` (called at every step boundary) reports a save that has committed
("checkpoint saved") or failed (one warning line; training goes on, the next save retries);
`finish` waits for the last one and raises `CheckpointSaveError` if it failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from flash_jax.train.checkpoint_format import (
    FORMAT_VERSION,
    ITEMS,
    DamagedCheckpointError,
    DataStateSave,
    checkpoint_dir,
    few,
    inspect_arrays,
    reason,
)
from flash_jax.train.checkpoint_reader import CheckpointReader

policies = ocp.checkpoint_managers

# A damaged step is moved here (never deleted) when the run is about to save that step again.
DAMAGED_DIR = "damaged_checkpoints"


class CheckpointSaveError(RuntimeError):
    """The run's last checkpoint could not be saved (full disk, lost storage); one line."""


# A save writes under `<step>.orbax-checkpoint-tmp-<time>/<item>.orbax-checkpoint-tmp-<time>/`;
# the deepest files below that are the data item's TF files (about 100 characters). The probe
# writes this many characters there: the deepest file, with a margin.
PROBE_TAIL_CHARS = 128


def check_writable(workdir: str, num_steps: int) -> None:
    """ValueError (one line) unless `workdir/checkpoints` can hold a checkpoint: writes, then
    removes, a file at a path as long as the longest a save of step `num_steps` writes, so that a
    path past the system's limit ("File name too long"), a read-only or unwritable folder stops
    the run before it trains instead of failing every save."""
    root = epath.Path(checkpoint_dir(workdir))
    existed = root.exists()
    # Orbax's temporary suffix (a probe left by a crash is cleaned as an unfinished save), one
    # per process: each process writes and removes its own.
    tmp = f"orbax-checkpoint-tmp-{jax.process_index():019d}"
    step_dir = root / f"{num_steps}.{tmp}"
    tail = "probe".ljust(PROBE_TAIL_CHARS // 2, "_")
    path = step_dir / f"state.{tmp}" / tail / tail
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("flash_jax checks that a checkpoint can be written here")
    except Exception as e:  # noqa: BLE001 - OSError locally, tf / gcs errors remotely
        raise ValueError(
            f"workdir {workdir!r} cannot hold a checkpoint: writing a {len(str(path))}-character "
            f"path under {root} failed ({reason(e)}); use a shorter or writable --workdir"
        ) from e
    finally:
        _remove_quietly(step_dir)
        if not existed and "://" not in str(root):
            with contextlib.suppress(OSError):  # only when empty: other processes probe too
                os.rmdir(root)


def _remove_quietly(path: epath.Path) -> None:
    """Removes folder `path` if it is there; a failure is one warning line."""
    try:
        if path.exists():
            path.rmtree()
    except Exception as e:  # noqa: BLE001 - what is left is Orbax's to clean, or harmless
        logging.warning("could not remove %s (%s)", path, reason(e))


# ----------------------------------------------------------------------------- retention


@dataclasses.dataclass(frozen=True)
class _StepInfo:  # what Orbax's preservation policies read (PolicyCheckpointInfo)
    step: int
    metrics: dict | None
    time: Any = None


def retention_policy(
    keep: int, keep_every_steps: int = 0, keep_best: int = 0
) -> policies.PreservationPolicy:
    """Orbax's policies for the steps `_prune` may choose from (confirmed, intact ones): the
    newest `keep`; every multiple of `keep_every_steps` (0: none), for good; the `keep_best` with
    the lowest eval loss (0: none; steps saved without an eval loss do not compete)."""
    chosen = [policies.LatestN(n=keep)]
    if keep_every_steps:
        chosen.append(policies.EveryNSteps(interval_steps=keep_every_steps))
    if keep_best:
        chosen.append(
            policies.BestN(
                get_metric_fn=lambda m: m["eval_loss"],
                reverse=True,  # BestN keeps the end of the sorted list: the lowest losses
                n=keep_best,
                keep_checkpoints_without_metrics=False,
            )
        )
    return policies.AnyPreservationPolicy(chosen)


# ------------------------------------------------------------------------ the trainer's checkpoints


class Checkpoints(CheckpointReader):
    """The run's `CheckpointManager` under `workdir/checkpoints`, for the trainer that holds the
    workdir (see the module docstring)."""

    # The workdir lock keeps every other trainer out: nothing changes here but by this one.
    live = False

    def __init__(
        self,
        workdir: str,
        keep: int = 1,
        *,
        keep_every_steps: int = 0,
        keep_best: int = 0,
        async_save: bool = True,
        max_failed_saves: int = 0,
    ):
        """`max_failed_saves`: after this many failed saves in a row, `poll` and `save` raise
        CheckpointSaveError (0: never; the last save is checked by `finish`)."""
        options = ocp.CheckpointManagerOptions(
            # No max_to_keep: `_prune` removes old steps, counting only verified ones.
            enable_async_checkpointing=async_save,
            # A save killed half-way leaves a temporary directory, never a half checkpoint
            # (orbax renames on commit); clean such leftovers when the run restarts. Safe
            # because the workdir is locked (flash_jax.train.workdir): no other trainer is
            # saving here.
            cleanup_tmp_directories=True,
            create=True,
        )
        manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)
        super().__init__(workdir, manager)
        self.max_failed_saves = max_failed_saves
        self._failures_in_a_row: list[str] = []  # "step N: reason" of each, since the last commit
        self.keep = keep
        self.policy = retention_policy(keep, keep_every_steps, keep_best)
        self._eval_losses: dict[int, float | None] = {}  # step -> its meta's eval_loss (cache)
        self.unverified: int | None = None  # newest saved state whose loss is not yet known
        self._in_flight: int | None = None  # saving, commit not yet seen
        self._failed: int | None = None  # the step of the last save that failed
        self._attempted: int | None = None  # the step of the last save started

    def latest_good_step(self) -> int | None:
        """The newest step that is neither damaged nor awaiting its loss check."""
        good = [s for s in self.all_steps() if s not in self.damaged and s != self.unverified]
        return good[-1] if good else None

    def restore_newest(
        self, abstract_state: Any, model_config=None, pipe=None
    ) -> tuple[Any, dict, int]:
        """(state, meta, step) of the newest intact checkpoint (see `first_intact`); with `pipe`,
        its input stream too. Its loss is checked again by the first step (`keep_by_loss`)."""

        def restore_one(s: int):
            return self.restore(abstract_state, s, model_config, pipe=pipe)

        step, (state, meta) = self.first_intact(restore_one)
        self.unverified = step
        return state, meta, step

    # ---- saving
    def save(self, step: int, state: Any, meta: dict, pipe=None) -> bool:
        """Starts an asynchronous save of `state` + `meta` at `step` (with `pipe`, each process's
        input stream is saved first, synchronously: "data"); False if nothing was started.

        Nothing is written for a step that exists, or a state holding non-finite values; a failure
        is reported in one warning line (`_save_failed`).
        """
        self._settle(block=True)
        self._stop_if_failing()
        self._prune()
        if step in self.damaged:
            self._set_aside(step)
        if step in self.manager.all_steps():
            return False
        checksums, non_finite = inspect_arrays(state)
        if non_finite:
            logging.warning("not saving step %d: non-finite values in %s", step, few(non_finite))
            return False
        items = {
            "state": ocp.args.StandardSave(state),
            "meta": ocp.args.JsonSave(
                {**meta, "format_version": FORMAT_VERSION, "checksums": checksums}
            ),
        }
        if pipe is not None:
            items["data"] = DataStateSave(pipe)
        self._attempted = step
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001 - a full disk, lost storage, ...
            self._save_failed(step, e)
            self._stop_if_failing()
            return False
        self._in_flight = self.unverified = step
        self._eval_losses[step] = meta.get("eval_loss")
        return True

    def poll(self) -> None:
        """At a step boundary: reports a save that has committed or failed since the last call;
        CheckpointSaveError after `max_failed_saves` failures in a row."""
        self._settle(block=False)
        self._stop_if_failing()

    def _stop_if_failing(self) -> None:
        failures = self._failures_in_a_row
        if self.max_failed_saves and len(failures) >= self.max_failed_saves:
            raise CheckpointSaveError(
                f"{len(failures)} checkpoints in a row could not be saved in {self.directory} "
                f"(the last, {failures[-1]}); stopped (train.max_failed_saves="
                f"{self.max_failed_saves}); {self._committed()}"
            )

    def _committed(self) -> str:
        good = self.latest_good_step()
        if good is None:
            return "no checkpoint is committed yet"
        return f"the newest committed checkpoint is step {good}"

    def finish(self) -> None:
        """Waits for the last save; CheckpointSaveError (one line) if it did not commit."""
        self._settle(block=True)
        last = self._attempted  # its failure may be reported by save itself (the data item)
        if last is not None and self._failed == last:
            raise CheckpointSaveError(
                f"the checkpoint of step {last} could not be saved in {self.directory} (see the "
                f"warning above); {self._committed()}"
            )
        self._prune()

    def confirm(self, step: int) -> None:
        """A finite loss was computed from the state saved at `step`: it is good."""
        if step == self.unverified:
            self.unverified = None

    def discard(self, step: int) -> bool:
        """The loss computed from the state saved at `step` is not finite: removes that step.

        Returns whether a checkpoint was removed.
        """
        if step != self.unverified:
            return False
        self.unverified = None
        self._settle(block=True)
        if step not in self.manager.all_steps():
            return False
        self.manager.delete(step)
        self._eval_losses.pop(step, None)
        return True

    def keep_by_loss(self, step: int, loss: float) -> str:
        """Keeps the checkpoint of `step` when `loss`, computed from its state (the next step's
        loss), is finite, and removes it when not: no kept checkpoint has a non-finite loss.

        Returns what a run stopped now leaves, for its error line: whether this checkpoint was
        removed, and the newest checkpoint with a finite loss.
        """
        if math.isfinite(loss):
            self.confirm(step)
            removed = False
        else:
            removed = self.discard(step)
        good = self.latest_good_step()
        if good is None:
            kept = f"no checkpoint with a finite loss is kept in {self.directory}"
        else:
            kept = f"the newest checkpoint with a finite loss is step {good} in {self.directory}"
        return f"its checkpoint was removed; now {kept}" if removed else kept

    def _settle(self, *, block: bool) -> None:
        if self._in_flight is None or (not block and self.manager.is_saving_in_progress()):
            return
        step, self._in_flight = self._in_flight, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - the background commit failed
            self._save_failed(step, e)
            return
        self._failures_in_a_row = []
        logging.info("checkpoint saved at step %d in %s", step, self.directory)

    def _save_failed(self, step: int, error: Exception) -> None:
        self._failed = step
        self._failures_in_a_row.append(f"step {step}: {reason(error)}")
        if self.unverified == step:
            self.unverified = None
        if jax.process_index() == 0:  # what the failed save left (Orbax cleans only on restart)
            for unfinished in epath.Path(self.directory).glob(f"{step}.orbax-checkpoint-tmp*"):
                _remove_quietly(unfinished)
        logging.warning(
            "checkpoint step %d could not be saved in %s (%s); training goes on and the next "
            "checkpoint tries again; %s",
            step,
            self.directory,
            reason(error),
            self._committed(),
        )

    def _eval_loss(self, step: int) -> float | None:
        if step not in self._eval_losses:
            try:
                self._eval_losses[step] = self.read_meta(step).get("eval_loss")
            except DamagedCheckpointError:
                self._eval_losses[step] = None
        return self._eval_losses[step]

    def _prune(self) -> None:
        """Deletes the verified steps `policy` does not keep (damaged and unverified ones are
        neither counted nor deleted here).

        Called only where every process is (saves, the end), after the last save has settled.
        """
        good = [s for s in self.all_steps() if s not in self.damaged and s != self.unverified]
        infos = []
        for s in good:
            loss = self._eval_loss(s)
            finite = loss is not None and math.isfinite(loss)
            infos.append(_StepInfo(s, {"eval_loss": loss} if finite else None))
        keep = self.policy.should_preserve(infos, context=policies.PreservationContext())
        for info, kept in zip(infos, keep, strict=True):
            if not kept:
                self.manager.delete(info.step)
                self._eval_losses.pop(info.step, None)

    def _set_aside(self, step: int) -> None:
        """Moves damaged `step` to `workdir/damaged_checkpoints/`, so that it can be saved anew."""
        source = epath.Path(self.step_path(step))
        target = epath.Path(self.workdir) / DAMAGED_DIR / str(step)
        if target.exists():
            target = target.with_name(f"{step}-{int(time.time())}")
        if jax.process_index() == 0:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                source.rename(target)
            except Exception as e:  # noqa: BLE001 - e.g. a directory rename on GCS
                raise CheckpointSaveError(
                    f"the damaged checkpoint {source} could not be moved out of the way of a new "
                    f"step {step} ({reason(e)}); move it by hand and rerun"
                ) from e
        multihost_utils.sync_global_devices(f"flash_jax_set_aside_{step}")
        self.manager.reload()
        del self.damaged[step]
        self._eval_losses.pop(step, None)
        logging.warning("moved the damaged checkpoint step %d to %s", step, target)

    def close(self) -> None:
        """Waits for a save still in flight (reporting its failure in one line) and closes."""
        try:
            self._settle(block=True)
        finally:
            super().close()
