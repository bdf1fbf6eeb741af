"""Transformer++ attention on cuDNN against XLA on one GPU: the padding-length fast path (one
document per row) and the dense-mask fallback (packed rows), agreement and forward + backward time.
Results: docs/results/kernel_check_h100/cudnn_check.md.

    python scripts/bench/cudnn_check.py      # a GPU with cuDNN; about 20 s
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app

from flash_jax.ops import dot_product

B, T, H, D = 4, 4096, 16, 64  # Transformer++ at d_model 1024: 16 heads of 64
REPEATS = 5


def segment_cases():
    """One document per row with trailing padding (the fast path), and a packed row."""
    single_BT = jnp.where(jnp.arange(T) < jnp.array([[T], [3000], [T], [700]]), 3, 0)
    single_BT = single_BT.astype(jnp.int32)
    return {"one document per row": single_BT, "packed": single_BT.at[0, 1000:].set(5)}


def attention_fns(impl):
    def attend(q, k, v, seg):
        return dot_product.dot_product_attention(q, k, v, causal=True, segment_ids=seg, impl=impl)

    def loss(q, k, v, seg):
        return jnp.sum(jnp.square(attend(q, k, v, seg).astype(jnp.float32)))

    return jax.jit(attend), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def fwd_bwd_ms(grad_fn, *args) -> float:
    jax.block_until_ready(grad_fn(*args))  # compile and warm up
    start = time.perf_counter()
    for _ in range(REPEATS):
        grads = grad_fn(*args)
    jax.block_until_ready(grads)
    return (time.perf_counter() - start) / REPEATS * 1e3


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (B, T, H, D), jnp.bfloat16) for key in keys)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    for name, seg in segment_cases().items():
        fast = bool(dot_product.single_document_rows(seg))
        outputs = {}
        for impl in ("cudnn", "xla"):
            attend, grad_fn = attention_fns(impl)
            outputs[impl] = attend(q, k, v, seg)
            ms = fwd_bwd_ms(grad_fn, q, k, v, seg)
            finite = bool(jnp.isfinite(outputs[impl]).all())
            print(f"{name}, {impl}: fast path {fast}, finite {finite}, fwd+bwd {ms:.2f} ms")
        real = np.asarray(seg != 0)
        diff = jnp.abs((outputs["cudnn"] - outputs["xla"]).astype(jnp.float32))
        print(f"{name}: max |cudnn - xla| on real tokens {float(np.asarray(diff)[real].max()):.4f}")


if __name__ == "__main__":
    app.run(main)
