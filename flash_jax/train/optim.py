"""Learning-rate schedules, the optimizer (AdamW or Adafactor) and its weight-decay mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flash_jax import sharding
from flash_jax.config import DECAYS, OPTIMIZERS

# Parameters whose path contains one of these are norms, biases or per-dimension scales/offsets
# (the GAU's gamma/beta): no weight decay, as in BERT/T5-era practice.
_NO_DECAY_NAMES = ("norm", "bias", "scale", "gamma", "beta", "offset")


def make_schedule(train) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then `train.decay` until `train.num_steps`."""
    peak, warmup, total = train.learning_rate, train.warmup_steps, train.num_steps
    end = peak * train.end_learning_rate_fraction
    decay_steps = max(total - warmup, 1)
    if train.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
    elif train.decay == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif train.decay == "rsqrt":
        # T5-style inverse square root, continuous with the warm-up at its end.
        def decay(count):
            # join_schedules also evaluates this during warm-up (count < 0): clamp.
            return peak * jnp.sqrt(max(warmup, 1) / (jnp.maximum(count, 0) + max(warmup, 1)))
    elif train.decay == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"train.decay must be one of {DECAYS}, got {train.decay!r}")
    if warmup <= 0:
        return decay

    # Linear warm-up that starts above zero (step 0 already moves the parameters) and reaches
    # the peak at step warmup - 1; `decay` then runs from the peak.
    def warm(count):
        return peak * (count + 1) / warmup

    return optax.join_schedules([warm, decay], [warmup])


def decay_mask(params) -> object:
    """True for the parameters that get weight decay: matrices, not norms / biases / scales.

    `params` is an nnx State whose leaves are Variables (abstract ones are fine): the logical
    axis names tell a stacked-layer axis ("layers") from a real matrix dimension, so a stack of
    norm scales [layers, d] is not mistaken for a matrix.
    """

    def wants_decay(path, var) -> bool:
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path).lower()
        if any(word in name for word in _NO_DECAY_NAMES):
            return False
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        axes = (
            var.get_metadata().get(sharding.LOGICAL_AXES) if isinstance(var, nnx.Variable) else None
        )
        if axes is None:
            axes = (None,) * len(value.shape)
        return sum(axis != "layers" for axis in axes) >= 2

    return jax.tree_util.tree_map_with_path(
        wants_decay, params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def make_optimizer(train, mask) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The configured optimizer with clipping; `mask` is `decay_mask(params)` (pure structure)."""
    schedule = make_schedule(train)
    if train.optimizer == "adamw":
        tx = optax.adamw(
            schedule,
            b1=train.b1,
            b2=train.b2,
            eps=1e-8,
            weight_decay=train.weight_decay,
            mask=mask,
        )
    elif train.optimizer == "adafactor":
        # Factored second moments (memory ~ rows + cols); momentum b1 kept if configured.
        tx = optax.adafactor(
            schedule,
            momentum=train.b1 or None,
            weight_decay_rate=train.weight_decay or None,
            weight_decay_mask=mask,
        )
    else:
        raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {train.optimizer!r}")
    if train.grad_clip and train.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(train.grad_clip), tx)
    return tx, schedule
