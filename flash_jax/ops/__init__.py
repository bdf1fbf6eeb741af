"""Pure attention functions (no parameters): the seam where faster kernels plug in."""

from flash_jax.ops import dot_product
from flash_jax.ops.attention import mixed_chunk_attention, quadratic_attention
from flash_jax.ops.dot_product import dot_product_attention

__all__ = ["dot_product", "dot_product_attention", "mixed_chunk_attention", "quadratic_attention"]
