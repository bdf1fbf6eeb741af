"""Orbax checkpoints of a run: asynchronous, atomic, the last K kept, resumable exactly.

Each step directory holds two items:
  state: the train state (params, optimizer state, step, RNG key data) as sharded arrays
  meta:  JSON: step, data position (`pipe.position`), the model config, the resolved run config
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from flash_jax.config import ModelConfig

CHECKPOINT_DIR = "checkpoints"
# Keys that change how the model is computed, not what it is: a resumed run may change them.
RESUMABLE_MODEL_KEYS = ("remat", "attention_impl", "flash_impl")


def model_config_dict(model_config) -> dict:
    """The model config as plain JSON-able values (from a ConfigDict, mapping or ModelConfig)."""
    if not isinstance(model_config, ModelConfig):
        model_config = ModelConfig.from_config(model_config)
    values = dataclasses.asdict(model_config)
    # The activation-sharding rules are the mesh's business (config.mesh.rules), not the model's.
    values.pop("sharding_rules", None)
    return json.loads(json.dumps(values))  # tuples -> lists, as they come back from JSON


def differing_keys(saved: dict, current: dict) -> list[str]:
    """Model keys whose values differ (a key missing on one side counts as differing)."""
    keys = sorted(set(saved) | set(current))
    return [
        k
        for k in keys
        if k not in RESUMABLE_MODEL_KEYS
        and saved.get(k, "<missing>") != current.get(k, "<missing>")
    ]


def checkpoint_dir(workdir: str) -> str:
    """`workdir/checkpoints`, absolute for local paths; URLs (gs://) are kept as they are."""
    path = str(epath.Path(workdir) / CHECKPOINT_DIR)
    return path if "://" in path else os.path.abspath(path)


class Checkpoints:
    """The run's `CheckpointManager` under `workdir/checkpoints`."""

    def __init__(self, workdir: str, keep: int, *, async_save: bool = True):
        self.directory = checkpoint_dir(workdir)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
            enable_async_checkpointing=async_save,
            # A save killed half-way leaves a temporary directory, never a half checkpoint
            # (orbax renames on commit); clean such leftovers when the run restarts.
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def check_compatible(self, model_config) -> int | None:
        """Refuses (ValueError) a workdir whose latest checkpoint has another model config.

        Returns the latest step (None for a fresh workdir). Reads only the small JSON item.
        """
        step = self.latest_step()
        if step is None:
            return None
        saved = self.read_meta(step).get("model_config", {})
        current = model_config_dict(model_config)
        diff = differing_keys(saved, current)
        if diff:
            details = ", ".join(
                f"model.{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}" for k in diff
            )
            raise ValueError(
                f"the checkpoints in {self.directory} (step {step}) come from a different model "
                f"config ({details}); use another --workdir or the checkpoint's config"
            )
        return step

    def save(self, step: int, state: Any, meta: dict) -> bool:
        """Starts an asynchronous save of `state` + `meta` at `step` (no-op if it exists)."""
        if step in self.manager.all_steps():
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """The state laid out as `abstract_state` (ShapeDtypeStructs with shardings) + meta."""
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
