"""Loss and perplexity helpers shared by training and evaluation.

Losses are kept as sums (summed negative log-likelihood and summed token weight) so that they add
exactly over micro-batches, devices and eval batches; divide only at the end.
"""

from __future__ import annotations

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
