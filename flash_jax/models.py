"""The language model around the layers (embedding, scanned layer stack, final norm, float32
logits), its factory `create`, and named size presets mirroring the paper's scales."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flash_jax import sharding
from flash_jax.config import MAX_LEN_BOUND, TRANSFORMER_BLOCKS, ModelConfig
from flash_jax.layers import (
    Dense,
    Embed,
    FlashLayer,
    GAULayer,
    TransformerBlock,
    document_positions,
    make_norm,
)
from flash_jax.layers.basic import float32_logits, param
from flash_jax.ops import context_parallel
from flash_jax.sharding import LAYER_AXIS_METADATA, constrain

LAYER_TYPES = {
    "flash": FlashLayer,
    "flash_quad": GAULayer,
    "transformer": TransformerBlock,
    "transformer_plus": TransformerBlock,
    "transformer_pp": TransformerBlock,
    "performer": TransformerBlock,  # Transformer++ blocks with FAVOR+ attention
    "combiner": TransformerBlock,  # Transformer++ blocks with Combiner-Fixed attention
}


def remat_policy(name: str):
    """What the backward keeps of a layer's forward (by checkpoint_name) instead of recomputing:
    `full` nothing; `save_proj` the projection outputs; `save_attn` those and the attention
    output with FLASH's cross-chunk states, so that the backward never reruns attention."""
    if name == "save_proj":
        return jax.checkpoint_policies.save_only_these_names("proj_in", "proj_out")
    if name == "save_attn":
        return jax.checkpoint_policies.save_only_these_names(
            "proj_in", "proj_out", "attn", "attn_states"
        )
    return None


class LanguageModel(nnx.Module):
    """tokens [B, T] -> float32 logits [B, T, vocab]; causal (LM) or bidirectional (masked LM)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg, rngs=rngs)
        if cfg.name == "transformer":  # the vanilla baseline: learned absolute positions
            self.position_embed = param(
                rngs,
                (cfg.max_len, cfg.d_model),
                (None, "embed"),
                stddev=0.02,
                dtype=cfg.weight_dtype,
            )
        layer_type = LAYER_TYPES[cfg.name]

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=LAYER_AXIS_METADATA)
        def make_layers(layer_rngs: nnx.Rngs):
            return layer_type(cfg, rngs=layer_rngs)

        self.layers = make_layers(rngs)
        self.final_norm = make_norm(cfg, rngs=rngs)
        if not cfg.tie_embeddings:
            self.head = Dense(
                (cfg.d_model,),
                (cfg.vocab_size,),
                ("embed", "vocab"),
                cfg,
                rngs=rngs,
                use_bias=False,
            )

    def __call__(
        self,
        tokens: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        x, positions = self.embed_inputs(tokens, segment_ids, positions)
        return self.apply_layers(x, segment_ids, positions)

    def hidden(
        self,
        tokens: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """What the output projection reads: the layer stack's output after the final norm, in
        the compute dtype. `logits` = this times `head_kernel` (in float32), for a loss that
        folds the projection in (`metrics.blocked_head_cross_entropy`)."""
        x, positions = self.embed_inputs(tokens, segment_ids, positions)
        return self.final_norm(self.layer_stack(x, segment_ids, positions))

    def embed_inputs(self, tokens, segment_ids, positions):
        """Checked tokens -> (embedded inputs, positions: per document when not given)."""
        self.check_inputs(tokens, segment_ids, positions)
        if positions is None:
            positions = (
                jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
                if segment_ids is None
                else self.document_positions(segment_ids)
            )
        x = self.embed(tokens)
        if self.cfg.name == "transformer":
            x = x + jnp.take(self.position_embed.value, positions, axis=0).astype(x.dtype)
        return x, positions

    def document_positions(self, segment_ids_BT):
        """Positions inside each document; with the sequence sharded over the mesh, each device
        counts its stretch's and gets the counts before it (not the ids) from the others."""
        rules = self.cfg.sharding_rules
        sequence_axis = sharding.sequence_axis(rules)
        if sequence_axis is None:
            return document_positions(segment_ids_BT)
        fn = functools.partial(context_parallel.document_positions_sharded, axis_name=sequence_axis)
        axes = ("batch", "length")
        return sharding.per_shard(fn, (axes,), axes, rules)(segment_ids_BT)

    def apply_layers(
        self, x_BTD: jax.Array, segment_ids: jax.Array | None, positions: jax.Array
    ) -> jax.Array:
        """Embedded inputs -> logits: the layer stack, final norm, head."""
        x = self.layer_stack(x_BTD, segment_ids, positions)
        return constrain(self.logits(x), ("batch", "length", "act_vocab"), self.cfg.sharding_rules)

    def layer_stack(
        self, x_BTD: jax.Array, segment_ids: jax.Array | None, positions: jax.Array
    ) -> jax.Array:
        """The layers (one scanned body, rematerialised as model.remat says)."""
        cfg = self.cfg
        x = constrain(x_BTD, ("batch", "length", "act_embed"), cfg.sharding_rules)

        def apply_layer(x_BTD, layer):
            return layer(x_BTD, segment_ids, positions)

        if cfg.remat != "none":
            apply_layer = nnx.remat(apply_layer, policy=remat_policy(cfg.remat))
        return nnx.scan(
            apply_layer,
            in_axes=(nnx.Carry, 0),
            out_axes=nnx.Carry,
            unroll=cfg.unroll_layers,
            transform_metadata=LAYER_AXIS_METADATA,
        )(x, self.layers)

    def logits(self, x_BTD: jax.Array) -> jax.Array:
        """Final norm and output projection, in float32."""
        x = self.final_norm(x_BTD)
        return float32_logits(x, self.head_kernel(x.dtype))

    def head_kernel(self, dtype) -> jax.Array:
        """The output projection `[D, V]` in `dtype`: the head's, or the embedding table's
        transpose when tied."""
        if self.cfg.tie_embeddings:
            return self.embed.table.value.astype(dtype).T
        return self.head.kernel.value.astype(dtype)

    def init_cache(self, batch_size: int, length: int | None = None) -> dict:
        """Decoding state of every layer, stacked on a leading layer axis. `length` bounds the
        context for the models whose state grows with it (default model.max_len); FLASH's and
        Performer's states have a constant size."""
        length = self.cfg.max_len if length is None else length
        if not self.cfg.constant_state and length > self.cfg.max_len:
            raise ValueError(f"cache length {length} exceeds model.max_len {self.cfg.max_len}")
        one_layer = LAYER_TYPES[self.cfg.name].init_cache(self.cfg, batch_size, length)
        return jax.tree.map(
            lambda a: jnp.zeros((self.cfg.num_layers,) + a.shape, a.dtype), one_layer
        )

    def decode_step(self, tokens_B1: jax.Array, t: jax.Array, cache: dict):
        """Logits [B, 1, vocab] for the token at position t (a scalar), given the state of
        positions < t; returns (logits, updated cache). Causal models only."""
        cfg = self.cfg
        if not cfg.causal:
            raise ValueError("incremental decoding needs a causal model (model.causal=True)")
        t = jnp.asarray(t, jnp.int32)
        x = self.embed(tokens_B1)
        if cfg.name == "transformer":
            x = x + jax.lax.dynamic_slice_in_dim(self.position_embed.value, t, 1)[None].astype(
                x.dtype
            )

        def decode_layer(x_B1D, layer, layer_cache):
            return layer.decode(x_B1D, t, layer_cache)

        x, cache = nnx.scan(
            decode_layer,
            in_axes=(nnx.Carry, 0, 0),
            out_axes=(nnx.Carry, 0),
            transform_metadata=LAYER_AXIS_METADATA,
        )(x, self.layers, cache)
        return self.logits(x), cache

    def check_inputs(self, tokens, segment_ids, positions) -> None:
        """Clear errors instead of deep XLA shape errors (shapes are static, so this is free)."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
        for name, value in (("segment_ids", segment_ids), ("positions", positions)):
            if value is None:
                continue
            if value.shape != tokens.shape:
                raise ValueError(
                    f"{name} must have the tokens' shape {tokens.shape}, got {value.shape}"
                )
            if not jnp.issubdtype(value.dtype, jnp.integer):
                raise ValueError(f"{name} must be integers, got dtype {value.dtype}")
        if tokens.shape[1] > self.cfg.max_len and self.cfg.name in MAX_LEN_BOUND:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds model.max_len {self.cfg.max_len}, "
                f"which {self.cfg.name}'s math depends on"
            )


def create(config: Any, *, rngs: nnx.Rngs, sharding_rules=None) -> LanguageModel:
    """Builds the model named by `config.name` from a ConfigDict, mapping or ModelConfig.

    `sharding_rules` (config.mesh.rules, as `MeshConfig` holds them) map the logical names of
    activation constraints to mesh axes; None: a ModelConfig's own (a RunConfig's model has its
    mesh's), else DEFAULT_RULES. Parameters carry logical names too (see
    flash_jax.sharding.param_shardings).
    """
    return LanguageModel(ModelConfig.from_config(config, sharding_rules=sharding_rules), rngs=rngs)


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# Size presets mirroring the paper's scales. The Transformer baselines (Performer and Combiner
# included: Transformer++ blocks with the same parameters) use the listed depth; FLASH and
# FLASH-Quad use twice as many layers at the same width, since two GAU layers (3de parameters
# each with e = 2d) match one Transformer layer (12d^2). `base` is the paper's ~110M-parameter
# setting (BERT-Base shape, fairly sure); `large` is a documented guess for its bigger PG-19 scale.
SIZES = {
    # size: (transformer layers, d_model, attention heads)
    "tiny": (2, 128, 2),
    "small": (6, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}


def depth_factor(name: str) -> int:
    """Layers per Transformer layer at equal size: 2 for the GAU models (two GAU layers, 3de
    parameters each with e = 2d, match one Transformer layer's 12d^2), 1 for Transformer blocks."""
    return 1 if name in TRANSFORMER_BLOCKS else 2


def preset(name: str, size: str, *, layers: int | None = None, d_model: int | None = None) -> dict:
    """`config.model` overrides for model `name` at a named size: `config.model.update(...)`.

    `layers` (the Transformer depth) and `d_model` replace the size's; the other widths follow
    d_model (e = 2d, s = min(128, d), FFN 4d, heads of 64).
    """
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    if name not in LAYER_TYPES:
        raise ValueError(f"unknown model name {name!r}; choose one of {sorted(LAYER_TYPES)}")
    size_layers, size_d_model, heads = SIZES[size]
    layers = size_layers if layers is None else layers
    if d_model is not None:
        heads = max(1, d_model // 64)
    d_model = size_d_model if d_model is None else d_model
    return dict(
        name=name,
        num_layers=depth_factor(name) * layers,
        d_model=d_model,
        expansion_dim=2 * d_model,
        qk_dim=min(128, d_model),
        num_heads=heads,
        mlp_dim=4 * d_model,
    )
