"""flash_jax.ops.dot_product: the baselines' softmax attention on each backend's kernel.

The dense-mask XLA path is checked against a float64 numpy softmax reference; splash (TPU) runs
in Pallas interpret mode on this CPU and must equal it, forward and backward, and must lower for
TPU; the cuDNN fast path's logic (one document per row -> padding lengths) is checked through
JAX's XLA implementation of the same padding mask, since cuDNN itself needs a GPU
(scripts/bench/kernel_check.py compares it there).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flash_jax.ops import dot_product

B, T, H, D = 2, 256, 2, 32


def packed_segments():
    """Row 0: two documents (the second crosses the 128-token block boundary) and padding;
    row 1: one document and padding."""
    seg = np.zeros((B, T), np.int32)
    seg[0, :100], seg[0, 100:230] = 1, 2
    seg[1, :200] = 7
    return jnp.asarray(seg)


def inputs(dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(key, (B, T, H, D), dtype) for key in keys]


def reference(q, k, v, seg, causal):
    """float64 softmax(q k^T / sqrt(D)) v under the same-segment (and causal) mask."""
    q, k, v, seg = (np.asarray(x, np.float64) for x in (q, k, v, seg))
    scores = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1])
    mask = seg[:, None, :, None] == seg[:, None, None, :]
    if causal:
        mask = mask & np.tril(np.ones((T, T), bool))
    scores = np.where(mask, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhij,bjhd->bihd", weights, v)


# float32 softmax attention over <= 256 keys of unit-variance inputs: rounding ~1e-6 relative;
# 2e-5 absolute leaves a margin for the exp and the sums.
F32_TOL = 2e-5


@pytest.mark.parametrize("causal", [True, False])
def test_xla_path_matches_float64_reference(causal):
    q, k, v = inputs()
    seg = packed_segments()
    got = dot_product.dot_product_attention(q, k, v, causal=causal, segment_ids=seg, impl="xla")
    np.testing.assert_allclose(got, reference(q, k, v, seg, causal), atol=F32_TOL)


@pytest.mark.parametrize("causal", [True, False])
def test_splash_equals_xla_forward_and_backward(causal):
    q, k, v = inputs()
    seg = packed_segments()

    def loss(fn, q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * jnp.cos(out)), out  # a non-linear loss: every cotangent differs

    def xla(q, k, v):
        return dot_product.dot_product_attention(q, k, v, causal=causal, segment_ids=seg)

    def splash(q, k, v):
        return dot_product.splash_attention(q, k, v, causal=causal, segment_ids=seg, interpret=True)

    (_, want), want_grads = jax.value_and_grad(
        lambda *a: loss(xla, *a), argnums=(0, 1, 2), has_aux=True
    )(q, k, v)
    (_, got), got_grads = jax.value_and_grad(
        lambda *a: loss(splash, *a), argnums=(0, 1, 2), has_aux=True
    )(q, k, v)
    np.testing.assert_allclose(got, want, atol=F32_TOL)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4)  # gradients sum over <= 256 keys more


def test_splash_refuses_lengths_off_its_blocks():
    q, k, v = (x[:, :200] for x in inputs())
    with pytest.raises(ValueError, match="multiple of 128"):
        dot_product.splash_attention(q, k, v, causal=True)


def test_splash_lowers_for_tpu_at_paper_shapes():
    # Transformer++ at d_model 1024: 16 heads of 64, T = 8192, bf16, forward and backward.
    shape = jax.ShapeDtypeStruct((1, 8192, 16, 64), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 8192), jnp.int32)

    def loss(q, k, v, seg):
        out = dot_product.splash_attention(q, k, v, causal=True, segment_ids=seg)
        return jnp.sum(out.astype(jnp.float32))

    exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["tpu"])(
        shape, shape, shape, seg
    )
    assert "tpu_custom_call" in exported.mlir_module()


def test_single_document_rows():
    def single(rows):
        return bool(dot_product.single_document_rows(jnp.asarray(rows, jnp.int32)))

    assert single([[3, 3, 3, 0], [1, 1, 1, 1]])
    assert single([[0, 0, 0, 0], [5, 0, 0, 0]])  # a row of padding alone is fine
    assert not single([[1, 1, 2, 2]])  # two documents
    assert not single([[0, 1, 1, 1]])  # padding first
    assert not single([[1, 0, 1, 0]])  # a document interrupted by padding
    np.testing.assert_array_equal(
        dot_product.document_lengths(jnp.asarray([[3, 3, 0, 0], [0, 0, 0, 0]])), [2, 4]
    )


@pytest.mark.parametrize("causal", [True, False])
def test_padding_lengths_path_equals_dense_mask_on_single_document_rows(causal):
    # What impl="cudnn" runs for one-document rows, through XLA's implementation of the same
    # padding mask: equal to the dense segment mask on every non-padding token, finite on all.
    q, k, v = inputs()
    seg = jnp.asarray(np.where(np.arange(T) < np.array([[180], [256]]), 4, 0), jnp.int32)
    assert dot_product.single_document_rows(seg)
    dense = dot_product.dot_product_attention(q, k, v, causal=causal, segment_ids=seg)
    lengths = dot_product._padded_rows_attention(q, k, v, seg, causal=causal, impl="xla")
    real = np.asarray(seg != 0)
    np.testing.assert_allclose(np.asarray(lengths)[real], np.asarray(dense)[real], atol=F32_TOL)
    assert np.isfinite(np.asarray(lengths)).all()


def test_unknown_impl_is_named():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="attention impl must be one of"):
        dot_product.dot_product_attention(q, k, v, causal=True, impl="flash")


def test_splash_per_shard_on_a_mesh_equals_one_device():
    # The layer wraps Pallas kernels in sharding.per_shard: rows over `data`, heads over `tensor`.
    from flash_jax import sharding

    q, k, v = inputs()
    seg = packed_segments()

    def attend(q, k, v, seg):
        return dot_product.splash_attention(q, k, v, causal=True, segment_ids=seg, interpret=True)

    want = attend(q, k, v, seg)
    mesh = sharding.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), devices=jax.devices()[:4])
    heads = ("batch", "length", "act_heads", None)
    with jax.set_mesh(mesh):
        sharded = sharding.per_shard(attend, (heads, heads, heads, ("batch", "length")), heads)
        got = jax.jit(sharded)(q, k, v, seg)
    assert len(got.sharding.device_set) == 4
    np.testing.assert_allclose(got, want, atol=1e-6)
