"""Choosing FLASH's attention kernel: `ops.mixed_chunk_attention(impl=...)` and `model.flash_impl`.

The kernels themselves are checked against the XLA op in test_pallas_tpu.py / test_pallas_gpu.py;
here: a kernel by name runs interpreted on a CPU, clear errors (what `auto` picks:
test_dispatch.py), and the model using a kernel through `sharding.per_shard` on one device and on a
(data, fsdp, tensor) = (2, 2, 2) mesh with the same logits and gradients as the XLA path.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flash_jax import models, ops, sharding
from flash_jax.config import ModelConfig

# The smallest FLASH the TPU kernel serves: S, C and E multiples of 128 (E also when split in two
# over the mesh's `tensor` axis); two chunks per row.
KERNEL_SIZED = ModelConfig(
    name="flash",
    num_layers=1,
    d_model=128,
    expansion_dim=256,
    qk_dim=128,
    chunk_size=128,
    vocab_size=64,
    max_len=256,
)


def packed_batch(B=4, T=256):
    """Documents crossing the chunk boundary, one ending on it, padding at the end."""
    seg = np.zeros((B, T), np.int32)
    seg[:, :90], seg[:, 90:128], seg[:, 128:250] = 1, 2, 3
    seg[1, :] = 5  # one document filling its row
    tokens = jax.random.randint(jax.random.key(0), (B, T), 0, 64, dtype=jnp.int32)
    return tokens, jnp.asarray(seg)


def test_a_kernel_by_name_runs_interpreted_on_a_cpu_and_equals_xla():
    keys = jax.random.split(jax.random.key(1), 5)
    x = [jax.random.normal(k, (1, 256, 128)) for k in keys]
    seg = jnp.asarray(np.repeat([[1, 2]], 128, axis=1).astype(np.int32))
    kwargs = dict(chunk_size=128, causal=True, segment_ids=seg)
    want = ops.mixed_chunk_attention(*x, **kwargs)
    got = ops.mixed_chunk_attention(*x, **kwargs, impl="pallas_tpu")
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_unknown_impl_and_unserved_shapes_are_named():
    x = [jnp.ones((1, 64, 16))] * 5
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.mixed_chunk_attention(*x, chunk_size=32, causal=True, impl="triton")
    with pytest.raises(ValueError, match="multiple of 128"):  # the TPU kernel's tiles
        ops.mixed_chunk_attention(*x, chunk_size=32, causal=True, impl="pallas_tpu")
    with pytest.raises(ValueError, match="model.flash_impl"):
        ModelConfig(flash_impl="cuda")


def logits_and_grads(cfg, tokens, seg, mesh=None):
    model = models.create(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def loss(state, tokens, seg):
        logits = nnx.merge(graphdef, state)(tokens, segment_ids=seg)
        return jnp.sum(jnp.sin(logits)), logits

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    if mesh is None:
        (_, logits), grads = fn(state, tokens, seg)
        return logits, grads
    with jax.set_mesh(mesh):
        state = jax.device_put(state, sharding.param_shardings(state, mesh))
        spec = sharding.logical_to_spec(("batch", "length"), mesh_axis_names=mesh.axis_names)
        tokens, seg = jax.device_put((tokens, seg), jax.sharding.NamedSharding(mesh, spec))
        (_, logits), grads = fn(state, tokens, seg)
    return logits, grads


@pytest.mark.slow
@pytest.mark.parametrize("on_mesh", [False, True], ids=["one_device", "mesh_2x2x2"])
def test_model_with_the_tpu_kernel_equals_xla(on_mesh):
    # Rows over (data, fsdp) and the value width over `tensor`: the kernel's gradients of the
    # queries and keys are partial sums over E slices, which shard_map's transpose must add up.
    mesh = sharding.make_mesh((2, 2, 2), ("data", "fsdp", "tensor")) if on_mesh else None
    tokens, seg = packed_batch()
    want_logits, want_grads = logits_and_grads(KERNEL_SIZED, tokens, seg)
    kernel_cfg = dataclasses.replace(KERNEL_SIZED, flash_impl="pallas_tpu")
    got_logits, got_grads = logits_and_grads(kernel_cfg, tokens, seg, mesh)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        scale = float(jnp.max(jnp.abs(want))) + 1e-30
        np.testing.assert_allclose(got, want, atol=1e-4 * scale)
