"""flash_jax.layers.basic.float32_logits: the output projection's float32 logits and its backward
(bf16 operands with float32 accumulation in bf16 models; exactly autodiff in float32 ones)."""

import jax
import jax.numpy as jnp
import numpy as np

from flash_jax.layers.basic import float32_logits
from scripts import op_cost

B, T, D, V = 2, 8, 32, 48


def inputs(dtype):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (B, T, D), dtype)
    w = (jax.random.normal(kw, (D, V)) / np.sqrt(D)).astype(dtype)
    d_logits = jax.random.normal(kg, (B, T, V), jnp.float32)  # a float32 cotangent, as the loss'
    return x, w, d_logits


def vjp(fn, x, w, d_logits):
    logits, pullback = jax.vjp(fn, x, w)
    return logits, pullback(d_logits)


def plain(x, w):
    return jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32)


def test_float32_equals_autodiff():
    x, w, g = inputs(jnp.float32)
    got_logits, (got_dx, got_dw) = vjp(float32_logits, x, w, g)
    want_logits, (want_dx, want_dw) = vjp(plain, x, w, g)
    np.testing.assert_array_equal(got_logits, want_logits)
    np.testing.assert_allclose(got_dx, want_dx, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_dw, want_dw, rtol=1e-6, atol=1e-6)


def test_bf16_gradients_within_bf16_rounding():
    # The cotangent is rounded to bf16 (relative error <= u = 2^-8 per element), the products
    # are exact in float32 and summed in float32, and the result is rounded to bf16 once more:
    # |err| <= u * sum_k |a_k b_k| + u * |ref| (+ float32 summation, far below).
    x, w, g = inputs(jnp.bfloat16)
    _, (dx, dw) = vjp(float32_logits, x, w, g)
    x64, w64, g64 = (np.asarray(a, np.float64) for a in (x.astype(jnp.float32), w, g))
    u = 2.0**-8
    want_dx = np.einsum("btv,dv->btd", g64, w64)
    bound_dx = u * np.einsum("btv,dv->btd", np.abs(g64), np.abs(w64)) + u * np.abs(want_dx)
    assert np.all(np.abs(np.asarray(dx, np.float64) - want_dx) <= bound_dx)
    want_dw = np.einsum("btd,btv->dv", x64, g64)
    bound_dw = u * np.einsum("btd,btv->dv", np.abs(x64), np.abs(g64)) + u * np.abs(want_dw)
    assert np.all(np.abs(np.asarray(dw, np.float64) - want_dw) <= bound_dw)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16


def test_bf16_backward_has_no_float32_matmul():
    x, w, g = inputs(jnp.bfloat16)
    text = jax.jit(lambda x, w, g: vjp(float32_logits, x, w, g)).lower(x, w, g).as_text("hlo")
    assert set(op_cost.dot_flops_by_dtype(text)) == {"bf16 x bf16"}
    # ... whereas autodiff of the plain float32-output matmul makes float32 ones.
    text = jax.jit(lambda x, w, g: vjp(plain, x, w, g)).lower(x, w, g).as_text("hlo")
    assert "f32 x f32" in op_cost.dot_flops_by_dtype(text)
