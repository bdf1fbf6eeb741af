"""FLASH attention math: the "attend" of docs/model.md (no RoPE, gates or projections).

Two pure functions, the seam where faster kernels can plug in:

- `quadratic_attention`: FLASH-Quad's squared-ReLU attention over the whole sequence, O(T^2).
- `mixed_chunk_attention`: FLASH's quadratic attention inside chunks of C tokens plus a
  normalised linear attention across chunks, O(T * C) memory and time, no `[T, T]` array. Its
  states across chunks (which chunks and tokens exchange sums, `Boundary`) are built in
  state_passing.py.

Shapes: B batch, T tokens, S query/key width (s), E value width (e), G chunks, C chunk size,
D directions of the cross-chunk states (1 causal, 2 bidirectional), X = D * S.

Packed documents: `segment_ids[b, t]` numbers the documents of a row, 0 marks padding. Documents
must be contiguous runs of equal ids (what packing produces); `mixed_chunk_attention` relies on it
(an id that reappears after another document is not linked to its earlier run across chunks), and
it is not checked (ids are traced values). Padding tokens (any run of 0s) get output exactly 0 and
never enter any sum or count.

Precision policy (forward and backward alike). The compute dtype is the promoted dtype of the
inputs: bf16 when the model computes in bf16, float32 for float32 inputs (then everything below
is float32 and nothing is rounded beyond float32).

- Every large matmul takes its operands in the compute dtype and accumulates in float32
  (`preferred_element_type=float32`): q k^T, the `[C, C]` weights times v, the per-chunk sums
  k_lin^T v, the `[G, G]` state passing, the linear queries times the states, and every matmul of
  the hand-written backward (the backward is written by hand, `jax.custom_vjp`, because autodiff
  of a bf16 x bf16 -> float32 dot emits float32 x float32 cotangent dots).
- Scores, the squared ReLU and its derivative are float32 (squared scores are unbounded). The
  `[C, C]` weights are cast to the compute dtype right before their matmul with v, as
  FlashAttention casts its probabilities; the score cotangents likewise before theirs.
- Sums of states and counts accumulate in float32: each chunk's k_lin^T v is a float32-accumulated
  matmul, rounded once to the compute dtype as the operand of the state-passing matmul, which
  accumulates the chunks in float32 again; counts are exact float32 integers. The passed state,
  divided by its count, is rounded once more as the operand of the linear queries' matmul. So a
  state carries at most two roundings of the compute dtype, however many chunks it spans.
- Outputs and input gradients are rounded to the compute dtype once, at the end (the output in
  v's dtype; `quad_bias`'s gradient, a float32 sum of score cotangents, in quad_bias's dtype).

Nothing of size `[C, C]` (or `[T, T]`) is saved for the backward: it recomputes the score blocks
from the inputs. Saved: the inputs and, for `mixed_chunk_attention`, the passed states
(`[B, G, X, E]` in the compute dtype, 2 KiB per token in bf16 at S = 128, E = 2048, C = 256).
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from flash_jax.ops.state_passing import (
    Boundary,
    check_boundary,
    chunk_links,
    chunk_states,
    dot,
    merge_directions,
    pass_states,
    per_direction,
    per_direction_transposed,
    per_state_row,
    same_segment,
)

_F32 = jnp.float32


def quadratic_attention(q, k, v, *, n, causal: bool, segment_ids=None, bias=None):
    """Squared-ReLU attention: out_i = sum_j mask(i, j) * relu(q_i . k_j / n + bias[i, j])^2 v_j.

    Args:
      q: queries `[B, T, S]`.
      k: keys `[B, T, S]`.
      v: values `[B, T, E]`.
      n: the fixed score scale, the configured training length (never the runtime T, so that a
        token's output does not change when tokens are appended after it).
      causal: keep only j <= i (the diagonal is kept).
      segment_ids: int `[B, T]`, contiguous runs of equal ids, 0 = padding; None = one document
        without padding. mask(i, j) needs the same non-zero segment.
      bias: None, `[T, T]` or `[B, T, T]`, added after the 1/n scaling and before the ReLU.

    Returns:
      `[B, T, E]` in v's dtype; padding rows are exactly 0.
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    _check_scale("n", n)
    B, T = _check_qkv({"q": q, "k": k}, v)
    seg_BT = _segments(segment_ids, B, T)
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.shape not in ((T, T), (B, T, T)):
            raise ValueError(
                f"bias must have shape [T, T] = {(T, T)} or [B, T, T] = {(B, T, T)}, "
                f"got {bias.shape}"
            )
    dtype = jnp.result_type(q, k, v)
    out_BTE = _quadratic(q.astype(dtype), k.astype(dtype), v.astype(dtype), seg_BT, bias, n, causal)
    return out_BTE.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _quadratic(q_BTS, k_BTS, v_BTE, seg_BT, bias, n, causal):
    """`quadratic_attention` on inputs of one dtype; the result in float32."""
    weights_BTT, _ = _relu2_weights(q_BTS, k_BTS, bias, _quadratic_mask(seg_BT, causal), n)
    return dot("bij,bje->bie", weights_BTT, v_BTE, v_BTE.dtype)


def _quadratic_fwd(q_BTS, k_BTS, v_BTE, seg_BT, bias, n, causal):
    out_BTE = _quadratic(q_BTS, k_BTS, v_BTE, seg_BT, bias, n, causal)
    return out_BTE, (q_BTS, k_BTS, v_BTE, seg_BT, bias)


def _quadratic_bwd(n, causal, residuals, d_out_BTE):
    q_BTS, k_BTS, v_BTE, seg_BT, bias = residuals
    dtype = v_BTE.dtype
    # In the transposed frame (rows are keys j, columns queries i; see `dot`).
    mask_BJI = _swap(_quadratic_mask(seg_BT, causal))
    bias_T = None if bias is None else _swap(bias)
    weights_BJI, relu_BJI = _relu2_weights(k_BTS, q_BTS, bias_T, mask_BJI, n)
    d_weights_BJI = dot("bje,bie->bji", v_BTE, d_out_BTE, dtype)
    d_scores_BJI = jnp.where(mask_BJI, 2.0 * relu_BJI * d_weights_BJI, 0.0)
    d_q, d_k = _score_grads(d_scores_BJI / n, q_BTS, k_BTS)
    d_v = dot("bji,bie->bje", weights_BJI, d_out_BTE, dtype)
    d_bias = _bias_grad(d_scores_BJI, bias)
    return d_q.astype(dtype), d_k.astype(dtype), d_v.astype(dtype), None, d_bias


_quadratic.defvjp(_quadratic_fwd, _quadratic_bwd)


def mixed_chunk_attention(
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
    boundary: Boundary | None = None,
):
    """FLASH mixed chunk attention (token-exact for packed documents), the XLA path: what
    `ops.mixed_chunk_attention` runs for `impl="xla"`, and the contract its kernels meet.

    out_i = quad_i + lin_i with, for chunks of C = chunk_size tokens (T is padded up to G * C
    internally with segment 0 and sliced back):

      quad_i = sum_{j in chunk(i), mask(i, j)} relu(qq_i . kq_j / C + quad_bias[i % C, j % C])^2 v_j
      lin_i  = ql_i . S_i,  S_i = (1 / N_i) sum_{j in L(i)} outer(kl_j, v_j),  0 if N_i = 0

    mask(i, j): same non-zero segment, and j <= i when causal. L(i): tokens of the same non-zero
    segment in chunks strictly before chunk(i) (causal), or all tokens of that segment, own chunk
    included (non-causal); N_i = |L(i)|.

    Precondition: documents are contiguous runs of equal `segment_ids` (what packing produces).
    The cross-chunk sums use it (`chunk_links`): the tokens of i's document before chunk g are
    exactly those of the document of token g*C - 1 when the ids match, so per-chunk sums and one
    masked `[G, G]` matmul give every token's state and no `[T, T]` array is ever built (only
    `[B, G, C, C]` blocks and `[B, G, X, E]` sums). The backward is written by hand
    (`jax.custom_vjp`, precision policy in the module docstring) and recomputes the `[C, C]`
    blocks instead of saving them.

    Args:
      quad_q, quad_k: `[B, T, S]` queries/keys of the quadratic (within-chunk) part.
      lin_q, lin_k: `[B, T, S]` queries/keys of the linear (across-chunk) part.
      v: values `[B, T, E]`, shared by both parts.
      chunk_size: C > 0.
      causal: autoregressive (True) or bidirectional (False).
      segment_ids: int `[B, T]`, 0 = padding; None = one document without padding.
      quad_bias: None or `[C, C]`, the relative bias of the quadratic part (the same in every
        chunk).
      boundary: None, or the states of the tokens beyond the ends of this stretch of the
        sequence (`Boundary`: context parallelism, flash_jax/ops/context_parallel.py). Their
        documents' tokens join L(i) and N_i exactly as if they were chunks before (and, when
        bidirectional, after) these T tokens; their sums get the gradient.

    Returns:
      `[B, T, E]` in v's dtype; padding rows are exactly 0.
    """
    quad_q, quad_k, lin_q, lin_k, v = (jnp.asarray(x) for x in (quad_q, quad_k, lin_q, lin_k, v))
    if not isinstance(chunk_size, numbers.Integral) or isinstance(chunk_size, bool):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    B, T = _check_qkv({"quad_q": quad_q, "quad_k": quad_k}, v)
    _check_qkv({"lin_q": lin_q, "lin_k": lin_k}, v)
    seg_BT = _segments(segment_ids, B, T)
    C = int(chunk_size)
    if quad_bias is not None:
        quad_bias = jnp.asarray(quad_bias)
        if quad_bias.shape != (C, C):
            raise ValueError(
                f"quad_bias must have shape [C, C] = {(C, C)} (C = chunk_size), "
                f"got {quad_bias.shape}"
            )

    G = -(-T // C)
    dtype = jnp.result_type(quad_q, quad_k, lin_q, lin_k, v)

    def chunked(x):  # [B, T, ...] -> [B, G, C, ...], padding with zeros (= segment 0)
        if G * C != T:  # no copy of the big arrays when chunks tile T
            x = jnp.pad(x, [(0, 0), (0, G * C - T)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape((B, G, C) + x.shape[2:])

    inputs = [chunked(x.astype(dtype)) for x in (quad_q, quad_k, lin_q, lin_k, v)]
    if boundary is not None:
        boundary = check_boundary(boundary, B, lin_k.shape[2], v.shape[2], causal)
    out_BGCE = _mixed_chunks(*inputs, chunked(seg_BT), quad_bias, boundary, causal)
    return out_BGCE.reshape(B, G * C, -1)[:, :T].astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _mixed_chunks(qq_BGCS, kq_BGCS, ql_BGCS, kl_BGCS, v_BGCE, seg_BGC, bias, boundary, causal):
    """`mixed_chunk_attention` on chunked inputs of one dtype: `[B, G, C, E]` in float32."""
    args = (qq_BGCS, kq_BGCS, ql_BGCS, kl_BGCS, v_BGCE, seg_BGC, bias, boundary)
    return _mixed_fwd(*args, causal)[0]


def _mixed_fwd(qq_BGCS, kq_BGCS, ql_BGCS, kl_BGCS, v_BGCE, seg_BGC, bias, boundary, causal):
    dtype = v_BGCE.dtype
    links = chunk_links(seg_BGC, causal, boundary)
    states_BGXE = checkpoint_name(chunk_states(links, kl_BGCS, v_BGCE, boundary), "attn_states")
    weights_BGCC, _ = _chunk_weights(
        qq_BGCS, kq_BGCS, ql_BGCS, kl_BGCS, seg_BGC, bias, links, causal, transposed=False
    )
    # Both parts in one matmul over K = C + X: out = [W | ql_X] [v ; states]. One float32
    # [C, E] result instead of two that are added afterwards.
    left_BGCK = _columns(weights_BGCC, per_direction(ql_BGCS, links.use_BGCD), dtype)
    right_BGKE = _rows(v_BGCE, states_BGXE, dtype)
    out_BGCE = dot("bgik,bgke->bgie", left_BGCK, right_BGKE, dtype)
    residuals = (qq_BGCS, kq_BGCS, ql_BGCS, kl_BGCS, v_BGCE, seg_BGC, bias, boundary)
    return out_BGCE, (residuals, states_BGXE)


def _mixed_bwd(causal, residuals, d_out_BGCE):
    (qq_BGCS, kq_BGCS, ql_BGCS, kl_BGCS, v_BGCE, seg_BGC, bias, boundary), states_BGXE = residuals
    dtype = v_BGCE.dtype
    C = seg_BGC.shape[-1]
    links = chunk_links(seg_BGC, causal, boundary)

    # The states' side: out += ql_X states, states = (link A) / N, A = kl_X^T v per chunk.
    d_ql_BGCX = dot("bgce,bgxe->bgcx", d_out_BGCE, states_BGXE, dtype)
    ql_BGXC = per_direction_transposed(ql_BGCS, links.use_BGCD)
    d_states_BGXE = dot("bgxc,bgce->bgxe", ql_BGXC, d_out_BGCE, dtype)
    d_passed_BGXE = d_states_BGXE * per_state_row(links.norm_BGD, d_states_BGXE.shape[2])
    d_sums_BGXE = pass_states(links.link_BDHG, d_passed_BGXE, dtype)

    # v's cotangents through W v and through A, together (K = C + X), in the transposed frame
    # (rows = keys j): [dW^T | d kl_X] = v [dO ; dA]^T and dv = [W^T | kl_X] [dO ; dA].
    weights_BGJI, block = _chunk_weights(
        qq_BGCS, kq_BGCS, ql_BGCS, kl_BGCS, seg_BGC, bias, links, causal, transposed=True
    )
    right_BGKE = _rows(d_out_BGCE, d_sums_BGXE, dtype)
    left_BGJK = _columns(weights_BGJI, per_direction(kl_BGCS, links.member_BGCD), dtype)
    d_v = dot("bgjk,bgke->bgje", left_BGJK, right_BGKE, dtype)
    d_left_BGJK = dot("bgje,bgke->bgjk", v_BGCE, right_BGKE, dtype)
    d_weights_BGJI, d_kl_BGCX = d_left_BGJK[..., :C], d_left_BGJK[..., C:]

    # Within chunks: W = relu(s)^2 on the quadratic mask [+ ql kl^T / N, bidirectional].
    d_scores_BGJI = jnp.where(block.quad_mask, 2.0 * block.relu * d_weights_BGJI, 0.0)
    d_qq, d_kq = _score_grads(d_scores_BGJI / C, qq_BGCS, kq_BGCS)
    d_ql = merge_directions(d_ql_BGCX, links.use_BGCD)
    d_kl = merge_directions(d_kl_BGCX, links.member_BGCD)
    if not causal:
        d_lin_BGJI = jnp.where(block.same, d_weights_BGJI * block.norm, 0.0)
        d_ql_own, d_kl_own = _score_grads(d_lin_BGJI, ql_BGCS, kl_BGCS)
        d_ql, d_kl = d_ql + d_ql_own, d_kl + d_kl_own
    grads = (d_qq, d_kq, d_ql, d_kl, d_v)
    d_boundary = None
    if boundary is not None:  # the boundary sums enter every state their chunks receive
        B, G, X, E = d_passed_BGXE.shape
        d_passed_BGDSE = d_passed_BGXE.reshape(B, G, links.edge_BGD.shape[-1], -1, E)
        d_sum_BDSE = jnp.einsum("bgd,bgdse->bdse", links.edge_BGD.astype(_F32), d_passed_BGDSE)
        d_boundary = Boundary(None, d_sum_BDSE, jnp.zeros_like(boundary.count_BD))
    bias_grad = _bias_grad(d_scores_BGJI, bias)
    return (*(g.astype(dtype) for g in grads), None, bias_grad, d_boundary)


_mixed_chunks.defvjp(_mixed_fwd, _mixed_bwd)


class _Block(NamedTuple):
    """Float32 / boolean `[B, G, C, C]` arrays of the within-chunk part, in the frame asked."""

    relu: jax.Array  # relu(s), s = qq kq^T / C + bias
    quad_mask: jax.Array  # same document (and j <= i when causal)
    same: jax.Array  # same document
    norm: jax.Array  # 1 / N_i of the query i, broadcastable to [B, G, C, C]


def _chunk_weights(qq_BGCS, kq_BGCS, ql_BGCS, kl_BGCS, seg_BGC, bias, links, causal, transposed):
    """The within-chunk matrix that multiplies v, float32: relu(s)^2 on the quadratic mask, plus
    (bidirectional) the own chunk's share of the linear part, ql_i . kl_j / N_i on the same
    document (a plain kernel block, folded in so that one matmul with v serves both parts).
    `[B, G, i, j]`, or `[B, G, j, i]` when transposed (the backward's frame, see `dot`); also the
    `_Block` of that frame."""
    C = seg_BGC.shape[-1]
    same = same_segment(seg_BGC)  # symmetric
    quad_mask = _quadratic_mask(seg_BGC, causal)
    norm = links.norm_BGC[..., :, None]
    rows_q, cols_k, rows_ql, cols_kl = qq_BGCS, kq_BGCS, ql_BGCS, kl_BGCS
    if transposed:
        quad_mask, norm = _swap(quad_mask), _swap(norm)
        bias = None if bias is None else _swap(bias)
        rows_q, cols_k, rows_ql, cols_kl = kq_BGCS, qq_BGCS, kl_BGCS, ql_BGCS
    weights, relu = _relu2_weights(rows_q, cols_k, bias, quad_mask, C)
    if not causal:
        lin = dot("bgis,bgjs->bgij", rows_ql, cols_kl, ql_BGCS.dtype)
        weights = weights + jnp.where(same, lin * norm, 0.0)
    return weights, _Block(relu, quad_mask, same, norm)


# ---------------------------------------------------------------- shared pieces ----


def _columns(x, y, dtype):
    """[x | y] along the last axis, in `dtype`: a left matmul operand whose x is elementwise
    float32 work (the `[C, C]` weights). Built as the sum of the zero-padded halves so that XLA
    writes it from the fusion that computes x (it rewrites a concatenate of converts into a
    float32 concatenate and a convert: two more passes)."""
    widths = [(0, 0)] * (x.ndim - 1)
    x = jnp.pad(x.astype(_F32), widths + [(0, y.shape[-1])])
    y = jnp.pad(y.astype(_F32), widths + [(x.shape[-1] - y.shape[-1], 0)])
    return (x + y).astype(dtype)


def _rows(x, y, dtype):
    """[x ; y] along axis 2 (chunk rows), in `dtype`: a right matmul operand."""
    return jnp.concatenate([x.astype(dtype), y.astype(dtype)], axis=2)


def _swap(x):
    """Swaps the last two axes."""
    return jnp.swapaxes(x, -1, -2)


def _relu2_weights(q, k, bias, mask, scale):
    """relu(q k^T / scale + bias)^2 where mask, else 0, and relu(...) itself: float32
    `[..., I, J]` from `[..., I, S]` rows and `[..., J, S]` columns."""
    scores = dot("...is,...js->...ij", q, k, q.dtype) / scale
    if bias is not None:
        scores = scores + bias.astype(_F32)
    relu = jax.nn.relu(scores)
    return jnp.where(mask, jnp.square(relu), 0.0), relu


def _score_grads(d_scores_JI, q, k):
    """Cotangents (float32) of q `[..., I, S]` and k `[..., J, S]` for scores q k^T whose float32
    cotangent is given transposed, `[..., J, I]` (cast to the compute dtype as an operand)."""
    d_q = dot("...ji,...js->...is", d_scores_JI, k, q.dtype)
    d_k = dot("...ji,...is->...js", d_scores_JI, q, q.dtype)
    return d_q, d_k


def _bias_grad(d_scores_JI, bias):
    """The bias's cotangent from the transposed float32 score cotangents: summed over the axes
    the bias broadcasts over, in the bias's dtype."""
    if bias is None:
        return None
    lead = d_scores_JI.ndim - bias.ndim
    return _swap(jnp.sum(d_scores_JI, axis=tuple(range(lead)))).astype(bias.dtype)


def _quadratic_mask(seg_XT, causal):
    """[..., T] ids -> [..., T, T]: same non-zero segment, and j <= i when causal."""
    mask = same_segment(seg_XT)
    if causal:
        T = seg_XT.shape[-1]
        mask = mask & jnp.tril(jnp.ones((T, T), dtype=bool))
    return mask


def _segments(segment_ids, B, T):
    if segment_ids is None:
        return jnp.ones((B, T), dtype=jnp.int32)
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != (B, T):
        raise ValueError(f"segment_ids must have shape [B, T] = {(B, T)}, got {segment_ids.shape}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be integers, got dtype {segment_ids.dtype}")
    return segment_ids


def _check_qkv(qk, v):
    """Checks a query/key pair against v: rank 3, equal B and T, equal widths S. Returns B, T."""
    for name, x in {**qk, "v": v}.items():
        if x.ndim != 3:
            width = "E" if name == "v" else "S"
            raise ValueError(f"{name} must have rank 3 [B, T, {width}], got shape {x.shape}")
    B, T = v.shape[:2]
    for name, x in qk.items():
        if x.shape[:2] != (B, T):
            raise ValueError(
                f"{name} has [B, T] = {tuple(x.shape[:2])} but v has {(B, T)}: they must match"
            )
    (q_name, q), (k_name, k) = qk.items()
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"{q_name} and {k_name} must have the same width S, got {q.shape[2]} and {k.shape[2]}"
        )
    return B, T


def _check_scale(name, value):
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a positive number (the training length), got {value!r}")
