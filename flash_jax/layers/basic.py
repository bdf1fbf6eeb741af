"""Dense, embedding and normalisation layers with logical axis names on every parameter."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flash_jax.config import ModelConfig
from flash_jax.sharding import LOGICAL_AXES


def param(rngs: nnx.Rngs, shape, logical_axes, *, stddev: float, dtype) -> nnx.Param:
    """A normal(0, stddev) parameter (zeros when stddev is 0) carrying its logical axis names."""
    if stddev == 0.0:
        value = jnp.zeros(shape, dtype)
    else:
        value = stddev * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, **{LOGICAL_AXES: tuple(logical_axes)})


class Dense(nnx.Module):
    """y = x . W + b, contracting the last len(in_shape) axes of x; W ~ N(0, 1 / fan_in)."""

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        logical_axes: Sequence[str | None],
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        use_bias: bool = True,
    ):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        if len(logical_axes) != len(in_shape) + len(out_shape):
            raise ValueError(f"logical_axes {logical_axes} do not match {in_shape}->{out_shape}")
        fan_in = 1
        for size in in_shape:
            fan_in *= size
        self.num_in_axes = len(in_shape)
        self.dtype = cfg.compute_dtype
        self.kernel = param(
            rngs, in_shape + out_shape, logical_axes, stddev=fan_in**-0.5, dtype=cfg.weight_dtype
        )
        self.bias = (
            param(
                rngs, out_shape, logical_axes[len(in_shape) :], stddev=0.0, dtype=cfg.weight_dtype
            )
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.tensordot(
            x.astype(self.dtype), self.kernel.value.astype(self.dtype), axes=self.num_in_axes
        )
        if self.bias is not None:
            y = y + self.bias.value.astype(self.dtype)
        return y

    def split_outputs(self, x: jax.Array, widths: Sequence[int]) -> list[jax.Array]:
        """`self(x)` cut into parts of these widths along the last output axis, each its own
        matmul with its slice of the kernel (the same sums, equal up to float32 rounding): a
        consumer of one part then reads only that part from memory, where XLA reads the whole
        output for a fusion that uses a slice of it. No bias: a zero one (the same values)."""
        kernel = self.kernel.value.astype(self.dtype)
        if sum(widths) != kernel.shape[-1]:
            raise ValueError(f"widths {tuple(widths)} do not sum to {kernel.shape[-1]}")
        bias = (
            jnp.zeros(kernel.shape[self.num_in_axes :], self.dtype)
            if self.bias is None
            else self.bias.value.astype(self.dtype)
        )
        return list(split_matmul(x.astype(self.dtype), kernel, bias, tuple(widths)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def split_matmul(x, kernel, bias, widths: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """x . kernel + bias, contracting x's last (kernel.ndim - bias.ndim) axes, as one matmul per
    part of the last output axis (parts of these widths, in order).

    The backward is written by hand: the parts' cotangents side by side make one matmul against
    the whole kernel for x's gradient and one against x for the kernel's. Autodiff of the parts
    made one partial product of x's gradient per part, added afterwards, and read x once per part
    for the kernel's (one FLASH layer moved 11 KiB per token more on XLA:TPU, 267.4 against 256.2
    at the paper's widths and a 32K context on v5e; docs/benchmarks.md)."""
    num_in_axes = kernel.ndim - bias.ndim
    parts, start = [], 0
    for width in widths:
        part = jnp.tensordot(x, kernel[..., start : start + width], axes=num_in_axes)
        parts.append(part + bias[..., start : start + width])
        start += width
    return tuple(parts)


def _split_matmul_fwd(x, kernel, bias, widths):
    return split_matmul(x, kernel, bias, widths), (x, kernel, bias)


def _split_matmul_bwd(widths, residuals, d_parts):
    x, kernel, bias = residuals
    num_in_axes = kernel.ndim - bias.ndim
    token_axes = tuple(range(x.ndim - num_in_axes))
    d_out = jnp.concatenate(d_parts, axis=-1)
    d_out_axes = tuple(range(len(token_axes), d_out.ndim))
    kernel_out_axes = tuple(range(num_in_axes, kernel.ndim))
    d_x = jnp.tensordot(d_out, kernel, axes=(d_out_axes, kernel_out_axes))
    d_kernel = jnp.tensordot(x, d_out, axes=(token_axes, token_axes))
    # Each part summed apart (in float32): XLA sums a part where it makes that part's cotangent.
    d_bias = jnp.concatenate(
        [jnp.sum(d.astype(jnp.float32), axis=token_axes) for d in d_parts], axis=-1
    )
    return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype), d_bias.astype(bias.dtype)


split_matmul.defvjp(_split_matmul_fwd, _split_matmul_bwd)


class Embed(nnx.Module):
    """Token embedding table [vocab, d], N(0, 1); also the tied output projection
    (`LanguageModel.head_kernel`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype = cfg.compute_dtype
        self.table = param(
            rngs,
            (cfg.vocab_size, cfg.d_model),
            ("vocab", "embed"),
            stddev=1.0,
            dtype=cfg.weight_dtype,
        )

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        return jnp.take(self.table.value, tokens_BT, axis=0).astype(self.dtype)


@jax.custom_vjp
def float32_logits(x_BTD: jax.Array, kernel_DV: jax.Array) -> jax.Array:
    """x @ W with float32 results (the loss wants them) from operands of x's dtype.

    Autodiff of a bf16 x bf16 -> float32 matmul makes the backward's two matmuls (the logits'
    cotangent times W and times x) float32 x float32: at a 32k vocabulary the largest matmuls of
    the step, at half the bf16 rate or less. Here the cotangent is rounded to x's dtype first, as
    attention kernels round their probabilities, and both matmuls accumulate in float32. With
    float32 operands this is exactly autodiff.
    """
    return jnp.einsum("btd,dv->btv", x_BTD, kernel_DV, preferred_element_type=jnp.float32)


def _float32_logits_fwd(x_BTD, kernel_DV):
    return float32_logits(x_BTD, kernel_DV), (x_BTD, kernel_DV)


def _float32_logits_bwd(residuals, d_logits_BTV):
    x_BTD, kernel_DV = residuals
    d_logits_BTV = d_logits_BTV.astype(x_BTD.dtype)
    d_x = jnp.einsum("btv,dv->btd", d_logits_BTV, kernel_DV, preferred_element_type=jnp.float32)
    d_kernel = jnp.einsum("btd,btv->dv", x_BTD, d_logits_BTV, preferred_element_type=jnp.float32)
    return d_x.astype(x_BTD.dtype), d_kernel.astype(kernel_DV.dtype)


float32_logits.defvjp(_float32_logits_fwd, _float32_logits_bwd)


class ScaleNorm(nnx.Module):
    """g * x / rms(x) with one learned scalar g (ScaleNorm, Nguyen & Salazar 2019), in float32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, eps: float = 1e-5):
        del rngs
        self.eps = eps
        self.dtype = cfg.compute_dtype
        self.scale = nnx.Param(jnp.ones((), cfg.weight_dtype))  # a scalar: replicated

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean_square = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(mean_square + self.eps) * self.scale.value.astype(jnp.float32)
        return y.astype(self.dtype)


class LayerNorm(nnx.Module):
    """Layer normalisation with per-dimension scale and bias, in float32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, eps: float = 1e-5):
        del rngs
        self.eps = eps
        self.dtype = cfg.compute_dtype
        self.scale = nnx.Param(
            jnp.ones((cfg.d_model,), cfg.weight_dtype), **{LOGICAL_AXES: ("embed",)}
        )
        self.bias = nnx.Param(
            jnp.zeros((cfg.d_model,), cfg.weight_dtype), **{LOGICAL_AXES: ("embed",)}
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale.value.astype(jnp.float32) + self.bias.value.astype(jnp.float32)
        return y.astype(self.dtype)


def make_norm(cfg: ModelConfig, *, rngs: nnx.Rngs) -> ScaleNorm | LayerNorm:
    return ScaleNorm(cfg, rngs=rngs) if cfg.norm == "scale_norm" else LayerNorm(cfg, rngs=rngs)
