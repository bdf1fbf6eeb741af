"""Base configuration: every experiment file imports this and changes a few keys.

Its keys, their defaults and what each one means are the fields of the dataclasses in
`flash_jax/config.py` (`ModelConfig`, `DataConfig`, `TrainConfig`, `MeshConfig`): this is their
ConfigDict, so that `--config.section.key=value` overrides any of them and a mistyped key fails.
Dtypes are names ("bfloat16", "float32") so that `--config.model.dtype=float32` works.
"""

from flash_jax import config as config_lib

# The shipped corpus and vocabulary (the defaults), and T5's 32k vocabulary (the paper configs').
SHIPPED_CORPUS = config_lib.SHIPPED_CORPUS
SHIPPED_VOCAB = config_lib.SHIPPED_VOCAB
T5_VOCAB = config_lib.T5_VOCAB


def get_config():
    return config_lib.default_config_dict()
