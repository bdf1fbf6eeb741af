"""Tiny model configurations shared by the model and decoding tests."""

from flash_jax.config import ModelConfig

# Chunks of 8 and sequences of 13-32 tokens: several chunks, documents inside and across them.
TINY = dict(
    num_layers=2,
    d_model=32,
    expansion_dim=64,
    qk_dim=16,
    chunk_size=8,
    num_heads=4,
    mlp_dim=64,
    vocab_size=64,
    max_len=64,
)


def tiny_config(name: str, **overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, "name": name, **overrides})
