"""FLASH mixed chunk attention as Pallas kernels for NVIDIA Hopper GPUs (Mosaic GPU), fwd + bwd.

Computes exactly `ops.mixed_chunk_attention`'s contract (see its docstring and
docs/model.md): causal and bidirectional, token-exact `segment_ids` with the XLA path's
cross-chunk link rule, padding rows exactly 0, `quad_bias` [C, C], T padded up to G * C here.

Backend: Pallas Mosaic GPU (`jax.experimental.pallas.mosaic_gpu`, "plgpu"), not Triton: the
Triton backend is deprecated from jax 0.11 and Mosaic GPU is what Hopper-class kernels target
(TMA copies, wgmma). The kernels use the Warpgroup lowering semantics (layouts inferred, the
default from jax 0.11; set explicitly so jax 0.10.2 lowers them the same way) and only APIs
present in jax 0.10.2 and 0.11.x.

Design (no online softmax: squared-ReLU scores are not normalised, so a query block needs only its
own chunk). G = T / C chunks; K' = S (causal) or 2S (bidirectional).

- XLA, outside the kernels: per chunk h the state A_h = sum of k_lin v^T over the tokens of the
  document of h's last token (and, bidirectional, B_h for its first token); the prefix over chunks
  of the same document by one masked [G, G] matmul (the XLA path's link rule,
  `state_passing.chunk_links`: chunk g continues chunk g-1's document iff their last tokens share
  a segment id). The cross-chunk state of chunk g is X_g = [P_{g-1}; Q_{g+1}] in bf16, [K', E];
  each query's lin_q is masked to the states its document continues (`qlx`, [C, K']), and
  1 / N_i (N_i the number of tokens its linear part averages) is the links' `norm_BGC`.
- Forward kernel, one program per (query block, chunk, batch): for each block of keys, scores
  s = qq kq^T / C + bias in float32, W = relu(s)^2 * mask (+ the bidirectional in-chunk linear
  block), stored in shared memory as bf16 [bq, C]; then, streaming E tiles of v and X through a
  double-buffered TMA pipeline, out = (qlx X + (W N) v) / N with float32 accumulators (W is scaled
  by N before the bf16 rounding so that one accumulator serves both terms: bf16 rounding is
  relative, so this adds no error).
- Backward: the query-side kernel (per query block: dW = dO v^T over all E tiles, then
  d quad_q = (dW * mask * 2 relu(s)) kq / C and, bidirectional, the in-chunk d lin_q; the bias
  gradient is written per chunk and summed by XLA); the key-side kernel (per key block, in the
  transposed orientation: d quad_k, the in-chunk d lin_k, and dv = Mix^T dO + klx dA, fusing the
  states' share of dv); XLA for the states' backward (dX = qlx^T dO / N, the [G, G] prefix
  transposed, d lin_k's state share = v dA^T).

Precision: the kernels' matmul operands are bf16 (float32 inputs are rounded to bf16 first: an
f32 wgmma is TF32 and needs K-major operands, which the transposed blocks here are not);
accumulation, scores, masks, counts and the states' sums are float32. The result and the
gradients are cast to the inputs' dtype.

Interpret mode (`interpret=True`) runs the same kernel bodies on a CPU through Mosaic GPU's
interpreter (`InterpretGPUParams`, a private class in jax 0.10.2 / 0.11: imported only then). That
interpreter does not implement transposed shared-memory operands (`plgpu.transpose_ref`), so in
interpret mode the wrapper passes those operands (k^T, q^T, v^T, dO^T) transposed by XLA and the
kernels read them as they are (`_Config.pre_t`); every other line of the kernels is the one that
runs on the GPU. (On a GPU that layout does not fit the key-side kernel's shared memory.)

Block sizes: `block_q` (query rows per program, and key rows per key-side program; a multiple of
64 that divides C), `block_k` (key sub-block of the score computation, multiple of 64 dividing C),
`block_e` (E tile streamed per pipeline step, multiple of 64 dividing E). Shared memory at the
paper's shapes (S = 128, C = 256, E = 2048 or 1536) fits with the defaults (64, 64, 64).

Known costs left for tuning on hardware: causal blocks above the diagonal are computed and masked
(not skipped); one warpgroup per program (no warp specialisation); every query block re-reads its
chunk's v (from L2 when the blocks of a chunk run together); the bias gradient writes a float32
[C, C] block per chunk; the states' backward reads dO and v again in XLA.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from flash_jax.ops import state_passing

_F32 = jnp.float32
_BF16 = jnp.bfloat16
_MIN_BLOCK = 64  # wgmma row granularity and the 128-byte swizzle width of bf16 operands


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static parameters of one kernel family instance (hashable: a custom_vjp nondiff arg)."""

    chunk: int  # C
    causal: bool
    has_bias: bool
    block_q: int
    block_k: int
    block_e: int
    pre_t: bool  # transposed operands come pre-transposed from XLA (interpret mode)
    interpret: bool

    @property
    def nk(self):
        return self.chunk // self.block_k


def mixed_chunk_attention_gpu(
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
    interpret: bool = False,
    block_q: int = 64,
    block_k: int = 64,
    block_e: int = 64,
):
    """`ops.mixed_chunk_attention` as Mosaic GPU kernels (Hopper), differentiable.

    Same arguments and result as `ops.mixed_chunk_attention`, plus:
      interpret: run the kernels on a CPU with Mosaic GPU's interpreter (tests).
      block_q, block_k, block_e: block sizes (see the module docstring).

    Raises:
      ValueError: bad inputs (as the XLA op) or a shape these kernels cannot serve, naming why.
    """
    quad_q, quad_k, lin_q, lin_k, v = (jnp.asarray(x) for x in (quad_q, quad_k, lin_q, lin_k, v))
    B, T, C = _check_inputs(quad_q, quad_k, lin_q, lin_k, v, chunk_size, segment_ids, quad_bias)
    check_supported(
        S=quad_q.shape[2],
        E=v.shape[2],
        chunk_size=C,
        dtype=v.dtype,
        block_q=block_q,
        block_k=block_k,
        block_e=block_e,
    )
    cfg = _Config(
        chunk=C,
        causal=bool(causal),
        has_bias=quad_bias is not None,
        block_q=block_q,
        block_k=block_k,
        block_e=block_e,
        pre_t=bool(interpret),
        interpret=bool(interpret),
    )
    seg_BT = jnp.ones((B, T), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids)
    bias_CC = jnp.zeros((C, C), _F32) if quad_bias is None else jnp.asarray(quad_bias, _F32)
    return _attention(quad_q, quad_k, lin_q, lin_k, v, bias_CC, seg_BT.astype(jnp.int32), cfg)


def check_supported(*, S, E, chunk_size, dtype, block_q=64, block_k=64, block_e=64):
    """Raises ValueError naming the first reason these kernels cannot serve a shape."""
    C = chunk_size
    if jnp.dtype(dtype) not in (jnp.dtype(_BF16), jnp.dtype(_F32)):
        raise ValueError(f"pallas_gpu serves bfloat16 or float32 inputs, got {jnp.dtype(dtype)}")
    for name, block in (("block_q", block_q), ("block_k", block_k), ("block_e", block_e)):
        if not isinstance(block, int) or block <= 0 or block % _MIN_BLOCK:
            raise ValueError(f"pallas_gpu: {name} must be a positive multiple of 64, got {block!r}")
    if S % _MIN_BLOCK:
        raise ValueError(f"pallas_gpu: the query/key width S must be a multiple of 64, got {S}")
    if C % block_q or C % block_k:
        raise ValueError(
            f"pallas_gpu: chunk_size {C} must be a multiple of block_q {block_q} and "
            f"block_k {block_k} (so at least 64)"
        )
    if C > 256:
        raise ValueError(f"pallas_gpu: chunk_size must be at most 256 (one TMA box), got {C}")
    if S > 128:
        raise ValueError(f"pallas_gpu: the query/key width S must be at most 128, got {S}")
    if E % block_e:
        raise ValueError(
            f"pallas_gpu: the value width E = {E} must be a multiple of block_e {block_e}"
        )


def _check_inputs(quad_q, quad_k, lin_q, lin_k, v, chunk_size, segment_ids, quad_bias):
    """The XLA op's input checks (one line per problem), returning B, T, C."""
    if not isinstance(chunk_size, numbers.Integral) or isinstance(chunk_size, bool):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    C = int(chunk_size)
    named = {"quad_q": quad_q, "quad_k": quad_k, "lin_q": lin_q, "lin_k": lin_k, "v": v}
    for name, x in named.items():
        if x.ndim != 3:
            raise ValueError(f"{name} must have rank 3, got shape {x.shape}")
    B, T = v.shape[:2]
    S = quad_q.shape[2]
    for name, x in named.items():
        if name != "v" and x.shape != (B, T, S):
            raise ValueError(f"{name} must have shape [B, T, S] = {(B, T, S)}, got {x.shape}")
    if len({x.dtype for x in named.values()}) != 1:
        raise ValueError("quad_q, quad_k, lin_q, lin_k and v must have one dtype")
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
        if segment_ids.shape != (B, T):
            raise ValueError(
                f"segment_ids must have shape [B, T] = {(B, T)}, got {segment_ids.shape}"
            )
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be integers, got dtype {segment_ids.dtype}")
    if quad_bias is not None and jnp.shape(quad_bias) != (C, C):
        raise ValueError(
            f"quad_bias must have shape [C, C] = {(C, C)} (C = chunk_size), "
            f"got {jnp.shape(quad_bias)}"
        )
    return B, T, C


# ---------------------------------------------------------------- XLA: the states ----


def _states(links, kl_BGCS, v_BGCE):
    """X [B, G, K', E] (float32): per direction d, the sum over the chunks h linked to chunk g
    (`link_BDGH[:, d]`) of the per-chunk sums A[h, d] of kl v^T over `member_BGCD[..., d]`,
    stacked along K' (P_{g-1}, and bidirectional Q_{g+1})."""
    parts = []
    for d in range(links.link_BDGH.shape[1]):
        own_BHSE = jnp.einsum(
            "bhcs,bhce->bhse",
            jnp.where(links.member_BGCD[..., d, None], kl_BGCS, 0),
            v_BGCE,
            preferred_element_type=_F32,
        )
        parts.append(jnp.einsum("bgh,bhse->bgse", links.link_BDGH[:, d].astype(_F32), own_BHSE))
    return jnp.concatenate(parts, axis=2)


def _masked_pair(x_BGCS, mask_BGCD):
    """[x where mask[..., d]] for each direction d, stacked along the last axis."""
    parts = [jnp.where(mask_BGCD[..., d, None], x_BGCS, 0) for d in range(mask_BGCD.shape[-1])]
    return jnp.concatenate(parts, axis=-1)


# ---------------------------------------------------------------- custom_vjp ----


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(qq, kq, ql, kl, v, bias_CC, seg_BT, cfg):
    return _attention_fwd(qq, kq, ql, kl, v, bias_CC, seg_BT, cfg)[0]


def _attention_fwd(qq, kq, ql, kl, v, bias_CC, seg_BT, cfg):
    B, T, _ = qq.shape
    C = cfg.chunk
    G = -(-T // C)

    def chunked(x):  # [B, T, ...] -> [B, G, C, ...], zero padding (= segment 0)
        x = jnp.pad(x, [(0, 0), (0, G * C - T)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape((B, G, C) + x.shape[2:])

    seg_BGC = chunked(seg_BT)
    links = state_passing.chunk_links(seg_BGC, cfg.causal)
    # Matmul operands in bf16 (see the module docstring); the states' sums from them in float32.
    qq_, kq_, ql_, kl_, v_ = (chunked(x).astype(_BF16) for x in (qq, kq, ql, kl, v))
    x_BGKE = _states(links, kl_, v_).astype(_BF16)
    qlx_BGCK = _masked_pair(ql_, links.use_BGCD)
    out_BGCE = _forward_kernel(
        cfg, qq_, kq_, ql_, kl_, qlx_BGCK, x_BGKE, v_, seg_BGC, links.norm_BGC, bias_CC, v.dtype
    )
    out_BTE = out_BGCE.reshape(B, G * C, -1)[:, :T]
    res = (qq_, kq_, ql_, kl_, v_, qlx_BGCK, x_BGKE, seg_BGC, links, bias_CC)
    return out_BTE, res


def _attention_bwd(cfg, res, dout_BTE):
    qq_, kq_, ql_, kl_, v_, qlx_BGCK, x_BGKE, seg_BGC, links, bias_CC = res
    B, G, C, S = qq_.shape
    T, in_dtype = dout_BTE.shape[1], dout_BTE.dtype  # all inputs share v's dtype
    dout_BGCE = jnp.pad(dout_BTE, [(0, 0), (0, G * C - T), (0, 0)]).reshape(B, G, C, -1)
    do_ = dout_BGCE.astype(_BF16)
    norm_BGC = links.norm_BGC

    # XLA: the cross-chunk part, out += norm * (qlx X).
    dqlx_BGCK = norm_BGC[..., None] * jnp.einsum(
        "bgce,bgke->bgck", do_, x_BGKE, preferred_element_type=_F32
    )
    dx_BGKE = jnp.einsum(
        "bgck,bgce->bgke",
        (qlx_BGCK * norm_BGC[..., None]).astype(_BF16),
        do_,
        preferred_element_type=_F32,
    )
    # Through the prefix: d own-chunk state h = sum_g link[g, h] dX_g.
    directions = range(links.link_BDGH.shape[1])
    dstate_BGKE = jnp.concatenate(
        [
            jnp.einsum(
                "bgh,bgse->bhse",
                links.link_BDGH[:, d].astype(_F32),
                dx_BGKE[:, :, d * S : (d + 1) * S],
            )
            for d in directions
        ],
        axis=2,
    ).astype(_BF16)
    dkl_state = jnp.einsum("bgce,bgke->bgck", v_, dstate_BGKE, preferred_element_type=_F32)
    dkl_BGCS = sum(
        jnp.where(links.member_BGCD[..., d, None], dkl_state[..., d * S : (d + 1) * S], 0.0)
        for d in directions
    )
    dql_BGCS = sum(
        jnp.where(links.use_BGCD[..., d, None], dqlx_BGCK[..., d * S : (d + 1) * S], 0.0)
        for d in directions
    )
    klx_BGCK = _masked_pair(kl_, links.member_BGCD)

    # Kernels: the in-chunk blocks (and dv's state share, klx dstate, fused).
    dqq_BGCS, dql_blk, dbias_parts = _dq_kernel(
        cfg, qq_, kq_, ql_, kl_, v_, do_, seg_BGC, norm_BGC, bias_CC
    )
    dkq_BGCS, dkl_blk, dv_BGCE = _dkv_kernel(
        cfg,
        qq_,
        kq_,
        ql_,
        kl_,
        v_,
        do_,
        klx_BGCK,
        dstate_BGKE,
        seg_BGC,
        norm_BGC,
        bias_CC,
        in_dtype,
    )
    if not cfg.causal:
        dql_BGCS = dql_BGCS + dql_blk
        dkl_BGCS = dkl_BGCS + dkl_blk

    def unchunked(x_BGCX):
        return x_BGCX.reshape(B, G * C, -1)[:, :T].astype(in_dtype)

    dbias_CC = jnp.sum(dbias_parts, axis=(0, 1)) if cfg.has_bias else jnp.zeros_like(bias_CC)
    grads = (dqq_BGCS, dkq_BGCS, dql_BGCS, dkl_BGCS, dv_BGCE)
    return (*(unchunked(x) for x in grads), dbias_CC, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


# ---------------------------------------------------------------- kernel building blocks ----


def _operand(shape):
    """Shared memory for a bf16 wgmma operand: (8, 64) tiles with the 128-byte swizzle."""
    return plgpu.SMEM(
        shape, _BF16, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    )


def _smem(shape, dtype):
    return _operand(shape) if jnp.dtype(dtype) == jnp.dtype(_BF16) else plgpu.SMEM(shape, dtype)


def _barriers(n=2):
    return plgpu.Barrier(num_barriers=n)


def _matmul(a, b, shape):
    """a @ b from shared memory into a fresh float32 accumulator, returned as a value."""

    def body(acc):
        plgpu.wgmma(acc, a, b)
        return acc[...]

    return pl.run_scoped(body, plgpu.ACC(shape, _F32))


def _load_now(pairs, barriers):
    """Copies [(gmem, smem)] with one barrier each and waits for all of them."""
    for i, (src, dst) in enumerate(pairs):
        plgpu.copy_gmem_to_smem(src, dst, barriers.at[i])
    for i in range(len(pairs)):
        plgpu.barrier_wait(barriers.at[i])


def _static_pipeline(n, sources, buffers, barriers, compute):
    """for j in range(n): compute(j, slot), buffers[k][slot] holding sources(j)[k].

    Two slots: block j + 1 is copied while block j is computed. `compute` must have finished
    reading its slot when it returns (it reads SMEM into registers and awaits its wgmmas).
    """

    def load(j):
        for src, buf, bar in zip(sources(j), buffers, barriers, strict=True):
            plgpu.copy_gmem_to_smem(src, buf.at[j % 2], bar.at[j % 2])

    load(0)
    for j in range(n):
        if j + 1 < n:
            load(j + 1)
        for bar in barriers:
            plgpu.barrier_wait(bar.at[j % 2])
        compute(j, j % 2)


def _loop_pipeline(n, sources, buffers, barriers, compute):
    """The same over a traced loop index e (the E tiles): compute(e, slot), slot = e % 2."""

    def load(e, slot):
        for src, buf, bar in zip(sources(e), buffers, barriers, strict=True):
            plgpu.copy_gmem_to_smem(src, buf.at[slot], bar.at[slot])

    load(0, 0)
    if n > 1:
        load(1, 1)

    def step(e, carry):
        slot = lax.rem(e, 2)
        for bar in barriers:
            plgpu.barrier_wait(bar.at[slot])
        compute(e, slot)

        @pl.when(e + 2 < n)
        def _():
            load(e + 2, slot)

        return carry

    lax.fori_loop(0, n, step, 0)


def _masks(cfg, rows_seg, cols_seg, row0, col0, shape, rows_are_keys):
    """(same non-zero segment, quadratic mask) for a [rows, cols] block of a chunk."""
    r_seg = lax.broadcast_in_dim(rows_seg, shape, [0])
    c_seg = lax.broadcast_in_dim(cols_seg, shape, [1])
    same = (r_seg == c_seg) & (r_seg != 0)
    if not cfg.causal:
        return same, same
    r_pos = lax.broadcasted_iota(jnp.int32, shape, 0) + row0
    c_pos = lax.broadcasted_iota(jnp.int32, shape, 1) + col0
    keep = (r_pos <= c_pos) if rows_are_keys else (c_pos <= r_pos)  # the diagonal is kept
    return same, same & keep


def _columns(x, start, size):
    """x[:, start:start + size] (strides=None: the Warpgroup lowering rejects explicit strides)."""
    return lax.slice(x, (0, start), (x.shape[0], start + size))


def _kernel(cfg, body, out_type, grid, *args):
    kwargs = {}
    if cfg.interpret:
        # Private in jax 0.10.2 / 0.11 (no public alias yet); needed only to interpret on a CPU.
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        kwargs["interpret"] = InterpretGPUParams()
    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=grid,
        grid_names=("q", "g", "b"),  # q fastest: the blocks of one chunk share its v in L2
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **kwargs,
    )(*args)


def _block_index():
    return lax.axis_index("q"), lax.axis_index("g"), lax.axis_index("b")


def _transposable(cfg, x_BGCS, block):
    """A [B, G, C, S] array read in blocks of `block` rows and used transposed ([S, block]).

    On the GPU: [B, G, n, block, S], each block transposed in shared memory by the wgmma.
    Pre-transposed: [B, G, S, n, block] from XLA, each block used as it is.
    """
    B, G, C, S = x_BGCS.shape
    if cfg.pre_t:
        return jnp.swapaxes(x_BGCS, 2, 3).reshape(B, G, S, C // block, block)
    return x_BGCS.reshape(B, G, C // block, block, S)


def _t_source(cfg, x_ref, b, g, j):
    return x_ref.at[b, g, :, j] if cfg.pre_t else x_ref.at[b, g, j]


def _t_buffer(cfg, block, S):
    return _operand((2, S, block) if cfg.pre_t else (2, block, S))


def _e_tiles_t(cfg, x_BGCE):
    """A [B, G, C, E] array read in E tiles and used transposed ([block_e, C] per tile).

    On the GPU: [B, G, C, nE, block_e], each tile transposed by the wgmma; pre-transposed:
    [B, G, nE, block_e, C].
    """
    B, G, C, E = x_BGCE.shape
    be = cfg.block_e
    if cfg.pre_t:
        return jnp.swapaxes(x_BGCE, 2, 3).reshape(B, G, E // be, be, C)
    return x_BGCE.reshape(B, G, C, E // be, be)


def _e_source(cfg, x_ref, b, g, e):
    return x_ref.at[b, g, e] if cfg.pre_t else x_ref.at[b, g, :, e]


def _t_view(cfg, slot_ref):
    """The transposed operand ([S, block] of a [block, S] slot): pre-transposed or in the wgmma."""
    return slot_ref if cfg.pre_t else plgpu.transpose_ref(slot_ref, (1, 0))


def _score_blocks(cfg, *, quad_rows, lin_rows, col_sources, rows_seg, row0, rows_are_keys, emit):
    """Scores of this program's rows against the chunk, one block of `block_k` columns at a time.

    quad_rows / lin_rows: gmem refs of the rows' [R, S] quadratic / linear operand (lin_rows is
    None when causal). col_sources(j) -> dict of gmem refs for column block j: "quad" and "lin"
    (transposable operands), "seg", optionally "vec" (a per-column float32 vector) and "bias"
    (the [R, block_k] bias block, oriented like the rows).
    emit(j, s, lin, same, quad, vec): s = qk / C + bias (float32), lin = the linear block or None,
    the masks, vec = the column vector or None.
    """
    R, S = quad_rows.shape
    bk = cfg.block_k
    shape = (R, bk)
    names = list(col_sources(0))
    types = {
        "quad": _t_buffer(cfg, bk, S),
        "lin": _t_buffer(cfg, bk, S),
        "seg": plgpu.SMEM((2, bk), jnp.int32),
        "vec": plgpu.SMEM((2, bk), _F32),
        "bias": plgpu.SMEM((2, R, bk), _F32),
    }

    def scoped(rows, cols, row_bars, col_bars):
        _load_now(
            [(quad_rows, rows["quad"])]
            + ([(lin_rows, rows["lin"])] if lin_rows is not None else []),
            row_bars,
        )

        def compute(j, slot):
            s = _matmul(rows["quad"], _t_view(cfg, cols["quad"].at[slot]), shape) * (
                1.0 / cfg.chunk
            )
            if "bias" in cols:
                s = s + cols["bias"].at[slot][...]
            lin = None
            if lin_rows is not None:
                lin = _matmul(rows["lin"], _t_view(cfg, cols["lin"].at[slot]), shape)
            same, quad = _masks(
                cfg, rows_seg, cols["seg"].at[slot][...], row0, j * bk, shape, rows_are_keys
            )
            vec = cols["vec"].at[slot][...] if "vec" in cols else None
            emit(j, s, lin, same, quad, vec)

        _static_pipeline(
            cfg.nk,
            lambda j: [col_sources(j)[n] for n in names],
            [cols[n] for n in names],
            [col_bars[n] for n in names],
            compute,
        )

    row_types = {"quad": _operand((R, S))}
    if lin_rows is not None:
        row_types["lin"] = _operand((R, S))
    pl.run_scoped(
        scoped,
        row_types,
        {n: types[n] for n in names},
        _barriers(2),
        {n: _barriers() for n in names},
    )


def _forward_kernel(cfg, qq, kq, ql, kl, qlx, x, v, seg, norm, bias, out_dtype):
    """out [B, G, C, E] = (qlx X + (W / norm) v) * norm, W the mixed in-chunk
    block, norm = 1 / N."""
    B, G, C, S = qq.shape
    E, K = v.shape[-1], qlx.shape[-1]
    bq, bk, be = cfg.block_q, cfg.block_k, cfg.block_e
    nq, ne = C // bq, E // be
    lin = not cfg.causal
    args = (
        qq.reshape(B, G, nq, bq, S),
        _transposable(cfg, kq, bk),
        ql.reshape(B, G, nq, bq, S),
        _transposable(cfg, kl, bk),
        qlx.reshape(B, G, nq, bq, K),
        x.reshape(B, G, K, ne, be),
        v.reshape(B, G, C, ne, be),
        seg.reshape(B, G, nq, bq),
        seg.reshape(B, G, cfg.nk, bk),
        norm.reshape(B, G, nq, bq),
        bias.reshape(nq, bq, cfg.nk, bk),
    )

    def body(qq_r, kq_r, ql_r, kl_r, qlx_r, x_r, v_r, segq_r, segk_r, norm_r, bias_r, out_r):
        qi, g, b = _block_index()

        def with_top(w_s, qlx_s, segq_s, norm_s, bars):
            plgpu.copy_gmem_to_smem(qlx_r.at[b, g, qi], qlx_s, bars.at[2])  # awaited below
            _load_now([(segq_r.at[b, g, qi], segq_s), (norm_r.at[b, g, qi], norm_s)], bars)
            norm = norm_s[...]

            def col_sources(j):
                src = {"quad": _t_source(cfg, kq_r, b, g, j), "seg": segk_r.at[b, g, j]}
                if lin:
                    src["lin"] = _t_source(cfg, kl_r, b, g, j)
                if cfg.has_bias:
                    src["bias"] = bias_r.at[qi, :, j]
                return src

            def emit(j, s, lin_s, same, quad, vec):
                mix = jnp.where(quad, jnp.square(jnp.maximum(s, 0.0)), 0.0)
                mix = mix / lax.broadcast_in_dim(norm, mix.shape, [0])
                if lin_s is not None:
                    mix = mix + jnp.where(same, lin_s, 0.0)
                w_s[:, pl.ds(j * bk, bk)] = mix.astype(_BF16)

            _score_blocks(
                cfg,
                quad_rows=qq_r.at[b, g, qi],
                lin_rows=ql_r.at[b, g, qi] if lin else None,
                col_sources=col_sources,
                rows_seg=segq_s[...],
                row0=qi * bq,
                rows_are_keys=False,
                emit=emit,
            )
            plgpu.commit_smem()  # W, written from registers, is read by the wgmma below
            plgpu.barrier_wait(bars.at[2])
            norm_be = lax.broadcast_in_dim(norm, (bq, be), [0])

            def tiles(v_s, x_s, o_s, v_bars, x_bars):
                def compute(e, slot):
                    def acc_body(acc):
                        plgpu.wgmma(acc, qlx_s, x_s.at[slot])
                        plgpu.wgmma(acc, w_s, v_s.at[slot])
                        return acc[...]

                    out = pl.run_scoped(acc_body, plgpu.ACC((bq, be), _F32)) * norm_be
                    plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # o_s[slot]'s last copy
                    o_s.at[slot][...] = out.astype(out_dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_s.at[slot], out_r.at[b, g, qi, :, e])

                _loop_pipeline(
                    ne,
                    lambda e: [v_r.at[b, g, :, e], x_r.at[b, g, :, e]],
                    [v_s, x_s],
                    [v_bars, x_bars],
                    compute,
                )
                plgpu.wait_smem_to_gmem(0)

            pl.run_scoped(
                tiles,
                _operand((2, C, be)),
                _operand((2, K, be)),
                _smem((2, bq, be), out_dtype),
                _barriers(),
                _barriers(),
            )

        pl.run_scoped(
            with_top,
            _operand((bq, C)),
            _operand((bq, K)),
            plgpu.SMEM((bq,), jnp.int32),
            plgpu.SMEM((bq,), _F32),
            _barriers(3),
        )

    out_type = jax.ShapeDtypeStruct((B, G, nq, bq, ne, be), out_dtype)
    out = _kernel(cfg, body, out_type, (nq, G, B), *args)
    return out.reshape(B, G, C, E)


def _store_block(o_s, value, dst):
    """value -> o_s (shared) -> dst (global), waiting for o_s's previous copy to have read it."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    o_s[...] = value.astype(o_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, dst)


def _final_matmuls(pairs, dsts, shape):
    """For each (a_s, b_gmem) in pairs: dst <- a_s @ b (float32), b loaded whole ([C, S])."""
    R, S = shape
    C = pairs[0][1].shape[0]

    def scoped(b_s, o_s, bars):
        for i, ((a_s, b_ref), dst) in enumerate(zip(pairs, dsts, strict=True)):
            plgpu.copy_gmem_to_smem(b_ref, b_s, bars.at[i])
            plgpu.barrier_wait(bars.at[i])
            _store_block(o_s, _matmul(a_s, b_s, shape), dst)
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scoped, _operand((C, S)), plgpu.SMEM((R, S), _F32), _barriers(len(pairs)))


def _dq_kernel(cfg, qq, kq, ql, kl, v, do, seg, norm, bias):
    """Query-side gradients of the in-chunk blocks, per query block.

    dW = dO v^T (all E); g = dW * mask * 2 relu(s) (= dL/ds); d quad_q = g kq / C; the bias
    gradient's per-chunk parts g; bidirectional: h = dW * same / N, d lin_q (in-chunk) = h kl.
    Returns (d quad_q [B, G, C, S], d lin_q in-chunk or None, g [B, G, C, C] or None), float32.
    """
    B, G, C, S = qq.shape
    E = v.shape[-1]
    bq, bk, be = cfg.block_q, cfg.block_k, cfg.block_e
    nq, ne = C // bq, E // be
    lin = not cfg.causal
    vt = _e_tiles_t(cfg, v)
    args = (
        qq.reshape(B, G, nq, bq, S),
        _transposable(cfg, kq, bk),
        kq,
        ql.reshape(B, G, nq, bq, S),
        _transposable(cfg, kl, bk),
        kl,
        do.reshape(B, G, nq, bq, ne, be),
        vt,
        seg.reshape(B, G, nq, bq),
        seg.reshape(B, G, cfg.nk, bk),
        norm.reshape(B, G, nq, bq),
        bias.reshape(nq, bq, cfg.nk, bk),
    )
    rows_type = jax.ShapeDtypeStruct((B, G, nq, bq, S), _F32)
    out_types = [rows_type] + ([rows_type] if lin else [])
    if cfg.has_bias:
        out_types.append(jax.ShapeDtypeStruct((B, G, nq, bq, cfg.nk, bk), _F32))

    def body(
        qq_r, kqt_r, kq_r, ql_r, klt_r, kl_r, do_r, vt_r, segq_r, segk_r, norm_r, bias_r, *outs
    ):
        qi, g, b = _block_index()
        dqq_r, dql_r = outs[0], (outs[1] if lin else None)
        gb_r = outs[-1] if cfg.has_bias else None

        def with_top(segq_s, norm_s, grad_s, bars):
            _load_now([(segq_r.at[b, g, qi], segq_s), (norm_r.at[b, g, qi], norm_s)], bars)
            norm = norm_s[...]

            def dw_phase(do_s, vt_s, do_bars, vt_bars):
                def acc_body(acc):
                    def compute(e, slot):
                        plgpu.wgmma(acc, do_s.at[slot], _t_view(cfg, vt_s.at[slot]))
                        plgpu.wgmma_wait(0)  # the slot is reloaded next

                    _loop_pipeline(
                        ne,
                        lambda e: [do_r.at[b, g, qi, :, e], _e_source(cfg, vt_r, b, g, e)],
                        [do_s, vt_s],
                        [do_bars, vt_bars],
                        compute,
                    )
                    return acc[...]

                return pl.run_scoped(acc_body, plgpu.ACC((bq, C), _F32))

            vt_shape = (2, be, C) if cfg.pre_t else (2, C, be)
            dw = pl.run_scoped(
                dw_phase, _operand((2, bq, be)), _operand(vt_shape), _barriers(), _barriers()
            )

            def col_sources(j):
                src = {"quad": _t_source(cfg, kqt_r, b, g, j), "seg": segk_r.at[b, g, j]}
                if cfg.has_bias:
                    src["bias"] = bias_r.at[qi, :, j]
                return src

            def grads(gb_s):
                def emit(j, s, lin_s, same, quad, vec):
                    dw_j = _columns(dw, j * bk, bk)
                    g_j = jnp.where(quad, dw_j * (2.0 * jnp.maximum(s, 0.0)), 0.0)
                    grad_s["quad"][:, pl.ds(j * bk, bk)] = g_j.astype(_BF16)
                    if lin:
                        h_j = jnp.where(
                            same, dw_j * lax.broadcast_in_dim(norm, same.shape, [0]), 0.0
                        )
                        grad_s["lin"][:, pl.ds(j * bk, bk)] = h_j.astype(_BF16)
                    if cfg.has_bias:
                        _store_block(gb_s, g_j, gb_r.at[b, g, qi, :, j])

                _score_blocks(
                    cfg,
                    quad_rows=qq_r.at[b, g, qi],
                    lin_rows=None,
                    col_sources=col_sources,
                    rows_seg=segq_s[...],
                    row0=qi * bq,
                    rows_are_keys=False,
                    emit=emit,
                )
                plgpu.wait_smem_to_gmem(0)

            pl.run_scoped(grads, plgpu.SMEM((bq, bk), _F32) if cfg.has_bias else None)
            plgpu.commit_smem()
            pairs = [(grad_s["quad"], kq_r.at[b, g])]
            dsts = [dqq_r.at[b, g, qi]]
            if lin:
                pairs.append((grad_s["lin"], kl_r.at[b, g]))
                dsts.append(dql_r.at[b, g, qi])
            _final_matmuls(pairs, dsts, (bq, S))

        grad_types = {"quad": _operand((bq, C))}
        if lin:
            grad_types["lin"] = _operand((bq, C))
        pl.run_scoped(
            with_top,
            plgpu.SMEM((bq,), jnp.int32),
            plgpu.SMEM((bq,), _F32),
            grad_types,
            _barriers(2),
        )

    outs = _kernel(cfg, body, out_types, (nq, G, B), *args)
    dqq = outs[0].reshape(B, G, C, S) * (1.0 / C)
    dql = outs[1].reshape(B, G, C, S) if lin else None
    gbias = outs[-1].reshape(B, G, C, C) if cfg.has_bias else None
    return dqq, dql, gbias


def _dkv_kernel(cfg, qq, kq, ql, kl, v, do, klx, dstate, seg, norm, bias, out_dtype):
    """Key-side gradients, per key block, in the transposed orientation (rows = keys).

    Mix^T = (relu(s)^2 * mask)^T (+ bidirectional (same * ql kl^T / N)^T); dW^T = v dO^T (all E);
    dv = Mix^T dO + klx dstate (the states' share, fused); g^T = dW^T * mask^T * 2 relu(s^T);
    d quad_k = g^T qq / C; bidirectional: h^T = dW^T * same^T / N_query, in-chunk d lin_k = h^T ql.
    Returns (d quad_k [B, G, C, S] f32, d lin_k in-chunk or None, dv [B, G, C, E] out_dtype).
    """
    B, G, C, S = qq.shape
    E, K = v.shape[-1], klx.shape[-1]
    bq, bk, be = cfg.block_q, cfg.block_k, cfg.block_e
    nq, ne = C // bq, E // be
    lin = not cfg.causal
    dot = _e_tiles_t(cfg, do)  # read only when pre-transposed (dO's own tiles otherwise)
    args = (
        kq.reshape(B, G, nq, bq, S),
        kl.reshape(B, G, nq, bq, S),
        _transposable(cfg, qq, bk),
        _transposable(cfg, ql, bk),
        qq,
        ql,
        v.reshape(B, G, nq, bq, ne, be),
        do.reshape(B, G, C, ne, be),
        dot,
        klx.reshape(B, G, nq, bq, K),
        dstate.reshape(B, G, K, ne, be),
        seg.reshape(B, G, nq, bq),
        seg.reshape(B, G, cfg.nk, bk),
        norm.reshape(B, G, cfg.nk, bk),
        bias.T.reshape(nq, bq, cfg.nk, bk),  # bias^T[j, i] = bias[i, j]: rows are keys
    )
    rows_type = jax.ShapeDtypeStruct((B, G, nq, bq, S), _F32)
    out_types = [rows_type] + ([rows_type] if lin else [])
    out_types.append(jax.ShapeDtypeStruct((B, G, nq, bq, ne, be), out_dtype))

    def body(
        kq_r,
        kl_r,
        qqt_r,
        qlt_r,
        qq_r,
        ql_r,
        v_r,
        do_r,
        dot_r,
        klx_r,
        ds_r,
        segk_r,
        segq_r,
        norm_r,
        bias_r,
        *outs,
    ):
        ki, g, b = _block_index()
        dkq_r, dkl_r, dv_r = outs[0], (outs[1] if lin else None), outs[-1]

        def col_sources(i):
            src = {
                "quad": _t_source(cfg, qqt_r, b, g, i),
                "seg": segq_r.at[b, g, i],
                "vec": norm_r.at[b, g, i],
            }
            if lin:
                src["lin"] = _t_source(cfg, qlt_r, b, g, i)
            if cfg.has_bias:
                src["bias"] = bias_r.at[ki, :, i]
            return src

        def key_scores(segk, emit):
            _score_blocks(
                cfg,
                quad_rows=kq_r.at[b, g, ki],
                lin_rows=kl_r.at[b, g, ki] if lin else None,
                col_sources=col_sources,
                rows_seg=segk,
                row0=ki * bq,
                rows_are_keys=True,
                emit=emit,
            )

        def with_top(mix_s, segk_s, bars):
            _load_now([(segk_r.at[b, g, ki], segk_s)], bars)
            segk = segk_s[...]

            def emit_mix(i, s, lin_s, same, quad, norm):
                mix = jnp.where(quad, jnp.square(jnp.maximum(s, 0.0)), 0.0)
                if lin_s is not None:
                    norm_cc = lax.broadcast_in_dim(norm, mix.shape, [1])
                    mix = mix + jnp.where(same, lin_s * norm_cc, 0.0)
                mix_s[:, pl.ds(i * bk, bk)] = mix.astype(_BF16)

            key_scores(segk, emit_mix)
            plgpu.commit_smem()

            def tiles(klx_s, v_s, do_s, dot_s, ds_s, o_s, fix_bars, *tile_bars):
                _load_now([(klx_r.at[b, g, ki], klx_s)], fix_bars)

                def acc_body(dwt_acc):
                    def compute(e, slot):
                        dot_view = _t_view(cfg, (dot_s if cfg.pre_t else do_s).at[slot])
                        plgpu.wgmma(dwt_acc, v_s.at[slot], dot_view)

                        def dv_body(acc):
                            plgpu.wgmma(acc, mix_s, do_s.at[slot])
                            plgpu.wgmma(acc, klx_s, ds_s.at[slot])
                            return acc[...]

                        dv = pl.run_scoped(dv_body, plgpu.ACC((bq, be), _F32))
                        plgpu.wgmma_wait(0)  # dW^T's wgmma too: the slot is reloaded next
                        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                        o_s.at[slot][...] = dv.astype(out_dtype)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(o_s.at[slot], dv_r.at[b, g, ki, :, e])

                    def sources(e):
                        src = [v_r.at[b, g, ki, :, e], do_r.at[b, g, :, e], ds_r.at[b, g, :, e]]
                        return src + ([_e_source(cfg, dot_r, b, g, e)] if cfg.pre_t else [])

                    buffers = [v_s, do_s, ds_s] + ([dot_s] if cfg.pre_t else [])
                    _loop_pipeline(ne, sources, buffers, list(tile_bars), compute)
                    plgpu.wait_smem_to_gmem(0)
                    return dwt_acc[...]

                return pl.run_scoped(acc_body, plgpu.ACC((bq, C), _F32))

            dwt = pl.run_scoped(
                tiles,
                _operand((bq, K)),
                _operand((2, bq, be)),
                _operand((2, C, be)),
                _operand((2, be, C)) if cfg.pre_t else None,
                _operand((2, K, be)),
                _smem((2, bq, be), out_dtype),
                _barriers(1),
                *[_barriers() for _ in range(4 if cfg.pre_t else 3)],
            )

            def grads(h_s):
                def emit_grads(i, s, lin_s, same, quad, norm):
                    dwt_i = _columns(dwt, i * bk, bk)
                    g_i = jnp.where(quad, dwt_i * (2.0 * jnp.maximum(s, 0.0)), 0.0)
                    mix_s[:, pl.ds(i * bk, bk)] = g_i.astype(_BF16)  # Mix^T is spent: reuse
                    if lin:
                        norm_cc = lax.broadcast_in_dim(norm, same.shape, [1])
                        h_s[:, pl.ds(i * bk, bk)] = jnp.where(same, dwt_i * norm_cc, 0.0).astype(
                            _BF16
                        )

                key_scores(segk, emit_grads)
                plgpu.commit_smem()
                pairs = [(mix_s, qq_r.at[b, g])]
                dsts = [dkq_r.at[b, g, ki]]
                if lin:
                    pairs.append((h_s, ql_r.at[b, g]))
                    dsts.append(dkl_r.at[b, g, ki])
                _final_matmuls(pairs, dsts, (bq, S))

            pl.run_scoped(grads, _operand((bq, C)) if lin else None)

        pl.run_scoped(with_top, _operand((bq, C)), plgpu.SMEM((bq,), jnp.int32), _barriers(1))

    outs = _kernel(cfg, body, out_types, (nq, G, B), *args)
    dkq = outs[0].reshape(B, G, C, S) * (1.0 / C)
    dkl = outs[1].reshape(B, G, C, S) if lin else None
    return dkq, dkl, outs[-1].reshape(B, G, C, E)
