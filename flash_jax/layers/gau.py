"""The Gated Attention Unit (FLASH-Quad layer) and the FLASH layer (mixed chunk attention).

    h       = norm(x)
    u, v, z = split(silu(dense(h, 2e + s)), [e, e, s])   # one fused projection
    out     = x + dense(u * attend(z, v), d)

See docs: the queries/keys are per-dimension scale/offset "heads" of the shared z, rotated by RoPE
at document positions; `attend` is flash_jax.ops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from flash_jax import ops
from flash_jax.config import ModelConfig
from flash_jax.layers.basic import Dense, make_norm, param
from flash_jax.layers.positions import RelativePositionBias, apply_rope
from flash_jax.sharding import constrain


class OffsetScale(nnx.Module):
    """heads[h] = z * gamma[h] + beta[h]; gamma ~ N(0, 0.02), beta = 0."""

    def __init__(self, num_heads: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.gamma = param(
            rngs, (num_heads, cfg.qk_dim), (None, "qk"), stddev=0.02, dtype=cfg.weight_dtype
        )
        self.beta = param(
            rngs, (num_heads, cfg.qk_dim), (None, "qk"), stddev=0.0, dtype=cfg.weight_dtype
        )

    def __call__(self, z_BTS: jax.Array) -> list[jax.Array]:
        gamma = self.gamma.value.astype(z_BTS.dtype)
        beta = self.beta.value.astype(z_BTS.dtype)
        return [z_BTS * gamma[h] + beta[h] for h in range(gamma.shape[0])]


class _GatedUnit(nnx.Module):
    """What GAU and FLASH share: norm, fused projection, heads, bias, gate and output projection."""

    num_qk_heads: int
    bias_span: int

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        e, s = cfg.expansion_dim, cfg.qk_dim
        self.norm = make_norm(cfg, rngs=rngs)
        self.proj_in = Dense((cfg.d_model,), (2 * e + s,), ("embed", "mlp"), cfg, rngs=rngs)
        self.heads = OffsetScale(self.num_qk_heads, cfg, rngs=rngs)
        kind = cfg.rel_pos_kind
        self.rel_bias = (
            None if kind == "none" else RelativePositionBias(kind, self.bias_span, cfg, rngs=rngs)
        )
        self.proj_out = Dense((e,), (cfg.d_model,), ("mlp", "embed"), cfg, rngs=rngs)

    def project(self, x_BTD: jax.Array, positions_BT: jax.Array):
        """u, v [B, T, e] and the RoPE-rotated query/key heads [B, T, s] of the input."""
        e = self.cfg.expansion_dim
        uvz = jax.nn.silu(self.proj_in(self.norm(x_BTD)))
        uvz = checkpoint_name(uvz, "proj_in")
        u, v, z = jnp.split(uvz, [e, 2 * e], axis=-1)
        u = constrain(u, ("batch", "length", "act_mlp"), self.cfg.sharding_rules)
        v = constrain(v, ("batch", "length", "act_mlp"), self.cfg.sharding_rules)
        heads = [apply_rope(h, positions_BT) for h in self.heads(z)]
        return u, v, heads

    def output(self, x_BTD: jax.Array, u_BTE: jax.Array, attended_BTE: jax.Array) -> jax.Array:
        gated = checkpoint_name(u_BTE * attended_BTE.astype(u_BTE.dtype), "gated")
        out = checkpoint_name(self.proj_out(gated), "proj_out")
        return constrain(
            x_BTD + out.astype(x_BTD.dtype),
            ("batch", "length", "act_embed"),
            self.cfg.sharding_rules,
        )

    def bias(self, length: int):
        return None if self.rel_bias is None else self.rel_bias(length)


class GAULayer(_GatedUnit):
    """FLASH-Quad layer: exact quadratic relu^2 attention over the whole (packed) sequence."""

    num_qk_heads = 2

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.bias_span = cfg.max_len
        super().__init__(cfg, rngs=rngs)

    def __call__(self, x_BTD, segment_ids_BT, positions_BT):
        u, v, (q, k) = self.project(x_BTD, positions_BT)
        T = x_BTD.shape[1]
        attended = ops.quadratic_attention(
            q,
            k,
            v,
            n=self.cfg.max_len,
            causal=self.cfg.causal,
            segment_ids=segment_ids_BT,
            bias=self.bias(T),
        )
        return self.output(x_BTD, u, attended)


class FlashLayer(_GatedUnit):
    """FLASH layer: quadratic attention inside chunks plus linear attention across chunks."""

    num_qk_heads = 4

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.bias_span = cfg.chunk_size
        super().__init__(cfg, rngs=rngs)

    def __call__(self, x_BTD, segment_ids_BT, positions_BT):
        u, v, (quad_q, quad_k, lin_q, lin_k) = self.project(x_BTD, positions_BT)
        attended = ops.mixed_chunk_attention(
            quad_q,
            quad_k,
            lin_q,
            lin_k,
            v,
            chunk_size=self.cfg.chunk_size,
            causal=self.cfg.causal,
            segment_ids=segment_ids_BT,
            quad_bias=self.bias(self.cfg.chunk_size),
        )
        return self.output(x_BTD, u, attended)
