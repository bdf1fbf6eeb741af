"""Loss and perplexity helpers shared by training and evaluation.

Losses are kept as sums (summed negative log-likelihood and summed token weight) so that they add
exactly over micro-batches, devices and eval batches; divide only at the end.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array):
    """Weighted token cross-entropy in float32: returns (nll_sum, weight_sum), both scalars.

    `weights_BT` is the loss mask (0 for padding, unmasked MLM positions, eval padding rows).
    """
    if logits_BTV.shape[:-1] != targets_BT.shape or targets_BT.shape != weights_BT.shape:
        raise ValueError(
            f"cross_entropy: logits {logits_BTV.shape}, targets {targets_BT.shape} and "
            f"weights {weights_BT.shape} do not agree"
        )
    weights_BT = weights_BT.astype(jnp.float32)
    nll_sum = _weighted_nll(logits_BTV.astype(jnp.float32), targets_BT, weights_BT)
    return nll_sum, jnp.sum(weights_BT)


@jax.custom_vjp
def _weighted_nll(logits_BTV, targets_BT, weights_BT):
    """sum_t w_t (log Z_t - logit_t[target_t]) over the positions with w_t > 0.

    The backward is written by hand: d/d logits = w (softmax - onehot(target)) is one elementwise
    pass over the `[B, T, V]` float32 logits (a fusion that also rounds the result to the head's
    compute dtype), where autodiff makes several (a scatter of the target gather's cotangent into
    a float32 `[B, T, V]` zero array, the softmax's product, their sum) at the largest activation
    of the step.
    """
    return _weighted_nll_fwd(logits_BTV, targets_BT, weights_BT)[0]


def _weighted_nll_fwd(logits_BTV, targets_BT, weights_BT):
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    nll_BT = log_z_BT - target_logit_BT
    # where(): a masked position whose logits are inf must not turn the sum into nan (0 * inf).
    nll_sum = jnp.sum(jnp.where(weights_BT > 0, nll_BT * weights_BT, 0.0))
    return nll_sum, (logits_BTV, log_z_BT, targets_BT, weights_BT)


def _weighted_nll_bwd(residuals, d_nll_sum):
    logits_BTV, log_z_BT, targets_BT, weights_BT = residuals
    scale_BT1 = (weights_BT * d_nll_sum)[..., None]
    target_BTV = targets_BT[..., None] == jnp.arange(logits_BTV.shape[-1], dtype=targets_BT.dtype)
    softmax_BTV = jnp.exp(logits_BTV - log_z_BT[..., None])
    # The scale outside the where, as autodiff of the forward has it: a masked position's
    # non-finite softmax gives 0, a nan weight a nan gradient (0 * nan; the loop's gradient-norm
    # check stops on it).
    d_logits_BTV = scale_BT1 * jnp.where(weights_BT[..., None] > 0, softmax_BTV - target_BTV, 0.0)
    return d_logits_BTV, None, None


_weighted_nll.defvjp(_weighted_nll_fwd, _weighted_nll_bwd)


def blocked_head_cross_entropy(
    x_BTD: jax.Array,
    kernel_DV: jax.Array,
    targets_BT,
    weights_BT,
    num_blocks: int,
    batch_shards: int = 1,
):
    """`cross_entropy(x @ W, ...)` (the output projection folded in) without the `[B, T, V]`
    logits: the tokens go through in `num_blocks` blocks along T, and each block's float32
    logits live only while that block is scored. Returns (nll_sum, weight_sum).

    Differentiated, the forward also takes each block's logit cotangent w (softmax - onehot),
    rounded to x's dtype as `float32_logits` rounds it, through both head matmuls (float32
    accumulation; W's over the blocks in float32, rounded once): the backward only scales the
    saved `[B, T, D]` and `[D, V]` results by the incoming cotangent (1 in training, which
    differentiates the sum). So nothing the size of the logits is kept, and no matmul is
    recomputed. Equal to the unblocked `float32_logits` + `cross_entropy` up to float32
    summation order (and, for a cotangent other than 1, one more rounding of the scaled
    results).

    x `[B, T, D]` and W `[D, V]` in the compute dtype; T divisible by num_blocks.
    `batch_shards`: how many ways B is split across devices (the step's data-parallel size).
    W's gradient is then summed per shard of rows across the blocks, `[batch_shards, D, V]`,
    and over the shards once at the end: one cross-device reduction per step instead of one
    per block."""
    B, T = targets_BT.shape
    if (
        x_BTD.shape[:2] != (B, T)
        or weights_BT.shape != (B, T)
        or x_BTD.shape[2] != kernel_DV.shape[0]
    ):
        raise ValueError(
            f"blocked_head_cross_entropy: x {x_BTD.shape}, W {kernel_DV.shape}, targets "
            f"{targets_BT.shape} and weights {weights_BT.shape} do not agree"
        )
    if T % num_blocks or B % batch_shards:
        raise ValueError(
            f"blocked_head_cross_entropy: T ({T}) is not divisible by {num_blocks} or B ({B}) "
            f"by {batch_shards}"
        )
    weights_BT = weights_BT.astype(jnp.float32)
    nll_sum = _blocked_nll(x_BTD, kernel_DV, targets_BT, weights_BT, num_blocks, batch_shards)
    return nll_sum, jnp.sum(weights_BT)


def _blocks(x_BT_, num_blocks):
    """[B, T, ...] -> [num_blocks, B, T / num_blocks, ...] (consecutive tokens per block; the
    batch axis, the sharded one, stays whole in every block)."""
    B, T = x_BT_.shape[:2]
    x = x_BT_.reshape(B, num_blocks, T // num_blocks, *x_BT_.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _unblocks(x_kBt_):
    """The inverse of `_blocks`."""
    k, B, t = x_kBt_.shape[:3]
    return jnp.moveaxis(x_kBt_, 0, 1).reshape(B, k * t, *x_kBt_.shape[3:])


def _block_nll(x_BtD, kernel_DV, targets_Bt, weights_Bt, with_grads: bool, batch_shards: int):
    """One block: its nll sum and, with_grads, its x cotangent and W cotangent per shard of
    rows (float32 `[batch_shards, D, V]`: a sum over rows that stays on each device)."""
    logits_BtV = jnp.einsum("btd,dv->btv", x_BtD, kernel_DV, preferred_element_type=jnp.float32)
    nll_sum, residuals = _weighted_nll_fwd(logits_BtV, targets_Bt, weights_Bt)
    if not with_grads:
        return nll_sum, None, None
    d_logits_BtV = _weighted_nll_bwd(residuals, jnp.float32(1))[0].astype(x_BtD.dtype)
    d_x_BtD = jnp.einsum("btv,dv->btd", d_logits_BtV, kernel_DV, preferred_element_type=jnp.float32)
    B, t, D = x_BtD.shape
    d_kernel_nDV = jnp.einsum(
        "nbtd,nbtv->ndv",
        x_BtD.reshape(batch_shards, B // batch_shards, t, D),
        d_logits_BtV.reshape(batch_shards, B // batch_shards, t, -1),
        preferred_element_type=jnp.float32,
    )
    return nll_sum, d_x_BtD.astype(x_BtD.dtype), d_kernel_nDV


def _scan_blocks(x_BTD, kernel_DV, targets_BT, weights_BT, num_blocks, batch_shards, with_grads):
    def body(carry, block):
        nll_sum, d_kernel_nDV = carry
        nll, d_x, d_kernel = _block_nll(
            kernel_DV=kernel_DV, with_grads=with_grads, batch_shards=batch_shards, **block
        )
        if with_grads:
            d_kernel_nDV = d_kernel_nDV + d_kernel
        return (nll_sum + nll, d_kernel_nDV), d_x

    blocks = {
        "x_BtD": _blocks(x_BTD, num_blocks),
        "targets_Bt": _blocks(targets_BT, num_blocks),
        "weights_Bt": _blocks(weights_BT, num_blocks),
    }
    zeros = jnp.zeros((batch_shards,) + kernel_DV.shape, jnp.float32) if with_grads else None
    (nll_sum, d_kernel_nDV), d_x = jax.lax.scan(body, (jnp.float32(0), zeros), blocks)
    if d_x is None:
        return nll_sum, None, None
    return nll_sum, _unblocks(d_x), jnp.sum(d_kernel_nDV, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blocked_nll(x_BTD, kernel_DV, targets_BT, weights_BT, num_blocks, batch_shards):
    args = (x_BTD, kernel_DV, targets_BT, weights_BT, num_blocks, batch_shards)
    return _scan_blocks(*args, False)[0]


def _blocked_nll_fwd(x_BTD, kernel_DV, targets_BT, weights_BT, num_blocks, batch_shards):
    args = (x_BTD, kernel_DV, targets_BT, weights_BT, num_blocks, batch_shards)
    nll_sum, d_x_BTD, d_kernel_DV = _scan_blocks(*args, True)
    return nll_sum, (d_x_BTD, d_kernel_DV, kernel_DV)  # W: for its dtype (no copy)


def _blocked_nll_bwd(num_blocks, batch_shards, residuals, d_nll_sum):
    d_x_BTD, d_kernel_DV, kernel_DV = residuals
    d_x = (d_nll_sum * d_x_BTD.astype(jnp.float32)).astype(d_x_BTD.dtype)
    return d_x, (d_nll_sum * d_kernel_DV).astype(kernel_DV.dtype), None, None


_blocked_nll.defvjp(_blocked_nll_fwd, _blocked_nll_bwd)


def perplexity(nll_sum: float, weight_sum: float) -> float:
    """exp(mean NLL) as a Python float (inf past float range, nan for an empty sum)."""
    nll_sum, weight_sum = float(nll_sum), float(weight_sum)
    if weight_sum <= 0:
        return math.nan
    mean = nll_sum / weight_sum
    return math.exp(mean) if mean < 700 else math.inf


def bits_per_byte(nll_sum: float, num_bytes: float) -> float:
    """Summed NLL (nats) over a text of `num_bytes` UTF-8 bytes -> bits per byte."""
    if num_bytes <= 0:
        raise ValueError(f"bits_per_byte needs a positive byte count, got {num_bytes}")
    return float(nll_sum) / (float(num_bytes) * math.log(2.0))
