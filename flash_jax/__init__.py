"""flash-jax: FLASH (Hua et al., 2022) and its Transformer baselines in JAX / Flax NNX."""
