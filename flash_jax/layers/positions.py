"""Positions: per-document positions, rotary embeddings (RoPE) and the relative position bias."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flash_jax.config import ModelConfig
from flash_jax.layers.basic import param

ROPE_BASE = 10_000.0


def document_positions(segment_ids_BT: jax.Array) -> jax.Array:
    """Position of each token inside its packed document (documents are contiguous runs)."""
    _, T = segment_ids_BT.shape
    index = jnp.arange(T, dtype=jnp.int32)
    is_start = jnp.concatenate(
        [
            jnp.ones_like(segment_ids_BT[:, :1], dtype=bool),
            segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1],
        ],
        axis=1,
    )
    start = jax.lax.cummax(jnp.where(is_start, index, 0), axis=1)
    return index - start


def apply_rope(x: jax.Array, positions_BT: jax.Array) -> jax.Array:
    """Rotates every pair of dimensions (all of them: no partial RoPE) by position * frequency.

    x is [B, T, ..., w] with w even; positions are [B, T] (positions inside each document).
    Computed in float32 and cast back.
    """
    sin, cos = rope_sin_cos(positions_BT, x.shape[-1])
    shape = sin.shape[:2] + (1,) * (x.ndim - 3) + sin.shape[2:]
    return rotate(x.astype(jnp.float32), sin.reshape(shape), cos.reshape(shape)).astype(x.dtype)


def rope_sin_cos(positions_BT: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """sin and cos of RoPE's angles, position * frequency: float32 [B, T, width / 2]."""
    freq = ROPE_BASE ** (-jnp.arange(0, width, 2, dtype=jnp.float32) / width)  # [w/2]
    angle = positions_BT.astype(jnp.float32)[..., None] * freq
    return jnp.sin(angle), jnp.cos(angle)


def rotate(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """RoPE's rotation of float32 x [..., w] (its halves are the pairs' two coordinates) by the
    angles whose sin and cos [..., w / 2] are given; `rotate(y, -sin, cos)` is its inverse and
    its transpose."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class RelativePositionBias(nnx.Module):
    """The paper's relative position bias for the quadratic attention parts.

    `toeplitz`: a learned scalar per offset (2 * span - 1 in all): bias[i, j] = w[i - j + span - 1]
    `rope`: bias[i, j] = (R_i a) . (R_j b), learned a, b of width s (the paper's form beyond 512).
    Both depend only on i - j, so a [L, L] block serves every chunk / every packed document.
    """

    def __init__(self, kind: str, span: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if kind not in ("toeplitz", "rope"):
            raise ValueError(f"unknown relative position bias {kind!r}")
        self.kind = kind
        self.span = span
        if kind == "toeplitz":
            self.weight = param(
                rngs, (2 * span - 1,), ("rel",), stddev=0.02, dtype=cfg.weight_dtype
            )
        else:
            self.a = param(rngs, (cfg.qk_dim,), ("qk",), stddev=0.02, dtype=cfg.weight_dtype)
            self.b = param(rngs, (cfg.qk_dim,), ("qk",), stddev=0.02, dtype=cfg.weight_dtype)

    def __call__(self, length: int) -> jax.Array:
        """The [length, length] float32 bias for query offsets i and key offsets j."""
        if length > self.span:
            raise ValueError(f"relative bias covers {self.span} tokens, asked for {length}")
        if self.kind == "toeplitz":
            return _toeplitz(self.weight.value.astype(jnp.float32), self.span, length)
        index = jnp.arange(length)
        return self.rows(index, index)

    def rows(self, query_index: jax.Array, key_index: jax.Array) -> jax.Array:
        """Bias for arbitrary query and key offsets ([Q], [K] -> [Q, K]); used by decoding."""
        if self.kind == "toeplitz":
            offsets = query_index[:, None] - key_index[None, :] + self.span - 1
            return self.weight.value.astype(jnp.float32)[offsets]
        a = _rotate(self.a.value, query_index)
        b = _rotate(self.b.value, key_index)
        return a @ b.T


def _toeplitz(weight_W: jax.Array, span: int, length: int) -> jax.Array:
    """bias[i, j] = w[i - j + span - 1] for i, j < length, by tiling and reshaping instead of a
    gather: a gather's backward is a scatter-add of length^2 values into 2 span - 1 slots, which
    on a GPU serialises on atomics (0.26 ms a layer at C = 256 on an H100); this one's backward
    is a reshape and a sum.

    Row i is the reversed weights' window starting at length - 1 - i, a step left per row: tile
    the rotated, zero-padded reversed weights (period P = 2 length) and cut the flat run into rows
    of P - 1; the windows never reach the padding."""
    # r[k] = w[span + length - 2 - k]; row 0 starts at r[length - 1]
    reversed_W = weight_W[span - length : span + length - 1][::-1]
    period_P = jnp.roll(jnp.append(reversed_W, 0.0), -(length - 1))
    P = 2 * length
    rows = jnp.tile(period_P, length)[: length * (P - 1)].reshape(length, P - 1)
    return rows[:, :length]


def _rotate(vector_S: jax.Array, index_L: jax.Array) -> jax.Array:
    tiled = jnp.broadcast_to(vector_S.astype(jnp.float32), (1, index_L.shape[0]) + vector_S.shape)
    return apply_rope(tiled, index_L[None, :])[0]
