r"""Builds seqio's offline cache of a config's data task on this machine (no Apache Beam needed).

    python scripts/data/cache_data.py --config=configs/quickstart.py --output_dir=/data/seqio_cache
    python train.py --config=configs/quickstart.py --workdir=runs/q \
        --config.data.use_cached=/data/seqio_cache

Runs the task's steps up to its `seqio.CacheDatasetPlaceholder` (read, clean, tokenize, append
EOS: one example per document) over every split and writes them the way seqio's
`cache_tasks_main` does, which is what seqio's reader (`Task.get_dataset(use_cached=True)`)
expects: `<output_dir>/<task name>/` holding `<split>.tfrecord-NNNNN-of-NNNNN` (tf.Example
shards, document i in shard i mod num_shards, in the corpus's file order), `info.<split>.json`
(features, shard count), `stats.<split>.json` (examples, tokens) and, written last, `COMPLETED`.
A run then reads token ids instead of tokenizing: windows, masks, shuffling and packing still
happen at training time, from the run's sequence length and seed.

One process writes everything: fine for the shipped corpus and corpora of a few GB. On the shipped
corpus the result has the same documents, info and stats as seqio's own `cache_tasks_main` (whose
Beam shuffle puts them in other shards). For PG-19 or C4 at full size run that distributed job,
e.g. on Dataflow:

    python -m seqio.scripts.cache_tasks_main --module_import=flash_jax.data.standard_tasks \
        --tasks=<task name, printed by this script with --dry_run> \
        --output_cache_dir=gs://BUCKET/seqio_cache --pipeline_options=--runner=DataflowRunner,...

It needs `apache-beam[gcp]` and `crcmod`, which the project's pinned stack does not include: Beam
2.77 declares protobuf < 7, and pip's downgrade to 6.x breaks the pinned sentencepiece (its
generated code needs protobuf >= 7.36.1); installed beside protobuf 7.36 it ran (DirectRunner).
A task of a local corpus other than the shipped one is registered from a config, which seqio's
script does not read; this script does.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import seqio
import tensorflow as tf
from absl import app, flags, logging
from ml_collections import config_flags

from flash_jax import data
from flash_jax.config import DataConfig
from flash_jax.data import pipeline, tasks

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "run config")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "cache folder (local or gs://)")
_SPLITS = flags.DEFINE_list("splits", None, "splits to cache (default: all of the dataset's)")
_MAX_SHARDS = flags.DEFINE_integer("max_shards", 256, "TFRecord files per split, at most")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "rebuild a finished cache")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print the task name and folder, write nothing")


def write_split(task: seqio.Task, split: str, task_dir: str, max_shards: int) -> dict:
    """Writes one split's shards, info and stats; returns the stats."""
    num_docs = task.source.num_input_examples(split) or max_shards  # None: TFDS, unknown
    num_shards = max(1, min(max_shards, num_docs))
    prefix = seqio.utils.get_cached_tfrecord_prefix(task_dir, split)
    paths = [f"{prefix}-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]
    writers = [tf.io.TFRecordWriter(p) for p in paths]
    eos = task.output_features["targets"].vocabulary.eos_id
    counts = []  # per document: tokens that are neither EOS nor padding (seqio's GetStats)
    ds = task.preprocess_precache(task.source.get_dataset(split=split, shuffle=False))
    try:
        for i, ex in enumerate(ds.as_numpy_iterator()):
            targets = ex["targets"].astype(np.int32)
            writers[i % num_shards].write(
                seqio.dict_to_tfexample({"targets": targets}).SerializeToString()
            )
            counts.append(int(np.sum((targets != eos) & (targets != 0))))
    finally:
        for w in writers:
            w.close()
    info = {
        "num_shards": num_shards,
        "features": {"targets": {"shape": [None], "dtype": "int32"}},
        "seqio_version": seqio.__version__,
    }
    stats = {
        "examples": len(counts),
        "targets_tokens": sum(counts),
        "targets_max_tokens": max(counts, default=0),
    }
    for path, content in (
        (seqio.utils.get_cached_info_path(task_dir, split), info),
        (seqio.utils.get_cached_stats_path(task_dir, split), stats),
    ):
        with tf.io.gfile.GFile(path, "w") as f:
            json.dump(content, f, indent=2)
    return stats


def write_cache(
    data_config, output_dir: str, splits=None, *, max_shards: int = 256, overwrite: bool = False
) -> str:
    """Writes seqio's cache of `data_config`'s task into `output_dir`; returns the task's folder.

    A finished cache (its COMPLETED file) is kept unless `overwrite`."""
    # The source is the raw corpus.
    cfg = dataclasses.replace(DataConfig.from_config(data_config), use_cached="")
    task = data.get_task(cfg)
    if not task.supports_caching:
        raise ValueError(f"task {task.name} has no CacheDatasetPlaceholder")
    task_dir = os.path.join(output_dir, seqio.get_task_dir_from_name(task.name))
    completed = os.path.join(task_dir, "COMPLETED")
    if tf.io.gfile.exists(completed):
        if not overwrite:
            logging.info("%s is already cached in %s", task.name, task_dir)
            return task_dir
        tf.io.gfile.rmtree(task_dir)
    tf.io.gfile.makedirs(task_dir)
    for split in splits or pipeline.dataset_splits(cfg):
        stats = write_split(task, split, task_dir, max_shards)
        logging.info("%s %s: %s", task.name, split, stats)
    with tf.io.gfile.GFile(completed, "w") as f:
        f.write("")
    return task_dir


def main(argv):
    del argv
    cfg = DataConfig.from_config(_CONFIG.value.data)
    if _DRY_RUN.value:
        name = tasks.task_name(cfg)
        print(name, os.path.join("<output_dir>", seqio.get_task_dir_from_name(name)))
        return
    if not _OUTPUT_DIR.value:
        raise app.UsageError("--output_dir is required")
    task_dir = write_cache(
        cfg,
        _OUTPUT_DIR.value,
        _SPLITS.value,
        max_shards=_MAX_SHARDS.value,
        overwrite=_OVERWRITE.value,
    )
    print(f"cached {tasks.task_name(cfg)} in {task_dir}")
    print(f"train with --config.data.use_cached={_OUTPUT_DIR.value}")


if __name__ == "__main__":
    app.run(main)
