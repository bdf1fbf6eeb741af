"""The bridge to JAX: batches of packed windows as numpy arrays or global jax.Arrays.

    pipe = InputPipeline(config.data, "train", mesh=mesh, seed=0)
    batch = next(pipe)  # inputs, targets, segment_ids, positions int32; weights float32: [B, L]
    pipe.position       # batches produced so far
    pipe.save_state(directory)     # every host, with a checkpoint: its place in the stream
    pipe = InputPipeline(config.data, "train", mesh=mesh, seed=0)
    pipe.restore_state(directory)  # next(pipe) is the batch an uninterrupted run gets next

Per host: documents are split between hosts (`seqio.ShardInfo`, one shard per process) when a split
has at least as many documents as hosts; otherwise every host reads the whole (small) split and
keeps every num_shards-th window, so no host is left without data. Each host builds
`batch_size // num_shards` rows.

Order: a fixed seed and host layout give a fixed order (seeded file shuffle, window shuffle buffer
of `shuffle_buffer`, deterministic parallel maps).

Resume: `save_state(directory)` writes this host's tf.data iterator with `tf.train.Checkpoint`, as
T5X does with seqio pipelines: the place in the input files, the documents being tokenized and cut
into windows, the shuffle buffer and its random state, the packer's open row and the prefetched
batches, i.e. everything the next batch depends on, plus a JSON of `position` and `host_layout`.
`restore_state(directory)` loads them into a newly built pipeline: a restart costs the same at step
100K as at step 10 (scripts/bench/bench_resume.py) and yields exactly the uninterrupted batches.

Why not a pipeline whose position is an index: the order comes from streaming steps (file
shuffle, 16 documents interleaved window by window, a shuffle buffer, greedy packing) whose state
after k batches cannot be computed from k without replaying them. Making it index-addressable
means replacing those steps, and the TFDS and seqio-cache readers, with random-access sources and
blockwise shuffling and packing. The iterator checkpoint keeps the pipeline as it is, covers every
source alike, and is plain files written through tf.io.gfile (local or gs://), one set per host,
so hosts never coordinate. Its cost is size, as buffers are saved whole: a host's state holds its
shuffle buffer (shuffle_buffer windows), the documents in flight (seqio tokenizes up to 256
ahead; none with `data.use_cached`), the packer's group of windows (`preprocessors.PACK_TOKENS`)
and, for a small local corpus, its tokenized copy kept in memory (`sources.MAX_BYTES_TO_CACHE`).
Measured: 24 MB for the shipped corpus, 35-50 MB per host at seq_len 8192 on a PG-19-like corpus.
`start_batch=k` rebuilds the stream and drops its first k batches, a cost linear in k
(scripts/bench/bench_resume.py compares it with a restore).

Host layout: the batches depend on the number of hosts, the seed, the task, the lengths and
buffer sizes (`host_layout`). A checkpoint records it; `check_layout(saved, current)` names in one
line what to do when a resumed run differs (restart with the saved number of hosts or settings, or
start a new workdir). A changed number of devices per host or mesh shape does not matter.

Eval (`repeat=False, shuffle=False`): every window of every document exactly once; the last
partial batch is filled with all-zero rows (weights 0). With several processes, a host that runs
out first keeps yielding all-zero batches until every host is done, so that the collective
`make_array_from_process_local_data` never waits on a host that has stopped.

TensorFlow only runs host-side input ops here: importing this module hides GPUs and TPUs from it
(`hide_accelerators_from_tensorflow`), so that it never reserves accelerator memory JAX needs.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
import seqio
import tensorflow as tf
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from flash_jax import sharding
from flash_jax.config import DataConfig
from flash_jax.data import preprocessors, sources, tasks

FEATURES = ("inputs", "targets", "weights", "segment_ids", "positions")


def hide_accelerators_from_tensorflow() -> None:
    """Makes TF see only the CPU. Must run before TF initialises its devices (its first op):
    afterwards TF may already hold GPU memory, and a warning says so."""
    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except RuntimeError as e:  # devices already initialised, some of this kind visible
            logging.warning(
                "flash_jax.data: TensorFlow initialised its devices before flash_jax.data was "
                "imported and may hold %s memory (%s); import flash_jax.data first",
                kind,
                e,
            )


hide_accelerators_from_tensorflow()


def dataset_splits(cfg) -> tuple[str, ...]:
    if cfg.source == "tfds":
        return sources.TFDS_DATASETS[cfg.dataset]["splits"]
    return sources.SPLITS


def _check_split(cfg, split: str) -> None:
    splits = dataset_splits(cfg)
    if split not in splits:
        raise ValueError(
            f"split {split!r} is not available for data.dataset={cfg.dataset!r} "
            f"(data.source={cfg.source!r}); choose from {splits}"
        )


def _num_documents(cfg, task: seqio.Task, split: str) -> int | None:
    """Documents in a split; None when the source cannot tell (TFDS without split info).

    A local split is also checked to hold readable text (ValueError naming the folder), a cached
    one to be in the cache (ValueError naming data.use_cached)."""
    if tasks.cache_dir(cfg):
        return tasks.cached_documents(cfg, split)
    source = task.source
    if isinstance(source, sources.LocalTextSource):
        source.corpus.check_readable(split)
        return len(source.corpus.files(split))
    try:
        source.list_shards(split)  # seqio needs the file list to shard by document
        return int(source.num_input_examples(split) or 0) or None
    except (KeyError, ValueError, tf.errors.OpError):
        return None


# ----------------------------------------------------------------------------- host layout

# Layout keys a resumed run may not change, with the flag that sets each back.
_LAYOUT_FLAGS = {
    "task": None,  # dataset, objective, mask rate, source, corpus path and vocabulary
    "documents": None,
    "use_cached": "--config.data.use_cached",
    "seq_len": "--config.data.seq_len",
    "batch_size": "--config.data.batch_size",
    "shuffle_buffer": "--config.data.shuffle_buffer",
    "seed": "--config.seed",
}


def host_layout(
    cfg: DataConfig,
    *,
    seed: int,
    split: str = "train",
    shard_index: int | None = None,
    num_shards: int | None = None,
) -> dict:
    """What decides this host's stream of batches, as a JSON-able dict (what a checkpoint records).

    processes / process_index: the hosts reading (default: jax.process_count() / process_index());
    sharded_by: "documents" (host i reads documents i::processes of the seeded file order) or
    "windows" (a split with fewer documents than hosts: every host reads it all and keeps windows
    i::processes); batch_size (global) and batch_per_host; seed; task (seqio task name: dataset,
    objective, source, corpus path, vocabulary); documents in the split; seq_len; shuffle_buffer;
    use_cached. Raises ValueError for a bad config, split or host index (one line).
    """
    tasks.require_typed(cfg)
    _check_split(cfg, split)
    if num_shards is None:
        num_shards = jax.process_count()
    if shard_index is None:
        shard_index = jax.process_index() if num_shards == jax.process_count() else 0
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} is not in [0, {num_shards})")
    if cfg.batch_size % num_shards:
        raise ValueError(
            f"data.batch_size ({cfg.batch_size}) must be divisible by the number of hosts "
            f"({num_shards})"
        )
    task = tasks.get_task(cfg)
    num_docs = _num_documents(cfg, task, split)  # also checks the local corpus and the cache
    # Unknown counts (no split info) take the window route too: slower, never wrong.
    by_documents = num_shards == 1 or (num_docs or 0) >= num_shards
    return {
        "processes": num_shards,
        "process_index": shard_index,
        "sharded_by": "documents" if by_documents else "windows",
        "batch_size": cfg.batch_size,
        "batch_per_host": cfg.batch_size // num_shards,
        "seed": seed,
        "task": task.name,
        "documents": num_docs,
        "seq_len": cfg.seq_len,
        "shuffle_buffer": cfg.shuffle_buffer,
        "use_cached": tasks.cache_dir(cfg),
    }


def check_layout(saved: dict, current: dict) -> str | None:
    """None when a run with layout `current` continues the stream saved with layout `saved`
    exactly; otherwise one line saying what differs and what to do.

    The process index is not compared: each process restores the state saved under its own index,
    whichever machine it runs on. Devices per host and the mesh are not part of the layout.
    """
    if saved.get("processes") != current["processes"]:
        return (
            f"the data position was saved by {saved.get('processes')} processes and this run "
            f"has {current['processes']}: each process's batches depend on the process count, so "
            f"restart with {saved.get('processes')} processes to resume exactly, or start a new "
            "workdir"
        )
    for key, flag in _LAYOUT_FLAGS.items():
        was, now = saved.get(key), current[key]
        if was == now:
            continue
        if flag is None:
            what = "the task" if key == "task" else f"the number of {current['task']} documents"
            return (
                f"the data changed since the checkpoint ({what} was {was!r}, is {now!r}): resume "
                "with the checkpoint's data settings, or start a new workdir"
            )
        return (
            f"{flag.removeprefix('--config.')} was {was!r} when the checkpoint was saved and is "
            f"{now!r} now: resume with {flag}={was}, or start a new workdir"
        )
    return None


def state_prefix(directory: str, process_index: int, processes: int) -> str:
    """The file prefix of one host's saved state in `directory` (several files start with it)."""
    return os.path.join(directory, f"data.process_{process_index:05d}-of-{processes:05d}")


def _read_json(path: str) -> dict | None:
    try:
        with tf.io.gfile.GFile(path) as f:
            return json.load(f)
    except (tf.errors.NotFoundError, FileNotFoundError):
        return None


# ----------------------------------------------------------------------------- the pipeline


class InputPipeline:
    """Iterator of batches for one split; see the module docstring for the contract."""

    def __init__(
        self,
        cfg: DataConfig,
        split: str = "train",
        *,
        mesh: jax.sharding.Mesh | None = None,
        seed: int = 0,
        shuffle: bool = True,
        repeat: bool = True,
        start_batch: int = 0,
        shard_index: int | None = None,
        num_shards: int | None = None,
        rules: sharding.Rules = sharding.DEFAULT_RULES,
    ):
        self.layout = host_layout(  # TypeError / ValueError for a bad cfg, split or host
            cfg, seed=seed, split=split, shard_index=shard_index, num_shards=num_shards
        )
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.config = cfg
        self.split = split
        self.seq_len = cfg.seq_len
        self.global_batch_size = cfg.batch_size
        self.local_batch_size = self.layout["batch_per_host"]
        self.shard_index, self.num_shards = self.layout["process_index"], self.layout["processes"]
        self.repeat = repeat
        self.position = start_batch
        self.mesh = mesh
        self._sharding = None
        if mesh is not None:
            spec = sharding.logical_to_spec(("batch", "length"), rules, mesh.axis_names)
            batch_axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],) if spec[0] else ()
            num_batch_shards = int(np.prod([mesh.shape[a] for a in batch_axes]))
            if cfg.batch_size % num_batch_shards:
                raise ValueError(
                    f"data.batch_size ({cfg.batch_size}) must be divisible by the "
                    f"{num_batch_shards} batch shards of the mesh (axes {batch_axes})"
                )
            self._sharding = NamedSharding(mesh, spec)
        self.task = tasks.get_task(cfg)
        self._dataset = self._build(seed, shuffle, repeat)
        self._iterator = None  # made by the first next() (or restore_state)
        self._replay = start_batch  # batches the first next() drops
        self._exhausted = False
        self._closed = False

    # ---- tf.data ----
    def _build(self, seed: int, shuffle: bool, repeat: bool) -> tf.data.Dataset:
        cfg = self.config
        lengths = {"targets": cfg.seq_len}
        if cfg.objective == "mlm":
            lengths["inputs"] = cfg.seq_len
        if self.layout["sharded_by"] == "documents":
            # Hosts read different documents: give each its own seed (masks, shuffles).
            task_seed = int(np.random.SeedSequence([seed, self.shard_index]).generate_state(1)[0])
            task_seed = seed if self.num_shards == 1 else task_seed
            shard_info = seqio.ShardInfo(self.shard_index, self.num_shards)
        else:
            # Every host runs the same stream (same seed) and keeps its share of the windows.
            task_seed, shard_info = seed, None
        ds = self.task.get_dataset(
            sequence_length=lengths,
            split=self.split,
            use_cached=bool(tasks.cache_dir(cfg)),
            shuffle=shuffle,
            shuffle_buffer_size=cfg.shuffle_buffer,
            seed=task_seed,
            shard_info=shard_info if self.num_shards > 1 else None,
            num_epochs=None if repeat else 1,
            try_in_mem_cache=False,
        )
        if self.layout["sharded_by"] == "windows":
            ds = ds.shard(self.num_shards, self.shard_index)
        ds = preprocessors.pack_windows(ds, cfg.seq_len, cfg.objective)
        ds = ds.batch(self.local_batch_size, drop_remainder=repeat)
        options = tf.data.Options()
        options.deterministic = True
        ds = ds.with_options(options)
        return ds.prefetch(cfg.prefetch or tf.data.AUTOTUNE)

    # ---- saved state ----
    def save_state(self, directory: str) -> str:
        """Writes this host's place in the stream into `directory` (local or gs://; created if
        needed): `state_prefix(...)` + ".index", ".data-*" (the tf.data iterator) and ".json"
        (position and layout). Every host calls it; each writes only its own files. Returns the
        prefix. Call between batches, from the thread that calls next()."""
        if self._closed:
            raise ValueError("save_state on a closed pipeline")
        if self._iterator is None:
            self._start()
        prefix = state_prefix(directory, self.shard_index, self.num_shards)
        tf.io.gfile.makedirs(directory)
        tf.train.Checkpoint(iterator=self._iterator).write(prefix)
        with tf.io.gfile.GFile(prefix + ".json", "w") as f:
            json.dump({"position": self.position, "layout": self.layout}, f, indent=2)
        return prefix

    def restore_state(self, directory: str) -> None:
        """Continues the stream `save_state(directory)` saved: the next batch is the one an
        uninterrupted pipeline would have produced, and `position` is the saved one.

        The pipeline must be new (built without start_batch, no batch taken). ValueError (one
        line) if this host's state is missing, or saved with another layout (`check_layout`)."""
        if self._iterator is not None or self._replay:
            raise ValueError("restore_state needs a new pipeline (no batch taken, no start_batch)")
        prefix = state_prefix(directory, self.shard_index, self.num_shards)
        saved = _read_json(prefix + ".json")
        if saved is None:
            # Another host count saves under other names: say what differs if that is why.
            others = sorted(tf.io.gfile.glob(os.path.join(directory, "data.process_*.json")))
            problem = others and check_layout(_read_json(others[0])["layout"], self.layout)
            raise ValueError(
                problem
                or f"no saved data state for process {self.shard_index} of {self.num_shards} "
                f"in {directory} ({os.path.basename(prefix)}.json)"
            )
        problem = check_layout(saved["layout"], self.layout)
        if problem:
            raise ValueError(problem)
        iterator = iter(self._dataset)
        tf.train.Checkpoint(iterator=iterator).read(prefix).assert_consumed()
        self._iterator = iterator
        self.position = int(saved["position"])

    # ---- batches ----
    def _pad(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = batch["targets"].shape[0]
        if rows == self.local_batch_size:
            return batch
        pad = [(0, self.local_batch_size - rows), (0, 0)]
        return {k: np.pad(v, pad) for k, v in batch.items()}

    def zero_batch(self) -> dict[str, np.ndarray]:
        shape = (self.local_batch_size, self.seq_len)
        return {k: np.zeros(shape, np.float32 if k == "weights" else np.int32) for k in FEATURES}

    def _to_device(self, batch: dict[str, np.ndarray]):
        if self._sharding is None:
            return batch
        shape = (self.global_batch_size, self.seq_len)
        return {
            k: jax.make_array_from_process_local_data(self._sharding, v, shape)
            for k, v in batch.items()
        }

    def _start(self) -> None:
        # Batches are pulled in the caller's thread, so that the iterator's state is always that
        # of `position` (a thread running ahead would save batches the run has not trained on);
        # tf.data's own threads prepare the next batches (`data.prefetch`).
        self._iterator = iter(self._dataset)
        for _ in range(self._replay):  # start_batch: replayed in Python (not ds.skip), so the
            if self._next_numpy() is None:  # graph, and a state saved later, are the same
                break
        self._replay = 0

    def _next_numpy(self) -> dict[str, np.ndarray] | None:
        if self._exhausted:
            return None
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._exhausted = True
            return None
        return {k: v.numpy() for k, v in batch.items()}

    def __iter__(self):
        return self

    def __next__(self):
        if self._closed:
            raise StopIteration
        if self._iterator is None:
            self._start()
        batch = self._next_numpy()
        several = self._sharding is not None and jax.process_count() > 1
        if batch is None:
            if self.repeat:
                raise RuntimeError(
                    f"the {self.split!r} stream of {self.task.name} ended although repeat=True: "
                    f"host {self.shard_index} of {self.num_shards} got no data"
                )
            if not several:
                raise StopIteration
            item = self._multihost_end_of_data()
        else:
            item = self._to_device(self._pad(batch))
            if several and not self.repeat:
                self._multihost_any_data(True)
        self.position += 1
        return item

    def _multihost_any_data(self, has_data: bool) -> bool:
        flags = multihost_utils.process_allgather(np.array(has_data, np.int32))
        return bool(np.any(flags))

    def _multihost_end_of_data(self):
        # Every host calls next() the same number of times: one all-gather per eval batch.
        if not self._multihost_any_data(False):
            raise StopIteration
        return self._to_device(self.zero_batch())

    def close(self) -> None:
        """Releases the tf.data iterator (its threads and buffers)."""
        self._iterator = None
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def split_statistics(cfg: DataConfig, split: str) -> dict[str, int]:
    """Documents, UTF-8 bytes and whitespace-separated words of a split's raw text.

    The text is the one that is tokenized (after Wiki-40B marker cleanup, empty documents
    dropped). Words are runs of non-whitespace (TF's ASCII whitespace split, as `str.split()` on
    ASCII text). Cached per process.
    """
    tasks.require_typed(cfg)
    _check_split(cfg, split)
    data_dir = tasks._local_path(cfg.data_dir) if cfg.source == "local" else ""
    return dict(_split_statistics(cfg.dataset, cfg.source, data_dir, cfg.tfds_data_dir, split))


@functools.cache
def _split_statistics(dataset, source, data_dir, tfds_data_dir, split):
    if source == "tfds":
        src = sources.tfds_source(dataset, tfds_data_dir)
        text_key = sources.TFDS_DATASETS[dataset]["text_key"]
    else:
        src, text_key = sources.LocalTextSource(data_dir), "text"
    ds = src.get_dataset(split=split, shuffle=False)
    for prep in tasks.text_preprocessors(dataset, text_key):
        ds = prep(ds)

    def count(ex):
        text = ex["targets"]
        return {
            "documents": tf.constant(1, tf.int64),
            "bytes": tf.cast(tf.strings.length(text, unit="BYTE"), tf.int64),
            "words": tf.size(tf.strings.split(text[None]).flat_values, out_type=tf.int64),
        }

    ds = ds.map(count, num_parallel_calls=tf.data.AUTOTUNE)
    zero = {k: tf.constant(0, tf.int64) for k in ("documents", "bytes", "words")}
    totals = ds.reduce(zero, lambda acc, x: {k: acc[k] + x[k] for k in acc})
    return tuple((k, int(v.numpy())) for k, v in totals.items())
