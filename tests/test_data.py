"""flash_jax.data: windows, packing, masking, hosts, resume, mesh, eval coverage, bad input."""

import collections
import contextlib
import importlib
import logging
import os
import subprocess
import sys
import tarfile
import threading
import time

import jax
import ml_collections
import numpy as np
import pytest
import seqio
import tensorflow as tf
from jax.sharding import PartitionSpec as P

from configs import base
from flash_jax import data, sharding
from flash_jax.config import DataConfig
from flash_jax.data import preprocessors, sources, tasks, vocabularies

AUSTEN_VALIDATION_BYTES = 433410  # 121.txt, Northanger Abbey (see the corpus README)


def make_cfg(**overrides) -> DataConfig:
    cfg = ml_collections.ConfigDict(base.get_config().data.to_dict())
    cfg.update(overrides)
    return DataConfig.from_config(cfg)


def collect(pipe, limit=10_000):
    batches = []
    for batch in pipe:
        batches.append(batch)
        if len(batches) >= limit:
            break
    pipe.close()
    return {k: np.concatenate([b[k] for b in batches]) for k in data.FEATURES}, len(batches)


def segments(rows):
    """The token pieces of packed rows, in order: a list of 1-D arrays."""
    pieces = []
    for targets, seg in zip(rows["targets"], rows["segment_ids"], strict=True):
        for s in np.unique(seg[seg > 0]):
            pieces.append(targets[seg == s])
    return pieces


# A small corpus in PG-19 layout, written once per module: 5 train books, 1 validation book.
WORDS = "the of and to a in that it was her not be he his as you she with for had".split()


def _book(rng, n_words):
    words = rng.choice(WORDS, size=n_words)
    lines = [" ".join(words[i : i + 12]) for i in range(0, n_words, 12)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "tiny-pg19"
    rng = np.random.default_rng(0)
    books = {}
    for split, ids, sizes in (
        ("train", [11, 12, 13, 14, 15], [900, 40, 700, 13, 333]),
        ("validation", [21], [500]),
        ("test", [31, 32], [80, 90]),
    ):
        (root / split).mkdir(parents=True)
        for book_id, size in zip(ids, sizes, strict=True):
            text = _book(rng, size)
            (root / split / f"{book_id}.txt").write_text(text, encoding="utf-8")
            books[(split, book_id)] = text
    rows = [f"{i},Book {i},1900,https://www.gutenberg.org/ebooks/{i}" for _, i in books]
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root, books


def byte_cfg(data_dir, **kw):
    return make_cfg(
        data_dir=str(data_dir), vocab="byte", seq_len=64, batch_size=4, shuffle_buffer=64, **kw
    )


def eval_pipe(cfg, split, **kw):
    return data.InputPipeline(cfg, split, shuffle=False, repeat=False, **kw)


# ---------------------------------------------------------------- shipped assets and config


def test_shipped_paths_and_vocab_match_the_config_contract():
    assert data.SHIPPED_CORPUS == base.SHIPPED_CORPUS and os.path.isfile(data.SHIPPED_CORPUS)
    assert data.SHIPPED_VOCAB == base.SHIPPED_VOCAB and data.T5_VOCAB == base.T5_VOCAB
    vocab = data.get_vocabulary(make_cfg())
    assert vocab.vocab_size == base.get_config().model.vocab_size == 4096
    sp = vocab.tokenizer
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert data.mlm_mask_spec(vocab) == vocabularies.MaskSpec(3, 4, 4096)  # <mask> is id 3
    byte = data.get_vocabulary(make_cfg(vocab="byte"))
    assert isinstance(byte, seqio.ByteVocabulary) and byte.vocab_size == 259
    assert data.mlm_mask_spec(byte) == vocabularies.MaskSpec(2, 3, 259)


def test_shipped_vocab_is_lossless_on_the_corpus():
    text = tf.io.gfile.GFile(sources.LocalCorpus(data.SHIPPED_CORPUS).files("test")[0]).read()
    vocab = data.get_vocabulary(make_cfg())
    ids = vocab.encode_tf(tf.constant(text)).numpy()
    assert vocab.decode_tf(tf.constant(ids)).numpy().decode() == text
    # About 3.4 bytes per token: the 4k vocab is fitted to this corpus.
    assert 3.0 < len(text.encode()) / len(ids) < 4.0


def test_standard_tasks_register_once_and_reimport_does_not_fail():
    names = tasks.register_standard_tasks()
    assert len(names) == len(set(names)) == 10
    assert all(n in seqio.TaskRegistry.names() for n in names)
    assert tasks.register_standard_tasks() == names
    importlib.reload(importlib.import_module("flash_jax.data"))
    cfg = make_cfg()
    assert data.get_task(cfg) is data.get_task(cfg)
    assert data.task_name(cfg) in names
    assert (
        data.task_name(make_cfg(dataset="c4", objective="mlm", source="tfds", vocab="byte"))
        == "flash_jax.c4_mlm15.tfds.byte"
    )


def test_importing_the_package_registers_no_task_and_standard_tasks_registers_them():
    """A fresh process: this one has registered tasks already. seqio's tools import
    flash_jax.data.standard_tasks (docs/data.md); everything else registers on first use."""
    script = (
        "import seqio, flash_jax.data\n"
        "def ours(): return sorted(n for n in seqio.TaskRegistry.names() if 'flash_jax' in n)\n"
        "assert ours() == [], ours()\n"
        "from flash_jax.data import standard_tasks\n"
        "assert ours() == sorted(standard_tasks.NAMES) and len(ours()) == 10, ours()\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=repo),
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(
    "key,value", [("dataset", "wikitext"), ("objective", "prefix_lm"), ("source", "hf")]
)
def test_unknown_config_values_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"data.{key}"):
        data.InputPipeline(make_cfg(**{key: value}), "train")


def test_batch_size_must_divide_over_hosts_and_mesh():
    with pytest.raises(ValueError, match="data.batch_size"):
        data.InputPipeline(make_cfg(batch_size=6), "train", shard_index=0, num_shards=4)
    mesh = sharding.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    with pytest.raises(ValueError, match="data.batch_size"):
        data.InputPipeline(make_cfg(batch_size=6), "train", mesh=mesh)
    with pytest.raises(ValueError, match="split 'test' is not available"):
        data.InputPipeline(make_cfg(dataset="c4", source="tfds", vocab="byte"), "test")


# ---------------------------------------------------------------- windows and packing


@pytest.mark.parametrize("cycle_length", [1, 4])
def test_windows_cover_every_token_once_in_order(cycle_length):
    rng = np.random.default_rng(1)
    docs = [rng.integers(3, 50, size=n).astype(np.int32) for n in (1, 7, 8, 9, 23, 16, 40)]
    ds = tf.data.Dataset.from_generator(
        lambda: ({"targets": d, "doc": i} for i, d in enumerate(docs)),
        output_signature={
            "targets": tf.TensorSpec([None], tf.int32),
            "doc": tf.TensorSpec([], tf.int32),
        },
    )
    out = list(
        preprocessors.split_into_windows(
            ds, {"targets": 8}, cycle_length=cycle_length
        ).as_numpy_iterator()
    )
    by_doc = collections.defaultdict(list)
    for w in out:
        by_doc[int(w["doc"])].append(w)
    for i, doc in enumerate(docs):
        windows = by_doc[i]
        assert [int(w["window_index"]) for w in windows] == list(range(len(windows)))
        np.testing.assert_array_equal(np.concatenate([w["targets"] for w in windows]), doc)
        assert all(len(w["targets"]) == 8 for w in windows[:-1])
        assert len(windows) == -(-len(doc) // 8)


def _reference_pack(lengths, seq_len, group=None):
    """Next-fit greedy packing, written independently of seqio: rows of window indices. With a
    group size, each group of windows is packed alone (its last row closed at its end)."""
    if group is not None:
        rows = []
        for start in range(0, len(lengths), group):
            part = _reference_pack(lengths[start : start + group], seq_len)
            rows += [[start + i for i in row] for row in part]
        return rows
    rows, row, used = [], [], 0
    for i, n in enumerate(lengths):
        if used + n > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    return rows + [row]


# None: seqio's groups of seq_len windows; 3: the bounded groups of long windows (PACK_TOKENS)
@pytest.mark.parametrize("group", [None, 3])
def test_packing_segment_ids_positions_and_shifted_inputs(group, monkeypatch):
    seq_len = 8
    lengths = [5, 3, 8, 2, 6, 1, 4, 4, 7]  # in groups of 3, windows 5 and 6 no longer share a row
    if group is not None:
        monkeypatch.setattr(preprocessors, "PACK_TOKENS", group * seq_len)
    rng = np.random.default_rng(2)
    windows = [rng.integers(3, 99, size=n).astype(np.int32) for n in lengths]
    ds = tf.data.Dataset.from_generator(
        lambda: ({"targets": w} for w in windows),
        output_signature={"targets": tf.TensorSpec([None], tf.int32)},
    )
    rows = list(preprocessors.pack_windows(ds, seq_len, "lm").as_numpy_iterator())
    expected = _reference_pack(lengths, seq_len, group)
    assert len(rows) == len(expected)
    for row, members in zip(rows, expected, strict=True):
        want_targets, want_seg, want_pos, want_inputs = [], [], [], []
        for s, i in enumerate(members, start=1):
            w = windows[i]
            want_targets += list(w)
            want_seg += [s] * len(w)
            want_pos += list(range(len(w)))
            want_inputs += [0] + list(w[:-1])
        pad = seq_len - len(want_targets)
        np.testing.assert_array_equal(row["targets"], want_targets + [0] * pad)
        np.testing.assert_array_equal(row["segment_ids"], want_seg + [0] * pad)
        np.testing.assert_array_equal(row["positions"], want_pos + [0] * pad)
        np.testing.assert_array_equal(row["inputs"], want_inputs + [0] * pad)
        np.testing.assert_array_equal(row["weights"], [1.0] * len(want_seg) + [0.0] * pad)
        assert row["weights"].dtype == np.float32 and row["inputs"].dtype == np.int32


def test_clean_wiki40b_markers():
    raw = (
        "\n_START_ARTICLE_\nAda Lovelace\n_START_SECTION_\nEarly life\n_START_PARAGRAPH_\n"
        "Ada was born in 1815._NEWLINE_She was the only child.\n_START_PARAGRAPH_\nLater."
    )
    ds = tf.data.Dataset.from_tensors({"text": tf.constant(raw)})
    out = next(preprocessors.clean_wiki40b(ds).as_numpy_iterator())["text"].decode()
    assert out == (
        "Ada Lovelace\n\nEarly life\n\nAda was born in 1815.\nShe was the only child.\n\nLater."
    )


# ---------------------------------------------------------------- the shipped corpus, end to end


@pytest.fixture(scope="module")
def austen_eval():
    cfg = make_cfg(seq_len=128, batch_size=8)
    rows, num_batches = collect(eval_pipe(cfg, "validation"))
    return cfg, rows, num_batches


def test_eval_covers_the_split_exactly(austen_eval):
    cfg, rows, num_batches = austen_eval
    vocab = data.get_vocabulary(cfg)
    path = sources.LocalCorpus(data.SHIPPED_CORPUS).files("validation")[0]
    text = tf.io.gfile.GFile(path).read()
    want = list(vocab.encode_tf(tf.constant(text)).numpy()) + [vocab.eos_id]
    # One book: its windows, in order, rebuild the token stream exactly (the 4k vocab: 128-token
    # windows, the remainder packed in the last row).
    stream = np.concatenate(segments(rows))
    np.testing.assert_array_equal(stream, want)
    assert rows["weights"].sum() == len(want)
    num_rows = -(-len(want) // 128)  # ceil: full windows plus the remainder
    assert num_batches == -(-num_rows // 8)
    # The last partial batch is filled with all-zero rows.
    empty = rows["segment_ids"].sum(axis=1) == 0
    assert empty.any() and not any(rows[k][empty].any() for k in data.FEATURES)
    stats = data.split_statistics(cfg, "validation")
    assert stats == dict(documents=1, bytes=AUSTEN_VALIDATION_BYTES, words=len(text.split()))
    assert len(text.encode()) == AUSTEN_VALIDATION_BYTES


def test_mlm_masks_about_mask_rate_and_keeps_originals_as_targets(austen_eval):
    _, lm_rows, _ = austen_eval
    cfg = make_cfg(seq_len=128, batch_size=8, objective="mlm", mask_rate=0.15)
    rows, _ = collect(eval_pipe(cfg, "validation", seed=5))
    spec = data.mlm_mask_spec(data.get_vocabulary(cfg))
    # Same windows as the LM eval: the targets are the original tokens.
    np.testing.assert_array_equal(rows["targets"], lm_rows["targets"])
    np.testing.assert_array_equal(rows["segment_ids"], lm_rows["segment_ids"])
    real = rows["segment_ids"] > 0
    w = rows["weights"] > 0
    assert not (w & ~real).any()
    rate = w.sum() / real.sum()  # ~36k tokens: the standard error is 0.002
    assert abs(rate - 0.15) < 0.01, rate
    np.testing.assert_array_equal(rows["inputs"][~w], rows["targets"][~w])
    masked = rows["inputs"][w] == spec.mask_id
    unchanged = rows["inputs"][w] == rows["targets"][w]
    assert abs(masked.mean() - 0.8) < 0.03 and abs(unchanged.mean() - 0.1) < 0.03
    replaced = rows["inputs"][w][~masked & ~unchanged]
    assert replaced.min() >= spec.random_low and replaced.max() < spec.random_high
    # A fixed seed gives fixed masks.
    again, _ = collect(eval_pipe(cfg, "validation", seed=5), limit=2)
    np.testing.assert_array_equal(again["inputs"], rows["inputs"][: len(again["inputs"])])


@pytest.mark.slow  # four pipelines: about 10 s on two busy cores
def test_train_batches_fixed_order_resume_and_seed(small_corpus):
    cfg = byte_cfg(small_corpus[0])
    first, _ = collect(data.InputPipeline(cfg, "train", seed=3), limit=6)
    again, _ = collect(data.InputPipeline(cfg, "train", seed=3), limit=6)
    for k in data.FEATURES:
        np.testing.assert_array_equal(first[k], again[k])
    pipe = data.InputPipeline(cfg, "train", seed=3, start_batch=4)
    assert pipe.position == 4
    resumed, _ = collect(pipe, limit=2)
    assert pipe.position == 6
    for k in data.FEATURES:
        np.testing.assert_array_equal(resumed[k], first[k][16:24])
    other, _ = collect(data.InputPipeline(cfg, "train", seed=4), limit=1)
    assert not np.array_equal(other["targets"], first["targets"][:4])
    # LM contract on real batches: inputs are the targets shifted within each segment.
    t, seg = first["targets"], first["segment_ids"]
    start = np.concatenate([np.ones_like(seg[:, :1]), (seg[:, 1:] != seg[:, :-1])], axis=1)
    shifted = np.concatenate([np.zeros_like(t[:, :1]), t[:, :-1]], axis=1)
    np.testing.assert_array_equal(first["inputs"], np.where(start | (seg == 0), 0, shifted))
    np.testing.assert_array_equal(first["weights"], (seg > 0).astype(np.float32))


def test_mesh_batch_is_a_global_array_sharded_over_data_and_fsdp():
    cfg = make_cfg(seq_len=128, batch_size=8, vocab="byte")
    mesh = sharding.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    want, _ = collect(eval_pipe(cfg, "validation"), limit=1)
    pipe = eval_pipe(cfg, "validation", mesh=mesh)
    batch = next(pipe)
    pipe.close()
    for k in data.FEATURES:
        x = batch[k]
        assert isinstance(x, jax.Array) and x.shape == (8, 128)
        assert x.sharding.spec == P(("data", "fsdp"), None)
        np.testing.assert_array_equal(np.asarray(x), want[k])
        for shard in x.addressable_shards:  # each device holds its 2 rows, replicated on tensor
            assert shard.data.shape == (2, 128)
            np.testing.assert_array_equal(np.asarray(shard.data), want[k][shard.index])


# ---------------------------------------------------------------- hosts, layouts, archives


def _token_counter(rows):
    return collections.Counter(np.concatenate(segments(rows)).tolist())


@pytest.mark.parametrize("split", ["train", "validation"])  # 5 books: by file; 1 book: by window
def test_two_hosts_read_disjoint_data_that_make_the_whole(small_corpus, split):
    root, _ = small_corpus
    cfg = byte_cfg(root)
    whole, _ = collect(eval_pipe(cfg, split))
    host0, _ = collect(eval_pipe(cfg, split, shard_index=0, num_shards=2))
    host1, _ = collect(eval_pipe(cfg, split, shard_index=1, num_shards=2))
    assert host0["targets"].shape[0] % 2 == 0  # each host builds batch_size // 2 rows
    c0, c1 = _token_counter(host0), _token_counter(host1)
    assert c0 and c1 and c0 + c1 == _token_counter(whole)
    pieces0 = {p.tobytes() for p in segments(host0)}
    assert not pieces0 & {p.tobytes() for p in segments(host1)}


def test_small_corpus_tokens_and_statistics(small_corpus):
    root, books = small_corpus
    cfg = byte_cfg(root)
    rows, _ = collect(eval_pipe(cfg, "train"))
    texts = [t for (split, _), t in books.items() if split == "train"]
    assert rows["weights"].sum() == sum(len(t.encode()) + 1 for t in texts)  # + EOS each
    assert data.split_statistics(cfg, "train") == dict(
        documents=5,
        bytes=sum(len(t.encode()) for t in texts),
        words=sum(len(t.split()) for t in texts),
    )


def test_tar_xz_archive_reads_like_the_folder(small_corpus, tmp_path, monkeypatch):
    root, _ = small_corpus
    monkeypatch.setenv("FLASH_JAX_CACHE_DIR", str(tmp_path / "cache"))
    archive = tmp_path / "tiny-pg19.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(root, arcname="tiny-pg19")
    corpus = sources.LocalCorpus(str(archive))
    assert [os.path.basename(p) for p in corpus.files("train")] == [
        os.path.basename(p) for p in sources.LocalCorpus(str(root)).files("train")
    ]
    assert corpus.root.startswith(str(tmp_path / "cache"))
    assert data.split_statistics(byte_cfg(archive), "test") == data.split_statistics(
        byte_cfg(root), "test"
    )


def test_flat_folder_is_split_by_file_name_hash(tmp_path):
    names = [f"doc{i}.txt" for i in range(60)]
    for n in names:
        (tmp_path / n).write_text(f"text of {n}\n")
    corpus = sources.LocalCorpus(str(tmp_path))
    got = {s: [os.path.basename(p) for p in corpus.files(s)] for s in sources.SPLITS}
    assert sorted(sum(got.values(), [])) == sorted(names)
    for s, files in got.items():
        assert all(sources.split_of_file(f) == s for f in files)
    assert len(got["train"]) > len(got["validation"])


# ---------------------------------------------------------------- bad input


def test_missing_empty_and_wrong_folders_are_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist; expected a PG-19-layout folder"):
        data.InputPipeline(byte_cfg(tmp_path / "nope"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty'? is empty; expected"):
        data.InputPipeline(byte_cfg(tmp_path / "empty"), "train")
    wrong = tmp_path / "wrong"
    (wrong / "books").mkdir(parents=True)
    (wrong / "notes.md").write_text("hi")
    with pytest.raises(ValueError, match="no train/, validation/ or test/ folder and no .txt"):
        data.InputPipeline(byte_cfg(wrong), "train")
    only_train = tmp_path / "only_train"
    (only_train / "train").mkdir(parents=True)
    (only_train / "train" / "1.txt").write_text("one")
    with pytest.raises(ValueError, match="has no validation/ folder"):
        data.InputPipeline(byte_cfg(only_train), "validation")
    (only_train / "test").mkdir()
    with pytest.raises(ValueError, match="no .txt documents for split 'test'"):
        data.InputPipeline(byte_cfg(only_train), "test")
    bad_metadata = tmp_path / "bad_metadata"
    (bad_metadata / "train").mkdir(parents=True)
    (bad_metadata / "train" / "1.txt").write_text("one")
    (bad_metadata / "metadata.csv").write_text("book_id,title\n")
    with pytest.raises(ValueError, match="metadata.csv line 1"):
        data.InputPipeline(byte_cfg(bad_metadata), "train")
    with pytest.raises(ValueError, match="data.data_dir"):
        data.InputPipeline(byte_cfg(""), "train")


def test_missing_vocabulary_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="data.vocab .*does not exist"):
        data.get_vocabulary(make_cfg(vocab=str(tmp_path / "missing.model")))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\xff\x00 not a model")
    with pytest.raises(ValueError, match="could not be read as a SentencePiece model"):
        data.get_vocabulary(make_cfg(vocab=str(bad), objective="mlm"))


def test_every_document_is_trained_on_or_named(tmp_path, caplog, monkeypatch):
    """Latin-1 / cp1252 text is decoded (counted in the log), not dropped; empty and binary files
    are named in a warning; a split without readable text is an error naming its files."""
    monkeypatch.setattr(sources, "_reported", set())
    monkeypatch.setattr(sources, "_decoded_count", 0)
    root = tmp_path / "corpus"
    (root / "validation").mkdir(parents=True)
    files = {
        "1.txt": b"good text\n",
        "2.txt": "caf\xe9 na\xefve\n".encode("latin-1"),
        "3.txt": "\u201cquoted\u201d\n".encode("cp1252"),  # cp1252's curly quotes
        "4.txt": b"",
        "5.txt": b"\x89PNG\r\n\x1a\n\0\0\0",
    }
    for name, content in files.items():
        (root / "validation" / name).write_bytes(content)
    cfg = byte_cfg(root)
    with caplog.at_level(logging.WARNING):
        rows, _ = collect(eval_pipe(cfg, "validation"))
    trained = ["good text\n", "caf\xe9 na\xefve\n", "\u201cquoted\u201d\n"]
    assert rows["weights"].sum() == sum(len(t.encode()) + 1 for t in trained)  # + EOS each
    text = bytes(np.concatenate(segments(rows)).astype(np.uint8) - 3).decode(errors="replace")
    assert "caf\xe9" in text and "\u201cquoted\u201d" in text
    log = [r.getMessage() for r in caplog.records]
    # Files are read in parallel: which of the two is counted first varies from run to run.
    decoded = {
        m.split(" is not UTF-8: decoded as cp1252 (")[1].split()[0]: m for m in log if "cp1252" in m
    }
    assert sorted(decoded) == ["1", "2"], log
    assert sorted(m.split(" is not UTF-8")[0][-5:] for m in decoded.values()) == ["2.txt", "3.txt"]
    assert any("4.txt is empty: not trained on" in m for m in log)
    assert any("5.txt is not text (it holds NUL bytes): not trained on" in m for m in log)
    # Nothing readable at all: found when the pipeline is built, naming the files.
    bad = tmp_path / "bad"
    (bad / "validation").mkdir(parents=True)
    (bad / "validation" / "4.txt").write_bytes(files["4.txt"])
    (bad / "validation" / "5.txt").write_bytes(files["5.txt"])
    with pytest.raises(
        ValueError, match=r"split 'validation' .* no readable text: .*4.txt is empty; .*5.txt is"
    ):
        data.check_data(byte_cfg(bad), ["validation"])


def test_a_fifo_named_txt_is_skipped_with_a_warning_not_read(tmp_path, caplog, monkeypatch):
    """A FIFO named 0.txt (read first) in a split: reading it would wait for a writer forever.
    It is named in a warning and skipped. Should it be opened, a helper thread writes to it after
    20 s, so that the test fails instead of hanging."""
    monkeypatch.setattr(sources, "_reported", set())
    root = tmp_path / "corpus"
    (root / "validation").mkdir(parents=True)
    fifo = root / "validation" / "0.txt"
    os.mkfifo(fifo)
    (root / "validation" / "1.txt").write_text("good text\n")
    rescued = []

    def rescue():
        time.sleep(20)
        with contextlib.suppress(OSError):
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO: nobody is reading
            rescued.append(True)
            os.close(fd)

    threading.Thread(target=rescue, daemon=True).start()
    with caplog.at_level(logging.WARNING):
        data.check_data(byte_cfg(root), ["validation"])
        rows, _ = collect(eval_pipe(byte_cfg(root), "validation"))
    assert not rescued
    assert rows["weights"].sum() == len("good text\n") + 1  # + EOS
    log = [r.getMessage() for r in caplog.records]
    assert any("0.txt is not a regular file (a FIFO" in m and "not trained on" in m for m in log)


def test_bytes_cp1252_leaves_undefined_fall_back_to_latin1(tmp_path):
    path = tmp_path / "1.txt"
    path.write_bytes(b"a\x81b")  # 0x81 has no cp1252 character
    assert sources.decode_document(str(path)) == ("a\x81b", "is not UTF-8: decoded as latin-1")
