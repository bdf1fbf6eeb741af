"""NNX layers: basic building blocks, positions, the GAU / FLASH layers and Transformer blocks."""

from flash_jax.layers.basic import Dense, Embed, LayerNorm, ScaleNorm, make_norm
from flash_jax.layers.gau import FlashLayer, GAULayer
from flash_jax.layers.positions import RelativePositionBias, apply_rope, document_positions
from flash_jax.layers.transformer import TransformerBlock

__all__ = [
    "Dense",
    "Embed",
    "FlashLayer",
    "GAULayer",
    "LayerNorm",
    "RelativePositionBias",
    "ScaleNorm",
    "TransformerBlock",
    "apply_rope",
    "document_positions",
    "make_norm",
]
