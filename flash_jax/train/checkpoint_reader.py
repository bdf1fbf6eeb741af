"""Reading a run's checkpoints, finished or still being written (eval.py, sample.py, export.py).

    from flash_jax.train import checkpoint_reader
    run = checkpoint_reader.restore("runs/quickstart")   # latest checkpoint, its own config

What a restore checks (`CheckpointReader.restore`): the meta JSON parses and has this code's
format version; Orbax reads every array (missing or truncated files, a missing `_METADATA`, ...
fail here); every array matches its checksum (a flipped bit anywhere in the data); every float is
finite. Any failure is a `DamagedCheckpointError` naming the step and its path. `first_intact`
falls back from a damaged step to the newest intact one (one warning line per damaged step;
nothing is deleted). A train state of another layout (other arrays than the meta's checksums
name, e.g. another optimizer's) is a config error, not damage.

A `CheckpointReader` never creates, deletes or cleans anything. A live trainer saves and prunes
while a reader works: the reader lists the steps afresh each time it asks, and a step that
disappears while it is read (or whose folder a live trainer is removing) is not damage but a
`RemovedCheckpointError`: falling back takes the newest committed step then.
"""

from __future__ import annotations

import dataclasses
import logging as std_logging
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from flash_jax import sharding
from flash_jax.config import ModelConfig, RunConfig
from flash_jax.train import workdir as workdir_lib
from flash_jax.train.checkpoint_format import (
    ITEMS,
    DamagedCheckpointError,
    DataStateRestore,
    RemovedCheckpointError,
    check_arrays,
    check_data_layout,
    check_format_version,
    check_model_config,
    checkpoint_dir,
    damage_or_layout_error,
    reason,
)

# A reader waits this long for the folder of a step that fails to read to disappear, when a live
# trainer holds the workdir (its prune removes a step's files one by one).
REMOVAL_SECONDS = 3.0
# Listing the steps of a live run fails when a step is pruned while Orbax reads it: tries.
LIST_ATTEMPTS = 5


class _WithoutMessage(std_logging.Filter):
    """Drops the log records whose message contains `text`."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record):
        return self.text not in record.getMessage()


class CheckpointReader:
    """The checkpoints under `workdir/checkpoints`, read-only (see the module docstring)."""

    # Whether a trainer may be saving and pruning while this reads (not for the trainer itself,
    # `checkpoint.Checkpoints`, which holds the workdir lock).
    live = True

    def __init__(self, workdir: str, manager: ocp.CheckpointManager | None = None):
        """ValueError (one line) for a workdir without checkpoints. `manager`: the trainer's own
        (opened for saving); by default one is opened read-only."""
        self.workdir = workdir
        self.directory = checkpoint_dir(workdir)
        self.damaged: dict[int, str] = {}  # step -> reason, found by `first_intact`
        self._listed_steps: set[int] = set()  # every step listed so far
        self.manager = manager if manager is not None else self._open_read_only()

    def _open_read_only(self) -> ocp.CheckpointManager:
        workdir, directory = self.workdir, self.directory
        if not epath.Path(workdir).is_dir():
            raise ValueError(f"workdir {workdir!r} does not exist")
        if not epath.Path(directory).is_dir():
            raise ValueError(f"no checkpoints in {workdir!r} ({directory} does not exist)")
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        read_only_notice = _WithoutMessage("Given directory is read only")
        std_logging.getLogger("absl").addFilter(read_only_notice)  # what was asked for
        try:
            return self._listed(
                lambda: ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
            )
        finally:
            std_logging.getLogger("absl").removeFilter(read_only_notice)

    # ---- steps
    def step_path(self, step: int) -> str:
        return str(epath.Path(self.directory) / str(step))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """The committed steps; read afresh from storage when `live` (a live run's change)."""
        if self.live:
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
                        f"the checkpoints in {self.directory} cannot be listed ({reason(e)})"
                    ) from e
                time.sleep(0.1)

    def live_holder(self) -> dict | None:
        """The trainer holding a live run's workdir, if one does (its lock record)."""
        return workdir_lib.holder(self.workdir) if self.live else None

    def removed(self, step: int) -> bool:
        """Whether listed `step` has gone (live runs only): its folder no longer exists, or
        disappears within REMOVAL_SECONDS while a trainer holds the workdir."""
        if not self.live:
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
        read back, RemovedCheckpointError if the step went while it was read, ValueError (one
        line) for another format version."""
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
                step, self.step_path(step), f"its meta JSON cannot be read ({reason(e)})"
            ) from e
        if not isinstance(meta, dict):
            raise DamagedCheckpointError(
                step, self.step_path(step), "its meta is not a JSON object"
            )
        check_format_version(step, self.step_path(step), meta)
        return dict(meta)

    def check_compatible(self, model_config) -> int | None:
        """Refuses (ValueError) a workdir whose newest readable checkpoint has another model config.

        Returns the latest step (None for a fresh workdir). Reads only the small JSON items; a
        damaged one is skipped here and reported by the restore.
        """
        for step in reversed(self.all_steps()):
            try:
                meta = self.read_meta(step)
            except DamagedCheckpointError:
                continue
            check_model_config(self.directory, step, meta, model_config)
            break
        return self.latest_step()

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
        if the step went while it was read); ValueError for another format version, model config
        (`model_config`), state layout or host layout (`pipe`).
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
        path = self.step_path(step)
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(state=item))["state"]
        except Exception as e:  # noqa: BLE001 - classified below
            raise damage_or_layout_error(step, path, abstract, meta, e) from e
        check_arrays(step, path, state, meta["checksums"])
        if pipe is not None:
            self.restore_data(step, pipe)
        return state, meta

    def restore_data(self, step: int, pipe) -> None:
        """Puts each process's input stream where it was at `step`; DamagedCheckpointError if it
        does not read back."""
        try:
            self.manager.restore(step, args=ocp.args.Composite(data=DataStateRestore(pipe)))
        except ValueError:  # another layout: a one-line config error from the pipeline
            raise
        except Exception as e:  # noqa: BLE001 - missing or truncated iterator files
            raise DamagedCheckpointError(
                step, self.step_path(step), f"its data state cannot be read ({reason(e)})"
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

    def close(self) -> None:
        try:
            self.manager.close()
        except Exception as e:  # noqa: BLE001 - the failed save it re-raises is reported
            logging.warning("closing the checkpoints in %s: %s", self.directory, reason(e))


# ----------------------------------------------------------------------------- reading a run


def run_config(ckpts: CheckpointReader, step: int, config=None) -> RunConfig:
    """The config to read checkpoint `step` with.

    Without `config`: the run config saved in the checkpoint. With `config` (a ConfigDict, e.g.
    eval.py's --config): that one, once its model is found to be the checkpoint's.
    DamagedCheckpointError if the meta JSON does not read.
    """
    meta = ckpts.read_meta(step)
    config = RunConfig.from_config(meta["config"] if config is None else config)
    check_model_config(ckpts.directory, step, meta, config.model)
    return config


def steps_to_evaluate(
    ckpts: CheckpointReader, step: int | None, all_steps: bool, config=None
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
    ckpts: CheckpointReader | None = None,
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
    ckpts = CheckpointReader(workdir) if own else ckpts

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
