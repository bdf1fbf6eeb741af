"""Tests of flash_jax.ops.pallas_gate, the gated unit's output x + (silu(u_pre) * a) . W + b as
Pallas TPU kernels, on a CPU: interpret mode against a float64 reference, forward and every
gradient; the layer running them when asked, equal to its XLA path; and the lowering for TPU
through `jax.export` at the paper's widths.

Error bounds against the float64 value of the same (already rounded) inputs. M is, elementwise,
the same sum over the absolute values of its terms (`_reference(..., absolute=True)`, with
silu'(p) = s (1 + p (1 - s)) bounded by s (1 + |p| (1 - s)), s = sigmoid(p) in (0, 1)). A float32
sum of K terms is within gamma_K M of the exact sum, gamma_K = K 2^-24 (K: the contraction length
plus the roundings after it, 8 of them allowed for the float32 SiLU, sigmoid and products). In
bf16 every rounding to bf16 adds at most U = 2^-8 relative to the magnitude it rounds, which is at
most M: the output rounds five times (u, the product u * a, the projection, its bias added, the
residual added), u_pre's gradient once, a's twice (u, the result), W's three times (u, the
product, the result), b's once.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from flash_jax import sharding
from flash_jax.layers.gau import FlashLayer
from flash_jax.ops import pallas_gate
from tests.helpers import tiny_model_config

N, E, D = 1024, 256, 128  # two token blocks of 512: the backward's two core halves
U_BF16 = 2.0**-8
NAMES = ["out", "x", "u_pre", "a", "w", "b"]


def gamma(k):
    return k * 2.0**-24


def _inputs(dtype, seed=0):
    rng = np.random.default_rng(seed)
    x, u_pre, a, d_out = (rng.normal(size=s) for s in [(N, D), (N, E), (N, E), (N, D)])
    w, b = rng.normal(size=(E, D)) * E**-0.5, rng.normal(size=D)
    return [jnp.asarray(z, dtype) for z in (x, u_pre, a, w, b, d_out)]


def _reference(x, u_pre, a, w, b, d_out, absolute=False):
    """Float64 output and gradients (x, u_pre, a, w, b); with `absolute`, the sums of |terms|."""
    x, u_pre, a, w, b, d_out = (np.asarray(z, np.float64) for z in (x, u_pre, a, w, b, d_out))
    sigmoid = 1.0 / (1.0 + np.exp(-u_pre))
    u, d_silu = u_pre * sigmoid, sigmoid * (1.0 + u_pre * (1.0 - sigmoid))
    if absolute:
        x, u, a, w, b, d_out = map(np.abs, (x, u, a, w, b, d_out))
        d_silu = sigmoid * (1.0 + np.abs(u_pre) * (1.0 - sigmoid))
    d_gated = d_out @ w.T
    out = x + (u * a) @ w + b
    return [out, d_out, d_gated * a * d_silu, d_gated * u, (u * a).T @ d_out, d_out.sum(0)]


def _kernel(x, u_pre, a, w, b, d_out):
    def call(*args):
        return pallas_gate.gated_output(*args, interpret=True, megacore=True)

    out, vjp = jax.vjp(call, x, u_pre, a, w, b)
    return [out, *vjp(d_out)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_output_and_gradients_match_float64_reference(dtype):
    assert pallas_gate.core_halves(N // pallas_gate.block_tokens(N), megacore=True) == 2
    inputs = _inputs(dtype)
    got = _kernel(*inputs)
    want = _reference(*inputs)
    size = _reference(*inputs, absolute=True)
    unit = U_BF16 if dtype == jnp.bfloat16 else 0.0
    roundings = [5 * unit + gamma(E + 8), 0.0, unit + gamma(D + 8), 2 * unit + gamma(D + 8)]
    roundings += [3 * unit + gamma(N + 8), unit + gamma(N)]
    for name, g, w_, m, r in zip(NAMES, got, want, size, roundings, strict=True):
        assert g.dtype == dtype, name
        error = np.abs(np.asarray(g, np.float64) - w_)
        bound = r * m * 1.01  # 1% for the bound's own first-order approximation
        assert np.all(error <= bound), (name, float(np.max(error / bound)))


def test_lowers_for_tpu_at_paper_shapes():
    """The paper's widths (e = 2048, d_model = 1024) and 65,536 tokens: block shapes and the
    Pallas-to-Mosaic lowering of both kernels (Mosaic's own compiler: tests/test_tpu_compile.py
    and scripts/op_cost.py --tpu_topology)."""
    tokens, e, d = 65536, 2048, 1024

    def step(x, u, a, w, b, d_out):
        out, vjp = jax.vjp(pallas_gate.gated_output, x, u, a, w, b)
        return out, vjp(d_out)

    shapes = [(tokens, d), (tokens, e), (tokens, e), (e, d), (d,), (tokens, d)]
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
    exported = jax.export.export(jax.jit(step), platforms=["tpu"])(*args)
    assert exported.mlir_module().count("tpu_custom_call") == 2


@pytest.mark.parametrize(
    "shape, served", [((384, 256, 128), True), ((6, 256, 128), False), ((384, 200, 128), False)]
)
def test_supported_shapes(shape, served):
    assert pallas_gate.supported(*shape) == served


# The smallest FLASH layer the kernel serves: e and d_model multiples of 128; 2 x 128 tokens.
LAYER = tiny_model_config(
    "flash", d_model=128, expansion_dim=256, qk_dim=128, chunk_size=128, proj_impl="pallas_tpu"
)


def _layer_output_and_gradients(cfg, x, u_pre, attended, d_out, mesh=None):
    """The layer's `output` (gate, projection, residual) and its gradients (x, u_pre, attended,
    the projection's kernel and bias), in the layer's parameters from one seed; with a mesh, the
    parameters placed by their logical axes and the program jitted under it."""
    layer = FlashLayer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer, nnx.Param)

    @jax.jit
    def output_and_gradients(params, x, u_pre, attended, d_out):
        def output(params, x, u_pre, attended):
            return nnx.merge(graphdef, params).output(x, u_pre, attended)

        out, vjp = jax.vjp(output, params, x, u_pre, attended)
        d_params, *d_inputs = vjp(d_out)
        proj = d_params["proj_out"]
        return [out, *d_inputs, proj["kernel"].value, proj["bias"].value]

    if mesh is None:
        return output_and_gradients(params, x, u_pre, attended, d_out)
    with jax.set_mesh(mesh):
        specs = sharding.param_specs(params, cfg.sharding_rules, mesh.axis_names)
        params = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
        return output_and_gradients(params, x, u_pre, attended, d_out)


# Tokens over data and sequence and W gathered from FSDP: each device's 128 tokens in the kernel.
MESH_AXES = ("data", "fsdp", "sequence")


@pytest.mark.parametrize("mesh_shape", [None, (2, 2, 2)])
def test_the_layer_runs_the_kernel_when_asked_and_equals_the_xla_path(mesh_shape):
    """float32: the same sums in another order, each within gamma_K M of the float64 value (the
    module docstring), so within 2 gamma_K of each other, K = the tokens + 8 (the longest
    contraction, W's gradient: on a mesh, each device's part summed across the devices) and M
    bounded by `_reference(..., absolute=True)`'s largest entry."""
    B = 2 if mesh_shape is None else 4
    T = 128 if mesh_shape is None else 256
    mesh = None if mesh_shape is None else sharding.make_mesh(mesh_shape, MESH_AXES)
    rng = np.random.default_rng(3)
    x, d_out = (jnp.asarray(rng.normal(size=(B, T, 128)), jnp.float32) for _ in range(2))
    u_pre, attended = (jnp.asarray(rng.normal(size=(B, T, 256)), jnp.float32) for _ in range(2))
    xla = dataclasses.replace(LAYER, proj_impl="xla")
    got = _layer_output_and_gradients(LAYER, x, u_pre, attended, d_out, mesh)
    want = _layer_output_and_gradients(xla, x, u_pre, attended, d_out)
    layer = FlashLayer(xla, rngs=nnx.Rngs(0))
    w, b = layer.proj_out.kernel.value, layer.proj_out.bias.value
    flat = [z.reshape(B * T, -1) for z in (x, u_pre, attended)]
    size = _reference(*flat, w, b, d_out.reshape(B * T, -1), absolute=True)
    for name, g, w_, m in zip(NAMES, got, want, size, strict=True):
        bound = 2 * gamma(B * T + 8) * float(np.max(m)) * 1.01
        assert float(jnp.max(jnp.abs(g - w_))) <= bound, name


def test_the_xla_path_runs_unless_asked_or_with_e_split_over_devices():
    """`auto` and `xla` run XLA's ops; `pallas_tpu` runs the kernel (a pallas_call in the
    program), on one device and on each device of a mesh, except where the mesh splits e
    (tensor parallelism): XLA's ops then."""

    def pallas_calls(cfg):
        layer = FlashLayer(cfg, rngs=nnx.Rngs(0))
        x, u = jnp.ones((4, 128, 128)), jnp.ones((4, 128, 256))
        return str(jax.make_jaxpr(layer.output)(x, u, u)).count("pallas_call")

    assert pallas_calls(LAYER) == 1
    assert pallas_calls(dataclasses.replace(LAYER, proj_impl="auto")) == 0
    with jax.set_mesh(sharding.make_mesh((2,), ("data",), devices=jax.devices()[:2])):
        assert pallas_calls(LAYER) == 1
    with jax.set_mesh(sharding.make_mesh((2,), ("tensor",), devices=jax.devices()[:2])):
        assert pallas_calls(LAYER) == 0
