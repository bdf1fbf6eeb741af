"""The paper's Transformer baselines: MHSA + FFN blocks, pre-norm.

Transformer: absolute positions (added in the model wrapper) and a GELU FFN.
Transformer+: RoPE.  Transformer++: RoPE and a SwiGLU FFN (two-thirds width, same parameters).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from flash_jax import ops, sharding
from flash_jax.config import ModelConfig
from flash_jax.layers.basic import Dense, make_norm
from flash_jax.layers.positions import apply_rope
from flash_jax.sharding import constrain


class MultiHeadAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        H, dh, d = cfg.num_heads, cfg.d_model // cfg.num_heads, cfg.d_model
        self.query = Dense((d,), (H, dh), ("embed", "heads", "kv"), cfg, rngs=rngs)
        self.key = Dense((d,), (H, dh), ("embed", "heads", "kv"), cfg, rngs=rngs)
        self.value = Dense((d,), (H, dh), ("embed", "heads", "kv"), cfg, rngs=rngs)
        self.out = Dense((H, dh), (d,), ("heads", "kv", "embed"), cfg, rngs=rngs)

    def project(self, x_BTD, positions_BT):
        q, k, v = self.query(x_BTD), self.key(x_BTD), self.value(x_BTD)
        if self.cfg.uses_rope:
            q, k = apply_rope(q, positions_BT), apply_rope(k, positions_BT)
        q, k, v = (checkpoint_name(t, "proj_in") for t in (q, k, v))
        return [
            constrain(t, ("batch", "length", "act_heads", None), self.cfg.sharding_rules)
            for t in (q, k, v)
        ]

    def __call__(self, x_BTD, segment_ids_BT, positions_BT):
        q, k, v = self.project(x_BTD, positions_BT)
        cfg = self.cfg
        impl = cfg.attention_impl
        if impl == "auto":
            impl = ops.dot_product.auto_impl(q.shape[1], q.shape[-1], q.dtype)

        def attend(q, k, v, segment_ids_BT):
            return ops.dot_product_attention(
                q, k, v, causal=cfg.causal, segment_ids=segment_ids_BT, impl=impl
            )

        if impl == "splash":  # a Pallas kernel: run per device on its rows and heads
            heads = ("batch", "length", "act_heads", None)
            segments = None if segment_ids_BT is None else ("batch", "length")
            attend = sharding.per_shard(
                attend, (heads, heads, heads, segments), heads, cfg.sharding_rules
            )
        attended = checkpoint_name(attend(q, k, v, segment_ids_BT), "attn")  # kept by save_attn
        return checkpoint_name(self.out(attended), "proj_out")

    def decode(self, x_B1D, t, cache):
        """One token at position t with a key/value cache of every earlier token."""
        B = x_B1D.shape[0]
        q, k, v = self.project(x_B1D, jnp.full((B, 1), t, jnp.int32))
        keys = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), t, 1)
        values = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), t, 1)
        mask = (jnp.arange(keys.shape[1]) <= t)[None, None, None, :]
        attended = jax.nn.dot_product_attention(
            q,
            keys.astype(q.dtype),
            values.astype(q.dtype),
            mask=mask,  # one query row: JAX picks the backend's kernel (None)
        )
        return self.out(attended), {"k": keys, "v": values}


class FeedForward(nnx.Module):
    """GELU MLP (Transformer, Transformer+) or SwiGLU (Transformer++)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.glu = cfg.name == "transformer_pp"
        d = cfg.d_model
        # SwiGLU has three matrices: two-thirds of the hidden width keeps the parameter count.
        hidden = cfg.mlp_dim * 2 // 3 if self.glu else cfg.mlp_dim
        self.wi = Dense((d,), (hidden,), ("embed", "mlp"), cfg, rngs=rngs)
        self.wg = Dense((d,), (hidden,), ("embed", "mlp"), cfg, rngs=rngs) if self.glu else None
        self.wo = Dense((hidden,), (d,), ("mlp", "embed"), cfg, rngs=rngs)

    def __call__(self, x_BTD):
        if self.glu:
            h = jax.nn.silu(self.wg(x_BTD)) * self.wi(x_BTD)
        else:
            h = jax.nn.gelu(self.wi(x_BTD))
        h = constrain(
            checkpoint_name(h, "proj_in"), ("batch", "length", "act_mlp"), self.cfg.sharding_rules
        )
        return checkpoint_name(self.wo(h), "proj_out")


class TransformerBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attention_norm = make_norm(cfg, rngs=rngs)
        self.attention = MultiHeadAttention(cfg, rngs=rngs)
        self.mlp_norm = make_norm(cfg, rngs=rngs)
        self.mlp = FeedForward(cfg, rngs=rngs)

    def __call__(self, x_BTD, segment_ids_BT, positions_BT):
        x = x_BTD + self.attention(self.attention_norm(x_BTD), segment_ids_BT, positions_BT)
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "length", "act_embed"), self.cfg.sharding_rules)

    @staticmethod
    def init_cache(cfg: ModelConfig, batch_size: int, length: int) -> dict:
        shape = (batch_size, length, cfg.num_heads, cfg.d_model // cfg.num_heads)
        return {"k": jnp.zeros(shape, cfg.compute_dtype), "v": jnp.zeros(shape, cfg.compute_dtype)}

    def decode(self, x_B1D, t, cache):
        attended, cache = self.attention.decode(self.attention_norm(x_B1D), t, cache)
        x = x_B1D + attended
        return x + self.mlp(self.mlp_norm(x)), cache
