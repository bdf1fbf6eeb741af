"""The TFDS code path (pg19, wiki40b/en, c4/en) on tfds.testing.mock_data: offline, real code."""

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import base
from flash_jax import data
from flash_jax.config import DataConfig
from flash_jax.data import sources

NUM_EXAMPLES = 6


def make_cfg(**overrides):
    cfg = ml_collections.ConfigDict(base.get_config().data.to_dict())
    cfg.update(dict(source="tfds", vocab="byte", seq_len=16, batch_size=4, shuffle_buffer=16))
    cfg.update(overrides)
    return DataConfig.from_config(cfg)


def _collect(pipe):
    batches = list(pipe)
    pipe.close()
    return {k: np.concatenate([b[k] for b in batches]) for k in data.FEATURES}


@pytest.mark.parametrize("dataset", ["pg19", "wiki40b", "c4"])
def test_tfds_eval_covers_every_mock_document(dataset):
    spec = sources.TFDS_DATASETS[dataset]
    cfg = make_cfg(dataset=dataset)
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        # The reference reads the builder directly, with the feature name of the real dataset.
        texts = [
            ex[spec["text_key"]].decode()
            for ex in tfds.as_numpy(tfds.load(spec["name"], split="validation"))
        ]
        rows = _collect(data.InputPipeline(cfg, "validation", shuffle=False, repeat=False))
        stats = data.split_statistics(cfg, "validation")
        train = data.InputPipeline(cfg, "train", seed=0)
        batch = next(train)
        train.close()
    texts = (
        [t.strip() for t in texts if t.strip()] if dataset == "wiki40b" else [t for t in texts if t]
    )
    assert len(texts) > 0
    assert rows["weights"].sum() == sum(len(t.encode()) + 1 for t in texts)  # bytes + EOS
    assert stats == dict(
        documents=len(texts),
        bytes=sum(len(t.encode()) for t in texts),
        words=sum(len(t.split()) for t in texts),
    )
    assert batch["targets"].shape == (4, 16) and batch["weights"].sum() > 0


def test_tfds_c4_masked_lm():
    cfg = make_cfg(dataset="c4", objective="mlm", mask_rate=0.3)
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        rows = _collect(data.InputPipeline(cfg, "validation", shuffle=False, repeat=False))
    w = rows["weights"] > 0
    assert w.any() and not (w & (rows["segment_ids"] == 0)).any()
    np.testing.assert_array_equal(rows["inputs"][~w], rows["targets"][~w])
    assert (rows["inputs"][w] == data.mlm_mask_spec(data.get_vocabulary(cfg)).mask_id).any()


def test_tfds_two_hosts_split_the_documents():
    cfg = make_cfg(dataset="pg19")
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        whole = _collect(data.InputPipeline(cfg, "validation", shuffle=False, repeat=False))
        hosts = [
            _collect(
                data.InputPipeline(
                    cfg, "validation", shuffle=False, repeat=False, shard_index=i, num_shards=2
                )
            )
            for i in range(2)
        ]
    total = sum(h["weights"].sum() for h in hosts)
    assert total == whole["weights"].sum() and all(h["weights"].sum() > 0 for h in hosts)
