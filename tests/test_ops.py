"""Tests of flash_jax.ops: each function against a dense reference written from the spec.

The reference (`_ref_masks`, `_ref_mixed`, `_ref_quadratic`) builds the spec's sets as dense
`[T, T]` masks from their definitions (same chunk, same non-zero segment, j <= i, L(i), N_i) and
never uses chunk carries, so it shares no logic with the efficient implementation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flash_jax import ops
from scripts import op_cost
from tests.helpers import has_quadratic_array, num_instructions

# Jitted once per shape: op-by-op (eager) dispatch compiles every primitive separately and is
# several times slower on the test CPUs. `test_jit_and_vmap_match_eager` covers the eager path.
mixed_chunk_attention = jax.jit(ops.mixed_chunk_attention, static_argnames=("chunk_size", "causal"))
quadratic_attention = jax.jit(ops.quadratic_attention, static_argnames=("n", "causal"))

S, E = 8, 6  # query/key width and value width of the test inputs


# ---------------------------------------------------------------- the dense reference ----


def _ref_masks(seg_BT, C, causal):
    """Dense spec masks: quad [B, T, T] (bool) and linear weights [B, T, T] = 1/N_i on L(i)."""
    seg_BT = np.asarray(seg_BT)
    T = seg_BT.shape[1]
    i = np.arange(T)
    same = (seg_BT[:, :, None] == seg_BT[:, None, :]) & (seg_BT[:, :, None] != 0)
    chunk = i // C
    before_or_self = i[None, :] <= i[:, None]  # [i, j]: j <= i
    quad = same & (chunk[:, None] == chunk[None, :])
    if causal:
        quad = quad & before_or_self
        lin_set = same & (chunk[None, :] < chunk[:, None])  # strictly earlier chunks
    else:
        lin_set = same  # the whole document, own chunk included
    count = lin_set.sum(-1, keepdims=True)
    lin_w = np.where(lin_set, 1.0 / np.maximum(count, 1), 0.0)
    return quad, lin_w


def _relu_sq(x, xp):
    return xp.square(xp.maximum(x, 0.0))


def _ref_mixed(qq, kq, ql, kl, v, *, C, causal, seg, quad_bias=None, xp=np):
    """The spec's mixed chunk attention, dense; xp=np in float64 or xp=jnp (for gradients)."""
    quad_mask, lin_w = _ref_masks(seg, C, causal)
    T = np.asarray(seg).shape[1]
    bias_TT = 0.0
    if quad_bias is not None:  # bias(i, j) = quad_bias[i % C, j % C] (used only in-chunk)
        pos = np.arange(T) % C
        bias_TT = xp.asarray(quad_bias)[pos][:, pos]
    scores = xp.einsum("bis,bjs->bij", qq, kq) / C + bias_TT
    quad = xp.where(quad_mask, _relu_sq(scores, xp), 0.0)
    lin = xp.einsum("bis,bjs->bij", ql, kl) * lin_w
    return xp.einsum("bij,bje->bie", quad + lin, v)


def _ref_quadratic(q, k, v, *, n, causal, seg, bias=None, xp=np):
    quad_mask, _ = _ref_masks(seg, C=np.asarray(seg).shape[1], causal=causal)  # one chunk
    scores = xp.einsum("bis,bjs->bij", q, k) / n
    if bias is not None:
        scores = scores + bias
    return xp.einsum("bij,bje->bie", xp.where(quad_mask, _relu_sq(scores, xp), 0.0), v)


def _inputs(B, T, seed=0, num=5):
    """Random float32 inputs: `num - 1` query/key arrays [B, T, S] and v [B, T, E] last."""
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(B, T, S)).astype(np.float32) for _ in range(num - 1)]
    return xs + [rng.normal(size=(B, T, E)).astype(np.float32)]


def _f64(xs):
    return [np.asarray(x, np.float64) for x in xs]


def _assert_close(out, ref, tol=1e-5):
    """rtol/atol `tol`, the absolute part relative to the output's scale."""
    ref = np.asarray(ref)
    scale = max(float(np.max(np.abs(ref))), 1e-30)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=tol, atol=tol * scale)


# Segment layouts as (T, C, rows); None = no segment_ids. Documents start and end inside chunks,
# span several chunks, sit exactly on chunk boundaries, have one token; padding trails or sits
# between documents.
LAYOUTS = {
    "packed": (
        22,
        4,
        [
            [1] * 3 + [2] * 10 + [3] * 5 + [0] * 4,
            [1] * 8 + [2] * 8 + [3] * 1 + [4] * 5,
            [1] * 5 + [0] * 2 + [2] * 11 + [0] * 4,
        ],
    ),
    "one_doc": (16, 4, None),
    "single_chunk": (8, 8, [[1] * 3 + [2] * 4 + [0], [1] * 8]),
    "shorter_than_chunk": (5, 8, [[1, 1, 2, 2, 0], [3, 3, 3, 3, 3]]),
}


def _layout(name):
    T, C, rows = LAYOUTS[name]
    B = 2 if rows is None else len(rows)
    seg = None if rows is None else np.asarray(rows, np.int32)
    seg_ref = np.ones((B, T), np.int32) if seg is None else seg
    return T, C, B, seg, seg_ref


# ---------------------------------------------------------------- bf16 error bounds ----

# bf16 keeps 8 significant bits: rounding to it moves x by at most U |x|.
U = 2.0**-8


def _relu2_magnitudes(q, k, v, d_out, scores, mask, scale):
    """Float64 sums of |terms| of relu(scores)^2 v and of its cotangents (`_mixed_magnitudes`)."""
    relu = np.maximum(scores, 0.0)
    weights = np.where(mask, relu**2, 0.0)
    d_scores = np.where(mask, 2.0 * relu * np.einsum("bie,bje->bij", abs(d_out), abs(v)), 0.0)
    return {
        "out": np.einsum("bij,bje->bie", weights, abs(v)),
        "d_v": np.einsum("bij,bie->bje", weights, abs(d_out)),
        "d_q": np.einsum("bij,bjs->bis", d_scores, abs(k)) / scale,
        "d_k": np.einsum("bij,bis->bjs", d_scores, abs(q)) / scale,
    }


def _mixed_magnitudes(qq, kq, ql, kl, v, quad_bias, d_out, *, C, causal, seg):
    """For the output and each input's gradient of `_ref_mixed` (but quad_bias's), the float64
    sum of the absolute values of the products it sums (e.g. out_i: sum_j |W_ij| |v_j| +
    sum_j lin_w_ij |ql_i|.|kl_j| |v_j|).

    Rounding any factor of every product by a relative r moves a result by at most r times this,
    whatever cancels in the result itself: what the bf16 bounds scale with."""
    quad_mask, lin_w = _ref_masks(seg, C, causal)
    pos_TC = np.eye(C)[np.arange(seg.shape[1]) % C]  # one-hot position in the chunk
    scores = np.einsum("bis,bjs->bij", qq, kq) / C + pos_TC @ quad_bias @ pos_TC.T
    quad = _relu2_magnitudes(qq, kq, v, d_out, scores, quad_mask, C)
    lin = np.einsum("bis,bjs->bij", abs(ql), abs(kl)) * lin_w
    d_lin = np.einsum("bie,bje->bij", abs(d_out), abs(v)) * lin_w
    return {
        "out": quad["out"] + np.einsum("bij,bje->bie", lin, abs(v)),
        "d_quad_q": quad["d_q"],
        "d_quad_k": quad["d_k"],
        "d_lin_q": np.einsum("bij,bjs->bis", d_lin, abs(kl)),
        "d_lin_k": np.einsum("bij,bis->bjs", d_lin, abs(ql)),
        "d_v": quad["d_v"] + np.einsum("bij,bie->bje", lin, abs(d_out)),
    }


def _assert_within_bf16_bound(name, got, want, magnitude, roundings):
    """|got - want| <= U |want| + (roundings U + 8 U^2) magnitude + 2^-16 max(magnitude).

    The bf16 precision policy (flash_jax/ops/attention.py) rounds each product's factors to
    bf16 at most `roundings` times on the way to a result (operands of bf16 inputs are exact;
    float32 accumulation adds no bf16 error) and the result once at the end: U |want| for the
    last rounding, roundings U (1 + U) magnitude for the operands, 8 U^2 magnitude covering the
    second-order terms. The last term covers float32 arithmetic (scores, sums over at most a few
    hundred terms: relative 2^-24 each), far below any bf16 rounding. Errors reach 20-80% of
    the bound in these tests; a wrong mask or a lost or doubled term shows as an error of the
    order of the result itself, a rounding more than the policy's as up to twice the bound."""
    got = np.asarray(got, np.float64)
    bound = U * np.abs(want) + (roundings * U + 8 * U**2) * magnitude + 2.0**-16 * np.max(magnitude)
    excess = np.abs(got - want) / bound
    assert np.all(excess <= 1.0), f"{name}: error up to {np.max(excess):.2f} x its bound"


def _vjp(fn, primals, d_out):
    out, vjp = jax.vjp(fn, *primals)
    return out, vjp(d_out)


# ---------------------------------------------------------------- reference comparisons ----


# Every layout with a bias, and the richest layout also without (the bias is one optional add).
@pytest.mark.parametrize(
    "layout, with_bias", [(name, True) for name in LAYOUTS] + [("packed", False)]
)
@pytest.mark.parametrize("causal", [True, False])
def test_mixed_matches_dense_reference(layout, causal, with_bias):
    T, C, B, seg, seg_ref = _layout(layout)
    xs = _inputs(B, T, seed=1)
    bias = np.random.default_rng(2).normal(size=(C, C)).astype(np.float32) if with_bias else None
    out = mixed_chunk_attention(*xs, chunk_size=C, causal=causal, segment_ids=seg, quad_bias=bias)
    ref = _ref_mixed(*_f64(xs), C=C, causal=causal, seg=seg_ref, quad_bias=bias)
    assert out.shape == (B, T, E) and out.dtype == jnp.float32
    _assert_close(out, ref)
    # Padding rows are exactly zero.
    assert np.all(np.asarray(out)[seg_ref == 0] == 0.0)


@pytest.mark.parametrize("layout", ["packed", "one_doc"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bias_rank", [0, 2, 3])
def test_quadratic_matches_dense_reference(layout, causal, bias_rank):
    T, _, B, seg, seg_ref = _layout(layout)
    q, k, v = _inputs(B, T, seed=3, num=3)
    rng = np.random.default_rng(4)
    bias = {0: None, 2: rng.normal(size=(T, T)), 3: rng.normal(size=(B, T, T))}[bias_rank]
    bias = None if bias is None else bias.astype(np.float32)
    n = 512  # the training length, unrelated to T
    out = quadratic_attention(q, k, v, n=n, causal=causal, segment_ids=seg, bias=bias)
    ref = _ref_quadratic(*_f64([q, k, v]), n=n, causal=causal, seg=seg_ref, bias=bias)
    assert out.shape == (B, T, E) and out.dtype == jnp.float32
    _assert_close(out, ref)
    assert np.all(np.asarray(out)[seg_ref == 0] == 0.0)


def test_mixed_long_document_many_chunks():
    """Carries over many chunks, several documents each spanning chunks, both modes."""
    T, C = 64, 8
    seg = np.asarray([[1] * 13 + [2] * 30 + [3] * 17 + [0] * 4], np.int32)
    xs = _inputs(1, T, seed=5)
    for causal in (True, False):
        out = mixed_chunk_attention(*xs, chunk_size=C, causal=causal, segment_ids=seg)
        _assert_close(out, _ref_mixed(*_f64(xs), C=C, causal=causal, seg=seg))


# ---------------------------------------------------------------- gradients, jit, vmap ----


@pytest.mark.parametrize("causal", [True, False])
def test_mixed_gradients_finite_and_match_reference(causal):
    """Padding, single-token documents and first chunks (N_i = 0) give finite, correct grads."""
    T, C, B, seg, _ = _layout("packed")
    xs = [jnp.asarray(x) for x in _inputs(B, T, seed=6)]
    bias = jnp.asarray(np.random.default_rng(7).normal(size=(C, C)), jnp.float32)

    def loss(fn, *args):
        return jnp.sum(jnp.sin(fn(*args)))  # a non-linear read-out so every output matters

    def ours(*a):
        return mixed_chunk_attention(
            *a[:5], chunk_size=C, causal=causal, segment_ids=seg, quad_bias=a[5]
        )

    def dense(*a):
        return _ref_mixed(*a[:5], C=C, causal=causal, seg=seg, quad_bias=a[5], xp=jnp)

    argnums = tuple(range(6))
    grads = jax.jit(jax.grad(lambda *a: loss(ours, *a), argnums=argnums))(*xs, bias)
    grads_ref = jax.jit(jax.grad(lambda *a: loss(dense, *a), argnums=argnums))(*xs, bias)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert np.all(np.isfinite(np.asarray(g)))
        _assert_close(g, g_ref, tol=1e-4)  # float32 on both sides, different summation orders
    # Padding tokens receive no gradient.
    for g in grads[:5]:
        assert np.all(np.asarray(g)[seg == 0] == 0.0)


def test_quadratic_gradients_finite_and_match_reference():
    T, _, B, seg, _ = _layout("packed")
    xs = [jnp.asarray(x) for x in _inputs(B, T, seed=8, num=3)]

    def ours(*a):
        return jnp.sum(jnp.sin(quadratic_attention(*a, n=16, causal=True, segment_ids=seg)))

    def dense(*a):
        return jnp.sum(jnp.sin(_ref_quadratic(*a, n=16, causal=True, seg=seg, xp=jnp)))

    grads = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(*xs)
    grads_ref = jax.jit(jax.grad(dense, argnums=(0, 1, 2)))(*xs)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert np.all(np.isfinite(np.asarray(g)))
        _assert_close(g, g_ref, tol=1e-4)


MIXED_INPUTS = ("quad_q", "quad_k", "lin_q", "lin_k", "v", "quad_bias")


# Packed documents across chunk boundaries with padding and T % C != 0, and one document with
# T % C == 0 (no padding of the chunks), both with the relative bias; float32 at the forward's
# and the gradients' usual tolerances, bf16 at the derived bound.
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout", ["packed", "one_doc"])
def test_mixed_forward_and_gradients_match_float64_reference(layout, causal, dtype):
    T, C, B, seg, seg_ref = _layout(layout)
    rng = np.random.default_rng(30)
    xs = [jnp.asarray(x, dtype) for x in _inputs(B, T, seed=31)]
    bias = jnp.asarray(rng.normal(size=(C, C)), jnp.float32)  # the layer's is in param dtype
    d_out = jnp.asarray(rng.normal(size=(B, T, E)), dtype)

    def ours(*a):
        return ops.mixed_chunk_attention(
            *a[:5], chunk_size=C, causal=causal, segment_ids=seg, quad_bias=a[5]
        )

    def dense(*a):
        return _ref_mixed(*a[:5], C=C, causal=causal, seg=seg_ref, quad_bias=a[5], xp=jnp)

    out, grads = jax.jit(functools.partial(_vjp, ours))((*xs, bias), d_out)
    assert out.dtype == dtype
    assert [g.dtype for g in grads] == [x.dtype for x in (*xs, bias)]
    f64 = _f64([*xs, bias, d_out])  # the same (bf16-rounded) values, exactly
    with jax.enable_x64(True):
        ref, ref_grads = jax.jit(functools.partial(_vjp, dense))(f64[:6], f64[6])
        ref, ref_grads = np.asarray(ref), [np.asarray(g) for g in ref_grads]
    names = ("out",) + tuple(f"d_{name}" for name in MIXED_INPUTS)
    if dtype == "float32":
        _assert_close(out, ref)
        for g, g_ref in zip(grads, ref_grads, strict=True):
            _assert_close(g, g_ref, tol=1e-4)
    else:
        # Two roundings at most on any path: the per-chunk sums and the passed state (and, in
        # the backward, the passed cotangent and dA); one for the [C, C] weights and dS.
        mags = _mixed_magnitudes(*f64, C=C, causal=causal, seg=seg_ref)
        for name, got, want in zip(
            names[:6], (out, *grads[:5]), (ref, *ref_grads[:5]), strict=True
        ):
            _assert_within_bf16_bound(name, got, want, mags[name], roundings=2)
        # quad_bias's gradient sums float32 score cotangents of exact bf16 products: float32's
        # tolerance (a bf16 rounding of dS before the sum would show).
        _assert_close(grads[5], ref_grads[5], tol=1e-4)
    # Padding: output exactly 0, no gradient.
    assert np.all(np.asarray(out)[seg_ref == 0] == 0.0)
    for g in grads[:5]:
        assert np.all(np.asarray(g)[seg_ref == 0] == 0.0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("causal, bias_rank", [(True, 2), (False, 3)])
def test_quadratic_forward_and_gradients_match_float64_reference(causal, bias_rank, dtype):
    T, _, B, seg, seg_ref = _layout("packed")
    rng = np.random.default_rng(32)
    q, k, v = (jnp.asarray(x, dtype) for x in _inputs(B, T, seed=33, num=3))
    bias = jnp.asarray(rng.normal(size=(B, T, T)[-bias_rank:]), jnp.float32)
    d_out = jnp.asarray(rng.normal(size=(B, T, E)), dtype)
    n = 16

    def ours(*a):
        return ops.quadratic_attention(*a[:3], n=n, causal=causal, segment_ids=seg, bias=a[3])

    def dense(*a):
        return _ref_quadratic(*a[:3], n=n, causal=causal, seg=seg_ref, bias=a[3], xp=jnp)

    out, grads = jax.jit(functools.partial(_vjp, ours))((q, k, v, bias), d_out)
    assert out.dtype == dtype and [g.dtype for g in grads] == [x.dtype for x in (q, k, v, bias)]
    f64 = _f64([q, k, v, bias, d_out])
    with jax.enable_x64(True):
        ref, ref_grads = jax.jit(functools.partial(_vjp, dense))(f64[:4], f64[4])
        ref, ref_grads = np.asarray(ref), [np.asarray(g) for g in ref_grads]
    if dtype == "float32":
        _assert_close(out, ref)
        for g, g_ref in zip(grads, ref_grads, strict=True):
            _assert_close(g, g_ref, tol=1e-4)
    else:  # one rounding (the weights, dS) on any path
        mask, _ = _ref_masks(seg_ref, C=T, causal=causal)
        scores = np.einsum("bis,bjs->bij", f64[0], f64[1]) / n + f64[3]
        mags = _relu2_magnitudes(*f64[:3], f64[4], scores, mask, n)
        names = ("out", "d_q", "d_k", "d_v")
        for name, got, want in zip(names, (out, *grads[:3]), (ref, *ref_grads[:3]), strict=True):
            _assert_within_bf16_bound(name, got, want, mags[name], roundings=1)
        _assert_close(grads[3], ref_grads[3], tol=1e-4)  # the bias's: float32 sums (above)


def _stacked_case():
    T, C, B, seg, _ = _layout("packed")
    stacked = _inputs(3 * B, T, seed=9)
    stacked = [x.reshape(3, B, T, -1) for x in stacked]  # a leading axis to vmap over (layers)

    def mixed(*a):
        return ops.mixed_chunk_attention(*a, chunk_size=C, causal=True, segment_ids=seg)

    def quad(*a):
        return ops.quadratic_attention(*a, n=32, causal=False, segment_ids=seg)

    return ((mixed, stacked), (quad, stacked[2:]))


def test_vmap_matches_per_slice():
    for fn, xs in _stacked_case():
        batched = jax.jit(jax.vmap(fn))(*xs)
        for layer in range(3):
            _assert_close(batched[layer], jax.jit(fn)(*(x[layer] for x in xs)), tol=1e-6)


@pytest.mark.slow  # about 10 s: op-by-op dispatch compiles each primitive separately
def test_eager_matches_jit():
    for fn, xs in _stacked_case():
        one = [x[0] for x in xs]
        _assert_close(fn(*one), jax.jit(fn)(*one), tol=1e-6)


def test_segment_ids_none_is_one_document():
    xs = _inputs(2, 12, seed=10)
    ones = np.ones((2, 12), np.int32)
    for causal in (True, False):
        a = mixed_chunk_attention(*xs, chunk_size=4, causal=causal)
        b = mixed_chunk_attention(*xs, chunk_size=4, causal=causal, segment_ids=ones)
        _assert_close(a, b, tol=1e-6)  # two compiled programs: float32 summation order may differ
        a = quadratic_attention(*xs[-3:], n=12, causal=causal)
        b = quadratic_attention(*xs[-3:], n=12, causal=causal, segment_ids=ones)
        _assert_close(a, b, tol=1e-6)


# ---------------------------------------------------------------- causality, isolation ----


def _both_fns(C, causal, seg):
    return {
        "mixed": lambda xs: mixed_chunk_attention(
            *xs, chunk_size=C, causal=causal, segment_ids=seg
        ),
        "quadratic": lambda xs: quadratic_attention(*xs[2:], n=64, causal=causal, segment_ids=seg),
    }


@pytest.mark.parametrize("fn_name", ["mixed", "quadratic"])
def test_causal_output_ignores_later_tokens(fn_name):
    T, C, B, seg, _ = _layout("packed")
    fn = _both_fns(C, True, seg)[fn_name]
    xs = _inputs(B, T, seed=11)
    out = np.asarray(fn(xs))
    later = _inputs(B, T, seed=12)
    for i in (0, 2, 3, 4, 9, 15, 20):  # chunk starts, ends and middles
        changed = [
            np.concatenate([x[:, : i + 1], y[:, i + 1 :]], axis=1)
            for x, y in zip(xs, later, strict=True)
        ]
        out_changed = np.asarray(fn(changed))
        np.testing.assert_array_equal(out_changed[:, : i + 1], out[:, : i + 1])
        assert not np.allclose(out_changed[:, i + 1 :], out[:, i + 1 :])  # the change mattered


@pytest.mark.parametrize("fn_name", ["mixed", "quadratic"])
@pytest.mark.parametrize("causal", [True, False])
def test_documents_are_isolated(fn_name, causal):
    T, C, B, seg, _ = _layout("packed")
    fn = _both_fns(C, causal, seg)[fn_name]
    xs = _inputs(B, T, seed=13)
    other = _inputs(B, T, seed=14)
    out = np.asarray(fn(xs))
    for doc in (1, 2, 3):
        in_doc = (seg == doc)[:, :, None]
        changed = [np.where(in_doc, y, x) for x, y in zip(xs, other, strict=True)]
        out_changed = np.asarray(fn(changed))
        outside = ~in_doc[:, :, 0]
        np.testing.assert_array_equal(out_changed[outside], out[outside])
        assert not np.allclose(out_changed[~outside], out[~outside])


# ---------------------------------------------------------------- the spec's pitfalls ----


def test_pitfall1_causal_linear_part_excludes_own_chunk():
    """With the quadratic part off (q = k = 0), chunk 0 outputs 0 and chunk g sees chunks < g."""
    T, C = 12, 4
    _, _, ql, kl, v = _inputs(1, T, seed=15)
    zeros = np.zeros_like(ql)
    out = np.asarray(mixed_chunk_attention(zeros, zeros, ql, kl, v, chunk_size=C, causal=True))
    assert np.all(out[:, :C] == 0.0)  # an inclusive cumulative sum would give ql . k0 v0 here
    for g in (1, 2):
        S_se = np.einsum("js,je->se", kl[0, : g * C], v[0, : g * C]) / (g * C)
        np.testing.assert_allclose(
            out[0, g * C : (g + 1) * C], ql[0, g * C : (g + 1) * C] @ S_se, rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("causal", [True, False])
def test_pitfall2_linear_part_is_a_mean_and_does_not_grow(causal):
    """Constant inputs along a long document: the linear part is the same at every position."""
    C = 4
    outs = []
    for T in (16, 32):
        ql = np.full((1, T, S), 0.5, np.float32)
        v = np.full((1, T, E), 2.0, np.float32)
        zeros = np.zeros_like(ql)
        outs.append(mixed_chunk_attention(zeros, zeros, ql, ql, v, chunk_size=C, causal=causal))
    expected = 0.5 * 0.5 * S * 2.0  # ql . kl * v: a mean over any number of equal tokens
    first = C if causal else 0  # causal chunk 0 has no earlier tokens
    for out in outs:
        np.testing.assert_allclose(np.asarray(out)[0, first:], expected, rtol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_pitfall3_first_chunk_and_fresh_documents_are_finite(causal):
    """N_i = 0 (first chunk, documents starting mid-chunk) gives 0 from the linear part."""
    T, C, B, seg, _ = _layout("packed")
    xs = _inputs(B, T, seed=16)
    out = np.asarray(mixed_chunk_attention(*xs, chunk_size=C, causal=causal, segment_ids=seg))
    assert np.all(np.isfinite(out))
    zeros = np.zeros_like(xs[0])
    lin_only = mixed_chunk_attention(
        zeros, zeros, *xs[2:], chunk_size=C, causal=causal, segment_ids=seg
    )
    if causal:
        assert np.all(np.asarray(lin_only)[:, :C] == 0.0)
        # Row 0, doc 3 starts at 13 inside chunk 3: nothing earlier, linear part 0.
        assert np.all(np.asarray(lin_only)[0, 13:16] == 0.0)
    grads = jax.jit(
        jax.grad(
            lambda *a: jnp.sum(
                mixed_chunk_attention(*a, chunk_size=C, causal=causal, segment_ids=seg) ** 2
            ),
            argnums=(0, 1, 2, 3, 4),
        )
    )(*xs)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_pitfall4_non_causal_sum_covers_all_chunks():
    """Same ql everywhere: every token of a document gets the same mean over the document."""
    T, C = 16, 4
    _, _, _, kl, v = _inputs(1, T, seed=17)
    ql = np.broadcast_to(np.random.default_rng(18).normal(size=(1, 1, S)), (1, T, S))
    ql = ql.astype(np.float32)
    zeros = np.zeros_like(kl)
    out = np.asarray(mixed_chunk_attention(zeros, zeros, ql, kl, v, chunk_size=C, causal=False))
    expected = ql[0, 0] @ (np.einsum("js,je->se", kl[0], v[0]) / T)
    np.testing.assert_allclose(out[0], np.broadcast_to(expected, (T, E)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn_name", ["mixed", "quadratic"])
@pytest.mark.parametrize("causal", [True, False])
def test_pitfall5_padding_never_counts(fn_name, causal):
    """Trailing padding with non-zero inputs changes nothing; padding rows are exactly 0."""
    T0, pad, C = 10, 7, 4
    xs = _inputs(2, T0 + pad, seed=19)
    seg = np.zeros((2, T0 + pad), np.int32)
    seg[0, :T0] = 1
    seg[1, :4], seg[1, 4:T0] = 1, 2
    fn_padded = _both_fns(C, causal, seg)[fn_name]
    fn_plain = _both_fns(C, causal, seg[:, :T0])[fn_name]
    padded = np.asarray(fn_padded(xs))
    plain = np.asarray(fn_plain([x[:, :T0] for x in xs]))
    _assert_close(padded[:, :T0], plain, tol=1e-6)
    assert np.all(padded[:, T0:] == 0.0)


@pytest.mark.parametrize("fn_name", ["mixed", "quadratic"])
def test_pitfall6_appending_tokens_keeps_earlier_causal_outputs(fn_name):
    """The score scale is the fixed n (or C), not the runtime length."""
    T0, extra, C = 10, 9, 4
    xs = _inputs(1, T0 + extra, seed=20)
    long = np.asarray(_both_fns(C, True, None)[fn_name](xs))
    short = np.asarray(_both_fns(C, True, None)[fn_name]([x[:, :T0] for x in xs]))
    _assert_close(long[:, :T0], short, tol=1e-6)


def test_pitfall6_quadratic_scale_is_n():
    """Doubling n equals halving the scores: checks n is used, not T."""
    q, k, v = _inputs(1, 6, seed=21, num=3)
    a = quadratic_attention(q, k, v, n=10, causal=True)
    b = quadratic_attention(q, k * 2.0, v, n=20, causal=True)
    _assert_close(a, b, tol=1e-6)
    c = quadratic_attention(q, k, v, n=6, causal=True)  # n = T would differ
    assert not np.allclose(a, c)


# ---------------------------------------------------------------- linear cost, dtypes ----


def test_mixed_has_no_T_by_T_array():
    C = 8
    T = 8 * C
    seg = np.asarray([[1] * 20 + [2] * 40 + [0] * 4], np.int32)
    xs = _inputs(1, T, seed=22)
    bias = np.zeros((C, C), np.float32)
    for causal in (True, False):

        def f(*a, causal=causal):
            return mixed_chunk_attention(
                *a[:5], chunk_size=C, causal=causal, segment_ids=seg, quad_bias=a[5]
            )

        assert not has_quadratic_array(f, xs + [bias], T)
        grad_f = jax.grad(lambda *a, f=f: jnp.sum(f(*a)), argnums=(0, 1, 2, 3, 4, 5))
        assert not has_quadratic_array(grad_f, xs + [bias], T)
    # The check itself can fail: the quadratic function does build [T, T].
    assert has_quadratic_array(lambda *a: quadratic_attention(*a, n=T, causal=True), xs[2:], T)


@pytest.mark.parametrize("causal", [True, False])
def test_mixed_bf16_at_the_papers_widths_runs_here_and_meets_the_bound(causal):
    """bf16 forward and backward at S = 128, E = 2048, C = 256 (T = 768: two documents crossing
    chunk boundaries, then padding), against the float64 reference at the derived bound.

    At these sizes XLA's CPU backend runs the matmuls through its matmul library, which cannot
    run a bf16 matmul whose left operand XLA has folded a transpose into: the program compiles
    and then fails at run time ("Unsupported element type for DotThunk::Execute: BF16 x BF16 =
    F32"). At the other tests' widths it runs such matmuls with its own loops, so only a test
    at full width catches a phrasing of the sums over tokens (k_lin^T v, q_lin^T dO) that XLA
    rewrites into that form."""
    B, T, S_, E_, C = 1, 768, 128, 2048, 256
    seg_ref = np.asarray([[1] * 300 + [2] * 400 + [0] * 68], np.int32)
    rng = np.random.default_rng(40)
    xs = [jnp.asarray(rng.normal(size=(B, T, S_)), jnp.bfloat16) for _ in range(4)]
    v, d_out = (jnp.asarray(rng.normal(size=(B, T, E_)), jnp.bfloat16) for _ in range(2))
    bias = jnp.asarray(rng.normal(size=(C, C)), jnp.float32)

    def ours(*a):
        return ops.mixed_chunk_attention(
            *a[:5], chunk_size=C, causal=causal, segment_ids=seg_ref, quad_bias=a[5]
        )

    out, grads = jax.jit(functools.partial(_vjp, ours))((*xs, v, bias), d_out)
    f64 = _f64([*xs, v, bias, d_out])
    with jax.enable_x64(True):
        dense = functools.partial(_ref_mixed, C=C, causal=causal, seg=seg_ref, xp=jnp)
        ref, ref_grads = jax.jit(functools.partial(_vjp, lambda *a: dense(*a[:5], quad_bias=a[5])))(
            f64[:6], f64[6]
        )
    mags = _mixed_magnitudes(*f64, C=C, causal=causal, seg=seg_ref)
    names = ("out",) + tuple(f"d_{name}" for name in MIXED_INPUTS[:5])
    for name, got, want in zip(names, (out, *grads[:5]), (ref, *ref_grads[:5]), strict=True):
        _assert_within_bf16_bound(name, got, np.asarray(want), mags[name], roundings=2)


def _lowered_bf16_fwd_bwd(fn_name, causal, G, C=4):
    """The HLO text of jax.vjp's forward and backward of one op on bf16 inputs (T = G C)."""
    B, T = 2, G * C
    seg = np.ones((B, T), np.int32)  # a traced argument below: only its shape matters

    def fwd_bwd(xs, bias, seg, d_out):
        def attend(*a):
            if fn_name == "mixed":
                return ops.mixed_chunk_attention(
                    *a[:-1], chunk_size=C, causal=causal, segment_ids=seg, quad_bias=a[-1]
                )
            return ops.quadratic_attention(*a[:-1], n=T, causal=causal, segment_ids=seg, bias=a[-1])

        return _vjp(attend, (*xs, bias), d_out)

    num = 5 if fn_name == "mixed" else 3
    xs = [jnp.zeros(x.shape, jnp.bfloat16) for x in _inputs(B, T, num=num)]
    bias = jnp.zeros((C, C) if fn_name == "mixed" else (T, T), jnp.float32)
    return jax.jit(fwd_bwd).lower(xs, bias, seg, xs[-1]).as_text("hlo")


@pytest.mark.parametrize("fn_name", ["mixed", "quadratic"])
@pytest.mark.parametrize("causal", [True, False])
def test_bf16_program_has_only_bf16_matmuls_and_no_loop_over_chunks(fn_name, causal):
    """The precision policy and the scan-free state passing, read from the lowered program."""
    text = _lowered_bf16_fwd_bwd(fn_name, causal, G=16)
    flops = op_cost.dot_flops_by_dtype(text)
    # Every matmul, forward and backward, on bf16 operands: the target allows float32 x
    # float32 matmuls up to 5% of the FLOPs; there are none.
    assert set(flops) == {"bf16 x bf16"}, flops
    assert " while(" not in text  # no loop (lax.scan, fori_loop)
    if fn_name == "mixed":
        # No scan over chunks in any form (an associative scan unrolls log2(G) levels of slices
        # and selects): the program is the same size at 4 and at 16 chunks.
        assert num_instructions(text) == num_instructions(
            _lowered_bf16_fwd_bwd(fn_name, causal, G=4)
        )


@pytest.mark.parametrize("fn_name", ["mixed", "quadratic"])
@pytest.mark.parametrize("causal", [True, False])
def test_bfloat16_inputs(fn_name, causal):
    T, C, B, seg, seg_ref = _layout("packed")
    xs32 = _inputs(B, T, seed=23)
    xs16 = [jnp.asarray(x, jnp.bfloat16) for x in xs32]
    fn = _both_fns(C, causal, seg)[fn_name]
    out16 = fn(xs16)
    assert out16.dtype == jnp.bfloat16
    out16 = np.asarray(out16, np.float64)
    # (a) Against the float64 reference on the same bf16-rounded inputs, within the bound that
    # the precision policy implies (`_assert_within_bf16_bound`). The [C, C] weights, and for
    # FLASH the cross-chunk states, are bf16 operands of their matmuls (as FlashAttention's
    # probabilities are), so an element's error scales with the sum of the magnitudes of its
    # terms: once the terms cancel, an element can be far smaller than that error. The bound
    # this test held before (2^-8 of each element, which is U: only the final rounding) encoded
    # float32 operands, which cost twice the matmul time on accelerators.
    rounded = _f64(xs16)
    if fn_name == "mixed":
        ref = _ref_mixed(*rounded, C=C, causal=causal, seg=seg_ref)
        no_bias, ones = np.zeros((C, C)), np.ones(ref.shape)
        mags = _mixed_magnitudes(*rounded, no_bias, ones, C=C, causal=causal, seg=seg_ref)
        _assert_within_bf16_bound("out", out16, ref, mags["out"], roundings=2)
    else:
        ref = _ref_quadratic(*rounded[2:], n=64, causal=causal, seg=seg_ref)
        q, k, v = rounded[2:]
        mask, _ = _ref_masks(seg_ref, C=T, causal=causal)
        scores = np.einsum("bis,bjs->bij", q, k) / 64
        mags = _relu2_magnitudes(q, k, v, np.ones(ref.shape), scores, mask, 64)
        _assert_within_bf16_bound("out", out16, ref, mags["out"], roundings=1)
    # (b) Close to the float32 run: rounding each input to bf16 (2^-9 relative) moves a squared
    # score by about 4 * 2^-9 and the output by a few times that relative to its scale; 2e-2 of
    # the output scale bounds it with margin while still catching gross errors (wrong mask,
    # dtype overflow, lost terms).
    out32 = np.asarray(fn(xs32), np.float64)
    np.testing.assert_allclose(out16, out32, rtol=0, atol=2e-2 * np.max(np.abs(out32)))


# ---------------------------------------------------------------- validation ----


def _mixed_call(**overrides):
    xs = dict(zip(["quad_q", "quad_k", "lin_q", "lin_k", "v"], _inputs(2, 8, seed=24), strict=True))
    kwargs = dict(chunk_size=4, causal=True, segment_ids=None, quad_bias=None)
    for key, value in overrides.items():
        (xs if key in xs else kwargs)[key] = value
    return mixed_chunk_attention(*xs.values(), **kwargs)


def _quad_call(**overrides):
    xs = dict(zip(["q", "k", "v"], _inputs(2, 8, seed=25, num=3), strict=True))
    kwargs = dict(n=8, causal=True, segment_ids=None, bias=None)
    for key, value in overrides.items():
        (xs if key in xs else kwargs)[key] = value
    return quadratic_attention(*xs.values(), **kwargs)


@pytest.mark.parametrize(
    "call, overrides, match",
    [
        (_mixed_call, {"quad_q": np.zeros((2, 8))}, "quad_q must have rank 3"),
        (_mixed_call, {"v": np.zeros((8, E))}, "v must have rank 3"),
        (_mixed_call, {"lin_k": np.zeros((3, 8, S))}, "lin_k has \\[B, T\\]"),
        (_mixed_call, {"quad_k": np.zeros((2, 7, S))}, "quad_k has \\[B, T\\]"),
        (_mixed_call, {"lin_q": np.zeros((2, 8, S + 1))}, "lin_q and lin_k must have the same"),
        (_mixed_call, {"chunk_size": 0}, "chunk_size must be a positive integer"),
        (_mixed_call, {"chunk_size": 2.5}, "chunk_size must be a positive integer"),
        (_mixed_call, {"segment_ids": np.ones((2, 7), np.int32)}, "segment_ids must have shape"),
        (_mixed_call, {"segment_ids": np.ones((2, 8), np.float32)}, "segment_ids must be int"),
        (_mixed_call, {"quad_bias": np.zeros((8, 8))}, "quad_bias must have shape"),
        (_quad_call, {"q": np.zeros((2, 8, S, 1))}, "q must have rank 3"),
        (_quad_call, {"k": np.zeros((2, 8, S + 1))}, "q and k must have the same width"),
        (_quad_call, {"v": np.zeros((1, 8, E))}, "q has \\[B, T\\]"),
        (_quad_call, {"n": 0}, "n must be a positive number"),
        (_quad_call, {"n": -3.0}, "n must be a positive number"),
        (_quad_call, {"n": None}, "n must be a positive number"),
        (_quad_call, {"bias": np.zeros((8, 7))}, "bias must have shape"),
        (_quad_call, {"bias": np.zeros((3, 8, 8))}, "bias must have shape"),
        (_quad_call, {"segment_ids": np.ones((8,), np.int32)}, "segment_ids must have shape"),
    ],
)
def test_bad_input_raises_named_value_error(call, overrides, match):
    with pytest.raises(ValueError, match=match):
        call(**overrides)
