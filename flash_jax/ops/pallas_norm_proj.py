"""The gated unit's input side, ScaleNorm(x) . W + b cut into parts (u_pre, v_pre, z_pre), as
Pallas Mosaic TPU kernels, forward and backward.

x [N, D] (tokens flattened), W [D, F], b [F], g (ScaleNorm's one learned scalar), the parts'
widths summing to F. ScaleNorm is g * x / sqrt(mean(x^2) + eps) in float32, rounded to W's dtype
before the matmul (`flash_jax.layers.basic.ScaleNorm`); each part is its own matmul with its
slice of W, float32 sums rounded to W's dtype, its slice of b added in that dtype (as
`Dense.split_outputs`). Neither the normed input nor its cotangent goes to HBM: the forward
kernel normalises each block of tokens in VMEM and multiplies it by the whole W, which stays in
VMEM; the backward kernel recomputes the block's norm from x, forms the normed input's cotangent
dh = sum over parts of d_part . W_part^T in float32 VMEM and writes x's gradient,
g r (dh - n mean(dh n)) with r = 1 / sqrt(mean(x^2) + eps) and n = x r, once. The XLA path wrote
the normed input, its cotangent and x's gradient in a T-minor layout, copying x, the cotangent
and the result between layouts (docs/benchmarks.md).

Grid: token blocks. The forward's are independent ("parallel"); the backward's run in order
("arbitrary") because W's, b's and g's gradients accumulate over them in float32 VMEM scratch,
written once at the last block. W and W's gradient have one block whose index never changes:
they are single-buffered (`pl.Buffered(1)`), since a default BlockSpec would hold two copies
(at the paper's widths W is 8.25 MiB in bf16 and its float32 sum 16.5).

Precision: the normed input is rounded to W's dtype before the matmul, as in the XLA path; the
matmuls' sums are float32; the normed input's cotangent and the norm's backward stay float32
(the XLA path rounds the cotangent to W's dtype first).

Cost: each call carries a `pl.CostEstimate` (operands read once, outputs written once, the
matmuls' FLOPs): XLA's cost analysis counts nothing of a Mosaic call without one, so a program's
"bytes accessed" would leave the kernels out. Every block is fetched once: x's and the
cotangents' blocks move along the grid, and W's index never changes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from flash_jax.ops.pallas_gate import block_tokens, cost_estimate

_MIB = 1 << 20
# 7/8 of a v5p core's 64 MiB (v5e and v6e have 128), as the gate kernels'. At the paper's widths
# (d_model 1024, 2e + s = 4224, bf16) and 512-token blocks the backward fits it (W, its float32
# sum and its output, single-buffered, 33 MiB; the blocks double-buffered and their float32
# values): 1,024-token blocks take 70 MiB, which Mosaic refuses on v5p.
_VMEM_LIMIT = 56 * _MIB
_TN = (((1,), (1,)), ((), ()))  # a . b^T
_TM = (((0,), (0,)), ((), ()))  # a^T . b


def supported(num_tokens: int, d: int, widths) -> bool:
    """Whether the kernels take these shapes: lane widths of 128, a token block that divides."""
    return (
        d % 128 == 0 and all(w % 128 == 0 for w in widths) and block_tokens(num_tokens) is not None
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def norm_projection(x_ND, w_DF, b_F, g, widths, eps=1e-5, interpret=False):
    """ScaleNorm(x) . w + b cut into parts of these widths (a tuple of arrays [N, width], in w's
    dtype); x in any float dtype, w and b in the compute dtype, g a scalar."""
    return _forward(x_ND, w_DF, b_F, g, widths, eps, interpret)


def _norm_projection_fwd(x_ND, w_DF, b_F, g, widths, eps, interpret):
    parts = _forward(x_ND, w_DF, b_F, g, widths, eps, interpret)
    return parts, (x_ND, w_DF, b_F, g)


def _norm_projection_bwd(widths, eps, interpret, residuals, d_parts):
    x_ND, w_DF, b_F, g = residuals
    d_parts = [d.astype(w_DF.dtype) for d in d_parts]
    dx, dw, db, dg_D = _backward(x_ND, w_DF, g, d_parts, widths, eps, interpret)
    return dx, dw, db.reshape(b_F.shape).astype(b_F.dtype), jnp.sum(dg_D).astype(g.dtype)


norm_projection.defvjp(_norm_projection_fwd, _norm_projection_bwd)


def _column_slices(widths):
    start = 0
    for width in widths:
        yield slice(start, start + width)
        start += width


def _normed(x_ref, g, eps):
    """n = x / sqrt(mean(x^2) + eps) and 1 / sqrt(mean(x^2) + eps), float32; the matmul's
    operand is (g n) rounded to W's dtype."""
    x = x_ref[...].astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * r, r


def _forward_kernel(widths, eps, g_ref, x_ref, w_ref, b_ref, *part_refs):
    dtype = w_ref.dtype
    n, _ = _normed(x_ref, g_ref[0], eps)
    h = (n * g_ref[0]).astype(dtype)
    for cols, part_ref in zip(_column_slices(widths), part_refs, strict=True):
        y = jnp.dot(h, w_ref[:, cols], preferred_element_type=jnp.float32)
        part_ref[...] = y.astype(dtype) + b_ref[:, cols]  # the bias in the compute dtype


def _smem_scalar(g):
    return jnp.reshape(g, (1,)).astype(jnp.float32)


def _forward(x_ND, w_DF, b_F, g, widths, eps, interpret):
    (N, D), F = x_ND.shape, w_DF.shape[1]
    tN = block_tokens(N)
    inputs = (_smem_scalar(g), x_ND, w_DF, b_F.reshape(1, F))
    out_shapes = [jax.ShapeDtypeStruct((N, width), w_DF.dtype) for width in widths]
    return tuple(
        pl.pallas_call(
            functools.partial(_forward_kernel, tuple(widths), eps),
            grid=(N // tN,),
            in_specs=[
                pl.BlockSpec(memory_space=pltpu.SMEM),
                pl.BlockSpec((tN, D), lambda i: (i, 0)),
                pl.BlockSpec((D, F), lambda i: (0, 0), pipeline_mode=pl.Buffered(1)),
                pl.BlockSpec((1, F), lambda i: (0, 0)),
            ],
            out_specs=[pl.BlockSpec((tN, width), lambda i: (i, 0)) for width in widths],
            out_shape=out_shapes,
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel",), vmem_limit_bytes=_VMEM_LIMIT
            ),
            cost_estimate=cost_estimate(inputs, out_shapes, 2 * N * D * F),
            interpret=interpret,
        )(*inputs)
    )


def _backward_kernel(widths, eps, g_ref, x_ref, w_ref, *refs):
    num_parts = len(widths)
    d_part_refs = refs[:num_parts]
    dx_ref, dw_ref, db_ref, dg_ref, dw_acc, db_acc, dg_acc = refs[num_parts:]
    i = pl.program_id(0)

    @pl.when(i == 0)
    def _():
        dw_acc[...] = jnp.zeros_like(dw_acc)
        db_acc[...] = jnp.zeros_like(db_acc)
        dg_acc[...] = jnp.zeros_like(dg_acc)

    g = g_ref[0]
    n, r = _normed(x_ref, g, eps)
    h = (n * g).astype(w_ref.dtype)  # the forward's matmul operand
    dh = sum(
        jax.lax.dot_general(d_ref[...], w_ref[:, cols], _TN, preferred_element_type=jnp.float32)
        for cols, d_ref in zip(_column_slices(widths), d_part_refs, strict=True)
    )
    dh_n = dh * n
    dg_acc[...] += jnp.sum(dh_n, axis=0, keepdims=True)
    dx = (g * r) * (dh - n * jnp.mean(dh_n, axis=-1, keepdims=True))
    dx_ref[...] = dx.astype(dx_ref.dtype)
    for cols, d_ref in zip(_column_slices(widths), d_part_refs, strict=True):
        db_acc[:, cols] += jnp.sum(d_ref[...].astype(jnp.float32), axis=0, keepdims=True)
        dw_acc[:, cols] += jax.lax.dot_general(
            h, d_ref[...], _TM, preferred_element_type=jnp.float32
        )

    @pl.when(i == pl.num_programs(0) - 1)
    def _():
        dw_ref[...] = dw_acc[...].astype(dw_ref.dtype)
        db_ref[...] = db_acc[...]
        dg_ref[...] = dg_acc[...]


def _backward(x_ND, w_DF, g, d_parts, widths, eps, interpret):
    (N, D), F = x_ND.shape, w_DF.shape[1]
    tN = block_tokens(N)
    whole_DF = pl.BlockSpec((D, F), lambda i: (0, 0), pipeline_mode=pl.Buffered(1))
    inputs = (_smem_scalar(g), x_ND, w_DF, *d_parts)
    out_shapes = [
        jax.ShapeDtypeStruct(x_ND.shape, x_ND.dtype),
        jax.ShapeDtypeStruct(w_DF.shape, w_DF.dtype),
        jax.ShapeDtypeStruct((1, F), jnp.float32),
        jax.ShapeDtypeStruct((1, D), jnp.float32),  # g's gradient, summed over d outside
    ]
    return pl.pallas_call(
        functools.partial(_backward_kernel, tuple(widths), eps),
        grid=(N // tN,),
        in_specs=[
            pl.BlockSpec(memory_space=pltpu.SMEM),
            pl.BlockSpec((tN, D), lambda i: (i, 0)),
            whole_DF,
            *[pl.BlockSpec((tN, width), lambda i: (i, 0)) for width in widths],
        ],
        out_specs=[
            pl.BlockSpec((tN, D), lambda i: (i, 0)),
            whole_DF,
            pl.BlockSpec((1, F), lambda i: (0, 0)),
            pl.BlockSpec((1, D), lambda i: (0, 0)),
        ],
        out_shape=out_shapes,
        scratch_shapes=[
            pltpu.VMEM((D, F), jnp.float32),
            pltpu.VMEM((1, F), jnp.float32),
            pltpu.VMEM((1, D), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("arbitrary",), vmem_limit_bytes=_VMEM_LIMIT
        ),
        cost_estimate=cost_estimate(inputs, out_shapes, 4 * N * D * F),  # dh and W's gradient
        interpret=interpret,
    )(*inputs)
