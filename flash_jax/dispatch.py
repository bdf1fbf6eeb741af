"""Which implementation of each attention op runs, and for which device: the one place that
resolves `impl="auto"`.

The config (`model.flash_impl`, `model.attention_impl`) checks names against the tuples here;
layers and ops ask `flash_impl` / `attention_impl` once per call for the implementation to run.
This module imports JAX alone, so that the config, the ops and the kernels may all import it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# FLASH's mixed chunk attention (flash_jax.ops.mixed_chunk_attention): the XLA path, or a fused
# Pallas kernel (flash_jax/ops/pallas_tpu.py, pallas_gpu.py).
FLASH_IMPLS = ("auto", "xla", "pallas_tpu", "pallas_gpu")
# The Transformer baselines' softmax attention (flash_jax.ops.dot_product_attention).
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
# The gated unit's projections around the attention (GAU and FLASH): XLA, or Pallas TPU kernels
# (flash_jax/ops/pallas_norm_proj.py and pallas_gate.py).
PROJ_IMPLS = ("auto", "xla", "pallas_tpu")
SPLASH_BLOCK = 128  # splash's block along the sequence (queries and keys)


def target_device():
    """The active mesh's (abstract) device, None without one: what the program being traced is
    for, also when that is TPU chips compiled for ahead of time on a CPU host
    (scripts/tpu_compile.py). Has `platform` and `device_kind`."""
    return getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)


def target_platform() -> str:
    """The platform the program being traced is for: `target_device`'s, else the default
    backend's."""
    device = target_device()
    return device.platform if device is not None else jax.default_backend()


# TPU chips whose two TensorCores JAX shows as one device (megacore): v4 and v5p. v5e and v6e
# ("lite") have one core per chip; v2 and v3 show each core as its own device.
MEGACORE_KINDS = ("TPU v4", "TPU v5")


def megacore() -> bool:
    """Whether the program being traced is for a megacore TPU chip (`MEGACORE_KINDS`), where a
    Pallas kernel's "parallel" grid axis is shared out between the chip's two cores."""
    device = target_device() or jax.devices()[0]
    return device.device_kind in MEGACORE_KINDS


def flash_impl(requested: str) -> str:
    """The implementation of FLASH's attention to run for `requested` (one of FLASH_IMPLS).

    `auto` is the XLA path, on every backend for now. A kernel becomes the default where it has
    been measured faster on hardware, and neither has yet: on an H100 the Mosaic GPU kernel is
    correct but no faster than the XLA path in the train step (3.1 ms against 2.3 ms for the op
    alone, forward + backward at 65,536 tokens; docs/results/device_check_h100/), and the TPU
    kernel has not run on a TPU. Name one (`impl="pallas_gpu"` / `"pallas_tpu"`,
    `model.flash_impl`) to use it."""
    _check("mixed_chunk_attention", requested, FLASH_IMPLS)
    return "xla" if requested == "auto" else requested


def proj_impl(requested: str) -> str:
    """The implementation of the gated unit's projections to run for `requested` (one of
    PROJ_IMPLS): `auto` is the XLA path; the kernels have not run on a TPU (they lower the
    layer's compiled traffic, docs/benchmarks.md)."""
    _check("proj", requested, PROJ_IMPLS)
    return "xla" if requested == "auto" else requested


def attention_impl(requested: str, length: int, head_dim: int, dtype) -> str:
    """The implementation of softmax attention to run for `requested` (one of ATTENTION_IMPLS):
    `auto` is the fastest this backend has for these shapes (splash on TPU, cuDNN on GPU in
    bf16 / fp16, else XLA)."""
    _check("attention", requested, ATTENTION_IMPLS)
    if requested != "auto":
        return requested
    platform = jax.devices()[0].platform
    if platform == "tpu" and length % SPLASH_BLOCK == 0:
        return "splash"
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim <= 128:
        return "cudnn"
    return "xla"


def _check(op: str, impl: str, choices: tuple) -> None:
    if impl not in choices:
        raise ValueError(f"{op} impl must be one of {choices}, got {impl!r}")
