"""What is checked of a `config.data` before a run writes or compiles anything: one line each.

    data.check_data(config.data, splits=("train", "validation"), vocab_size=4096)

In order: the vocabulary, the local corpus or the TFDS dataset can be reached (one line naming
every key to override, e.g. offline with T5's vocabulary on gs://); the model's `vocab_size` is
the vocabulary's size, rounded up to a multiple of 128 at most; each split can be read (a missing
split, a bad metadata.csv, a split without readable text: the pipeline is built, no batch is
read).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from flash_jax.config import SHIPPED_CORPUS, SHIPPED_VOCAB, DataConfig
from flash_jax.data import sources, tasks, vocabularies
from flash_jax.data.pipeline import InputPipeline

# Model vocabularies are the data vocabulary's size rounded up to a multiple of this (as T5 pads
# its 32,100 tokens to 32,128), so that sentinel ids fit and the vocab dimension shards evenly.
VOCAB_MULTIPLE = 128


def fitted_vocab_size(data_vocab_size: int) -> int:
    """The model.vocab_size the configs give a data vocabulary of `data_vocab_size` tokens."""
    return -(-data_vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def check_data(
    cfg: DataConfig, splits: Sequence[str] = (), *, vocab_size: int | None = None
) -> None:
    """ValueError, one line naming the keys or the path, if the data of `cfg` cannot be
    read as a run needs it (see the module docstring); `vocab_size`: the model's, which must be
    the data vocabulary's size up to `fitted_vocab_size` of it (a bigger one trains embedding
    rows no token uses: another data.vocab without its model.vocab_size)."""
    tasks.require_typed(cfg)
    _check_reachable(cfg, vocab_size)
    if vocab_size is not None:
        data_vocab_size = vocabularies.get_vocabulary(cfg).vocab_size
        fitted = fitted_vocab_size(data_vocab_size)
        if not data_vocab_size <= vocab_size <= fitted:
            relation = "smaller than" if vocab_size < data_vocab_size else "larger than needed for"
            raise ValueError(
                f"model.vocab_size ({vocab_size}) is {relation} the data vocabulary "
                f"({data_vocab_size} tokens, data.vocab={cfg.vocab!r}) -> "
                f"--config.model.vocab_size={fitted} (its size rounded up to a multiple of "
                f"{VOCAB_MULTIPLE})"
            )
    for split in splits:
        InputPipeline(cfg, split, shuffle=False, repeat=False).close()


def _check_reachable(cfg, vocab_size: int | None) -> None:
    """The vocabulary, the local corpus or the TFDS dataset that this machine cannot reach (offline:
    T5's vocabulary on gs://, a TFDS dataset never prepared), with every override to pass (the
    shipped vocabulary's model.vocab_size too, when the model's `vocab_size` is another). Reads
    metadata only: seconds."""
    problems = []
    if str(cfg.vocab) != "byte":
        reason = _unreadable(str(cfg.vocab))
        if reason:
            shipped = vocabularies.vocabulary(SHIPPED_VOCAB, str(cfg.objective))
            fitted = fitted_vocab_size(shipped.vocab_size)
            model = f" --config.model.vocab_size={fitted}" if vocab_size != fitted else ""
            problems.append(
                f"data.vocab {cfg.vocab!r} ({reason}) -> "
                f"--config.data.vocab={_shown(SHIPPED_VOCAB)}{model} (the shipped one)"
            )
    if cfg.source == "local":
        reason = _unreadable(str(cfg.data_dir))
        if reason:
            problems.append(
                f"data.data_dir {cfg.data_dir!r} ({reason}) -> --config.data.data_dir=<a "
                f"PG-19-layout folder, a .tar.xz of one or a folder of .txt> (default: "
                f"{_shown(SHIPPED_CORPUS)})"
            )
    else:
        reason = _tfds_unprepared(cfg)
        if reason:
            problems.append(
                f"{reason} -> --config.data.tfds_data_dir=<the folder or gs:// bucket where it "
                "is prepared>, or --config.data.source=local (the shipped corpus)"
            )
    if problems:
        raise ValueError(
            f"this machine cannot reach the config's data: {'; '.join(problems)}. The paper "
            "configs train small on the shipped corpus with ':smoke' (configs/pg19_flash.py:smoke)"
        )


def _unreadable(path: str) -> str | None:
    """Why `path` (local or gs://) cannot be read, or None if it exists."""
    import tensorflow as tf

    try:
        return None if tf.io.gfile.exists(os.path.expanduser(path)) else "does not exist"
    except tf.errors.OpError as e:  # e.g. offline: no route to GCS
        return e.message.splitlines()[0]


def _tfds_unprepared(cfg) -> str | None:
    """Why the TFDS dataset of `cfg` cannot be read, or None if it is prepared."""
    import tensorflow_datasets as tfds

    name = sources.TFDS_DATASETS[cfg.dataset]["name"]
    # TFDS warns (through absl's logger) that the folder it probes has no dataset_info.json: the
    # line we return says so. The logger's own level is restored exactly (absl's set_verbosity
    # would leave an explicit level where there was none).
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        builder = tfds.builder(name, data_dir=cfg.tfds_data_dir or None)
        if builder.is_prepared():
            return None
        return f"TFDS {name} is not prepared in {builder.data_dir}"
    except Exception as e:  # noqa: BLE001 - any failure here means: cannot be read
        return f"TFDS {name} cannot be read ({str(e).splitlines()[0]})"
    finally:
        absl_logger.setLevel(level)


def _shown(path: str) -> str:
    """`path` relative to the working directory when it is inside it (shorter to copy)."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative
