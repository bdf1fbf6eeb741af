"""What the multi-head attention ops of the baselines (performer, combiner) share: input checks,
chunking and running a one-head function over the heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flash_jax.ops import attention


def check_inputs(q, k, v, segment_ids):
    """q, k, v `[B, T, H, D]` of one shape and segment ids `[B, T]` (None: one document, ids 1)."""
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must share one shape [B, T, H, D], got {q.shape}, {k.shape}, {v.shape}"
        )
    return q, k, v, attention._segments(segment_ids, *q.shape[:2])


def chunked(x, C: int):
    """[B, T, ...] -> [B, G, C, ...] with G = ceil(T / C), padding with zeros (= segment 0)."""
    B, T = x.shape[:2]
    G = -(-T // C)
    if G * C != T:
        x = jnp.pad(x, [(0, 0), (0, G * C - T)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape((B, G, C) + x.shape[2:])


def per_head(fn, *xs_BTHX):
    """fn on `[B, T, X]` slices, once per head (axis 2), stacked back on axis 2. The heads stay a
    batch axis of every einsum (no transposes, sharding by heads survives)."""
    return jax.vmap(fn, in_axes=2, out_axes=2)(*xs_BTHX)
