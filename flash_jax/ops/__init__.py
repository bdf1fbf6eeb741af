"""Pure attention functions (no parameters): the seam where faster kernels plug in."""

from flash_jax.ops import combiner, context_parallel, dot_product, mixed_chunk, performer
from flash_jax.ops.attention import quadratic_attention
from flash_jax.ops.combiner import combiner_attention
from flash_jax.ops.dot_product import dot_product_attention
from flash_jax.ops.mixed_chunk import mixed_chunk_attention
from flash_jax.ops.performer import favor_attention

__all__ = [
    "combiner",
    "combiner_attention",
    "context_parallel",
    "dot_product",
    "dot_product_attention",
    "favor_attention",
    "mixed_chunk",
    "mixed_chunk_attention",
    "performer",
    "quadratic_attention",
]
