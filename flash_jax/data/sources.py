"""Where raw text comes from: TFDS builders, or a local corpus in PG-19's layout or of plain .txt.

Local corpora (`config.data.source = "local"`, `config.data.data_dir`):

* PG-19 layout: `train/`, `validation/`, `test/` folders of `<id>.txt` and, optionally, a headerless
  `metadata.csv` of `book_id,short_title,publication_date,link` (checked when present). The same
  layout with any file names is accepted, so a folder of plain-text splits works the same way.
* A `.tar.xz` / `.tar.gz` / `.tar` of such a folder: extracted once into the cache directory
  (`$FLASH_JAX_CACHE_DIR`, default `~/.cache/flash_jax`) and read from there.
* A flat folder of `.txt` files (no split folders): each file goes to a split by a hash of its
  name, stable across machines and runs: 90% train, 5% validation, 5% test (`split_of_file`).

Each file is one document. Paths go through `tf.io.gfile`, so `gs://` folders work too (e.g. the
public PG-19 copy `gs://deepmind-gutenberg`). Every document is trained on or named in a warning:
text that is not UTF-8 is decoded as cp1252 / Latin-1 (logged with a count); an empty, unreadable
or binary file is skipped with a warning naming it. A split with no readable text is an error
found before training starts (`LocalCorpus.check_readable`).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
from collections.abc import Sequence

import numpy as np
import seqio
import tensorflow as tf
from absl import logging

SPLITS = ("train", "validation", "test")
ARCHIVE_SUFFIXES = (".tar.xz", ".txz", ".tar.gz", ".tgz", ".tar")
# Local corpora up to this many bytes of text keep their tokenized documents in memory after the
# first epoch (the shipped corpus is 4.3 MB); bigger ones are re-read and re-tokenized each epoch.
MAX_BYTES_TO_CACHE = 256 * 2**20
# A flat folder of .txt files is split by file-name hash into these percentages.
FLAT_SPLIT_PERCENT = {"train": 90, "validation": 5, "test": 5}

EXPECTED_LAYOUT = (
    "expected a PG-19-layout folder (train/, validation/, test/ of <id>.txt plus a headerless "
    "metadata.csv of book_id,short_title,publication_date,link), a .tar.xz of one, or a folder "
    "of .txt files"
)

# TFDS builder and text feature per dataset; `splits` are the ones the builder has.
TFDS_DATASETS = {
    "pg19": dict(name="pg19:0.1.*", text_key="book_text", splits=("train", "validation", "test")),
    "wiki40b": dict(
        name="wiki40b/en:1.3.*", text_key="text", splits=("train", "validation", "test")
    ),
    "c4": dict(name="c4/en:3.*.*", text_key="text", splits=("train", "validation")),
}


def cache_dir() -> str:
    return os.environ.get("FLASH_JAX_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "flash_jax"
    )


def is_archive(path: str) -> bool:
    return path.endswith(ARCHIVE_SUFFIXES)


def extract_archive(archive: str) -> str:
    """Extracts a corpus archive once into the cache; returns the corpus folder inside it.

    The cache folder's name holds a hash of the archive's path, size and mtime, so a changed
    archive is extracted again. Extraction goes to a temporary folder that is renamed into place,
    so concurrent processes never see a half-written corpus.
    """
    if not os.path.isfile(archive):
        raise ValueError(f"data.data_dir {archive!r} does not exist; {EXPECTED_LAYOUT}")
    stat = os.stat(archive)
    key = hashlib.sha1(f"{os.path.abspath(archive)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    name = os.path.basename(archive)
    for suffix in ARCHIVE_SUFFIXES:
        name = name.removesuffix(suffix)
    target = os.path.join(cache_dir(), "corpora", f"{name}-{key.hexdigest()[:12]}")
    if not os.path.isdir(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=os.path.dirname(target))
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ValueError(
                f"data.data_dir {archive!r} could not be extracted ({e}); {EXPECTED_LAYOUT}"
            ) from e
        try:
            os.rename(tmp, target)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    # An archive usually holds one top folder (austen-pg19/...): descend into it.
    entries = [e for e in os.listdir(target) if not e.startswith(".")]
    if len(entries) == 1 and os.path.isdir(os.path.join(target, entries[0])):
        return os.path.join(target, entries[0])
    return target


def _few(items: Sequence[str], n: int = 2) -> str:
    return "; ".join(items[:n]) + (f"; and {len(items) - n} more" if len(items) > n else "")


def split_of_file(filename: str) -> str:
    """The split of a file in a flat folder: a stable hash of its base name."""
    bucket = int(hashlib.sha1(os.path.basename(filename).encode()).hexdigest(), 16) % 100
    if bucket < FLAT_SPLIT_PERCENT["train"]:
        return "train"
    if bucket < FLAT_SPLIT_PERCENT["train"] + FLAT_SPLIT_PERCENT["validation"]:
        return "validation"
    return "test"


class LocalCorpus:
    """A local corpus folder (or archive); `files(split)` lists its documents, sorted."""

    def __init__(self, data_dir: str):
        if not data_dir:
            raise ValueError(f"data.data_dir is empty; {EXPECTED_LAYOUT}")
        self.data_dir = data_dir

    @functools.cached_property
    def root(self) -> str:
        path = self.data_dir
        if "://" not in path:
            path = os.path.abspath(os.path.expanduser(path))
        if is_archive(path):
            return extract_archive(path)
        if not tf.io.gfile.isdir(path):
            raise ValueError(f"data.data_dir {self.data_dir!r} does not exist; {EXPECTED_LAYOUT}")
        return path

    @functools.cached_property
    def layout(self) -> str:
        """'splits' (PG-19 layout: split folders) or 'flat' (a folder of .txt files)."""
        entries = tf.io.gfile.listdir(self.root)
        if not entries:
            raise ValueError(f"data.data_dir {self.data_dir!r} is empty; {EXPECTED_LAYOUT}")
        names = {e.rstrip("/") for e in entries}
        if any(tf.io.gfile.isdir(os.path.join(self.root, s)) for s in SPLITS if s in names):
            self._check_metadata()
            return "splits"
        if any(n.endswith(".txt") for n in names):
            return "flat"
        raise ValueError(
            f"data.data_dir {self.data_dir!r} holds no train/, validation/ or test/ folder and no "
            f".txt file (found {sorted(names)[:5]}); {EXPECTED_LAYOUT}"
        )

    def _check_metadata(self) -> None:
        path = os.path.join(self.root, "metadata.csv")
        if not tf.io.gfile.exists(path):
            return
        with tf.io.gfile.GFile(path, "r") as f:
            rows = list(csv.reader(io.StringIO(f.read())))
        for i, row in enumerate(rows):
            if row and (len(row) != 4 or not row[0].strip().isdigit()):
                raise ValueError(
                    f"{path} line {i + 1} is {row!r}; expected a headerless PG-19 metadata.csv of "
                    "book_id,short_title,publication_date,link"
                )

    @functools.cache  # noqa: B019 (a corpus object lives as long as its task)
    def files(self, split: str) -> tuple[str, ...]:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        if self.layout == "splits":
            folder = os.path.join(self.root, split)
            if not tf.io.gfile.isdir(folder):
                raise ValueError(
                    f"data.data_dir {self.data_dir!r} has no {split}/ folder; {EXPECTED_LAYOUT}"
                )
            paths = tf.io.gfile.glob(os.path.join(folder, "*.txt"))
            where = folder
        else:
            paths = [
                p
                for p in tf.io.gfile.glob(os.path.join(self.root, "*.txt"))
                if split_of_file(p) == split
            ]
            where = (
                f"{self.root} (flat folder, {split} = {FLAT_SPLIT_PERCENT[split]}% by name hash)"
            )
        if not paths:
            raise ValueError(f"data.data_dir: no .txt documents for split {split!r} in {where}")
        return tuple(sorted(paths))

    def check_readable(self, split: str) -> None:
        """ValueError naming the folder unless the split has a document with text in it.

        Reads documents in order until one has text: usually just the first.
        """
        paths = self.files(split)
        problems = []
        for path in paths:
            text, note = decode_document(path)
            if text:
                return
            problems.append(f"{path} {note or 'holds no text'}")
        raise ValueError(
            f"data.data_dir: split {split!r} of {self.data_dir!r} has no readable text: "
            f"{_few(problems)}"
        )

    def total_bytes(self) -> int | None:
        """Total size of the corpus's .txt files, or None for remote corpora (slow to list)."""
        if "://" in self.root:
            return None
        total = 0
        for folder, _, names in os.walk(self.root):
            total += sum(
                os.path.getsize(os.path.join(folder, n)) for n in names if n.endswith(".txt")
            )
        return total


# Text that is not UTF-8 is decoded as cp1252 (Windows' superset of Latin-1's printable range);
# the five byte values cp1252 leaves undefined fall back to Latin-1, which decodes any byte.
FALLBACK_ENCODINGS = ("cp1252", "latin-1")
_reported: set[str] = set()  # documents already reported by this process (once, not per epoch)
_decoded_count = 0


def decode_document(path: str) -> tuple[str | None, str]:
    """(text, note) of one document: text None when it cannot be trained on, and why.

    The note is "" for UTF-8 text, else says what happened ("decoded as cp1252", "is empty",
    "is not text", "is not a regular file", "cannot be read (...)").
    """
    if "://" not in path and os.path.exists(path) and not os.path.isfile(path):
        # A FIFO or a device named *.txt: reading it could wait forever (SIGTERM included).
        return None, "is not a regular file (a FIFO, a device or a folder)"
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            raw = f.read()
    except (OSError, tf.errors.OpError) as e:
        return None, f"cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if not raw:
        return None, "is empty"
    if b"\0" in raw:  # no text encoding we read has NUL bytes: an image, an archive, UTF-16
        return None, "is not text (it holds NUL bytes)"
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError:
        pass
    for encoding in FALLBACK_ENCODINGS:
        try:
            return raw.decode(encoding), f"is not UTF-8: decoded as {encoding}"
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes every byte")


def read_text_file(path: str) -> str | None:
    """A document's text, or None when it cannot be trained on; either is logged once.

    Every document is trained on or named in a warning: a non-UTF-8 one is decoded (with a
    running count), an empty, unreadable or binary one is skipped.
    """
    global _decoded_count
    text, note = decode_document(path)
    if note and path not in _reported:
        _reported.add(path)
        if text is None:
            logging.warning("flash_jax.data: %s %s: not trained on", path, note)
        else:
            _decoded_count += 1
            logging.warning(
                "flash_jax.data: %s %s (%d non-UTF-8 document(s) so far)",
                path,
                note,
                _decoded_count,
            )
    return text


def read_documents(paths: Sequence[str]):
    """Yields the text of each readable document; raises if none of them is readable."""
    count = 0
    for path in paths:
        text = read_text_file(path)
        if text is None:
            continue
        count += 1
        yield text
    if paths and not count:
        raise ValueError(
            f"none of the {len(paths)} documents could be read as text "
            f"(first: {paths[0]}); see the logged warnings"
        )


def _read_document(path: tf.Tensor) -> dict[str, tf.Tensor]:
    """{"text": the document's text, or "" when it cannot be trained on} (see read_text_file)."""

    def read(path: bytes) -> np.ndarray:
        return np.array((read_text_file(path.decode()) or "").encode(), dtype=object)

    text = tf.numpy_function(read, [path], tf.string, stateful=False)
    return {"text": tf.ensure_shape(text, [])}


class LocalTextSource(seqio.DataSource):
    """A seqio DataSource over a LocalCorpus: examples {"text": <one document>}.

    Shards at the file level (each host reads only its files) when a split has at least as many
    files as hosts; seqio shards examples otherwise. File order is shuffled by `seed`.
    """

    def __init__(self, data_dir: str):
        self.corpus = LocalCorpus(data_dir)
        super().__init__(splits=SPLITS)

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return False

    def list_shards(self, split: str) -> Sequence[str]:
        return self.corpus.files(split)

    def num_input_examples(self, split: str) -> int:
        return len(self.corpus.files(split))

    def get_dataset(
        self,
        split: str = "train",
        shuffle: bool = True,
        seed: int | None = None,
        shard_info: seqio.ShardInfo | None = None,
        *,
        sequence_length=None,
        use_cached: bool = False,
        num_epochs: int | None = 1,
    ) -> tf.data.Dataset:
        del sequence_length, use_cached, num_epochs  # seqio's Task handles these
        paths = list(self.corpus.files(split))
        if shuffle:
            order = np.random.default_rng(0 if seed is None else seed).permutation(len(paths))
            paths = [paths[i] for i in order]
        if shard_info is not None:
            paths = paths[shard_info.index :: shard_info.num_shards]
        # Paths mapped by a stateless read rather than a Python generator: tf.data can then save
        # the iterator's place in the list (a generator's is not saved), which resuming relies on.
        documents = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string))
        documents = documents.map(_read_document)
        # Unreadable and empty documents become "" (each named in a warning) and are dropped.
        return documents.filter(lambda ex: tf.strings.length(ex["text"]) > 0)

    def __repr__(self) -> str:
        return f"LocalTextSource({self.corpus.data_dir!r})"


def tfds_source(dataset: str, tfds_data_dir: str) -> seqio.TfdsDataSource:
    spec = TFDS_DATASETS[dataset]
    return seqio.TfdsDataSource(
        tfds_name=spec["name"],
        tfds_data_dir=tfds_data_dir or None,
        splits=spec["splits"],
    )
