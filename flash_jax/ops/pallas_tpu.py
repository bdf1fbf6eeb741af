"""Mixed chunk attention as fused Pallas Mosaic TPU kernels, forward and backward.

`mixed_chunk_attention_tpu` computes exactly `ops.mixed_chunk_attention`'s contract (see its
docstring and docs/model.md): causal and bidirectional, token-exact `segment_ids` with the XLA
path's cross-chunk link rule, padding rows exactly 0, `quad_bias` [C, C], T padded up to G * C here.
Shapes: B batch, T tokens (Tp = G * C after padding), S query/key width, E value width, C chunk,
G chunks, tE the E tile (`block_e`), nE = E / tE.

Design
------
Every kernel runs on the grid (B, nE, G): batch and E tiles "parallel" (split over the two cores
of a megacore chip), the chunk axis "arbitrary" (in order on one core), so VMEM scratch carries
a state across chunks. Per grid step the blocks are one chunk: quad_q, quad_k, lin_q, lin_k
[C, S]; v, the output and its cotangent [C, tE]; the segment ids twice, as a lane-replicated column
[C, 128] int32 (from a [B, Tp, 128] array) and a sublane-replicated row [8, C] int32 (from
[B, 8, Tp]), the layout of jax's flash and splash attention kernels, because the (8, 128) rule
admits neither a [C] nor a [C, 1] block; quad_bias [C, C] float32, the same block at every step
(fetched once; zeros when the caller passes none). Every block shape is (multiple of 8, multiple
of 128), hence C, S, E and tE must be multiples of 128 (`unsupported_reason`).

Per-chunk scalars go through scalar prefetch (SMEM), computed by the wrapper in one O(B T) integer
pass over the segment ids (`_chunk_tables`): for chunk g the document carried in from the left
(id of token gC - 1) and its token count before chunk g, the id of the chunk's last token (whose
keys enter the carried state) and whether that document continues from chunk g - 1 (the XLA
path's link rule), and the mirror-image four for the right (bidirectional only). So the only
carry in VMEM is the [S, tE] float32 state; its count and segment id are exact integers read from
SMEM, and no vector-to-scalar reduction happens in a kernel. The state never goes to HBM.

Forward, causal: one pass in chunk order, state P = sum of lin_k^T v over the carried document:
    out = (relu(qq kq^T / C + bias)^2 * mask) @ v  +  [token continues P's document] (ql @ P) / N
    then P = [link] P + lin_k[tokens of the chunk's last document]^T v.
Forward, bidirectional: a reverse-order pass first (index maps read chunk G-1-g) carries the
right-hand state Q and writes each token's unnormalised ql @ Q as float32 [B, Tp, E]; the
forward-order pass adds it, the left-hand term and the own-chunk linear block (folded into the
[C, C] matrix that multiplies v, as the XLA path does) and divides by N.

Backward, two passes (bidirectional adds the mirror-image carries to each):
  1. chunk order, carrying P (and, bidirectional, dQ): recomputes the [C, C] scores, then
     dS = (dO v^T) * 2 relu(s) * mask -> d quad_q, d quad_k, d quad_bias; d lin_q = (dO / N) P^T;
     bidirectional also the own-chunk block's d lin_q / d lin_k, dQ's d lin_k and dQ's share of
     dv (float32 [B, Tp, E] through HBM to pass 2: dQ is only known going forwards).
  2. reverse chunk order, carrying dP (and, bidirectional, Q): dv = mix^T dO + lin_k dP (+ that
     share), d lin_k = v dP^T, then dP = [link] dP + ql^T (dO / N); bidirectional d lin_q's
     right-hand term (ql's gradient through Q).
  dv's quadratic term is computed in pass 2, not in pass 1 where the scores already are, so that
  causal dv is written once, in the input dtype, instead of going through HBM as a float32
  [B, Tp, E] intermediate; the price is recomputing the [C, C] scores (2 C^2 S flops per chunk
  and E tile: 2.5% of causal pass 2's matmul flops at C = 256, S = 128, tE = 2048; 9% at 512).
  Gradients of width S (d quad_q, d quad_k, d lin_q, d lin_k) and d quad_bias sum over E tiles:
  each E tile writes a float32 partial ([B, nE, Tp, S], [B, nE, C, C]) that the wrapper sums, so
  with nE = 1 (tE = E) nothing is duplicated, and with nE > 1 the partials cost nE [Tp, S] float32
  arrays per gradient and (nE - 1) recomputations of the scores.

Precision: scores, sums, states and all accumulations are float32; with bf16 inputs the big
matmuls take bf16 operands (the masked relu^2 weights, dS, the states P / Q / dP / dQ and dO / N
are cast to the input dtype just before their matmul), as jax's flash attention does with its
probabilities. float32 inputs use float32 operands throughout.

VMEM (`_vmem_estimate`): double-buffered blocks, the scratch states, and a model of the float32
temporaries that Mosaic keeps in VMEM (a model, not Mosaic's allocator). `vmem_limit_bytes` is
7/8 of the core's VMEM; `block_e=None` takes the largest tE dividing E whose estimate is within
3/4 of it (a margin for the model's error). Estimates at C = 256, S = 128, bf16, the largest of the
passes (MiB):
    tE              512    768   1024   1536   2048
    causal          6.3    7.9    9.8   13.5   17.3
    bidirectional   9.3   11.8   14.8   20.8   26.8
so v4 (16 MiB per core: 12 MiB budget) takes tE = 1024 (causal) / 512 (bidirectional) for
E = 2048 and 768 for E = 1536, and v5e (128 MiB) takes tE = E. Without a TPU attached (CPU,
`jax.export`) the default plans for v4.

What the tests prove and what they do not
-----------------------------------------
tests/test_pallas_tpu.py runs the kernels in Pallas interpret mode on a CPU against the XLA op and
a float64 dense reference (forward, all input gradients, quad_bias's), also under
`pltpu.InterpretParams` with two simulated cores and the race detector, and lowers them with
`jax.export(..., platforms=["tpu"])` at the paper's shapes, which checks block shapes and the
Pallas-to-Mosaic lowering of every operation. Not covered without a TPU: Mosaic's own compilation
(layouts, VMEM allocation against `vmem_limit_bytes`: only our estimate is checked), the speed,
and whether the kernel is MXU-bound; none of it has been measured.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from flash_jax import dispatch

_F32 = jnp.float32
_LANES = 128  # the TPU vector register is (8 sublanes, 128 lanes) of 32 bits
_SUBLANES = 8
_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b

_MIB = 1024 * 1024
_V4_VMEM_BYTES = 16 * _MIB  # the smallest VMEM of the chips we target: the default without a TPU
# VMEM per TensorCore by device kind (as jax's own table has it), for programs compiled for a TPU
# that is not attached (scripts/tpu_compile.py): Mosaic's compiler refuses a kernel over these.
VMEM_BYTES_BY_KIND = {
    "TPU v4": 16 * _MIB,
    "TPU v5 lite": 128 * _MIB,  # v5e
    "TPU v5": 64 * _MIB,  # v5p
    "TPU v6 lite": 128 * _MIB,  # v6e (Trillium)
}
_MAX_TABLE_BYTES = 256 * 1024  # scalar-prefetch tables live in SMEM (1 MiB per core from v4)

# Fields of the per-chunk table (`_chunk_tables`), each [B, G] int32.
_PREV_SEG = 0  # document carried in from the left: id of token gC - 1 (0 for chunk 0)
_PREV_CNT = 1  # its token count before chunk g
_LAST_SEG = 2  # id of the chunk's last token: its tokens in this chunk enter the left state
_LINK_FWD = 3  # 1 if that document continues from chunk g - 1 (the left state carries on)
_NEXT_SEG = 4  # document carried in from the right: id of token (g + 1)C (0 for the last chunk)
_NEXT_CNT = 5  # its token count from chunk g + 1 on
_FIRST_SEG = 6  # id of the chunk's first token: its tokens in this chunk enter the right state
_LINK_BWD = 7  # 1 if that document continues into chunk g + 1
_NUM_FIELDS = 8


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static description of one call: shapes, tiling, options (hashable, for custom_vjp)."""

    B: int
    G: int
    C: int
    S: int
    E: int
    block_e: int
    causal: bool
    vmem_limit_bytes: int
    interpret: Any

    @property
    def num_e(self):
        return self.E // self.block_e


# ---------------------------------------------------------------- public entry points ----


def mixed_chunk_attention_tpu(
    quad_q,
    quad_k,
    lin_q,
    lin_k,
    v,
    *,
    chunk_size: int,
    causal: bool,
    segment_ids=None,
    quad_bias=None,
    block_e: int | None = None,
    interpret=False,
    vmem_capacity_bytes: int | None = None,
):
    """`ops.mixed_chunk_attention` as Pallas TPU kernels (same arguments, same result).

    Args:
      quad_q, quad_k, lin_q, lin_k: `[B, T, S]`; v: `[B, T, E]`; all bf16 or all float32.
      chunk_size: C, a multiple of 128.
      causal: autoregressive (True) or bidirectional (False).
      segment_ids: int `[B, T]`, contiguous runs of equal ids, 0 = padding; None = one document.
      quad_bias: None or `[C, C]`.
      block_e: the E tile tE (a multiple of 128 dividing E); None = the largest that fits VMEM.
      interpret: False on a TPU; True or a `pltpu.InterpretParams` runs the kernels on a CPU.
      vmem_capacity_bytes: VMEM per core to plan for; None = the attached TPU's, else that of
        the kind of TPU the active mesh holds (an ahead-of-time compile), else v4's 16 MiB
        (CPU, `jax.export`).

    Returns:
      `[B, T, E]` in v's dtype; padding rows are exactly 0.

    Raises:
      ValueError: a malformed input, or a shape these kernels cannot serve (the reason named).
    """
    quad_q, quad_k, lin_q, lin_k, v = (jnp.asarray(x) for x in (quad_q, quad_k, lin_q, lin_k, v))
    segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
    quad_bias = None if quad_bias is None else jnp.asarray(quad_bias)
    reason = unsupported_reason(
        quad_q,
        quad_k,
        lin_q,
        lin_k,
        v,
        chunk_size=chunk_size,
        segment_ids=segment_ids,
        quad_bias=quad_bias,
        block_e=block_e,
        vmem_capacity_bytes=vmem_capacity_bytes,
        causal=causal,
    )
    if reason is not None:
        raise ValueError(reason)
    B, T, S = quad_q.shape
    E = v.shape[2]
    C = int(chunk_size)
    G = -(-T // C)
    capacity = _vmem_capacity(vmem_capacity_bytes)
    cfg = _Config(
        B=B,
        G=G,
        C=C,
        S=S,
        E=E,
        block_e=block_e or planned_block_e(C, S, E, v.dtype.itemsize, causal, capacity),
        causal=bool(causal),
        vmem_limit_bytes=_vmem_limit(capacity),
        interpret=interpret,
    )

    seg_BT = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids
    pad = G * C - T
    seg_BTp = jnp.pad(seg_BT.astype(jnp.int32), [(0, 0), (0, pad)])  # padding is segment 0
    seg_col = jax.lax.broadcast_in_dim(seg_BTp, (B, G * C, _LANES), (0, 1))
    seg_row = jax.lax.broadcast_in_dim(seg_BTp, (B, _SUBLANES, G * C), (0, 2))
    info = _chunk_tables(seg_BTp.reshape(B, G, C))
    bias_CC = jnp.zeros((C, C), _F32) if quad_bias is None else quad_bias.astype(_F32)

    def padded(x):
        return jnp.pad(x, [(0, 0), (0, pad), (0, 0)])

    out = _attend(
        cfg,
        *(padded(x) for x in (quad_q, quad_k, lin_q, lin_k, v)),
        bias_CC,
        seg_col,
        seg_row,
        info,
    )
    return out[:, :T]


def unsupported_reason(
    quad_q,
    quad_k,
    lin_q,
    lin_k,
    v,
    *,
    chunk_size,
    causal,
    segment_ids=None,
    quad_bias=None,
    block_e=None,
    vmem_capacity_bytes=None,
):
    """Why these kernels cannot serve the call, in one line; None when they can.

    Takes arrays or anything with `.shape` and `.dtype` (e.g. `jax.ShapeDtypeStruct`).
    """
    named = {"quad_q": quad_q, "quad_k": quad_k, "lin_q": lin_q, "lin_k": lin_k, "v": v}
    for name, x in named.items():
        if len(x.shape) != 3:
            width = "E" if name == "v" else "S"
            return f"{name} must have rank 3 [B, T, {width}], got shape {tuple(x.shape)}"
    B, T, E = v.shape
    S = quad_q.shape[2]
    for name, x in named.items():
        if name != "v" and tuple(x.shape) != (B, T, S):
            return f"{name} has shape {tuple(x.shape)}; expected [B, T, S] = {(B, T, S)}"
    dtypes = {jnp.dtype(x.dtype) for x in named.values()}
    if len(dtypes) != 1 or dtypes.pop() not in (jnp.dtype(jnp.bfloat16), jnp.dtype(_F32)):
        found = ", ".join(f"{n}={jnp.dtype(x.dtype).name}" for n, x in named.items())
        return f"the Pallas TPU kernel needs all inputs bfloat16 or all float32, got {found}"
    if not isinstance(chunk_size, numbers.Integral) or isinstance(chunk_size, bool):
        return f"chunk_size must be a positive integer, got {chunk_size!r}"
    C = int(chunk_size)
    if C <= 0 or C % _LANES:
        return f"the Pallas TPU kernel needs chunk_size to be a multiple of {_LANES}, got {C}"
    if S % _LANES:
        return f"the Pallas TPU kernel needs the query/key width S to be a multiple of 128, got {S}"
    if E % _LANES:
        return f"the Pallas TPU kernel needs the value width E to be a multiple of 128, got {E}"
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (B, T):
            return f"segment_ids must have shape [B, T] = {(B, T)}, got {tuple(segment_ids.shape)}"
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            return f"segment_ids must be integers, got dtype {jnp.dtype(segment_ids.dtype).name}"
    if quad_bias is not None and tuple(quad_bias.shape) != (C, C):
        return f"quad_bias must have shape [C, C] = {(C, C)}, got {tuple(quad_bias.shape)}"
    G = -(-T // C)
    if _NUM_FIELDS * B * G * 4 > _MAX_TABLE_BYTES:
        return (
            f"the Pallas TPU kernel's per-chunk tables ({_NUM_FIELDS} x B x G int32 in SMEM) "
            f"exceed {_MAX_TABLE_BYTES} bytes for B = {B}, G = {G}: split the batch"
        )
    capacity = _vmem_capacity(vmem_capacity_bytes)
    itemsize = jnp.dtype(v.dtype).itemsize
    if block_e is None:
        if _default_block_e(C, S, E, itemsize, causal, capacity) is None:
            return f"no E tile fits {capacity} bytes of VMEM for C = {C}, S = {S}"
    else:
        if not isinstance(block_e, numbers.Integral) or block_e <= 0 or block_e % _LANES:
            return f"block_e must be a positive multiple of 128, got {block_e!r}"
        if E % block_e:
            return f"block_e = {block_e} must divide E = {E}"
        need = _vmem_estimate(C, S, block_e, itemsize, causal)
        if need > _vmem_limit(capacity):
            return (
                f"block_e = {block_e} needs about {need / _MIB:.1f} MiB of VMEM, over the "
                f"{_vmem_limit(capacity) / _MIB:.1f} MiB limit of a {capacity / _MIB:.0f} MiB core"
            )
    return None


def supported(*args, **kwargs) -> bool:
    """True when `mixed_chunk_attention_tpu` can serve the call (see `unsupported_reason`)."""
    return unsupported_reason(*args, **kwargs) is None


# ---------------------------------------------------------------- VMEM planning ----


def _vmem_capacity(vmem_capacity_bytes):
    if vmem_capacity_bytes is not None:
        return int(vmem_capacity_bytes)
    if jax.default_backend() == "tpu":
        return pltpu.get_tpu_info().vmem_capacity_bytes
    # A program for TPU devices that are not attached (an ahead-of-time compile): their kind.
    device = dispatch.target_device()
    return VMEM_BYTES_BY_KIND.get(getattr(device, "device_kind", None), _V4_VMEM_BYTES)


def _vmem_limit(capacity):
    return capacity * 7 // 8  # an eighth left to Mosaic's internal scratch


def _vmem_estimate(C, S, tE, itemsize, causal):
    """Bytes of VMEM for the most demanding of the four passes (see the module docstring)."""
    cs, ce = C * S * itemsize, C * tE * itemsize  # input-dtype blocks
    segs_bias = C * _LANES * 4 + _SUBLANES * C * 4 + C * C * 4
    cc32, ce32, cs32, se32 = C * C * 4, C * tE * 4, C * S * 4, S * tE * 4
    extra = 0 if causal else 1  # the bidirectional passes carry and write one more of each
    passes = {
        # (double-buffered block bytes, scratch bytes, temporaries bytes)
        "forward": (
            4 * cs + 2 * ce + segs_bias + extra * ce32,
            se32,
            4 * cc32 + 3 * ce32 + 2 * se32,
        ),
        "backward, chunk order": (
            4 * cs + 2 * ce + segs_bias + (3 + extra) * cs32 + cc32 + extra * ce32,
            (1 + extra) * se32,
            (4 + 2 * extra) * cc32 + (2 + extra) * ce32 + (2 + 2 * extra) * se32,
        ),
        "backward, reverse order": (
            4 * cs + 3 * ce + segs_bias + (1 + extra) * cs32 + extra * ce32,
            (1 + extra) * se32,
            (3 + extra) * cc32 + (3 + extra) * ce32 + (2 + 2 * extra) * se32,
        ),
    }
    return max(2 * blocks + scratch + temps for blocks, scratch, temps in passes.values())


def planned_block_e(C, S, E, itemsize, causal, vmem_capacity_bytes=None):
    """The E tile `mixed_chunk_attention_tpu` takes when `block_e` is None (None if none fits),
    for `vmem_capacity_bytes` as that function reads it (None: the chip's)."""
    return _default_block_e(C, S, E, itemsize, causal, _vmem_capacity(vmem_capacity_bytes))


def _default_block_e(C, S, E, itemsize, causal, capacity):
    """The largest multiple of 128 dividing E whose VMEM estimate is within 3/4 of the core's
    VMEM (a margin for the estimate's own error); None if none is."""
    for tE in range(E, 0, -_LANES):
        if E % tE == 0 and _vmem_estimate(C, S, tE, itemsize, causal) <= capacity * 3 // 4:
            return tE
    return None


# ---------------------------------------------------------------- per-chunk tables ----


def _chunk_tables(seg_BGC):
    """The per-chunk scalars of the module docstring, flattened to [fields * B * G] int32.

    Follows the XLA path's link rule exactly: the left state of chunk g holds the tokens of the
    document of token gC - 1, linked over chunk boundaries while consecutive chunks end in the
    same id; the right state mirrors it with first tokens.
    """
    valid_BGC = seg_BGC != 0
    last_BG, first_BG = seg_BGC[:, :, -1], seg_BGC[:, :, 0]
    own_last_BG = jnp.sum((seg_BGC == last_BG[:, :, None]) & valid_BGC, axis=-1, dtype=jnp.int32)
    own_first_BG = jnp.sum((seg_BGC == first_BG[:, :, None]) & valid_BGC, axis=-1, dtype=jnp.int32)
    no_BG = jnp.zeros_like(last_BG[:, :1], dtype=bool)
    link_fwd_BG = jnp.concatenate([no_BG, last_BG[:, 1:] == last_BG[:, :-1]], axis=1)
    link_bwd_BG = jnp.concatenate([first_BG[:, :-1] == first_BG[:, 1:], no_BG], axis=1)
    cnt_fwd_BG = _linked_cumsum(link_fwd_BG, own_last_BG, reverse=False)
    cnt_bwd_BG = _linked_cumsum(link_bwd_BG, own_first_BG, reverse=True)

    def from_left(x_BG):  # x_{g-1}, 0 for chunk 0
        return jnp.pad(x_BG[:, :-1], [(0, 0), (1, 0)])

    def from_right(x_BG):  # x_{g+1}, 0 for the last chunk
        return jnp.pad(x_BG[:, 1:], [(0, 0), (0, 1)])

    fields = {
        _PREV_SEG: from_left(last_BG),
        _PREV_CNT: from_left(cnt_fwd_BG),
        _LAST_SEG: last_BG,
        _LINK_FWD: link_fwd_BG,
        _NEXT_SEG: from_right(first_BG),
        _NEXT_CNT: from_right(cnt_bwd_BG),
        _FIRST_SEG: first_BG,
        _LINK_BWD: link_bwd_BG,
    }
    return jnp.stack([fields[k].astype(jnp.int32) for k in range(_NUM_FIELDS)]).reshape(-1)


def _linked_cumsum(link_BG, x_BG, reverse):
    """y_g = [link_g] y_{g-1} + x_g along the chunk axis (from the right when reverse)."""

    def combine(earlier, later):
        link_a, y_a = earlier
        link_b, y_b = later
        return link_a & link_b, jnp.where(link_b, y_a, 0) + y_b

    _, y_BG = jax.lax.associative_scan(combine, (link_BG, x_BG), reverse=reverse, axis=1)
    return y_BG


# ---------------------------------------------------------------- custom VJP ----


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(cfg, qq, kq, ql, kl, v, bias, seg_col, seg_row, info):
    return _forward(cfg, qq, kq, ql, kl, v, bias, seg_col, seg_row, info)


def _attend_fwd(cfg, *args):
    return _forward(cfg, *args), args


def _attend_bwd(cfg, residuals, do):
    return (*_backward(cfg, *residuals, do), None, None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def _forward(cfg, qq, kq, ql, kl, v, bias, seg_col, seg_row, info):
    B, Tp, E = v.shape
    inputs = [("qq", qq), ("kq", kq), ("ql", ql), ("kl", kl), ("v", v)]
    inputs += [("seg_col", seg_col), ("seg_row", seg_row), ("bias", bias)]
    if not cfg.causal:
        nxt = _call(
            cfg,
            _right_state_kernel,
            reverse=True,
            inputs=[("ql", ql), ("kl", kl), ("v", v), ("seg_col", seg_col)],
            outputs=[("nxt", (B, Tp, E), _F32)],
            states=["right"],
            info=info,
        )["nxt"]
        inputs.append(("nxt", nxt))
    return _call(
        cfg,
        _forward_kernel,
        reverse=False,
        inputs=inputs,
        outputs=[("out", (B, Tp, E), v.dtype)],
        states=["left"],
        info=info,
    )["out"]


def _backward(cfg, qq, kq, ql, kl, v, bias, seg_col, seg_row, info, do):
    B, Tp, E = v.shape
    part_S = (B, cfg.num_e, Tp, cfg.S)  # per-E-tile float32 partials of the width-S gradients
    inputs = [("qq", qq), ("kq", kq), ("ql", ql), ("kl", kl), ("v", v), ("do", do)]
    inputs += [("seg_col", seg_col), ("seg_row", seg_row), ("bias", bias)]
    outputs = [("dqq", part_S, _F32), ("dkq", part_S, _F32), ("dql", part_S, _F32)]
    outputs.append(("dbias", (B, cfg.num_e, cfg.C, cfg.C), _F32))
    if not cfg.causal:
        outputs += [("dkl", part_S, _F32), ("dv_right", (B, Tp, E), _F32)]
    states = ["left"] if cfg.causal else ["left", "d_right"]
    first = _call(
        cfg,
        _backward_kernel,
        reverse=False,
        inputs=inputs,
        outputs=outputs,
        states=states,
        info=info,
    )
    outputs = [("dv", (B, Tp, E), v.dtype), ("dkl", part_S, _F32)]
    if not cfg.causal:
        inputs.append(("dv_right", first["dv_right"]))
        outputs.append(("dql", part_S, _F32))
    states = ["d_left"] if cfg.causal else ["d_left", "right"]
    second = _call(
        cfg, _reverse_kernel, reverse=True, inputs=inputs, outputs=outputs, states=states, info=info
    )

    def total(name, like):  # sum of the passes' and E tiles' partials
        parts = [p[name] for p in (first, second) if name in p]
        return sum(p.sum(axis=1) for p in parts).astype(like.dtype)

    dbias = first["dbias"].sum(axis=(0, 1))
    return (
        total("dqq", qq),
        total("dkq", kq),
        total("dql", ql),
        total("dkl", kl),
        second["dv"],
        dbias,
    )


# ---------------------------------------------------------------- pallas_call plumbing ----


def _call(cfg, body, *, reverse, inputs, outputs, states, info):
    """One pallas_call on the grid (B, nE, G); refs reach `body` as a dict by name.

    Its cost estimate: the blocks the grid moves (`_fetched_bytes`) and the body's matmul FLOPs
    per grid step (`_STEP_MATMULS`) times the steps.

    reverse: the chunk axis runs from the last chunk to the first (index maps read G - 1 - g).
    states: names of the carried [S, tE] float32 VMEM scratch states, zeroed at the first chunk.
    """
    C, S, tE, G = cfg.C, cfg.S, cfg.block_e, cfg.G

    def chunk(g):
        return G - 1 - g if reverse else g

    def spec(name, shape):
        if name in ("qq", "kq", "ql", "kl"):
            return pl.BlockSpec((None, C, S), lambda b, e, g, _: (b, chunk(g), 0))
        if name == "seg_col":
            return pl.BlockSpec((None, C, _LANES), lambda b, e, g, _: (b, chunk(g), 0))
        if name == "seg_row":
            return pl.BlockSpec((None, _SUBLANES, C), lambda b, e, g, _: (b, 0, chunk(g)))
        if name == "bias":
            return pl.BlockSpec((C, C), lambda b, e, g, _: (0, 0))
        if name == "dbias":  # accumulated over the chunk axis: the same block at every step
            return pl.BlockSpec((None, None, C, C), lambda b, e, g, _: (b, e, 0, 0))
        if len(shape) == 4:  # [B, nE, Tp, S] partials of the width-S gradients
            return pl.BlockSpec((None, None, C, S), lambda b, e, g, _: (b, e, chunk(g), 0))
        return pl.BlockSpec((None, C, tE), lambda b, e, g, _: (b, chunk(g), e))  # [B, Tp, E]

    names = ["info"] + [n for n, _ in inputs] + [n for n, *_ in outputs] + list(states)

    def kernel(*refs):
        refs = dict(zip(names, refs, strict=True))

        @pl.when(pl.program_id(2) == 0)
        def _():
            for name in states:
                refs[name][...] = jnp.zeros_like(refs[name])

        body(cfg, refs, chunk(pl.program_id(2)))

    grid = (cfg.B, cfg.num_e, G)
    in_specs = [spec(n, x.shape) for n, x in inputs]
    out_specs = [spec(n, shape) for n, shape, _ in outputs]
    blocks = [(sp, x.dtype) for sp, (_, x) in zip(in_specs, inputs, strict=True)]
    blocks += [(sp, dtype) for sp, (_, _, dtype) in zip(out_specs, outputs, strict=True)]
    results = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((S, tE), _F32) for _ in states],
        ),
        cost_estimate=pl.CostEstimate(
            flops=_step_flops(cfg, body) * math.prod(grid),
            transcendentals=0,
            bytes_accessed=_fetched_bytes(grid, blocks),
        ),
        out_shape=[jax.ShapeDtypeStruct(shape, dtype) for _, shape, dtype in outputs],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=cfg.vmem_limit_bytes,
        ),
        interpret=cfg.interpret,
        name=f"flash_mixed_chunk_{body.__name__.strip('_')}",
    )(info, *(x for _, x in inputs))
    return dict(zip([n for n, *_ in outputs], results, strict=True))


# Each body's matmuls per grid step (one chunk, one E tile), as counts of three shapes: "qk" a
# [C, S] x [S, C] product (2 C^2 S FLOPs: scores and their gradients), "mv" a [C, C] x [C, tE]
# one (2 C^2 tE: the mix times v and its transposes), "st" a [C, S] x [C, tE] one (2 C S tE:
# states, their folds and their gradients); the second entry is what bidirectional adds.
_STEP_MATMULS = {
    "_forward_kernel": ({"qk": 1, "mv": 1, "st": 2}, {"qk": 1}),
    "_right_state_kernel": ({"st": 2}, {}),
    "_backward_kernel": ({"qk": 3, "mv": 1, "st": 2}, {"qk": 2, "st": 3}),
    "_reverse_kernel": ({"qk": 1, "mv": 1, "st": 3}, {"qk": 1, "st": 2}),
}


def _step_flops(cfg, body) -> int:
    """Matmul FLOPs of one grid step of `body` (`_STEP_MATMULS`)."""
    C, S, tE = cfg.C, cfg.S, cfg.block_e
    size = {"qk": 2 * C * C * S, "mv": 2 * C * C * tE, "st": 2 * C * S * tE}
    always, bidirectional = _STEP_MATMULS[body.__name__]
    counts = dict(always)
    if not cfg.causal:
        for shape, n in bidirectional.items():
            counts[shape] = counts.get(shape, 0) + n
    return sum(n * size[shape] for shape, n in counts.items())


def _fetched_bytes(grid, blocks) -> int:
    """The HBM traffic of a pallas_call's blocks over `grid` (steps in order, the last axis
    fastest): a block moves whenever its index differs from the step before's, as Mosaic's
    pipeline fetches an input and writes back an output. `blocks`: (BlockSpec, dtype) pairs.
    This is the call's `pl.CostEstimate`'s bytes (XLA's cost analysis counts nothing of a Mosaic
    call without one)."""
    total = 0
    for block_spec, dtype in blocks:
        shape = [d if isinstance(d, int) else 1 for d in block_spec.block_shape]  # squeezed: 1
        block_bytes = math.prod(shape) * jnp.dtype(dtype).itemsize
        moves, last = 0, None
        for step in itertools.product(*(range(n) for n in grid)):
            index = tuple(block_spec.index_map(*step, None))
            moves += index != last
            last = index
        total += moves * block_bytes
    return total


# ---------------------------------------------------------------- in-kernel helpers ----


class _Chunk:
    """What a grid step knows about its chunk: per-chunk scalars and per-token flags [C, 128]."""

    def __init__(self, cfg, refs, chunk):
        b = pl.program_id(0)
        self.cfg = cfg
        self.info = lambda field: refs["info"][(field * cfg.B + b) * cfg.G + chunk]
        self.seg = refs["seg_col"][...]  # [C, 128]: each row holds its token's id in every lane

    def member(self, field, width=_LANES):
        """[C, width] bool: the token belongs to the (non-padding) document named by `field`.

        Masks are built at their final width from the int32 ids (tiled as jax's flash attention
        tiles its segment ids), never by tiling a boolean array.
        """
        seg = _lanes(self.seg, width)
        return (seg == self.info(field)) & (seg != 0)

    def same_segment(self, seg_row_ref):
        """[C, C] bool: same non-padding document (within the chunk)."""
        seg_CC = _lanes(self.seg, self.cfg.C)
        return (seg_CC == seg_row_ref[:1, :]) & (seg_CC != 0)

    def mean_weights(self, same_CC=None):
        """1/N_i for the tokens that take the left (a_prev) and right (a_next) states, [C, 128].

        N_i counts the tokens of i's document that its linear part covers (0 gives weight 0 and
        no 0/0): the left state's count when it continues i's document, bidirectional also the
        right state's and i's own chunk's.
        """
        use_prev = self.member(_PREV_SEG)
        count = jnp.where(use_prev, self.info(_PREV_CNT), 0)
        if self.cfg.causal:
            inv = 1.0 / jnp.maximum(count.astype(_F32), 1.0)
            return jnp.where(use_prev, inv, 0.0), None, None
        use_next = self.member(_NEXT_SEG)
        count = count + jnp.where(use_next, self.info(_NEXT_CNT), 0)
        own_C = jnp.sum(same_CC.astype(_F32), axis=1)
        count = count.astype(_F32) + jax.lax.broadcast_in_dim(own_C, count.shape, (0,))
        inv = 1.0 / jnp.maximum(count, 1.0)
        return jnp.where(use_prev, inv, 0.0), jnp.where(use_next, inv, 0.0), inv

    def fold(self, state_ref, link_field, take_field, keys, values):
        """state = [link] state + keys[tokens of `take_field`'s document]^T values (float32)."""
        # Selected in float32 (exact), as v4's vector unit has no bf16 arithmetic.
        take = self.member(take_field, keys.shape[1])
        keys = jnp.where(take, keys.astype(_F32), 0.0).astype(keys.dtype)
        update = jax.lax.dot_general(keys, values, _TN, preferred_element_type=_F32)

        @pl.when(self.info(link_field) == 0)
        def _():
            state_ref[...] = jnp.zeros_like(state_ref)

        state_ref[...] += update


def _lanes(x_C128, width):
    """[C, 128] lane-replicated -> [C, width] (width a multiple of 128)."""
    return x_C128 if width == _LANES else jnp.tile(x_C128, (1, width // _LANES))


def _dot(a, b, dims=_NN):
    return jax.lax.dot_general(a, b, dims, preferred_element_type=_F32)


def _relu_scores(cfg, refs, same_CC):
    """relu(qq kq^T / C + bias), 0 outside the quadratic mask: [C, C] float32."""
    scores = _dot(refs["qq"][...], refs["kq"][...], _NT) / cfg.C + refs["bias"][...]
    mask = same_CC
    if cfg.causal:
        row = jax.lax.broadcasted_iota(jnp.int32, (cfg.C, cfg.C), 0)
        col = jax.lax.broadcasted_iota(jnp.int32, (cfg.C, cfg.C), 1)
        mask = mask & (col <= row)
    return jnp.where(mask, jnp.maximum(scores, 0.0), 0.0)


def _mix(cfg, refs, relu_CC, same_CC, inv_C128):
    """The [C, C] matrix that multiplies v: relu^2 weights, plus bidirectionally the own chunk's
    linear block ql kl^T / N_i on the same document."""
    mix = relu_CC * relu_CC
    if not cfg.causal:
        own = _dot(refs["ql"][...], refs["kl"][...], _NT)
        mix = mix + jnp.where(same_CC, own, 0.0) * _lanes(inv_C128, cfg.C)
    return mix


# ---------------------------------------------------------------- kernel bodies ----


def _right_state_kernel(cfg, refs, chunk):
    """Bidirectional forward, reverse chunk order: nxt_i = [i continues Q's doc] ql_i Q_{g+1}."""
    ck = _Chunk(cfg, refs, chunk)
    ql, dt = refs["ql"][...], refs["v"].dtype
    use_next = ck.member(_NEXT_SEG, cfg.block_e)
    refs["nxt"][...] = jnp.where(use_next, _dot(ql, refs["right"][...].astype(dt)), 0.0)
    ck.fold(refs["right"], _LINK_BWD, _FIRST_SEG, refs["kl"][...], refs["v"][...])


def _forward_kernel(cfg, refs, chunk):
    """Forward, chunk order: the output block of one chunk and E tile."""
    ck = _Chunk(cfg, refs, chunk)
    ql, v, dt = refs["ql"][...], refs["v"][...], refs["v"].dtype
    same = ck.same_segment(refs["seg_row"])
    a_prev, _, inv = ck.mean_weights(same)
    mix = _mix(cfg, refs, _relu_scores(cfg, refs, same), same, inv)
    out = _dot(mix.astype(dt), v)
    lin = _dot(ql, refs["left"][...].astype(dt)) * _lanes(a_prev, cfg.block_e)
    if not cfg.causal:
        lin = lin + refs["nxt"][...] * _lanes(inv, cfg.block_e)
    refs["out"][...] = (out + lin).astype(refs["out"].dtype)
    ck.fold(refs["left"], _LINK_FWD, _LAST_SEG, refs["kl"][...], v)


def _backward_kernel(cfg, refs, chunk):
    """Backward, chunk order: the query-side gradients (and bidirectionally dQ's terms)."""

    @pl.when(pl.program_id(2) == 0)
    def _():
        refs["dbias"][...] = jnp.zeros_like(refs["dbias"])

    ck = _Chunk(cfg, refs, chunk)
    qq, kq, ql, kl = (refs[n][...] for n in ("qq", "kq", "ql", "kl"))
    v, do, dt = refs["v"][...], refs["do"][...], refs["v"].dtype
    same = ck.same_segment(refs["seg_row"])
    a_prev, a_next, inv = ck.mean_weights(same)
    relu = _relu_scores(cfg, refs, same)
    d_mix = _dot(do, v, _NT)  # [C, C]: the cotangent of the matrix that multiplies v
    d_scores = d_mix * (2.0 * relu)  # relu is 0 outside the mask
    refs["dbias"][...] += d_scores
    d_scores = d_scores.astype(dt)
    refs["dqq"][...] = _dot(d_scores, kq) / cfg.C
    refs["dkq"][...] = _dot(d_scores, qq, _TN) / cfg.C
    do_prev = (do * _lanes(a_prev, cfg.block_e)).astype(dt)
    dql = _dot(do_prev, refs["left"][...].astype(dt), _NT)
    if not cfg.causal:
        d_own = (jnp.where(same, d_mix, 0.0) * _lanes(inv, cfg.C)).astype(dt)
        dql = dql + _dot(d_own, kl)
        d_right = refs["d_right"][...].astype(dt)  # dL/dQ_g, complete once chunk g-1 is done
        take = ck.member(_FIRST_SEG, cfg.block_e)
        refs["dv_right"][...] = jnp.where(take, _dot(kl, d_right), 0.0)
        take = ck.member(_FIRST_SEG, cfg.S)
        refs["dkl"][...] = _dot(d_own, ql, _TN) + jnp.where(take, _dot(v, d_right, _NT), 0.0)
        do_next = (do * _lanes(a_next, cfg.block_e)).astype(dt)
        # dQ_{g+1} = [link] dQ_g + ql^T (dO / N) over the tokens that read Q_{g+1}.
        ck.fold(refs["d_right"], _LINK_BWD, _NEXT_SEG, ql, do_next)
    refs["dql"][...] = dql
    ck.fold(refs["left"], _LINK_FWD, _LAST_SEG, kl, v)


def _reverse_kernel(cfg, refs, chunk):
    """Backward, reverse chunk order: dv and the key-side gradients of the linear part."""
    ck = _Chunk(cfg, refs, chunk)
    ql, kl = refs["ql"][...], refs["kl"][...]
    v, do, dt = refs["v"][...], refs["do"][...], refs["v"].dtype
    same = ck.same_segment(refs["seg_row"])
    a_prev, a_next, inv = ck.mean_weights(same)
    mix = _mix(cfg, refs, _relu_scores(cfg, refs, same), same, inv)
    d_left = refs["d_left"][...].astype(dt)  # dL/dP_g: complete once chunks after g are done
    take = ck.member(_LAST_SEG, cfg.block_e)
    dv = _dot(mix.astype(dt), do, _TN) + jnp.where(take, _dot(kl, d_left), 0.0)
    take = ck.member(_LAST_SEG, cfg.S)
    refs["dkl"][...] = jnp.where(take, _dot(v, d_left, _NT), 0.0)
    if not cfg.causal:
        dv = dv + refs["dv_right"][...]
        do_next = (do * _lanes(a_next, cfg.block_e)).astype(dt)
        refs["dql"][...] = _dot(do_next, refs["right"][...].astype(dt), _NT)
        ck.fold(refs["right"], _LINK_BWD, _FIRST_SEG, kl, v)
    refs["dv"][...] = dv.astype(refs["dv"].dtype)
    # dP_{g-1} = [link] dP_g + ql^T (dO / N) over the tokens that read P_{g-1}.
    do_prev = (do * _lanes(a_prev, cfg.block_e)).astype(dt)
    ck.fold(refs["d_left"], _LINK_FWD, _PREV_SEG, ql, do_prev)
