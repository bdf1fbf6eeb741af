"""The frozen model configuration that model code receives (never the ConfigDict itself)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from flash_jax.ops.attention import FLASH_IMPLS
from flash_jax.ops.dot_product import IMPLS as ATTENTION_IMPLS
from flash_jax.sharding import DEFAULT_RULES

MODEL_NAMES = (
    "flash",
    "flash_quad",
    "transformer",
    "transformer_plus",
    "transformer_pp",
    "performer",
    "combiner",
)
# How tables and plots name the models (the paper's names).
DISPLAY_NAMES = {
    "flash": "FLASH",
    "flash_quad": "FLASH-Quad",
    "transformer": "Transformer",
    "transformer_plus": "Transformer+",
    "transformer_pp": "Transformer++",
    "performer": "Performer",
    "combiner": "Combiner",
}
# Models built from Transformer blocks (multi-head attention + FFN). Performer and Combiner are
# Transformer++ blocks (RoPE, SwiGLU) whose attention is FAVOR+ or Combiner's factorised softmax.
TRANSFORMER_BLOCKS = ("transformer", "transformer_plus", "transformer_pp", "performer", "combiner")
# Models whose decoding state does not grow with the context: they decode past model.max_len.
CONSTANT_STATE = ("flash", "performer")
NORMS = ("scale_norm", "layer_norm")
REL_POS = ("auto", "toeplitz", "rope", "none")
REMAT = ("none", "full", "save_proj", "save_attn")
DTYPES = ("float32", "bfloat16", "float16")
TOEPLITZ_MAX_LEN = 512  # the paper's switch from a Toeplitz bias to the RoPE-form bias


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "flash"
    num_layers: int = 4
    d_model: int = 256
    expansion_dim: int = 512
    qk_dim: int = 128
    chunk_size: int = 128  # FLASH's chunk, Combiner's span, Performer's prefix-sum chunk
    num_heads: int = 4
    mlp_dim: int = 1024
    random_features: int = 256  # Performer: FAVOR+ random features per head (m)
    vocab_size: int = 4096
    max_len: int = 512
    causal: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    norm: str = "scale_norm"
    rel_pos: str = "auto"
    remat: str = "none"
    attention_impl: str = "auto"
    flash_impl: str = "auto"
    tie_embeddings: bool = False
    # Logical axis -> mesh axes for activation constraints; set by create() from config.mesh.rules.
    sharding_rules: tuple = DEFAULT_RULES

    def __post_init__(self):
        _check_choice("name", self.name, MODEL_NAMES)
        for field in (
            "num_layers",
            "d_model",
            "expansion_dim",
            "qk_dim",
            "chunk_size",
            "num_heads",
            "mlp_dim",
            "random_features",
            "vocab_size",
            "max_len",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{field} must be a positive integer, got {value!r}")
        _check_choice("norm", self.norm, NORMS)
        _check_choice("rel_pos", self.rel_pos, REL_POS)
        _check_choice("remat", self.remat, REMAT)
        _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _check_choice("flash_impl", self.flash_impl, FLASH_IMPLS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("param_dtype", self.param_dtype, DTYPES)
        if self.is_transformer and self.d_model % self.num_heads:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.num_heads "
                f"({self.num_heads})"
            )
        if self.rope_width % 2:
            raise ValueError(f"RoPE needs an even width, got {self.rope_width}")

    @classmethod
    def from_config(cls, config: Any) -> ModelConfig:
        """Builds from a ConfigDict (or mapping); unknown keys are an error, naming the key."""
        values = dict(config.items()) if hasattr(config, "items") else dict(config)
        known = {f.name for f in dataclasses.fields(cls)} - {"sharding_rules"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**values)

    @property
    def is_transformer(self) -> bool:
        """Built from Transformer blocks (multi-head attention + FFN), Performer and Combiner
        included."""
        return self.name in TRANSFORMER_BLOCKS

    @property
    def uses_glu(self) -> bool:
        """SwiGLU FFN: Transformer++ and the Transformer++ blocks of Performer and Combiner."""
        return self.name in ("transformer_pp", "performer", "combiner")

    @property
    def constant_state(self) -> bool:
        """Decodes with a state that does not grow with the context (past model.max_len)."""
        return self.name in CONSTANT_STATE

    @property
    def uses_rope(self) -> bool:
        return self.name != "transformer"

    @property
    def rope_width(self) -> int:
        return self.d_model // self.num_heads if self.is_transformer else self.qk_dim

    @property
    def rel_pos_kind(self) -> str:
        """The relative position bias of the quadratic parts (GAU models only)."""
        if self.rel_pos != "auto":
            return self.rel_pos
        quad_span = self.chunk_size if self.name == "flash" else self.max_len
        return "toeplitz" if quad_span <= TOEPLITZ_MAX_LEN else "rope"

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)


def depth_factor(name: str) -> int:
    """Layers per Transformer layer at equal size: 2 for the GAU models (two GAU layers, 3de
    parameters each with e = 2d, match one Transformer layer's 12d^2), 1 for Transformer blocks."""
    return 1 if name in TRANSFORMER_BLOCKS else 2


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"model.{field} must be one of {choices}, got {value!r}")
