"""The gated unit's output, x + (silu(u_pre) * a) . W + b, as Pallas Mosaic TPU kernels, forward
and backward.

u_pre, a [N, e] (the gate's pre-activation and the attention output, tokens flattened), W [e, d],
b [d], x [N, d] (the residual). Neither the gate u = silu(u_pre) nor the gated product u * a goes
to HBM: the forward kernel forms them per block of tokens in VMEM and multiplies the product by
the whole kernel W, which stays in VMEM; the backward kernel recomputes them from u_pre and a for
W's gradient and, from the output's cotangent dO, writes d u_pre = (dO . W^T) * a * silu'(u_pre)
and da = (dO . W^T) * u once each (the gated product's cotangent dO . W^T stays in VMEM, in
float32). x's gradient is dO itself. The XLA path wrote u, the gated product's cotangent and u's
cotangent to HBM and read them back (docs/benchmarks.md).

Grid: token blocks of `block_tokens` rows. The forward's are independent ("parallel"). The
backward's W and b gradients accumulate over blocks in a float32 block that stays in VMEM, so its
blocks run in order ("arbitrary"); on a chip with two TensorCores as one device (v4, v5p:
megacore, `dispatch.megacore`) they run in two halves on a "parallel" leading axis, one half on
each core, each core summing its own partial
gradient, and XLA adds the two partials afterwards (16 MiB of float32 at the paper's widths,
written and read back: 0.5 KiB per token of 65,536). An "arbitrary" grid alone would leave the
second core idle.

Precision: u and the product u * a are rounded to the input dtype before the matmul, as in the
XLA path (`silu(u_pre) * a` in bf16, whose SiLU also rounds the sigmoid to bf16: the kernel's
SiLU and its derivative are float32); the matmuls' sums are float32; the gated product's
cotangent stays float32 (the XLA path rounds it to the input dtype).

Cost: each call carries a `pl.CostEstimate` (operands read once, outputs written once, the
matmuls' FLOPs): XLA's cost analysis counts nothing of a Mosaic call without one, so a program's
"bytes accessed" would leave the kernels out.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_MIB = 1 << 20
# 7/8 of a v5p core's 64 MiB (v5e and v6e have 128): the backward takes 40 MiB at the paper's
# widths (e = 2048, d_model = 1024, bf16: W, its float32 sum and 512-token blocks, each double
# buffered), so v4 (16 MiB) is not served there (Mosaic refuses the compile).
_VMEM_LIMIT = 56 * _MIB
_TOKEN_BLOCKS = (512, 256, 128, 64, 32, 16, 8)
_TN = (((1,), (1,)), ((), ()))  # a . b^T
_TM = (((0,), (0,)), ((), ()))  # a^T . b


def block_tokens(num_tokens: int) -> int | None:
    """The largest token block that divides num_tokens, None when none does."""
    return next((b for b in _TOKEN_BLOCKS if num_tokens % b == 0), None)


def supported(num_tokens: int, e: int, d: int) -> bool:
    """Whether the kernels take these shapes: lane widths of 128, a token block that divides."""
    return e % 128 == 0 and d % 128 == 0 and block_tokens(num_tokens) is not None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def gated_output(x_ND, u_pre_NE, a_NE, w_ED, b_D, interpret=False, megacore=False):
    """x + (silu(u_pre) * a) . w + b, in x's dtype; u_pre, a, w, b in one compute dtype.
    `megacore`: the chip runs two TensorCores as one device (`core_halves`)."""
    return _forward(x_ND, u_pre_NE, a_NE, w_ED, b_D, interpret)


def _gated_output_fwd(x_ND, u_pre_NE, a_NE, w_ED, b_D, interpret, megacore):
    out = _forward(x_ND, u_pre_NE, a_NE, w_ED, b_D, interpret)
    return out, (u_pre_NE, a_NE, w_ED, b_D)


def _gated_output_bwd(interpret, megacore, residuals, d_out_ND):
    u_pre_NE, a_NE, w_ED, b_D = residuals
    d_u_pre, da, dw_parts, db_parts = _backward(u_pre_NE, a_NE, w_ED, d_out_ND, interpret, megacore)
    dw, db = jnp.sum(dw_parts, axis=0), jnp.sum(db_parts, axis=(0, 1))  # the cores' partials
    return d_out_ND, d_u_pre, da, dw.astype(w_ED.dtype), db.reshape(b_D.shape).astype(b_D.dtype)


gated_output.defvjp(_gated_output_fwd, _gated_output_bwd)


def cost_estimate(inputs, out_shapes, flops) -> pl.CostEstimate:
    """What XLA's cost analysis counts for a call whose blocks are each fetched once (W's block
    index never changes, so it is fetched once): each operand read once and each output
    written once, and the matmuls' FLOPs. The norm + projection kernels use it too."""
    arrays = list(inputs) + list(out_shapes)
    return pl.CostEstimate(
        flops=int(flops),
        transcendentals=0,
        bytes_accessed=sum(x.size * jnp.dtype(x.dtype).itemsize for x in arrays),
    )


def _gate(u_pre_ref):
    """u = silu(u_pre) (float32, rounded to the input dtype as the XLA path's u is), in float32;
    sigmoid(u_pre) and u_pre in float32 for the SiLU's derivative."""
    u_pre = u_pre_ref[...].astype(jnp.float32)
    sigmoid = jax.nn.sigmoid(u_pre)
    return (u_pre * sigmoid).astype(u_pre_ref.dtype).astype(jnp.float32), sigmoid, u_pre


def _forward_kernel(x_ref, u_pre_ref, a_ref, w_ref, b_ref, out_ref):
    dtype = u_pre_ref.dtype
    u, _, _ = _gate(u_pre_ref)
    gated = (u * a_ref[...].astype(jnp.float32)).astype(dtype)
    y = jnp.dot(gated, w_ref[...], preferred_element_type=jnp.float32)
    y = y.astype(dtype) + b_ref[...]  # the projection in the compute dtype, as Dense's
    out_ref[...] = (x_ref[...] + y.astype(x_ref.dtype)).astype(out_ref.dtype)


def _forward(x_ND, u_pre_NE, a_NE, w_ED, b_D, interpret):
    (N, D), E = x_ND.shape, u_pre_NE.shape[1]
    tN = block_tokens(N)
    rows_ND = pl.BlockSpec((tN, D), lambda i: (i, 0))
    rows_NE = pl.BlockSpec((tN, E), lambda i: (i, 0))
    inputs = (x_ND, u_pre_NE, a_NE, w_ED, b_D.reshape(1, D))
    out_shape = jax.ShapeDtypeStruct(x_ND.shape, x_ND.dtype)
    return pl.pallas_call(
        _forward_kernel,
        grid=(N // tN,),
        in_specs=[
            rows_ND,
            rows_NE,
            rows_NE,
            pl.BlockSpec((E, D), lambda i: (0, 0)),
            pl.BlockSpec((1, D), lambda i: (0, 0)),
        ],
        out_specs=rows_ND,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel",), vmem_limit_bytes=_VMEM_LIMIT
        ),
        cost_estimate=cost_estimate(inputs, [out_shape], 2 * N * E * D),
        interpret=interpret,
    )(*inputs)


def _backward_kernel(u_pre_ref, a_ref, w_ref, do_ref, du_pre_ref, da_ref, dw_ref, db_ref):
    # dw_ref and db_ref: this core half's float32 sums, whose block (the same at every step of
    # the half) stays in VMEM until the half ends.
    @pl.when(pl.program_id(1) == 0)
    def _():
        dw_ref[...] = jnp.zeros_like(dw_ref)
        db_ref[...] = jnp.zeros_like(db_ref)

    u, sigmoid, u_pre = _gate(u_pre_ref)
    a = a_ref[...].astype(jnp.float32)
    d_out = do_ref[...].astype(w_ref.dtype)
    d_gated = jax.lax.dot_general(d_out, w_ref[...], _TN, preferred_element_type=jnp.float32)
    d_silu = sigmoid * (1.0 + u_pre * (1.0 - sigmoid))  # silu'(p) = s (1 + p (1 - s))
    du_pre_ref[...] = (d_gated * a * d_silu).astype(du_pre_ref.dtype)
    da_ref[...] = (d_gated * u).astype(da_ref.dtype)
    gated = (u * a).astype(u_pre_ref.dtype)
    dw_ref[0] += jax.lax.dot_general(gated, d_out, _TM, preferred_element_type=jnp.float32)
    db_ref[0] += jnp.sum(d_out.astype(jnp.float32), axis=0, keepdims=True)


def core_halves(num_blocks: int, megacore: bool) -> int:
    """Into how many parts a backward's token blocks are cut, one per TensorCore: two on a
    megacore chip when the blocks split evenly, else one (a chip with one core would only pay
    for the second partial sum)."""
    return 2 if megacore and num_blocks % 2 == 0 else 1


def _backward(u_pre_NE, a_NE, w_ED, d_out_ND, interpret, megacore):
    """u_pre's and a's gradients, and W's and b's as float32 partial sums, one per core half
    ([halves, E, D] and [halves, 1, D]): the caller adds them."""
    (N, E), D = u_pre_NE.shape, w_ED.shape[1]
    tN = block_tokens(N)
    halves = core_halves(N // tN, megacore)
    per_half = N // tN // halves
    rows_ND = pl.BlockSpec((tN, D), lambda c, i: (c * per_half + i, 0))
    rows_NE = pl.BlockSpec((tN, E), lambda c, i: (c * per_half + i, 0))
    whole_ED = pl.BlockSpec((E, D), lambda c, i: (0, 0))
    inputs = (u_pre_NE, a_NE, w_ED, d_out_ND)
    out_shapes = [
        jax.ShapeDtypeStruct(u_pre_NE.shape, u_pre_NE.dtype),
        jax.ShapeDtypeStruct(a_NE.shape, a_NE.dtype),
        jax.ShapeDtypeStruct((halves, E, D), jnp.float32),
        jax.ShapeDtypeStruct((halves, 1, D), jnp.float32),
    ]
    return pl.pallas_call(
        _backward_kernel,
        grid=(halves, per_half),
        in_specs=[rows_NE, rows_NE, whole_ED, rows_ND],
        out_specs=[
            rows_NE,
            rows_NE,
            pl.BlockSpec((1, E, D), lambda c, i: (c, 0, 0)),
            pl.BlockSpec((1, 1, D), lambda c, i: (c, 0, 0)),
        ],
        out_shape=out_shapes,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=_VMEM_LIMIT
        ),
        cost_estimate=cost_estimate(inputs, out_shapes, 4 * N * E * D),  # dO W^T, W gradient
        interpret=interpret,
    )(*inputs)
