"""The gated unit's projections (GAU and FLASH) as Pallas TPU kernels, `model.proj_impl =
pallas_tpu`: whether a kernel serves a call, and each device running it on its own tokens.

- `norm_projection`: ScaleNorm(x) W_in + b_in cut into u's pre-activation, v and z (after their
  SiLUs), flash_jax/ops/pallas_norm_proj.py;
- `gated_output`: x + (silu(u_pre) * attended) W_o + b_o, flash_jax/ops/pallas_gate.py.

On a mesh each device runs a kernel on its tokens (`sharding.per_shard`): W, b and the norm's
scale go whole to every device (gathered where FSDP shards them, as the XLA path's matmul does),
and shard_map sums their gradients over the devices' tokens. The layer runs XLA's ops where no
kernel serves (`gau._GatedUnit`).
"""

from __future__ import annotations

import jax

from flash_jax import dispatch, sharding
from flash_jax.config import ModelConfig
from flash_jax.layers.basic import Dense

_TOKENS_D = ("batch", "length", "act_embed")
_TOKENS_E = ("batch", "length", "act_mlp")


def _serves(cfg: ModelConfig, num_tokens: int, dense: Dense, supported) -> bool:
    """Whether a projection runs its kernel: asked for (`model.proj_impl`), with a bias, e and
    d_model not split over devices (the kernels add the bias, and the gate's kernel x, to their
    own partial products, and the norm sums over all of d_model), the tokens split evenly over
    the devices, and `supported(tokens on each device)`: shapes the kernel takes."""

    def shards(logical_axis):
        return sharding.active_shard_count(logical_axis, cfg.sharding_rules)

    local_tokens, rest = divmod(num_tokens, shards("batch") * shards("length"))
    return (
        dispatch.proj_impl(cfg.proj_impl) == "pallas_tpu"
        and dense.bias is not None
        and shards("act_mlp") == 1
        and shards("act_embed") == 1
        and rest == 0
        and supported(local_tokens)
    )


def norm_projection_serves(cfg: ModelConfig, proj_in: Dense, num_tokens: int) -> bool:
    """Whether the norm and input projection run their kernel: ScaleNorm (LayerNorm runs XLA's
    ops) and what `_serves` asks."""
    from flash_jax.ops import pallas_norm_proj  # Pallas is imported only where it runs

    widths = (cfg.expansion_dim, cfg.expansion_dim, cfg.qk_dim)
    return cfg.norm == "scale_norm" and _serves(
        cfg,
        num_tokens,
        proj_in,
        lambda local_tokens: pallas_norm_proj.supported(local_tokens, cfg.d_model, widths),
    )


def norm_projection(cfg: ModelConfig, norm, proj_in: Dense, x_BTD: jax.Array):
    """(u's pre-activation, v, z) [B, T, e | e | s]: the norm, `proj_in`'s parts and v's and z's
    SiLUs as one kernel forward and one backward, the normed input and its cotangent, and v's
    and z's pre-activation cotangents, in VMEM. The kernel names its residuals (v's and z's
    pre-activations) "proj_in" for remat."""
    from flash_jax.ops import pallas_norm_proj

    widths = (cfg.expansion_dim, cfg.expansion_dim, cfg.qk_dim)
    dtype, interpret = proj_in.dtype, dispatch.target_platform() == "cpu"
    megacore = dispatch.megacore()

    def per_device(x_BTD, w_DF, b_F, g):
        B, T, D = x_BTD.shape
        parts = pallas_norm_proj.norm_projection(
            x_BTD.reshape(B * T, D),
            w_DF,
            b_F,
            g,
            widths,
            (False, True, True),  # u's SiLU is the gate's (`gated_output`)
            norm.eps,
            interpret,
            "proj_in",
            megacore,
        )
        return tuple(part.reshape(B, T, -1) for part in parts)

    run = sharding.per_shard(
        per_device,
        (_TOKENS_D, None, None, None),
        [_TOKENS_E, _TOKENS_E, ("batch", "length", None)],
        cfg.sharding_rules,
    )
    return run(
        x_BTD,
        proj_in.kernel.value.astype(dtype),
        proj_in.bias.value.astype(dtype),
        norm.scale.value,
    )


def gated_output_serves(cfg: ModelConfig, proj_out: Dense, num_tokens: int) -> bool:
    """Whether the gate and output projection run their kernel: what `_serves` asks."""
    from flash_jax.ops import pallas_gate  # Pallas is imported only where it runs

    return _serves(
        cfg,
        num_tokens,
        proj_out,
        lambda local_tokens: pallas_gate.supported(local_tokens, cfg.expansion_dim, cfg.d_model),
    )


def gated_output(cfg: ModelConfig, proj_out: Dense, x_BTD, u_pre_BTE, attended_BTE):
    """x + (silu(u_pre) * attended) . W_o + b_o [B, T, d] as one kernel forward and one
    backward: the gated product and its cotangent stay in VMEM."""
    from flash_jax.ops import pallas_gate

    dtype, interpret = proj_out.dtype, dispatch.target_platform() == "cpu"
    megacore = dispatch.megacore()

    def per_device(x_BTD, u_pre_BTE, attended_BTE, w_ED, b_D):
        (B, T, D), E = x_BTD.shape, u_pre_BTE.shape[-1]
        out_ND = pallas_gate.gated_output(
            x_BTD.reshape(B * T, D),
            u_pre_BTE.reshape(B * T, E),
            attended_BTE.reshape(B * T, E),
            w_ED,
            b_D,
            interpret=interpret,
            megacore=megacore,
        )
        return out_ND.reshape(B, T, D)

    run = sharding.per_shard(
        per_device, (_TOKENS_D, _TOKENS_E, _TOKENS_E, None, None), _TOKENS_D, cfg.sharding_rules
    )
    return run(
        x_BTD,
        u_pre_BTE.astype(dtype),
        attended_BTE.astype(dtype),
        proj_out.kernel.value.astype(dtype),
        proj_out.bias.value.astype(dtype),
    )
