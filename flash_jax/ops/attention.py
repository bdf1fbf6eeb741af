"""FLASH attention math: the "attend" of docs/flash-spec.md (no RoPE, gates or projections).

Two pure functions, the seam where faster kernels can plug in:

- `quadratic_attention`: FLASH-Quad's squared-ReLU attention over the whole sequence, O(T^2).
- `mixed_chunk_attention`: FLASH's quadratic attention inside chunks of C tokens plus a
  normalised linear attention across chunks, O(T * C) memory and time, no `[T, T]` array.

Shapes: B batch, T tokens, S query/key width (s), E value width (e), G chunks, C chunk size.

Packed documents: `segment_ids[b, t]` numbers the documents of a row, 0 marks padding. Documents
must be contiguous runs of equal ids (what packing produces); `mixed_chunk_attention` relies on it
(an id that reappears after another document is not linked to its earlier run across chunks), and
it is not checked (ids are traced values). Padding tokens (any run of 0s) get output exactly 0 and
never enter any sum or count.

Scores and all sums are computed in float32 (squared ReLU scores are unbounded); the result is cast
back to v's dtype.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

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

    scores_BTT = jnp.einsum("bis,bjs->bij", q, k, preferred_element_type=_F32) / n
    if bias is not None:
        scores_BTT = scores_BTT + bias.astype(_F32)
    mask_BTT = _same_segment(seg_BT)
    if causal:
        mask_BTT = mask_BTT & jnp.tril(jnp.ones((T, T), dtype=bool))
    weights_BTT = jnp.where(mask_BTT, jnp.square(jax.nn.relu(scores_BTT)), 0.0)
    out_BTE = jnp.einsum("bij,bje->bie", weights_BTT, v.astype(_F32))
    return out_BTE.astype(v.dtype)


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
):
    """FLASH mixed chunk attention (token-exact for packed documents).

    out_i = quad_i + lin_i with, for chunks of C = chunk_size tokens (T is padded up to G * C
    internally with segment 0 and sliced back):

      quad_i = sum_{j in chunk(i), mask(i, j)} relu(qq_i . kq_j / C + quad_bias[i % C, j % C])^2 v_j
      lin_i  = ql_i . S_i,  S_i = (1 / N_i) sum_{j in L(i)} outer(kl_j, v_j),  0 if N_i = 0

    mask(i, j): same non-zero segment, and j <= i when causal. L(i): tokens of the same non-zero
    segment in chunks strictly before chunk(i) (causal), or all tokens of that segment, own chunk
    included (non-causal); N_i = |L(i)|.

    Precondition: documents are contiguous runs of equal `segment_ids` (what packing produces).
    The cross-chunk sums use it: the tokens of i's document before chunk g are exactly those of the
    document of token g*C - 1 when the ids match, so carries over chunks suffice and no `[T, T]`
    array is ever built (only `[B, G, C, C]` blocks and `[B, G, S, E]` sums).

    Args:
      quad_q, quad_k: `[B, T, S]` queries/keys of the quadratic (within-chunk) part.
      lin_q, lin_k: `[B, T, S]` queries/keys of the linear (across-chunk) part.
      v: values `[B, T, E]`, shared by both parts.
      chunk_size: C > 0.
      causal: autoregressive (True) or bidirectional (False).
      segment_ids: int `[B, T]`, 0 = padding; None = one document without padding.
      quad_bias: None or `[C, C]`, the relative bias of the quadratic part (the same in every
        chunk).

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
    pad = G * C - T

    def chunked(x):  # [B, T, ...] -> [B, G, C, ...], padding with zeros (= segment 0)
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape((B, G, C) + x.shape[2:])

    qq_BGCS, kq_BGCS, ql_BGCS, kl_BGCS, v_BGCE = (
        chunked(x) for x in (quad_q, quad_k, lin_q, lin_k, v)
    )
    seg_BGC = chunked(seg_BT)
    valid_BGC = seg_BGC != 0
    v32_BGCE = v_BGCE.astype(_F32)

    # ---- quadratic part, within each chunk ----
    same_BGCC = _same_segment(seg_BGC)  # same non-zero segment, within the chunk
    quad_mask_BGCC = same_BGCC
    if causal:
        quad_mask_BGCC = quad_mask_BGCC & jnp.tril(jnp.ones((C, C), dtype=bool))
    scores_BGCC = jnp.einsum("bgis,bgjs->bgij", qq_BGCS, kq_BGCS, preferred_element_type=_F32) / C
    if quad_bias is not None:
        scores_BGCC = scores_BGCC + quad_bias.astype(_F32)
    weights_BGCC = jnp.where(quad_mask_BGCC, jnp.square(jax.nn.relu(scores_BGCC)), 0.0)

    # ---- linear part: carries over chunks ----
    # Forward: P_g = sum of kl_j v_j^T (and count) over tokens j < (g+1)C of the document of the
    # chunk's last token: P_g = [doc continues from chunk g-1] * P_{g-1} + (its part in chunk g).
    seg_last_BG = seg_BGC[:, :, -1]
    fwd_link_BG = jnp.pad(seg_last_BG[:, 1:] == seg_last_BG[:, :-1], [(0, 0), (1, 0)])
    fwd_kv_BGSE, fwd_cnt_BG = _doc_scan(
        fwd_link_BG, seg_BGC == seg_last_BG[:, :, None], valid_BGC, kl_BGCS, v_BGCE, reverse=False
    )
    # Token i of chunk g uses P_{g-1} (the tokens before chunk g) iff its document is the one of
    # token gC - 1; a document that starts inside chunk g has no earlier tokens. Chunk 0 has none.
    prev_kv_BGSE = _shift(fwd_kv_BGSE, +1)
    prev_cnt_BG = _shift(fwd_cnt_BG, +1)
    prev_seg_BG = _shift(seg_last_BG, +1)  # 0 for chunk 0: never matches a real token
    use_prev_BGC = (seg_BGC == prev_seg_BG[:, :, None]) & valid_BGC

    # Rows of the within-chunk matrix that multiplies v, and the carry term per token.
    num_BGCE = jnp.where(
        use_prev_BGC[..., None],
        jnp.einsum("bgcs,bgse->bgce", ql_BGCS.astype(_F32), prev_kv_BGSE),
        0.0,
    )
    count_BGC = jnp.where(use_prev_BGC, prev_cnt_BG[:, :, None], 0.0)

    if causal:
        mix_BGCC = weights_BGCC
        norm_BGC = 1.0 / jnp.maximum(count_BGC, 1.0)  # count 0 -> sum is 0 -> lin 0, no 0/0
    else:
        # Backward: Q_g = sum over tokens j >= gC of the document of the chunk's first token.
        seg_first_BG = seg_BGC[:, :, 0]
        bwd_link_BG = jnp.pad(seg_first_BG[:, :-1] == seg_first_BG[:, 1:], [(0, 0), (0, 1)])
        bwd_kv_BGSE, bwd_cnt_BG = _doc_scan(
            bwd_link_BG, seg_BGC == seg_first_BG[:, :, None], valid_BGC, kl_BGCS, v_BGCE, True
        )
        next_kv_BGSE = _shift(bwd_kv_BGSE, -1)
        next_cnt_BG = _shift(bwd_cnt_BG, -1)
        next_seg_BG = _shift(seg_first_BG, -1)  # 0 after the last chunk
        use_next_BGC = (seg_BGC == next_seg_BG[:, :, None]) & valid_BGC
        num_BGCE = num_BGCE + jnp.where(
            use_next_BGC[..., None],
            jnp.einsum("bgcs,bgse->bgce", ql_BGCS.astype(_F32), next_kv_BGSE),
            0.0,
        )
        count_BGC = (
            count_BGC
            + jnp.where(use_next_BGC, next_cnt_BG[:, :, None], 0.0)
            + jnp.sum(same_BGCC, axis=-1, dtype=_F32)
        )
        norm_BGC = 1.0 / jnp.maximum(count_BGC, 1.0)
        # The own chunk's share of the linear part: a plain (no ReLU) kernel block, folded into
        # the within-chunk matrix so that one matmul with v serves both parts.
        lin_BGCC = jnp.einsum("bgis,bgjs->bgij", ql_BGCS, kl_BGCS, preferred_element_type=_F32)
        mix_BGCC = weights_BGCC + jnp.where(same_BGCC, lin_BGCC * norm_BGC[..., None], 0.0)

    out_BGCE = jnp.einsum("bgij,bgje->bgie", mix_BGCC, v32_BGCE) + num_BGCE * norm_BGC[..., None]
    out_BTE = out_BGCE.reshape(B, G * C, -1)[:, :T]
    return out_BTE.astype(v.dtype)


def _doc_scan(link_BG, member_BGC, valid_BGC, k_BGCS, v_BGCE, reverse):
    """x_g = [link_g] * x_{g-1} + sum_{j in chunk g, member} k_j v_j^T (and counts), in float32.

    With reverse=True the recurrence runs from the last chunk back (x_{g+1} feeds x_g).
    """
    take_BGC = member_BGC & valid_BGC  # padding never counts
    kv_BGSE = jnp.einsum(
        "bgcs,bgce->bgse",
        jnp.where(take_BGC[..., None], k_BGCS, 0),
        v_BGCE,
        preferred_element_type=_F32,
    )
    cnt_BG = jnp.sum(take_BGC, axis=-1, dtype=_F32)

    def combine(earlier, later):
        link_a, kv_a, cnt_a = earlier
        link_b, kv_b, cnt_b = later
        return (
            link_a & link_b,
            jnp.where(link_b[..., None, None], kv_a, 0.0) + kv_b,
            jnp.where(link_b, cnt_a, 0.0) + cnt_b,
        )

    _, kv_BGSE, cnt_BG = jax.lax.associative_scan(
        combine, (link_BG, kv_BGSE, cnt_BG), reverse=reverse, axis=1
    )
    return kv_BGSE, cnt_BG


def _shift(x_BG, by):
    """Shifts along the chunk axis (axis 1) by +1 (x_{g-1}) or -1 (x_{g+1}), filling zeros."""
    widths = [(0, 0)] * x_BG.ndim
    if by == 1:
        widths[1] = (1, 0)
        return jnp.pad(x_BG[:, :-1], widths)
    widths[1] = (0, 1)
    return jnp.pad(x_BG[:, 1:], widths)


def _same_segment(seg_XT):
    """[..., T] ids -> [..., T, T] mask: same segment and that segment is not padding."""
    return (seg_XT[..., :, None] == seg_XT[..., None, :]) & (seg_XT[..., :, None] != 0)


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
