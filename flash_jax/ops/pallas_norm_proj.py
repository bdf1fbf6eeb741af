"""The gated unit's input side, ScaleNorm(x) . W + b cut into parts (u_pre, v, z: v and z after a
SiLU), as Pallas Mosaic TPU kernels, forward and backward.

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

Parts may come out after a SiLU (the layer's v and z): the forward kernel then also writes the
part's pre-activation, the backward's residual, and the backward kernel takes the part's
cotangent after the SiLU with that pre-activation and applies the SiLU's backward in VMEM (the
XLA path wrote the pre-activation's cotangent in a fusion of its own, and the SiLU's output).

Grid: token blocks. The forward's are independent ("parallel"). The backward's W, b and g
gradients accumulate over blocks in float32 blocks that stay in VMEM, so its blocks run in order
("arbitrary"); on a megacore chip (v4, v5p) in two halves on a "parallel" leading axis, one per
TensorCore, each summing its own partial gradients, added by XLA afterwards
(`pallas_gate.core_halves`; 33 MiB of float32 at the paper's widths, written and read back: 1
KiB per token of 65,536). W and the partial sums have one block per core whose index never
changes within a half: they are single-buffered (`pl.Buffered(1)`), since a default BlockSpec
would hold two copies (at the paper's widths W is 8.25 MiB in bf16 and its float32 sum 16.5).
Both stay whole in VMEM, so a layer much wider than the paper's does not fit (v5p's 64 MiB
first): Mosaic then refuses the compile, naming the VMEM it would need.

Precision: the normed input is rounded to W's dtype before the matmul, as in the XLA path; the
matmuls' sums are float32; the normed input's cotangent and the norm's backward stay float32
(the XLA path rounds the cotangent to W's dtype first). The SiLU and its derivative are float32
on the pre-activation in W's dtype (the XLA path's SiLU in bf16 rounds the sigmoid to bf16),
the pre-activation's cotangent rounded to W's dtype for the matmuls, as in the XLA path.

Cost: each call carries a `pl.CostEstimate` (operands read once, outputs written once, the
matmuls' FLOPs): XLA's cost analysis counts nothing of a Mosaic call without one, so a program's
"bytes accessed" would leave the kernels out. Every block is fetched once: x's and the
cotangents' blocks move along the grid, and W's index never changes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from flash_jax.ops.pallas_gate import (  # the gate kernels' VMEM limit and contractions
    _TM,
    _TN,
    _VMEM_LIMIT,
    block_tokens,
    core_halves,
    cost_estimate,
)

# The backward's token blocks: at the paper's widths (d_model 1024, 2e + s = 4224, bf16) W and
# its float32 sum take 25 MiB (single-buffered), and the blocks (double-buffered: x,
# the cotangents, v's and z's pre-activations, x's gradient) and their float32 values the rest:
# with 512-token blocks Mosaic refused the kernel on v5p (over its 64 MiB; measured while a
# scratch sum and a bf16 gradient block took 33 MiB).
_BACKWARD_MAX_BLOCK_TOKENS = 256


def supported(num_tokens: int, d: int, widths) -> bool:
    """Whether the kernels take these shapes: lane widths of 128, a token block that divides."""
    return (
        d % 128 == 0 and all(w % 128 == 0 for w in widths) and block_tokens(num_tokens) is not None
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def norm_projection(
    x_ND,
    w_DF,
    b_F,
    g,
    widths,
    silu=(),
    eps=1e-5,
    interpret=False,
    residual_name=None,
    megacore=False,
):
    """ScaleNorm(x) . w + b cut into parts of these widths (a tuple of arrays [N, width], in w's
    dtype), each part whose `silu` flag is set after a SiLU; x in any float dtype, w and b in the
    compute dtype, g a scalar. The pre-activations of the SiLU parts are the backward's residuals
    (checkpoint-named `residual_name`, so that a remat policy can keep them)."""
    parts, _ = _forward(x_ND, w_DF, b_F, g, widths, _flags(silu, widths), eps, interpret, False)
    return parts


def _flags(silu, widths):
    return tuple(silu) or (False,) * len(widths)


def _silu_widths(widths, silu):
    """The widths of the SiLU parts (whose pre-activations are the backward's residuals)."""
    return [width for width, act in zip(widths, silu, strict=True) if act]


def _norm_projection_fwd(x_ND, w_DF, b_F, g, widths, silu, eps, interpret, residual_name, megacore):
    silu = _flags(silu, widths)
    parts, pres = _forward(x_ND, w_DF, b_F, g, widths, silu, eps, interpret, True)
    if residual_name is not None:
        pres = tuple(checkpoint_name(pre, residual_name) for pre in pres)
    return parts, (x_ND, w_DF, b_F, g, pres)


def _norm_projection_bwd(widths, silu, eps, interpret, residual_name, megacore, residuals, d_parts):
    del residual_name
    x_ND, w_DF, b_F, g, pres = residuals
    d_parts = [d.astype(w_DF.dtype) for d in d_parts]
    dx, dw_parts, db_parts, dg_parts = _backward(
        x_ND, w_DF, g, d_parts, pres, widths, _flags(silu, widths), eps, interpret, megacore
    )
    dw, db = jnp.sum(dw_parts, axis=0), jnp.sum(db_parts, axis=(0, 1))  # the cores' partials
    return (
        dx,
        dw.astype(w_DF.dtype),
        db.reshape(b_F.shape).astype(b_F.dtype),
        jnp.sum(dg_parts).astype(g.dtype),
    )


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


def _silu(pre):
    """silu(p) = p s and silu'(p) = s (1 + p (1 - s)), s = sigmoid(p), in float32."""
    pre = pre.astype(jnp.float32)
    sigmoid = jax.nn.sigmoid(pre)
    return pre * sigmoid, sigmoid * (1.0 + pre * (1.0 - sigmoid))


def _forward_kernel(widths, silu, eps, g_ref, x_ref, w_ref, b_ref, *out_refs):
    """The parts, then (where the outputs hold them) the SiLU parts' pre-activations."""
    dtype = w_ref.dtype
    n, _ = _normed(x_ref, g_ref[0], eps)
    h = (n * g_ref[0]).astype(dtype)
    part_refs, pre_refs = out_refs[: len(widths)], iter(out_refs[len(widths) :])
    for cols, act, part_ref in zip(_column_slices(widths), silu, part_refs, strict=True):
        y = jnp.dot(h, w_ref[:, cols], preferred_element_type=jnp.float32)
        pre = y.astype(dtype) + b_ref[:, cols]  # the bias in the compute dtype, as Dense's
        if not act:
            part_ref[...] = pre
            continue
        part_ref[...] = _silu(pre)[0].astype(dtype)
        pre_ref = next(pre_refs, None)
        if pre_ref is not None:
            pre_ref[...] = pre


def _smem_scalar(g):
    return jnp.reshape(g, (1,)).astype(jnp.float32)


def _forward(x_ND, w_DF, b_F, g, widths, silu, eps, interpret, with_pres):
    """(parts, the SiLU parts' pre-activations: written where `with_pres`, else ())."""
    (N, D), F = x_ND.shape, w_DF.shape[1]
    tN = block_tokens(N)
    inputs = (_smem_scalar(g), x_ND, w_DF, b_F.reshape(1, F))
    out_widths = list(widths) + (_silu_widths(widths, silu) if with_pres else [])
    out_shapes = [jax.ShapeDtypeStruct((N, width), w_DF.dtype) for width in out_widths]
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, tuple(widths), silu, eps),
        grid=(N // tN,),
        in_specs=[
            pl.BlockSpec(memory_space=pltpu.SMEM),
            pl.BlockSpec((tN, D), lambda i: (i, 0)),
            pl.BlockSpec((D, F), lambda i: (0, 0), pipeline_mode=pl.Buffered(1)),
            pl.BlockSpec((1, F), lambda i: (0, 0)),
        ],
        out_specs=[pl.BlockSpec((tN, width), lambda i: (i, 0)) for width in out_widths],
        out_shape=out_shapes,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel",), vmem_limit_bytes=_VMEM_LIMIT
        ),
        cost_estimate=cost_estimate(inputs, out_shapes, 2 * N * D * F),
        interpret=interpret,
    )(*inputs)
    return tuple(outs[: len(widths)]), tuple(outs[len(widths) :])


def _backward_kernel(widths, silu, eps, g_ref, x_ref, w_ref, *refs):
    num_parts, num_pres = len(widths), sum(silu)
    d_part_refs, pre_refs = refs[:num_parts], iter(refs[num_parts : num_parts + num_pres])
    # dw_ref, db_ref, dg_ref: this core half's float32 sums, whose blocks (the same at every step
    # of the half) stay in VMEM until the half ends.
    dx_ref, dw_ref, db_ref, dg_ref = refs[num_parts + num_pres :]

    @pl.when(pl.program_id(1) == 0)
    def _():
        dw_ref[...] = jnp.zeros_like(dw_ref)
        db_ref[...] = jnp.zeros_like(db_ref)
        dg_ref[...] = jnp.zeros_like(dg_ref)

    dtype = w_ref.dtype
    d_pres = []  # the parts' pre-activation cotangents, in the compute dtype
    for act, d_ref in zip(silu, d_part_refs, strict=True):
        if act:
            _, d_silu = _silu(next(pre_refs)[...])
            d_pres.append((d_ref[...].astype(jnp.float32) * d_silu).astype(dtype))
        else:
            d_pres.append(d_ref[...])
    g = g_ref[0]
    n, r = _normed(x_ref, g, eps)
    h = (n * g).astype(dtype)  # the forward's matmul operand
    dh = sum(
        jax.lax.dot_general(d_pre, w_ref[:, cols], _TN, preferred_element_type=jnp.float32)
        for cols, d_pre in zip(_column_slices(widths), d_pres, strict=True)
    )
    dh_n = dh * n
    dg_ref[0] += jnp.sum(dh_n, axis=0, keepdims=True)
    dx = (g * r) * (dh - n * jnp.mean(dh_n, axis=-1, keepdims=True))
    dx_ref[...] = dx.astype(dx_ref.dtype)
    for cols, d_pre in zip(_column_slices(widths), d_pres, strict=True):
        db_ref[0, :, cols] += jnp.sum(d_pre.astype(jnp.float32), axis=0, keepdims=True)
        dw_ref[0, :, cols] += jax.lax.dot_general(h, d_pre, _TM, preferred_element_type=jnp.float32)


def _backward(x_ND, w_DF, g, d_parts, pres, widths, silu, eps, interpret, megacore):
    """x's gradient, and W's, b's and g's as float32 partial sums, one per core half
    ([halves, D, F], [halves, 1, F], [halves, 1, D]: g's still to be summed over d): the
    caller adds them (`pallas_gate.core_halves`)."""
    (N, D), F = x_ND.shape, w_DF.shape[1]
    tN = min(block_tokens(N), _BACKWARD_MAX_BLOCK_TOKENS)
    halves = core_halves(N // tN, megacore)
    per_half = N // tN // halves

    def rows(width):
        return pl.BlockSpec((tN, width), lambda c, i: (c * per_half + i, 0))

    def per_core(*shape):
        return pl.BlockSpec((1, *shape), lambda c, i: (c, 0, 0), pipeline_mode=pl.Buffered(1))

    inputs = (_smem_scalar(g), x_ND, w_DF, *d_parts, *pres)
    in_widths = (*widths, *_silu_widths(widths, silu))  # the cotangents, the residuals
    out_shapes = [
        jax.ShapeDtypeStruct(x_ND.shape, x_ND.dtype),
        jax.ShapeDtypeStruct((halves, D, F), jnp.float32),
        jax.ShapeDtypeStruct((halves, 1, F), jnp.float32),
        jax.ShapeDtypeStruct((halves, 1, D), jnp.float32),
    ]
    return pl.pallas_call(
        functools.partial(_backward_kernel, tuple(widths), silu, eps),
        grid=(halves, per_half),
        in_specs=[
            pl.BlockSpec(memory_space=pltpu.SMEM),
            rows(D),
            pl.BlockSpec((D, F), lambda c, i: (0, 0), pipeline_mode=pl.Buffered(1)),
            *[rows(width) for width in in_widths],
        ],
        out_specs=[rows(D), per_core(D, F), per_core(1, F), per_core(1, D)],
        out_shape=out_shapes,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=_VMEM_LIMIT
        ),
        cost_estimate=cost_estimate(inputs, out_shapes, 4 * N * D * F),  # dh and W's gradient
        interpret=interpret,
    )(*inputs)
