"""flash_jax.ops.combiner (Combiner-Fixed) against a float64 reference written from the Combiner
paper's factorisation, one query at a time:

    p(j | i)   = exp(q_i . k_j) / Z_i                         j in O_0 (own span, j <= i causal)
    p(O_r | i) = exp(q_i . max-pool_{O_r} k) / Z_i             O_r: the document's tokens in span r
    p(j | O_r) = softmax over O_r of (max-pool_{O_r} q) . k_j
    out_i      = sum_j A_ij v_j,  A_ij = p(j | i) or p(O_r | i) p(j | O_r)

(queries scaled by 1 / sqrt(D)). The reference builds each row A_i of the full attention matrix
with Python loops over spans and tokens; the implementation never builds a `[T, T]` array.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flash_jax import ops
from flash_jax.ops import combiner
from tests.helpers import (
    QKV_HEAD_DIM,
    QKV_HEADS,
    assert_no_T_by_T_array,
    packed_segments,
    qkv_inputs,
)

combiner_attention = jax.jit(ops.combiner_attention, static_argnames=("causal", "span_size"))

H, D = QKV_HEADS, QKV_HEAD_DIM  # of qkv_inputs


def ref_attention_rows(q, k, seg, C, causal):
    """A [B, H, T, T] float64: the Combiner-Fixed attention matrix, row by row."""
    q = np.asarray(q, np.float64) / np.sqrt(q.shape[-1])
    k = np.asarray(k, np.float64)
    seg = np.asarray(seg)
    B, T = seg.shape
    A = np.zeros((B, q.shape[2], T, T))
    for b in range(B):
        for h in range(q.shape[2]):
            for i in range(T):
                doc, g = seg[b, i], i // C
                if doc == 0:
                    continue
                direct = [
                    j
                    for j in range(g * C, min(g * C + C, T))
                    if seg[b, j] == doc and (j <= i or not causal)
                ]
                groups = []
                for r in range(-(-T // C)):
                    if r < g or (r > g and not causal):
                        members = [j for j in range(r * C, min(r * C + C, T)) if seg[b, j] == doc]
                        if members:
                            groups.append(members)
                direct_e = [np.exp(q[b, i, h] @ k[b, j, h]) for j in direct]
                span_e = [np.exp(q[b, i, h] @ k[b, m, h].max(axis=0)) for m in groups]
                Z = sum(direct_e) + sum(span_e)
                for j, e in zip(direct, direct_e, strict=True):
                    A[b, h, i, j] = e / Z
                for members, e in zip(groups, span_e, strict=True):
                    span_q = q[b, members, h].max(axis=0)
                    local = np.exp([span_q @ k[b, j, h] for j in members])
                    A[b, h, i, members] += e / Z * local / local.sum()
    return A


def ref_combiner(q, k, v, seg, C, causal):
    A = ref_attention_rows(q, k, seg, C, causal)
    return np.einsum("bhij,bjhd->bihd", A, np.asarray(v, np.float64))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("span_size", [8, 4])
def test_matches_factorised_reference(causal, span_size):
    seg = packed_segments()
    q, k, v = qkv_inputs(2, 29, seed=1)
    got = np.asarray(
        combiner_attention(q, k, v, causal=causal, span_size=span_size, segment_ids=seg)
    )
    want = ref_combiner(q, k, v, seg, span_size, causal)
    # Convex combinations of v (|v| < 5) from float32 softmaxes over <= 8 + 8 logits: errors of
    # a few 1e-7 relative; 1e-5 absolute leaves a margin.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.all(got[seg == 0] == 0.0)  # padding rows are exactly 0


def test_the_attention_is_full():
    """Every token of the query's document (j <= i when causal) gets a positive weight, and the
    weights sum to 1: the factorisation covers the document exactly once."""
    seg = packed_segments()
    q, k, _ = qkv_inputs(2, 29, seed=2)
    for causal in (True, False):
        A = ref_attention_rows(q, k, seg, 4, causal)
        T = seg.shape[1]
        same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
        if causal:
            same = same & np.tril(np.ones((T, T), bool))
        np.testing.assert_array_equal(A > 0, np.broadcast_to(same[:, None], A.shape))
        want_sum = np.broadcast_to((seg != 0)[:, None].astype(float), A.shape[:3])
        np.testing.assert_allclose(A.sum(-1), want_sum, atol=1e-12)


def test_one_span_is_softmax_attention():
    T = 12
    q, k, v = qkv_inputs(1, T, seed=3)
    got = combiner_attention(q, k, v, causal=True, span_size=16)
    logits = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(D)
    logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, np.einsum("bhij,bjhd->bihd", weights, v), atol=1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_gradient_reaches_exactly_the_document(causal):
    seg = packed_segments()
    q, k, v = qkv_inputs(2, 29, seed=4)
    i = 12  # row 0: document 2 (tokens 5-18), spans of 4: the third span

    def out_i(v):
        out = combiner_attention(q, k, v, causal=causal, span_size=4, segment_ids=seg)
        return jnp.sum(out[0, i])

    d_v = np.abs(np.asarray(jax.grad(out_i)(v))).sum(axis=(-2, -1))
    last = i if causal else 18
    assert np.all(d_v[0, 5 : last + 1] > 0)
    assert np.count_nonzero(d_v) == last + 1 - 5


def test_cost_is_sub_quadratic():
    def attend(q, k, v, causal, seg):
        return ops.combiner_attention(q, k, v, causal=causal, span_size=8, segment_ids=seg)

    assert_no_T_by_T_array(attend, seed=5)


def test_decode_step_equals_the_causal_rows():
    C, T = 4, 11
    q, k, v = qkv_inputs(1, T, seed=6)
    want = np.asarray(combiner_attention(q, k, v, causal=True, span_size=C))
    state = combiner.init_state(1, H, D, C, T, jnp.float32)
    for t in range(T):
        out, state = combiner.decode_step(q[:, t], k[:, t], v[:, t], jnp.int32(t), state, C)
        np.testing.assert_allclose(out, want[:, t], rtol=0, atol=1e-5)


def test_a_stretch_after_prior_spans_equals_the_rows_of_the_whole_sequence():
    """Whole-document scoring's window: the spans before the stretch enter as `PriorSpans`
    (their summaries, in 3 of 8 slots; the others hold junk that must not be read), read by
    the stretch's first document only (document 2 starts inside the stretch; padding ends it)."""
    C, begin = 4, 12
    seg = np.array([[1] * 20 + [2] * 9 + [0] * 3], np.int32)
    q, k, v = qkv_inputs(1, 32, seed=9)
    span_k, span_v = combiner.completed_span_summaries(q[:, :begin], k[:, :begin], v[:, :begin], C)
    junk = 100.0 * np.ones((1, 5, H, D), np.float32)
    prior = combiner.PriorSpans(
        jnp.concatenate([span_k, junk], 1), jnp.concatenate([span_v, junk], 1), begin // C
    )
    got = ops.combiner_attention(
        *(x[:, begin:] for x in (q, k, v)),
        causal=True,
        span_size=C,
        segment_ids=seg[:, begin:],
        prior=prior,
    )
    want = ref_combiner(q, k, v, seg, C, True)[:, begin:]
    # As test_matches_factorised_reference: softmaxes over <= 4 + 5 + 3 logits.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="causal attention only"):
        ops.combiner_attention(q, k, v, causal=False, span_size=C, prior=prior)


def test_bfloat16_and_large_inputs_stay_finite():
    seg = packed_segments()
    q, k, v = qkv_inputs(2, 29, seed=7, scale=30.0)

    def loss(q, k, v):
        return jnp.sum(combiner_attention(q, k, v, causal=True, span_size=4, segment_ids=seg))

    for grad in jax.grad(loss, argnums=(0, 1, 2))(q, k, v):
        assert np.isfinite(np.asarray(grad)).all()
    out = combiner_attention(
        *(x.astype(jnp.bfloat16) for x in (q, k, v)), causal=False, span_size=4, segment_ids=seg
    )
    assert out.dtype == jnp.bfloat16 and np.isfinite(np.asarray(out, np.float32)).all()


def test_bad_shapes_are_named():
    q, k, v = qkv_inputs(1, 8, seed=8)
    with pytest.raises(ValueError, match="share one shape"):
        ops.combiner_attention(q, k, v[:, :4], causal=True, span_size=4)
