"""What a checkpoint holds, and the checks that tell whether it reads back as it was written.

Each step directory under `workdir/checkpoints` holds three items:
  state: the train state (params, optimizer state, step, RNG key data) as sharded arrays
  meta:  JSON: `format_version` (FORMAT_VERSION), step, data position (`pipe.position`), the host
         layout of the input stream (`data_layout`: process count, batch per host, seed, task,
         ...; see flash_jax/data), the model config, the resolved run config, the eval loss when
         the step was evaluated, and `checksums`: per array of the state, the sum of its 32-bit
         words modulo 2^32
  data:  each process's place in its input stream (`InputPipeline.save_state`: the tf.data
         iterator, shuffle buffer included), so that a resume costs the same at any step and
         continues with exactly the batches an uninterrupted run would have read.

A checkpoint of another format version is refused in one line (`check_format_version`): this
code reads only the layout it writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from flash_jax.config import ModelConfig

# Raise it whenever the items or the meta keys above change in a way older code cannot read.
FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
ITEMS = ("state", "meta", "data")
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


def checkpoint_dir(workdir: str) -> str:
    """`workdir/checkpoints`, absolute for local paths; URLs (gs://) are kept as they are."""
    path = str(epath.Path(workdir) / CHECKPOINT_DIR)
    return path if "://" in path else os.path.abspath(path)


def model_config_dict(model_config: ModelConfig) -> dict:
    """The model config as plain JSON-able values."""
    return json.loads(json.dumps(model_config.to_dict()))  # tuples -> lists, as JSON gives back


def reason(error: BaseException, limit: int = 300) -> str:
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


def few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# ----------------------------------------------------------------------------- the meta


def check_format_version(step: int, path: str, meta: dict) -> None:
    """ValueError (one line) unless checkpoint `step` was written in FORMAT_VERSION."""
    found = meta.get("format_version")
    if found != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint step {step} in {path} has format version "
            f"{'none' if found is None else found}; this flash_jax reads format version "
            f"{FORMAT_VERSION} only: read it with the flash_jax that wrote it, or train anew in "
            "another --workdir"
        )


def check_model_config(directory: str, step: int, meta: dict, model_config: ModelConfig) -> None:
    """ValueError if checkpoint `step` was written by another model config (keys that change only
    how the model is computed, RESUMABLE_MODEL_KEYS, may differ)."""
    saved = meta["model_config"]
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


def check_data_layout(directory: str, step: int, meta: dict, layout: dict) -> None:
    """ValueError (one line) if checkpoint `step` was saved with another host layout of the input
    stream than `layout` (this run's, `InputPipeline.layout`): another process count, batch size,
    seed or data."""
    from flash_jax.data import pipeline  # TensorFlow: only where a run resumes

    problem = pipeline.check_layout(meta["data_layout"], layout)
    if problem:
        raise ValueError(
            f"cannot resume from checkpoint {step} in {directory}: {problem}; nothing was written"
        )


# ----------------------------------------------------------------------------- the arrays


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


def check_arrays(step: int, path: str, tree, checksums: dict) -> None:
    """DamagedCheckpointError unless every array matches its saved checksum and is finite."""
    sums, non_finite = inspect_arrays(tree)
    bad = [p for p, s in sums.items() if checksums.get(p) != s]
    if bad:
        raise DamagedCheckpointError(
            step, path, f"array data differs from the checksum saved with it ({few(bad)})"
        )
    if non_finite:
        raise DamagedCheckpointError(step, path, f"non-finite values in {few(non_finite)}")


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


def damage_or_layout_error(step: int, path: str, abstract, meta: dict, error: Exception):
    """A failed restore is damage, unless the arrays saved (the names in the meta's checksums)
    are not the ones this config's state has: then the config differs."""
    diffs = layout_differences(meta["checksums"], abstract)
    if diffs:
        return ValueError(
            f"checkpoint step {step} in {path} holds a train state laid out differently from "
            f"this config's ({few(diffs, 2)}); a train.* setting such as the optimizer or "
            "gradient clipping differs: use the run's own config or another --workdir"
        )
    return DamagedCheckpointError(step, path, reason(error))


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
