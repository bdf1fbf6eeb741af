"""Pure attention functions (no parameters): the seam where faster kernels plug in."""

from flash_jax.ops.attention import mixed_chunk_attention, quadratic_attention

__all__ = ["mixed_chunk_attention", "quadratic_attention"]
