"""Orbax checkpoints of a run: asynchronous, atomic, checked on restore, resumable exactly.

Each step directory holds three items:
  state: the train state (params, optimizer state, step, RNG key data) as sharded arrays
  meta:  JSON: step, data position (`pipe.position`), the host layout of the input stream
         (`data_layout`: process count, batch per host, seed, task, ...; see flash_jax/data),
         the model config, the resolved run config, the eval loss when the step was evaluated, and
         `checksums`: per array of the state, the sum of its 32-bit words modulo 2^32
  data:  each process's place in its input stream (`InputPipeline.save_state`: the tf.data
         iterator, shuffle buffer included), so that a resume costs the same at any step and
         continues with exactly the batches an uninterrupted run would have read. Checkpoints
         written before it existed have none: the stream is then replayed up to the position.

Resuming needs the saved host layout (`check_layout`): another process count, batch size, seed or
data stops the run before its first step with one line saying what to do (rerun with the saved
settings, or start a new workdir); nothing is written.

Which steps are kept. A saved state is *unverified* until the loop has computed a loss from it (the
next step's loss): `confirm` keeps it, `discard` removes it (its loss was not finite), so no kept
checkpoint ever has a non-finite loss. A state holding non-finite values is never written. Among
the confirmed, intact steps, Orbax's preservation policies decide (`retention_policy`): the newest
`keep`, plus every multiple of `keep_every_steps` (kept for good, for `eval.py --all_steps`
curves), plus the `keep_best` with the lowest eval loss; the newest step is kept while it is
being verified.

What a restore checks (`Checkpoints.restore`): the meta JSON parses;
Orbax reads every array (missing or truncated files, a missing `_METADATA`, ... fail here); every
array matches its checksum (a flipped bit anywhere in the data); every float is finite. Any
failure is a `DamagedCheckpointError` naming the step and its path. `first_intact` falls back from
a damaged step to the newest intact one (one warning line per damaged step; nothing is deleted).
A train state of another layout (other arrays than the meta's checksums name, e.g. another
optimizer's) is a config error, not damage.

Saving is asynchronous: `poll` (called at every step boundary) reports a save that has committed
("checkpoint saved") or failed (one warning line; training goes on, the next save retries);
`finish` waits for the last one and raises `CheckpointSaveError` if it failed.

Reading a finished or running run (eval.py, sample.py, export.py): `Checkpoints(workdir,
read_only=True)` never creates, deletes or cleans anything; `restore(workdir)` gives the
parameters of a checkpoint with the config they were trained with, ready for a forward pass.
A live trainer saves and prunes while a reader works: the reader lists the steps afresh each time
it asks, and a step that disappears while it is read (or whose folder a live trainer is removing)
is not damage but a `RemovedCheckpointError`: falling back takes the newest committed step then.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging as std_logging
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from flash_jax import runs, sharding
from flash_jax.config import ModelConfig, RunConfig
from flash_jax.train import workdir as workdir_lib

policies = ocp.checkpoint_managers

CHECKPOINT_DIR = "checkpoints"
# A damaged step is moved here (never deleted) when the run is about to save that step again.
DAMAGED_DIR = "damaged_checkpoints"
# A reader waits this long for the folder of a step that fails to read to disappear, when a live
# trainer holds the workdir (its prune removes a step's files one by one).
REMOVAL_SECONDS = 3.0
# Listing the steps of a live run fails when a step is pruned while Orbax reads it: tries.
LIST_ATTEMPTS = 5
# Keys that change how the model is computed, not what it is: a resumed run may change them.
RESUMABLE_MODEL_KEYS = ("remat", "attention_impl", "flash_impl")


class DamagedCheckpointError(ValueError):
    """A checkpoint that does not read back as it was written; the message names step and path."""

    def __init__(self, step: int, path: str, reason: str):
        self.step, self.path, self.reason = step, path, reason
        super().__init__(f"checkpoint step {step} in {path} is damaged: {reason}")


class RemovedCheckpointError(ValueError):
    """A step that was listed but disappeared while it was read: a live trainer pruned it."""

    def __init__(self, step: int, directory: str):
        self.step = step
        super().__init__(
            f"checkpoint step {step} in {directory} was removed while it was read (the run "
            "writing it keeps only its newest checkpoints)"
        )


class CheckpointSaveError(RuntimeError):
    """The run's last checkpoint could not be saved (full disk, lost storage); one line."""


def model_config_dict(model_config) -> dict:
    """The model config as plain JSON-able values (from a ConfigDict, mapping or ModelConfig)."""
    values = ModelConfig.from_config(model_config).to_dict()
    return json.loads(json.dumps(values))  # tuples -> lists, as they come back from JSON


def checkpoint_dir(workdir: str) -> str:
    """`workdir/checkpoints`, absolute for local paths; URLs (gs://) are kept as they are."""
    path = str(epath.Path(workdir) / CHECKPOINT_DIR)
    return path if "://" in path else os.path.abspath(path)


def _reason(error: BaseException, limit: int = 300) -> str:
    """One line about an exception: its root cause, which says what is wrong (Orbax wraps
    TensorStore's "OUT_OF_RANGE: ..." in a page-long message), cut to about `limit` characters."""
    seen = {id(error)}
    while True:
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None or id(inner) in seen:
            break
        error = inner
        seen.add(id(error))
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    # Long messages name the path first and the cause ("No space left on device") last.
    text = text if len(text) <= limit else f"{text[: limit // 2]} ... {text[-limit // 2 :]}"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


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
            f"path under {root} failed ({_reason(e)}); use a shorter or writable --workdir"
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
        logging.warning("could not remove %s (%s)", path, _reason(e))


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# ----------------------------------------------------------------------------- array checks


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def leaf_paths(tree) -> dict[str, Any]:
    """{"params/embed/embedding": leaf, ...}: the same names for a state, its abstract twin and
    Orbax's metadata of it (which stores named tuples as dicts)."""
    return {
        "/".join(_key_name(k) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as unsigned integers (8-byte values become two 32-bit words)."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned)


@jax.jit
def _checksums_and_finite(tree):
    # Integer sums wrap modulo 2^32 and are exact in any reduction order, so the checksum does not
    # depend on the mesh or device; any single flipped bit changes it.
    sums = jax.tree.map(lambda x: jnp.sum(_words(x), dtype=jnp.uint32), tree)
    finite = jax.tree.map(
        lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.floating) else True,
        tree,
    )
    return sums, finite


def inspect_arrays(tree) -> tuple[dict[str, int], list[str]]:
    """Per-array checksums ({path: int}) and the paths of arrays holding nan or inf."""
    sums, finite = jax.device_get(_checksums_and_finite(tree))
    checksums = {p: int(v) for p, v in leaf_paths(sums).items()}
    return checksums, [p for p, ok in leaf_paths(finite).items() if not ok]


def check_arrays(step: int, path: str, tree, checksums: dict | None) -> None:
    """DamagedCheckpointError unless every array matches its saved checksum and is finite."""
    sums, non_finite = inspect_arrays(tree)
    if checksums:  # checkpoints written before checksums existed have none
        bad = [p for p, s in sums.items() if p in checksums and checksums[p] != s]
        if bad:
            raise DamagedCheckpointError(
                step, path, f"array data differs from the checksum saved with it ({_few(bad)})"
            )
    if non_finite:
        raise DamagedCheckpointError(step, path, f"non-finite values in {_few(non_finite)}")


def layout_differences(saved_paths: Iterable[str], abstract) -> list[str]:
    """Arrays of `abstract` that a checkpoint lacks, or has and `abstract` does not.

    `saved_paths` are the keys of the checkpoint's `checksums`; only the top-level groups of
    `abstract` are compared (a partial restore of "params" compares the parameters).
    """
    wanted = set(leaf_paths(abstract))
    groups = {p.split("/")[0] for p in wanted}
    saved = {p for p in saved_paths if p.split("/")[0] in groups}
    return [f"{p} is not in the checkpoint" for p in sorted(wanted - saved)] + [
        f"{p} is not in this config's state" for p in sorted(saved - wanted)
    ]


def check_model_config(directory: str, step: int, meta: dict, model_config) -> None:
    """ValueError if checkpoint `step` was written by another model config (keys that change only
    how the model is computed, RESUMABLE_MODEL_KEYS, may differ)."""
    saved = meta.get("model_config")
    if saved is None:
        return
    current = model_config_dict(model_config)
    keys = sorted(set(saved) | set(current))
    diff = [
        k
        for k in keys
        if k not in RESUMABLE_MODEL_KEYS
        and saved.get(k, "<missing>") != current.get(k, "<missing>")
    ]
    if diff:
        details = ", ".join(
            f"model.{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}" for k in diff
        )
        raise ValueError(
            f"checkpoint {step} in {directory} was written by a different model config "
            f"({details}); use the run's own config (eval.py, sample.py: leave out --config) or "
            "another --workdir"
        )


# ----------------------------------------------------------------------------- the data item


class DataStateHandler(ocp.CheckpointHandler):
    """The checkpoint's "data" item: every process writes (reads) its own input-stream state in
    the item's folder (`InputPipeline.save_state` / `restore_state`). Synchronous: it runs while the
    loop waits between two batches, so the saved state is that of the saved step."""

    def save(self, directory: epath.Path, args: DataStateSave) -> None:
        args.pipe.save_state(str(directory))

    def restore(self, directory: epath.Path, args: DataStateRestore) -> int:
        args.pipe.restore_state(str(directory))
        return args.pipe.position

    def metadata(self, directory: epath.Path) -> None:
        return None


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    pipe: Any  # flash_jax.data.InputPipeline


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pipe: Any  # a new flash_jax.data.InputPipeline (no batch taken)


def check_data_layout(directory: str, step: int, meta: dict, layout: dict) -> None:
    """ValueError (one line) if checkpoint `step` was saved with another host layout of the input
    stream than `layout` (this run's, `InputPipeline.layout`): another process count, batch size,
    seed or data. Checkpoints written before the layout was recorded pass."""
    from flash_jax.data import pipeline  # TensorFlow: only where a run resumes

    saved = meta.get("data_layout")
    problem = saved is not None and pipeline.check_layout(saved, layout)
    if problem:
        raise ValueError(
            f"cannot resume from checkpoint {step} in {directory}: {problem}; nothing was written"
        )


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


# ----------------------------------------------------------------------------- the manager


class _WithoutMessage(std_logging.Filter):
    """Drops the log records whose message contains `text`."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record):
        return self.text not in record.getMessage()


class Checkpoints:
    """The run's `CheckpointManager` under `workdir/checkpoints` (see the module docstring)."""

    def __init__(
        self,
        workdir: str,
        keep: int = 1,
        *,
        keep_every_steps: int = 0,
        keep_best: int = 0,
        async_save: bool = True,
        read_only: bool = False,
        max_failed_saves: int = 0,
    ):
        """`max_failed_saves`: after this many failed saves in a row, `poll` and `save` raise
        CheckpointSaveError (0: never; the last save is checked by `finish`)."""
        self.workdir = workdir
        self.max_failed_saves = max_failed_saves
        self._failures_in_a_row: list[str] = []  # "step N: reason" of each, since the last commit
        self.directory = checkpoint_dir(workdir)
        self.keep = keep
        self.policy = retention_policy(keep, keep_every_steps, keep_best)
        self._eval_losses: dict[int, float | None] = {}  # step -> its meta's eval_loss (cache)
        self._listed_steps: set[int] = set()  # every step listed so far
        self.read_only = read_only
        if read_only:
            # A run that may be live: nothing is created, deleted or cleaned.
            if not epath.Path(workdir).is_dir():
                raise ValueError(f"workdir {workdir!r} does not exist")
            if not epath.Path(self.directory).is_dir():
                raise ValueError(f"no checkpoints in {workdir!r} ({self.directory} does not exist)")
            options = ocp.CheckpointManagerOptions(
                read_only=True, create=False, save_interval_steps=0
            )
            read_only_notice = _WithoutMessage("Given directory is read only")
            std_logging.getLogger("absl").addFilter(read_only_notice)  # what was asked for
            try:
                self.manager = self._listed(
                    lambda: ocp.CheckpointManager(
                        self.directory, options=options, item_names=("state", "meta", "data")
                    )
                )
            finally:
                std_logging.getLogger("absl").removeFilter(read_only_notice)
        else:
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
            self.manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=("state", "meta", "data")
            )
        self.unverified: int | None = None  # newest saved state whose loss is not yet known
        self.damaged: dict[int, str] = {}  # step -> reason, found by `first_intact`
        self._in_flight: int | None = None  # saving, commit not yet seen
        self._failed: int | None = None  # the step of the last save that failed
        self._attempted: int | None = None  # the step of the last save started

    # ---- steps
    def step_path(self, step: int) -> str:
        return str(epath.Path(self.directory) / str(step))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """The committed steps; read afresh from storage when read-only (a live run's change)."""
        if self.read_only:
            self._listed(self.manager.reload)
        steps = sorted(self.manager.all_steps())
        self._listed_steps.update(steps)
        return steps

    def _listed(self, list_steps: Callable[[], Any]) -> Any:
        """`list_steps()` (Orbax listing the step folders), tried again when a step it found is
        removed by a live trainer before Orbax reads its metadata."""
        for attempt in range(LIST_ATTEMPTS):
            try:
                return list_steps()
            except Exception as e:  # noqa: BLE001 - FileNotFoundError, or Orbax's wrapping of it
                if attempt == LIST_ATTEMPTS - 1:
                    raise ValueError(
                        f"the checkpoints in {self.directory} cannot be listed ({_reason(e)})"
                    ) from e
                time.sleep(0.1)

    def live_holder(self) -> dict | None:
        """The trainer holding a read-only reader's workdir, if one does (its lock record)."""
        return workdir_lib.holder(self.workdir) if self.read_only else None

    def removed(self, step: int) -> bool:
        """Whether listed `step` has gone (read-only readers only): its folder no longer exists,
        or disappears within REMOVAL_SECONDS while a trainer holds the workdir."""
        if not self.read_only:
            return False
        path = epath.Path(self.step_path(step))
        deadline = time.time() + (REMOVAL_SECONDS if self.live_holder() is not None else 0.0)
        while path.exists():
            if time.time() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def _removed_or(self, error: DamagedCheckpointError) -> ValueError:
        """`error`, or a RemovedCheckpointError when its step has gone (see `removed`)."""
        if self.removed(error.step):
            return RemovedCheckpointError(error.step, self.directory)
        return error

    def latest_good_step(self) -> int | None:
        """The newest step that is neither damaged nor awaiting its loss check."""
        good = [s for s in self.all_steps() if s not in self.damaged and s != self.unverified]
        return good[-1] if good else None

    def resolve_step(self, step: int | None) -> int:
        """`step`, or the latest one; ValueError naming the steps there are (a
        RemovedCheckpointError for a step listed before that has gone since)."""
        steps = self.all_steps()
        if not steps:
            raise ValueError(f"no checkpoints in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps and step in self._listed_steps:  # seen before: pruned since
            raise RemovedCheckpointError(step, self.directory)
        if step not in steps:
            raise ValueError(
                f"no checkpoint for step {step} in {self.directory}; it has steps {steps}"
            )
        return step

    # ---- reading
    def read_meta(self, step: int | None = None) -> dict:
        """The meta JSON of `step` (the latest by default); DamagedCheckpointError if it does not
        read back, RemovedCheckpointError if the step went while it was read."""
        step = self.latest_step() if step is None else step
        try:
            return self._read_meta(step)
        except DamagedCheckpointError as e:
            raise self._removed_or(e) from e

    def _read_meta(self, step: int) -> dict:
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
            meta = restored["meta"]
        except Exception as e:  # noqa: BLE001 - any failure to read it back is damage
            raise DamagedCheckpointError(
                step, self.step_path(step), f"its meta JSON cannot be read ({_reason(e)})"
            ) from e
        if not isinstance(meta, dict):
            raise DamagedCheckpointError(
                step, self.step_path(step), "its meta is not a JSON object"
            )
        return dict(meta)

    def check_compatible(self, model_config) -> int | None:
        """Refuses (ValueError) a workdir whose newest readable checkpoint has another model config.

        Returns the latest step (None for a fresh workdir). Reads only the small JSON items; a
        damaged one is skipped here and reported by `restore_newest`.
        """
        for step in reversed(self.all_steps()):
            try:
                meta = self.read_meta(step)
            except DamagedCheckpointError:
                continue
            check_model_config(self.directory, step, meta, model_config)
            break
        return self.latest_step()

    def _damage_or_layout_error(
        self, step: int, abstract, meta: dict, error: Exception
    ) -> Exception:
        """A failed restore is damage, unless the arrays saved (the names in the meta's
        checksums) are not the ones this config's state has: then the config differs."""
        diffs = layout_differences(meta.get("checksums") or (), abstract)
        if meta.get("checksums") and diffs:
            return ValueError(
                f"checkpoint step {step} in {self.step_path(step)} holds a train state laid out "
                f"differently from this config's ({_few(diffs, 2)}); a train.* setting such as "
                "the optimizer or gradient clipping differs: use the run's own config or another "
                "--workdir"
            )
        return DamagedCheckpointError(step, self.step_path(step), _reason(error))

    def restore(
        self,
        abstract: Any,
        step: int | None = None,
        model_config=None,
        *,
        partial: bool = False,
        pipe=None,
    ) -> tuple[Any, dict]:
        """The train state laid out as `abstract` (ShapeDtypeStructs with shardings) + meta; with
        `partial`, `abstract` is part of the state (e.g. {"params": ...}) and only that is read.
        With `pipe` (a new InputPipeline), the input stream is restored too (`restore_data`).

        DamagedCheckpointError if anything does not read back as written (RemovedCheckpointError
        if the step went while it was read); ValueError for another model config (`model_config`),
        another state layout or another host layout (`pipe`).
        """
        step = self.latest_step() if step is None else step
        try:
            return self._restore(abstract, step, model_config, partial=partial, pipe=pipe)
        except DamagedCheckpointError as e:
            raise self._removed_or(e) from e

    def _restore(self, abstract, step: int, model_config, *, partial: bool, pipe) -> tuple:
        meta = self._read_meta(step)
        if model_config is not None:
            check_model_config(self.directory, step, meta, model_config)
        if pipe is not None:  # before the arrays are read: a wrong layout is a quick error
            check_data_layout(self.directory, step, meta, pipe.layout)
        if partial:
            restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
            item = ocp.args.PyTreeRestore(
                item=abstract, restore_args=restore_args, partial_restore=True
            )
        else:
            item = ocp.args.StandardRestore(abstract)
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(state=item))["state"]
        except Exception as e:  # noqa: BLE001 - classified below
            raise self._damage_or_layout_error(step, abstract, meta, e) from e
        check_arrays(step, self.step_path(step), state, meta.get("checksums"))
        if pipe is not None:
            self.restore_data(step, pipe)
        # Its loss is checked again by the first step (`confirm` / `discard`).
        self.unverified = step
        return state, meta

    def has_data(self, step: int) -> bool:
        """Whether checkpoint `step` holds the input streams' state (the "data" item)."""
        return (epath.Path(self.step_path(step)) / "data").is_dir()

    def restore_data(self, step: int, pipe) -> None:
        """Puts each process's input stream where it was at `step`; DamagedCheckpointError if it
        does not read back. Call `has_data` first (older checkpoints have no such item)."""
        try:
            self.manager.restore(step, args=ocp.args.Composite(data=DataStateRestore(pipe)))
        except ValueError:  # another layout: a one-line config error from the pipeline
            raise
        except Exception as e:  # noqa: BLE001 - missing or truncated iterator files
            raise DamagedCheckpointError(
                step, self.step_path(step), f"its data state cannot be read ({_reason(e)})"
            ) from e

    def first_intact(self, restore_one: Callable[[int], Any], upto: int | None = None):
        """(step, restore_one(step)) for the newest intact step (up to `upto`, if given).

        Each damaged step is reported in one warning line and remembered in `damaged`; nothing is
        deleted. A step removed while it was read (a live trainer's prune) is no damage: the steps
        are listed again and the newest committed one is tried. ValueError (one line) when every
        step is damaged.
        """
        tried, damaged = set(), []
        while True:
            steps = [s for s in self.all_steps() if (upto is None or s <= upto) and s not in tried]
            if not steps:
                break
            step = steps[-1]
            tried.add(step)
            try:
                return step, restore_one(step)
            except RemovedCheckpointError as e:
                logging.info("%s; taking the newest committed one", e)
            except DamagedCheckpointError as e:
                logging.warning("%s; trying an earlier checkpoint (nothing was deleted)", e)
                self.damaged[step] = e.reason
                damaged.append(step)
        if not damaged:
            raise ValueError(f"no checkpoints in {self.directory}")
        holder = self.live_holder()
        advice = (
            f"move {self.directory} away to start afresh"
            if holder is None
            else f"the run writing it ({workdir_lib.describe(holder)}) will save another one"
        )
        raise ValueError(
            f"no intact checkpoint in {self.directory}: steps {sorted(damaged)} are damaged (see "
            f"the warnings); {advice}"
        )

    def restore_newest(
        self, abstract_state: Any, model_config=None, pipe=None
    ) -> tuple[Any, dict, int]:
        """(state, meta, step) of the newest intact checkpoint (see `first_intact`); with `pipe`,
        its input stream too where the checkpoint holds one (`has_data`)."""

        def restore_one(s: int):
            return self.restore(
                abstract_state, s, model_config, pipe=pipe if self.has_data(s) else None
            )

        step, (state, meta) = self.first_intact(restore_one)
        return state, meta, step

    # ---- saving
    def save(self, step: int, state: Any, meta: dict, pipe=None) -> bool:
        """Starts an asynchronous save of `state` + `meta` at `step` (with `pipe`, each process's
        input stream is saved first, synchronously: "data"); False if nothing was started.

        Nothing is written for a step that exists, or a state holding non-finite values; a failure
        is reported in one warning line (`_save_failed`).
        """
        if self.read_only:
            raise RuntimeError(f"{self.directory} was opened read-only")
        self._settle(block=True)
        self._stop_if_failing()
        self._prune()
        if step in self.damaged:
            self._set_aside(step)
        if step in self.manager.all_steps():
            return False
        checksums, non_finite = inspect_arrays(state)
        if non_finite:
            logging.warning("not saving step %d: non-finite values in %s", step, _few(non_finite))
            return False
        items = {
            "state": ocp.args.StandardSave(state),
            "meta": ocp.args.JsonSave({**meta, "checksums": checksums}),
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
        self._failures_in_a_row.append(f"step {step}: {_reason(error)}")
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
            _reason(error),
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
                    f"step {step} ({_reason(e)}); move it by hand and rerun"
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
            try:
                self.manager.close()
            except Exception as e:  # noqa: BLE001 - the failed save it re-raises is reported
                logging.warning("closing the checkpoints in %s: %s", self.directory, _reason(e))


# ----------------------------------------------------------------------------- reading a run


def run_config(ckpts: Checkpoints, step: int, config=None) -> RunConfig:
    """The config to read checkpoint `step` with.

    Without `config`: the run config saved in the checkpoint (falling back to the run's
    config.json). With `config` (a ConfigDict, e.g. eval.py's --config): that one, once its model
    is found to be the checkpoint's. DamagedCheckpointError if the meta JSON does not read.
    """
    meta = ckpts.read_meta(step)
    if config is None:
        config = meta.get("config")
        if config is None:
            path = epath.Path(ckpts.workdir) / runs.CONFIG_FILE
            if not path.exists():
                raise ValueError(
                    f"checkpoint {step} in {ckpts.directory} holds no run config and there is "
                    f"no {path}; pass --config"
                )
            config = json.loads(path.read_text())
    config = RunConfig.from_config(config)
    check_model_config(ckpts.directory, step, meta, config.model)
    return config


def steps_to_evaluate(
    ckpts: Checkpoints, step: int | None, all_steps: bool, config=None
) -> tuple[list[int], RunConfig]:
    """The checkpoints eval.py evaluates, and the run config of the last (see `run_config`).

    `all_steps`: every step (a damaged one is skipped with one warning line, one removed by a live
    trainer while it was read with an INFO line); `step`: that one (a damaged one is an error);
    neither: the newest whose meta reads (falling back over damaged ones, one warning line each).
    ValueError (one line) when there is nothing to evaluate.
    """
    if step is not None and not all_steps:
        return [step], run_config(ckpts, ckpts.resolve_step(step), config)
    if not all_steps:
        ckpts.resolve_step(None)  # "no checkpoints in ..." for an empty folder
        found, run_cfg = ckpts.first_intact(lambda s: run_config(ckpts, s, config))
        return [found], run_cfg
    steps, run_cfg, damaged = [], None, []
    for s in ckpts.all_steps():
        try:
            run_cfg = run_config(ckpts, s, config)
        except RemovedCheckpointError as e:
            logging.info("%s; skipped", e)
            continue
        except DamagedCheckpointError as e:
            logging.warning("%s; skipped", e)
            damaged.append(s)
            continue
        steps.append(s)
    if damaged and not steps:
        raise ValueError(f"no intact checkpoint in {ckpts.directory}: steps {damaged} are damaged")
    if not steps:  # a live run removed every step listed: its newest committed one
        return steps_to_evaluate(ckpts, None, False, config)
    return steps, run_cfg


@dataclasses.dataclass
class Restored:
    """One checkpoint's parameters and the config they were trained with."""

    workdir: str
    step: int
    config: RunConfig
    fns: Any  # flash_jax.train.step.StepFns: the jitted eval step, shardings, graphdef
    params: Any
    rest: Any
    meta: dict  # the checkpoint's meta JSON (step, data position, configs, checksums)

    @property
    def model_config(self) -> ModelConfig:
        return self.config.model

    def model(self) -> nnx.Module:
        """The nnx model holding the restored parameters (for decoding, or a direct forward)."""
        return nnx.merge(self.fns.graphdef, self.params, self.rest)


# StepFns per (config, mesh): checkpoints of one run share their jitted eval step (one compile).
_STEP_FNS: dict = {}


def restore(
    workdir: str,
    step: int | None = None,
    *,
    config=None,
    single_device: bool = False,
    ckpts: Checkpoints | None = None,
    fall_back: bool | None = None,
) -> Restored:
    """Restores the parameters of checkpoint `step` (the latest by default) of a run.

    `config` defaults to the one saved with the checkpoint (see `run_config`); the mesh is the
    config's, or with `single_device` the first device alone (sampling). ValueError (one line,
    naming the path or key) for a workdir without checkpoints, a step that does not exist or a
    config of another model. The parameters are checked (see the module docstring): a damaged
    checkpoint is a DamagedCheckpointError (one removed by a live trainer while it was read a
    RemovedCheckpointError), unless `fall_back` (the default when no step is given): then the
    newest intact checkpoint up to `step` (the newest committed one when no step is given) is
    restored, with one warning line per damaged one.
    """
    from flash_jax.train import step as step_lib

    fall_back = step is None if fall_back is None else fall_back
    own = ckpts is None
    ckpts = Checkpoints(workdir, read_only=True) if own else ckpts

    def restore_step(s: int) -> Restored:
        run_cfg = run_config(ckpts, s, config)
        shape, names = run_cfg.mesh.shape, run_cfg.mesh.axis_names
        if single_device:
            mesh = sharding.make_mesh((1,) * len(names), names, jax.devices()[:1])
        else:
            mesh = sharding.make_mesh(shape, names, num_slices=run_cfg.mesh.num_slices)
        with jax.set_mesh(mesh):
            if (run_cfg, mesh) not in _STEP_FNS:
                _STEP_FNS[run_cfg, mesh] = step_lib.build(run_cfg, mesh)
            fns = _STEP_FNS[run_cfg, mesh]
            abstract = {"params": fns.abstract_state["params"]}
            state, meta = ckpts.restore(abstract, s, partial=True)
            return Restored(workdir, s, run_cfg, fns, state["params"], fns.init_rest(), meta)

    try:
        first = ckpts.resolve_step(step)
        if not fall_back:
            return restore_step(first)
        return ckpts.first_intact(restore_step, upto=step)[1]
    finally:
        if own:
            ckpts.close()
