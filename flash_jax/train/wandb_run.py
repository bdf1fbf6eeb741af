"""The run's Weights & Biases run (`log.wandb_project`): started, or continued by a resumed run,
and finished. The loop's `Reporter` sends it the records; W&B is imported only here."""

from __future__ import annotations

from absl import logging
from etils import epath

from flash_jax import runs

ID_FILE = "wandb_run_id"  # in the workdir: the W&B run a resumed run continues


def start(workdir: epath.Path, config):
    """The W&B run of this workdir: a new one, or the one whose id the workdir keeps (a resumed
    run continues it), and whether it continues one: (run, continued). The resolved config is the
    run's config; its files go under the workdir when that is local. ValueError (one line) when
    W&B is not installed or cannot start (not logged in: `wandb login`, or WANDB_MODE=offline)."""
    try:
        import wandb
    except ImportError as e:
        raise ValueError(
            f"log.wandb_project is set but wandb cannot be imported ({e}): pip install wandb, or "
            "leave log.wandb_project empty"
        ) from e
    id_file = workdir / ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else None
    local = "://" not in str(workdir)
    try:
        run = wandb.init(
            project=config.log.wandb_project,
            id=run_id,  # None: a new run, whose id is kept below
            resume="allow",
            name=workdir.name,
            config=runs.json_safe(config.to_dict()),
            dir=str(workdir) if local else None,
        )
    except Exception as e:  # noqa: BLE001 - W&B's errors are many; the user needs one line
        raise ValueError(
            f"log.wandb_project={config.log.wandb_project!r}: W&B could not start "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else e}); "
            "run `wandb login`, set WANDB_MODE=offline, or leave log.wandb_project empty"
        ) from e
    if run_id is None:
        id_file.write_text(run.id)
    return run, run_id is not None


def finish(run) -> None:
    """Finishes a `start` run (uploads what is left); a failure is one warning line."""
    try:
        run.finish()
    except Exception as e:  # noqa: BLE001 - W&B's errors are many; the run's work is done
        logging.warning("could not finish the W&B run (%s)", e)
