"""seqio Tasks: PG-19, Wiki-40B (en) and C4 (en) language modelling, and masked LM.

A task's name spells out what it reads and how it tokenizes, so one name always means the same
data (`task_name`):

    flash_jax.<dataset>_<objective>[<mask percent>].<source>.<vocab>
    e.g. flash_jax.pg19_lm.tfds.spm_sentencepiece_6f3e0a1c, flash_jax.c4_mlm15.tfds.byte,
         flash_jax.pg19_lm.local_3b9d0c2e.spm_austen_spm_4k_91ab22f0

The sequence length is not part of the name: windows are cut at `get_dataset` time from
`sequence_length["targets"]`. `get_task(config.data)` returns (registering on first use) the
task for a config; importing registers nothing. The standard ones (TFDS with T5's and the byte
vocabulary, and the shipped Austen corpus) are registered by `register_standard_tasks`, which
importing `flash_jax.data.standard_tasks` runs (for seqio's tools). Registration is idempotent, so
calling twice never fails.

Examples out of a task: {"targets": int32[<= L]} windows (LM); masked LM adds "inputs" (corrupted)
and "mlm_flags" (2 = selected for the loss, 1 = not). Each document ends with EOS.
"""

from __future__ import annotations

import functools
import hashlib
import os

import seqio

from flash_jax.config import DATASETS, SHIPPED_CORPUS, SHIPPED_VOCAB, T5_VOCAB, DataConfig
from flash_jax.data import preprocessors, sources, vocabularies

# ----------------------------------------------------------------------------- offline cache


def require_typed(cfg) -> DataConfig:
    """`cfg` itself if it is a DataConfig, else TypeError (one line): the data functions take
    the typed section, built once where a config enters (`RunConfig.from_config` in train.py and
    eval.py, `DataConfig.from_config(config.data)` in a script or notebook), which is where a
    bad key or value is reported."""
    if not isinstance(cfg, DataConfig):
        raise TypeError(
            f"expected a DataConfig, got {type(cfg).__name__}: pass "
            "DataConfig.from_config(config.data) (or RunConfig.from_config(config).data)"
        )
    return cfg


def cache_dir(cfg: DataConfig) -> str:
    """`data.use_cached`: the folder holding seqio's offline cache of the config's task, or ""."""
    return cfg.use_cached


def cached_task_dir(cfg) -> str:
    """Where seqio's cache of the config's task is (or would be): <use_cached>/<task name>."""
    return os.path.join(cache_dir(cfg), seqio.get_task_dir_from_name(task_name(cfg)))


def cached_documents(cfg, split: str) -> int:
    """Documents of `split` in the offline cache, after checking that seqio will read the task
    from `data.use_cached` (ValueError, one line, naming the key and the command that builds it).
    """
    import tensorflow as tf

    task = get_task(cfg)
    where = cached_task_dir(cfg)
    build = (
        f"build it with: python scripts/data/cache_data.py --config=<this config> "
        f"--output_dir={cache_dir(cfg)}"
    )
    if not tf.io.gfile.exists(os.path.join(where, "COMPLETED")):
        raise ValueError(
            f"data.use_cached: no finished seqio cache of {task.name} in {where}; {build}"
        )
    seqio.add_global_cache_dirs([cache_dir(cfg)])  # where seqio's Task looks for it
    if task.cache_dir != where:
        raise ValueError(
            f"data.use_cached: this process already reads {task.name} from the cache in "
            f"{task.cache_dir}, not {where} (seqio keeps one cache folder per task per process)"
        )
    try:
        return int(task.get_cached_stats(split)["examples"])
    except ValueError as e:
        raise ValueError(f"data.use_cached: split {split!r} is not in {where}; {build}") from e


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _clean_name(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def vocab_tag(vocab: str) -> str:
    if vocab == "byte":
        return "byte"
    path = vocab if "://" in vocab else os.path.abspath(os.path.expanduser(vocab))
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"spm_{_clean_name(stem)}_{_short_hash(path)}"


def _local_path(data_dir: str) -> str:
    return data_dir if "://" in data_dir else os.path.abspath(os.path.expanduser(data_dir))


def task_name(cfg) -> str:
    objective = cfg.objective
    if objective == "mlm":
        objective += f"{float(cfg.mask_rate) * 100:g}".replace(".", "p")
    if cfg.source == "tfds":
        source = "tfds" + (f"_{_short_hash(cfg.tfds_data_dir)}" if cfg.tfds_data_dir else "")
    else:
        source = f"local_{_short_hash(_local_path(cfg.data_dir))}"
    return f"flash_jax.{cfg.dataset}_{objective}.{source}.{vocab_tag(str(cfg.vocab))}"


def get_task(cfg: DataConfig) -> seqio.Task:
    """The seqio Task for a `config.data`, registered under `task_name(cfg)` on first use."""
    require_typed(cfg)
    name = task_name(cfg)
    if name not in seqio.TaskRegistry.names():
        vocab = vocabularies.get_vocabulary(cfg)
        _register(name, cfg, vocab)
    return seqio.TaskRegistry.get(name)


def _register(name: str, cfg, vocab: seqio.Vocabulary) -> None:
    if cfg.source == "tfds":
        source = sources.tfds_source(cfg.dataset, cfg.tfds_data_dir)
        text_key = sources.TFDS_DATASETS[cfg.dataset]["text_key"]
        cache = False  # TFDS corpora are big: stream them (or cache offline with seqio)
    else:
        source = sources.LocalTextSource(_local_path(cfg.data_dir))
        text_key = "text"
        cache = True
    features = {"targets": seqio.Feature(vocab, add_eos=True)}
    if cfg.objective == "mlm":
        features["inputs"] = seqio.Feature(vocab, add_eos=True)
    preps = text_preprocessors(cfg.dataset, text_key) + [
        functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False, with_eos=True),
    ]
    if cache:
        preps.append(_CacheSmallLocalCorpus(source))
    # Everything above runs once per document before seqio's repeat (and can be cached offline
    # with seqio's cache_tasks_main); windows and masks are cut after it, from the run's length.
    preps.append(seqio.CacheDatasetPlaceholder())
    preps.append(preprocessors.split_into_windows)
    if cfg.objective == "mlm":
        preps.append(functools.partial(preprocessors.bert_mask, mask_rate=float(cfg.mask_rate)))
    seqio.TaskRegistry.add(
        name,
        source=source,
        output_features=features,
        preprocessors=preps,
        shuffle_buffer_size=cfg.shuffle_buffer,
        metric_fns=[],
    )


def text_preprocessors(dataset: str, text_key: str) -> list:
    """The raw-text steps (also used by split_statistics): {"targets": cleaned text}."""
    preps = [functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key})]
    if dataset == "wiki40b":
        preps.append(functools.partial(preprocessors.clean_wiki40b, key="targets"))
    preps.append(functools.partial(preprocessors.drop_empty, key="targets"))
    return preps


class _CacheSmallLocalCorpus:
    """Keeps tokenized documents in memory when the local corpus is small (MAX_BYTES_TO_CACHE).

    A seqio preprocessor placed before seqio's repeat, so later epochs skip reading and
    tokenizing. Remote (gs://) and big corpora are streamed every epoch.
    """

    def __init__(self, source: sources.LocalTextSource):
        self.source = source

    def __call__(self, dataset):
        size = self.source.corpus.total_bytes()
        if size is not None and size <= sources.MAX_BYTES_TO_CACHE:
            return dataset.cache()
        return dataset


def register_standard_tasks() -> list[str]:
    """Registers the standard tasks (idempotent); returns their names.

    TFDS (default data dir) with T5's 32k vocabulary and with bytes: PG-19, Wiki-40B and C4 LM,
    C4 masked LM (15%); and the shipped Austen corpus (PG-19 layout) with its 4k vocabulary and
    with bytes. Nothing is read until a dataset is requested.
    """

    def cfg(**kw):
        return DataConfig(**{"source": "tfds", "data_dir": "", "vocab": T5_VOCAB, **kw})

    configs = []
    for vocab in (T5_VOCAB, "byte"):
        for dataset in DATASETS:
            configs.append(cfg(dataset=dataset, vocab=vocab))
        configs.append(cfg(dataset="c4", objective="mlm", vocab=vocab))
    for vocab in (SHIPPED_VOCAB, "byte"):
        configs.append(cfg(source="local", data_dir=SHIPPED_CORPUS, vocab=vocab))
    names = []
    for c in configs:
        name = task_name(c)
        if name not in seqio.TaskRegistry.names():
            # T5's model is on GCS; its vocabulary is built without reading it (no network).
            _register(name, c, vocabularies.get_vocabulary(c))
        names.append(name)
    return names
