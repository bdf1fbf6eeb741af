"""flash_jax.data: seqio tasks, sources, vocabularies and the host-to-device input pipeline.

    from flash_jax import data
    from flash_jax.config import RunConfig
    config = RunConfig.from_config(config_dict)  # typed and checked once: data takes config.data
    vocab = data.get_vocabulary(config.data)
    pipe = data.InputPipeline(config.data, split="train", mesh=mesh, seed=0)
    batch = next(pipe)   # inputs, targets, weights, segment_ids, positions: [batch, seq_len]
    stats = data.split_statistics(config.data, "validation")  # documents, bytes, words
    data.check_data(config.data, ["train"])  # one line now if the data cannot be read

Importing registers no seqio task: `get_task` registers a config's task on first use (the
pipeline, the checks and the cache builder call it); `flash_jax.data.standard_tasks` is the module
that seqio's own tools import to register the standard ones.
"""

from flash_jax.config import SHIPPED_CORPUS, SHIPPED_VOCAB, T5_VOCAB
from flash_jax.data.checks import check_data
from flash_jax.data.pipeline import FEATURES, InputPipeline, split_statistics
from flash_jax.data.tasks import get_task, task_name
from flash_jax.data.vocabularies import get_vocabulary, mlm_mask_spec

__all__ = [
    "FEATURES",
    "InputPipeline",
    "SHIPPED_CORPUS",
    "SHIPPED_VOCAB",
    "T5_VOCAB",
    "check_data",
    "get_task",
    "get_vocabulary",
    "mlm_mask_spec",
    "split_statistics",
    "task_name",
]
