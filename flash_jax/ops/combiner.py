"""Combiner attention (Ren et al., "Combiner: Full Attention Transformer with Sparse Computation
Cost", NeurIPS 2021), variant Combiner-Fixed: full softmax attention over the whole document,
factorised so that its cost is sub-quadratic.

The sequence is cut into spans of C tokens. For query i of document d in span g:

    O_0 = tokens of d in span g (j <= i when causal)                  direct expectation
    O_r = tokens of d in span r, for r < g (causal) or r != g          local expectation
          (bidirectional), each that holds a token of d
    p(j | i)     = exp(q_i . k_j) / Z_i                                j in O_0
    p(O_r | i)   = exp(q_i . k_r) / Z_i,   k_r = max-pool over O_r of k_j
    p(j | O_r)   = exp(q_r . k_j) / sum_{l in O_r} exp(q_r . k_l),   q_r = max-pool over O_r of q_j
    Z_i          = sum_{j in O_0} exp(q_i . k_j) + sum_r exp(q_i . k_r)
    out_i        = sum_{j in O_0} p(j | i) v_j + sum_r p(O_r | i) sum_{j in O_r} p(j | O_r) v_j

with queries scaled by 1 / sqrt(D) first (max-pooling commutes with that scale). Every token of
the document gets weight p(O_r | i) p(j | O_r) > 0: the attention is full, not sparse. The span
summaries (k_r, and the span's expected value v_r = sum_j p(j | O_r) v_j) do not depend on i, so
a query reads C direct logits and at most G = ceil(T / C) span logits: O(T (C + T / C) D) time
and memory, O(T^1.5 D) at C ~ sqrt(T) (the paper's choice). No `[T, T]` array is built.

Why this variant. The paper compares "Combiner" without naming the variant (not found in the
sources we have). Combiner-Fixed is the one that works for both causal and bidirectional models
with one definition, its spans are FLASH's chunks (so the two compare at the same C), and it is
what the Combiner authors' released code configures for Wiki-40B language modelling
(`sqrt_fixed_full`, max-pooled summaries, spans of 128 at 2048 tokens). Combiner-Axial and
-Mixture add summaries of column groups for images; they are not implemented here.

Packed documents (token-exact, as FLASH's linear part): a span summary serves query i only if it
is taken over i's document. Documents are contiguous runs, so the tokens of i's document in an
earlier span r are those of the document of r's last token, and in a later span those of the
document of r's first token: each span has a "tail" summary (over the document of its last token)
read by later spans of that document, and for bidirectional models a "head" summary (over the
document of its first token) read by earlier spans: the links of FLASH's linear part
(`state_passing.chunk_links`, whose directions 0 and 1 are these tails and heads). Padding (id 0)
reads nothing and gets 0.

Logits, softmaxes and sums are float32; the result is cast back to v's dtype.
Shapes: B batch, T tokens, H heads, D head width, G spans, C span size, R spans (as keys).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flash_jax.ops import attention, multihead, state_passing

_F32 = jnp.float32


class PriorSpans(NamedTuple):
    """The completed spans of a document before a stretch of the sequence (causal only): their
    key summaries and expected values `[B, R, H, D]` float32 (`completed_span_summaries`) in the
    first `count` of R slots. The stretch's tokens of the document of its first token read them
    as they read the summaries of earlier spans inside the stretch."""

    span_k_BRHD: jax.Array
    span_v_BRHD: jax.Array
    count: jax.Array  # int scalar: the slots filled


def combiner_attention(q, k, v, *, causal: bool, span_size: int, segment_ids=None, prior=None):
    """Combiner-Fixed attention (module docstring).

    Args:
      q, k, v: `[B, T, H, D]` (RoPE, if any, already applied to q and k).
      causal: autoregressive (O_0 keeps j <= i, only earlier spans) or bidirectional.
      span_size: C, the span length (T is padded up to G * C internally with segment 0).
      segment_ids: int `[B, T]`, contiguous runs of equal ids, 0 = padding; None = one document.
      prior: None, or the `PriorSpans` of the document that continues into the stretch's first
        token from before it (whole-document scoring, flash_jax/long_context.py); causal only,
        and the stretch must start at a span boundary of that document.

    Returns:
      `[B, T, H, D]` in v's dtype; padding rows are exactly 0.
    """
    q, k, v, seg_BT = multihead.check_inputs(q, k, v, segment_ids)
    seg_BGC = multihead.chunked(seg_BT, int(span_size))
    links = state_passing.chunk_links(seg_BGC, causal)  # shared by the heads
    if prior is None:
        span_k_BRHD = span_v_BRHD = reads_BGCR = None
    else:
        if not causal:
            raise ValueError("prior spans are read by causal attention only")
        span_k_BRHD, span_v_BRHD = prior.span_k_BRHD, prior.span_v_BRHD
        continues_BGC = (seg_BGC == seg_BT[:, :1, None]) & (seg_BGC != 0)
        filled_R = jnp.arange(span_k_BRHD.shape[1]) < prior.count
        reads_BGCR = continues_BGC[..., None] & filled_R

    def one_head(q_BTD, k_BTD, v_BTD, span_k_BRD, span_v_BRD):
        prior_head = None if prior is None else (span_k_BRD, span_v_BRD, reads_BGCR)
        return _combiner_head(q_BTD, k_BTD, v_BTD, seg_BGC, links, causal, prior_head)

    return multihead.per_head(one_head, q, k, v, span_k_BRHD, span_v_BRHD).astype(v.dtype)


def _combiner_head(q_BTD, k_BTD, v_BTD, seg_BGC, links, causal, prior=None):
    B, T, D = q_BTD.shape
    G, C = seg_BGC.shape[1:]
    q_BGCD = multihead.chunked(q_BTD.astype(_F32) * D**-0.5, C)
    k_BGCD, v_BGCD = (multihead.chunked(x.astype(_F32), C) for x in (k_BTD, v_BTD))

    # Direct expectation: the own span's tokens of the document (j <= i when causal).
    logits = [jnp.einsum("bgid,bgjd->bgij", q_BGCD, k_BGCD)]
    masks = [attention._quadratic_mask(seg_BGC, causal)]

    # Local expectations: per span and direction d, a summary over `member_BGCD[..., d]` (tail:
    # the document of the span's last token, d = 0; head: of its first token, d = 1), read by
    # the tokens of span g that FLASH's linear part would pass it to (`state_passing.chunk_links`,
    # the one home of the packed-document rule): i's document in earlier (d = 0) or later
    # (d = 1) spans. Combiner reads each summary with its own softmax weight, so the summaries
    # are not summed across spans (`state_passing.pass_states` does not apply): the link matrix
    # is the mask.
    span_values = []
    for d in range(links.use_BGCD.shape[-1]):
        span_k_BRD, span_v_BRD = span_summaries(q_BGCD, k_BGCD, v_BGCD, links.member_BGCD[..., d])
        logits.append(jnp.einsum("bgcd,brd->bgcr", q_BGCD, span_k_BRD))
        masks.append(links.use_BGCD[:, :, :, d, None] & links.link_BDGH[:, d, :, None, :])
        span_values.append(span_v_BRD)
    if prior is not None:  # the spans of i's document before the stretch, each one summary
        span_k_BRD, span_v_BRD, reads_BGCR = prior
        logits.append(jnp.einsum("bgcd,brd->bgcr", q_BGCD, span_k_BRD))
        masks.append(reads_BGCR)
        span_values.append(span_v_BRD)

    weights = masked_softmax(jnp.concatenate(logits, -1), jnp.concatenate(masks, -1))
    widths = [C] + [span_v.shape[1] for span_v in span_values]
    parts = jnp.split(weights, np.cumsum(widths)[:-1].tolist(), axis=-1)
    out_BGCD = jnp.einsum("bgij,bgjd->bgid", parts[0], v_BGCD)
    for weights_BGCR, span_v_BRD in zip(parts[1:], span_values, strict=True):
        out_BGCD = out_BGCD + jnp.einsum("bgcr,brd->bgcd", weights_BGCR, span_v_BRD)
    return out_BGCD.reshape(B, G * C, D)[:, :T]


def span_summaries(q_XCD, k_XCD, v_XCD, member_XC):
    """Per span (axes X), over its `member` tokens: the key summary k_r = max-pool k (`[X, D]`)
    and the expected value v_r (`span_value` with q_r = max-pool q). Spans without members give
    zeros (never read)."""
    span_q_XD, span_k_XD = max_pool(q_XCD, member_XC), max_pool(k_XCD, member_XC)
    return span_k_XD, span_value(span_q_XD, k_XCD, v_XCD, member_XC)


def completed_span_summaries(q, k, v, span_size: int):
    """Key summaries and expected values `[B, G, H, D]` float32 of the G = T / C spans of a
    stretch `[B, T, H, D]` of one document (every token a member of its span): what the
    stretches after it read as `PriorSpans`."""
    D, C = q.shape[-1], span_size

    def spans(x_BTHD):  # [B, G, H, C, D]
        return multihead.chunked(x_BTHD.astype(_F32), C).swapaxes(2, 3)

    everyone_C = jnp.ones((C,), bool)
    return span_summaries(spans(q) * D**-0.5, spans(k), spans(v), everyone_C)


def max_pool(x_XCD, member_XC):
    """Elementwise max over the member tokens (axis -2); 0 where there are none."""
    pooled = jnp.max(jnp.where(member_XC[..., None], x_XCD, -jnp.inf), axis=-2)
    return jnp.where(jnp.any(member_XC, axis=-1)[..., None], pooled, 0.0)


def span_value(span_q_XD, k_XCD, v_XCD, member_XC):
    """v_r = sum_j p(j | O_r) v_j, p(j | O_r) = softmax over the members of q_r . k_j."""
    p_XC = masked_softmax(jnp.einsum("...d,...cd->...c", span_q_XD, k_XCD), member_XC)
    return jnp.einsum("...c,...cd->...d", p_XC, v_XCD)


def masked_softmax(logits, mask):
    """Softmax over the last axis restricted to `mask`; rows without any kept entry give 0.
    Masked entries never reach exp (no inf * 0 in the gradient)."""
    row_max = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    e = jnp.exp(jnp.where(mask, logits - row_max, -jnp.inf))
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(total > 0, total, 1.0)


def init_state(batch_size: int, num_heads: int, head_dim: int, span_size: int, length: int, dtype):
    """Causal decoding state for a context of `length` tokens: the current span's keys and values
    and running query max, and the summaries of completed spans (ceil(length / C) slots, so it
    grows with the context, by a factor C less than a key/value cache)."""
    B, H, D, C = batch_size, num_heads, head_dim, span_size
    R = -(-length // C)
    return {
        "k": jnp.zeros((B, C, H, D), dtype),
        "v": jnp.zeros((B, C, H, D), dtype),
        "q_max": jnp.zeros((B, H, D), _F32),
        "span_k": jnp.zeros((B, R, H, D), _F32),
        "span_v": jnp.zeros((B, R, H, D), _F32),
    }


def decode_step(q_BHD, k_BHD, v_BHD, t, state, span_size: int):
    """One causal token at position t (a scalar) of a single document; returns (output `[B, H, D]`
    float32, state). Equals the token's row of `combiner_attention`."""
    C, D = span_size, q_BHD.shape[-1]
    slot, g = t % C, t // C
    q = q_BHD.astype(_F32) * D**-0.5

    def put(buffer, new_BHD):
        return jax.lax.dynamic_update_slice_in_dim(
            buffer, new_BHD[:, None].astype(buffer.dtype), slot, 1
        )

    keys_BCHD, values_BCHD = put(state["k"], k_BHD), put(state["v"], v_BHD)
    q_max = jnp.where(slot == 0, q, jnp.maximum(state["q_max"], q))
    keys, values = keys_BCHD.astype(_F32), values_BCHD.astype(_F32)
    R = state["span_k"].shape[1]
    logits = jnp.concatenate(
        [
            jnp.einsum("bhd,bchd->bhc", q, keys),
            jnp.einsum("bhd,brhd->bhr", q, state["span_k"]),
        ],
        axis=-1,
    )
    mask = jnp.concatenate([jnp.arange(C) <= slot, jnp.arange(R) < g])
    weights_BHCR = masked_softmax(logits, mask)
    out = jnp.einsum("bhc,bchd->bhd", weights_BHCR[..., :C], values) + jnp.einsum(
        "bhr,brhd->bhd", weights_BHCR[..., C:], state["span_v"]
    )

    # A completed span's summaries join the ones later tokens read (as the forward pass's).
    everyone_C = jnp.ones((C,), bool)  # a completed span of one document
    keys_BHCD, values_BHCD = keys.swapaxes(1, 2), values.swapaxes(1, 2)
    span_k_BHD = max_pool(keys_BHCD, everyone_C)
    span_v_BHD = span_value(q_max, keys_BHCD, values_BHCD, everyone_C)
    complete = slot == C - 1

    def add_span(buffer, new_BHD):
        updated = jax.lax.dynamic_update_slice_in_dim(buffer, new_BHD[:, None], g, 1)
        return jnp.where(complete, updated, buffer)

    return out, {
        "k": keys_BCHD,
        "v": values_BCHD,
        "q_max": q_max,
        "span_k": add_span(state["span_k"], span_k_BHD),
        "span_v": add_span(state["span_v"], span_v_BHD),
    }
