"""FLASH's mixed chunk attention on the implementation asked for: the XLA path
(`attention.mixed_chunk_attention`, whose docstring is the contract) or a fused Pallas kernel
(pallas_tpu.py, pallas_gpu.py) that meets the same contract.

A module of its own, above both: the GPU kernel builds on the XLA path's cross-chunk link rule,
so the XLA path cannot be the one that imports the kernels.
"""

from __future__ import annotations

import jax.numpy as jnp

from flash_jax import dispatch
from flash_jax.ops import attention, state_passing


def mixed_chunk_attention(
    quad_q,
    quad_k,
    lin_q,
    lin_k,
    v,
    *,
    chunk_size: int,
    causal: bool,
    segment_ids=None,
    quad_bias=None,
    impl: str = "xla",
    interpret: bool | None = None,
    boundary: state_passing.Boundary | None = None,
):
    """`attention.mixed_chunk_attention` (see it for the arguments and the result) run by `impl`.

    Args:
      impl: `xla` (the XLA path, every backend), `pallas_tpu` / `pallas_gpu` (the fused kernels),
        or `auto` (`flash_jax.dispatch.flash_impl`: XLA until a kernel is measured faster). A
        kernel asked for by name that cannot serve the shapes raises a ValueError saying why.
      interpret: run a Pallas kernel in interpret mode; None = exactly when the program is
        for CPUs (kernels there are for tests: slow, but the same kernel bodies): the active
        mesh's devices, else the default backend (`dispatch.target_platform`).
      boundary: context parallelism's edge states; XLA path only.
    """
    impl = dispatch.flash_impl(impl)
    common = dict(
        chunk_size=chunk_size, causal=causal, segment_ids=segment_ids, quad_bias=quad_bias
    )
    if impl == "xla":
        return attention.mixed_chunk_attention(
            quad_q, quad_k, lin_q, lin_k, v, **common, boundary=boundary
        )
    if boundary is not None:
        raise ValueError(f"boundary (context parallelism) needs impl='xla', got {impl!r}")
    if interpret is None:
        interpret = dispatch.target_platform() == "cpu"
    inputs = (jnp.asarray(x) for x in (quad_q, quad_k, lin_q, lin_k, v))
    return _kernel(impl)(*inputs, **common, interpret=interpret)


def _kernel(impl: str):
    """The kernel function of a Pallas impl (imported on first use)."""
    if impl == "pallas_tpu":
        from flash_jax.ops import pallas_tpu

        return pallas_tpu.mixed_chunk_attention_tpu
    from flash_jax.ops import pallas_gpu

    return pallas_gpu.mixed_chunk_attention_gpu
