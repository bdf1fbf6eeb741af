"""Softmax attention of the Transformer baselines on each backend's best kernel.

`dot_product_attention(q, k, v, causal=..., segment_ids=..., impl=...)` with packed documents
isolated exactly (`segment_ids`: contiguous runs of equal ids, 0 = padding; padding attends to
padding, so no softmax row is empty):

- `xla`: `jax.nn.dot_product_attention` with a dense `[B, 1, T, T]` mask; runs everywhere.
- `cudnn`: cuDNN flash attention (GPU, bf16 / fp16). cuDNN takes packing only as a dense mask,
  which it turns into a `[T, T]` bias read at every call. When every row of the batch holds one
  document followed by padding (true of most rows of long-context data, and of benchmarks),
  that is exactly cuDNN's own padding mask (`query_seq_lengths`): a `lax.cond` takes that path
  and falls back to the dense mask only for batches with several documents in a row.
- `splash`: TPU splash attention (Pallas Mosaic) with its native segment ids and a causal block
  mask: no `[T, T]` array at all. T must be a multiple of its 128-token blocks.
- `auto`: splash on TPU and cuDNN on GPU where they serve the shapes, XLA otherwise
  (`flash_jax.dispatch.attention_impl`).

Shapes: q, k, v are `[B, T, H, D]` (batch, tokens, heads, head width); the result is `[B, T, H, D]`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flash_jax import dispatch
from flash_jax.dispatch import SPLASH_BLOCK


def dot_product_attention(q, k, v, *, causal: bool, segment_ids=None, impl: str = "xla"):
    """Softmax attention, scale 1/sqrt(D); see the module docstring for `impl`."""
    impl = dispatch.attention_impl(impl, q.shape[1], q.shape[-1], q.dtype)
    if impl == "splash":
        return splash_attention(q, k, v, causal=causal, segment_ids=segment_ids)
    if segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
    mask = attention_mask(segment_ids, causal)
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    return jax.lax.cond(
        single_document_rows(segment_ids),
        functools.partial(_padded_rows_attention, causal=causal, impl=impl),
        lambda q, k, v, _: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl),
        q,
        k,
        v,
        segment_ids,
    )


def attention_mask(segment_ids_BT, causal: bool):
    """[B, 1, T, T]: same segment (padding attends to padding, so no row is empty) and causal."""
    mask = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    if causal:
        T = segment_ids_BT.shape[1]
        mask &= jnp.tril(jnp.ones((T, T), dtype=bool))
    return mask[:, None]


def document_lengths(segment_ids_BT):
    """Non-padding tokens per row; a row of padding alone counts as one document of T tokens
    (under the dense mask its tokens attend to each other)."""
    length_B = jnp.sum(segment_ids_BT != 0, axis=1, dtype=jnp.int32)
    return jnp.where(length_B == 0, segment_ids_BT.shape[1], length_B)


def single_document_rows(segment_ids_BT):
    """True iff every row is one document from position 0 followed only by padding (or is all
    padding): then the dense segment mask equals a padding mask given by lengths."""
    first_B1 = segment_ids_BT[:, :1]
    inside_BT = jnp.arange(segment_ids_BT.shape[1]) < document_lengths(segment_ids_BT)[:, None]
    all_padding_B1 = jnp.all(segment_ids_BT == 0, axis=1, keepdims=True)
    expected_BT = jnp.where(inside_BT & ~all_padding_B1, first_B1, 0)
    return jnp.all(segment_ids_BT == expected_BT)


def _padded_rows_attention(q, k, v, segment_ids_BT, *, causal, impl):
    """One document per row with trailing padding: the backend's padding mask, no [T, T] array.
    Padding queries get 0 (the dense mask gives them a mean over padding values; both are
    finite, and padding carries no loss weight)."""
    length_B = document_lengths(segment_ids_BT)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        is_causal=causal,
        query_seq_lengths=length_B,
        key_value_seq_lengths=length_B,
        implementation=impl,
    )


def splash_attention(q, k, v, *, causal: bool, segment_ids=None, interpret: bool = False):
    """TPU splash attention over [B, T, H, D] inputs (its kernel takes [H, T, D] per row)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    B, T, H, D = q.shape
    if T % SPLASH_BLOCK:
        raise ValueError(
            f"splash attention needs the sequence length to be a multiple of {SPLASH_BLOCK}, "
            f"got {T}; use model.attention_impl=xla"
        )
    one_head = splash.CausalMask((T, T)) if causal else splash.FullMask((T, T))
    block = min(512, T)  # larger blocks amortise per-step overhead; T is a multiple of 128
    block = block if T % block == 0 else SPLASH_BLOCK
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    kernel = splash.make_splash_mha_single_device(
        splash.MultiHeadMask([one_head] * H), block_sizes=sizes, interpret=interpret
    )
    segment_ids = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids
    scale = np.float32(1.0 / np.sqrt(D))

    def one_row(q_THD, k_THD, v_THD, seg_T):
        out_HTD = kernel(
            (q_THD * scale.astype(q_THD.dtype)).swapaxes(0, 1),
            k_THD.swapaxes(0, 1),
            v_THD.swapaxes(0, 1),
            segment_ids=splash.SegmentIds(q=seg_T, kv=seg_T),
        )
        return out_HTD.swapaxes(0, 1)

    return jax.vmap(one_row)(q, k, v, segment_ids)
