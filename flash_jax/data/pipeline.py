"""The bridge to JAX: batches of packed windows as numpy arrays or global jax.Arrays.

    pipe = InputPipeline(config.data, "train", mesh=mesh, seed=0)
    batch = next(pipe)  # inputs, targets, segment_ids, positions int32; weights float32: [B, L]
    pipe.position       # batches produced so far (checkpoint it; resume with start_batch=)

Per host: documents are split between hosts (`seqio.ShardInfo`, one shard per process) when a split
has at least as many documents as hosts; otherwise every host reads the whole (small) split and
keeps every num_shards-th window, so no host is left without data. Each host builds
`batch_size // num_shards` rows.

Order: a fixed seed and host layout give a fixed order (seeded file shuffle, window shuffle buffer
of `shuffle_buffer`, deterministic parallel maps). Resume is skip-based: `start_batch=k` rebuilds
the stream and drops its first k batches, which costs the preprocessing of k batches (about
k * batch_size * seq_len / throughput seconds; see scripts/bench_data.py).

Eval (`repeat=False, shuffle=False`): every window of every document exactly once; the last
partial batch is filled with all-zero rows (weights 0). With several processes, a host that runs
out first keeps yielding all-zero batches until every host is done, so that the collective
`make_array_from_process_local_data` never waits on a host that has stopped.
"""

from __future__ import annotations

import functools
import queue
import threading

import jax
import numpy as np
import seqio
import tensorflow as tf
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from flash_jax import sharding
from flash_jax.data import preprocessors, sources, tasks

FEATURES = ("inputs", "targets", "weights", "segment_ids", "positions")
_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


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


def _num_documents(task: seqio.Task, split: str) -> int | None:
    """Documents in a split; None when the source cannot tell (TFDS without split info).

    A local split is also checked to hold readable text (ValueError naming the folder)."""
    source = task.source
    if isinstance(source, sources.LocalTextSource):
        source.corpus.check_readable(split)
        return len(source.corpus.files(split))
    try:
        source.list_shards(split)  # seqio needs the file list to shard by document
        return int(source.num_input_examples(split) or 0) or None
    except (KeyError, ValueError, tf.errors.OpError):
        return None


class InputPipeline:
    """Iterator of batches for one split; see the module docstring for the contract."""

    def __init__(
        self,
        data_config,
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
        cfg = data_config
        tasks.check_config(cfg)
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
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.config = cfg
        self.split = split
        self.seq_len = cfg.seq_len
        self.global_batch_size = cfg.batch_size
        self.local_batch_size = cfg.batch_size // num_shards
        self.shard_index, self.num_shards = shard_index, num_shards
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
        self._dataset = self._build(seed, shuffle, repeat, start_batch)
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._exhausted = False

    # ---- tf.data ----
    def _build(self, seed: int, shuffle: bool, repeat: bool, start_batch: int) -> tf.data.Dataset:
        cfg = self.config
        lengths = {"targets": cfg.seq_len}
        if cfg.objective == "mlm":
            lengths["inputs"] = cfg.seq_len
        num_docs = _num_documents(self.task, self.split)  # also checks the local corpus
        # Unknown counts (no split info) take the window route too: slower, never wrong.
        by_document = self.num_shards == 1 or (num_docs or 0) >= self.num_shards
        if by_document:
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
            use_cached=False,
            shuffle=shuffle,
            shuffle_buffer_size=cfg.shuffle_buffer,
            seed=task_seed,
            shard_info=shard_info if self.num_shards > 1 else None,
            num_epochs=None if repeat else 1,
            try_in_mem_cache=False,
        )
        if not by_document:
            ds = ds.shard(self.num_shards, self.shard_index)
        ds = preprocessors.pack_windows(ds, cfg.seq_len, cfg.objective)
        ds = ds.batch(self.local_batch_size, drop_remainder=repeat)
        if start_batch:
            ds = ds.skip(start_batch)
        options = tf.data.Options()
        options.deterministic = True
        ds = ds.with_options(options)
        return ds.prefetch(cfg.prefetch or tf.data.AUTOTUNE)

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

    def _produce(self) -> None:
        try:
            for batch in self._dataset.as_numpy_iterator():
                item = self._to_device(self._pad(batch))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(_END)
        except BaseException as e:  # handed to the consumer thread, raised by next()
            self._queue.put(_Failure(e))

    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=max(1, self.config.prefetch))
        self._thread = threading.Thread(target=self._produce, daemon=True, name="InputPipeline")
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            self._start()
        item = _END if self._exhausted else self._queue.get()
        if isinstance(item, _Failure):
            raise item.error
        if item is _END:
            self._exhausted = True
            if self.repeat:
                raise RuntimeError(
                    f"the {self.split!r} stream of {self.task.name} ended although repeat=True: "
                    f"host {self.shard_index} of {self.num_shards} got no data"
                )
            if self._sharding is not None and jax.process_count() > 1:
                item = self._multihost_end_of_data()
            else:
                raise StopIteration
        elif self._sharding is not None and jax.process_count() > 1 and not self.repeat:
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
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        stop = getattr(self, "_stop", None)  # absent when __init__ raised
        if stop is not None:
            stop.set()


def check_split(data_config, split: str) -> None:
    """ValueError (one line, naming the key or path) now, before a run writes or compiles
    anything, if `split` cannot be read: a missing folder or dataset, a bad metadata.csv, a split
    without readable text. Builds the split's pipeline without reading a batch."""
    InputPipeline(data_config, split, shuffle=False, repeat=False).close()


def split_statistics(data_config, split: str) -> dict[str, int]:
    """Documents, UTF-8 bytes and whitespace-separated words of a split's raw text.

    The text is the one that is tokenized (after Wiki-40B marker cleanup, empty documents
    dropped). Words are runs of non-whitespace (TF's ASCII whitespace split, as `str.split()` on
    ASCII text). Cached per process.
    """
    cfg = data_config
    tasks.check_config(cfg)
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
