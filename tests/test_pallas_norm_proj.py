"""Tests of flash_jax.ops.pallas_norm_proj, the gated unit's input side ScaleNorm(x) . W + b cut
into parts (some after a SiLU) as Pallas TPU kernels, on a CPU: interpret mode against a float64
reference, forward and every gradient; the layer running them when asked, equal to its XLA path;
and the lowering for TPU through `jax.export` at the paper's widths.

Error bounds against the float64 value of the same (already rounded) inputs. With r = 1 /
sqrt(mean(x^2) + eps), n = x r, h = g n, A = |d| . |W|^T (d: the pre-activations' cotangents side
by side), M is, elementwise, the same sum over the absolute values of its terms (`_sizes`):
|g| |n| . |W| + |b| for a pre-activation, |g| r (A + |n| mean(A |n|)) for x's gradient, |h|^T .
|d| for W's, the sum of |d| for b's, the sum of A |n| for g's. A float32 sum of K terms is within
gamma_K M of the exact sum, gamma_K = K 2^-24. K counts each sum on the way: the mean of squares
over D (in r, n and h: D), the matmul over D (the output), dh = d . W^T over F (the parts'
widths), dh n's mean over D (x's gradient), the N tokens (W's, b's and g's gradients) and g's sum
over D, plus 8 for the float32 rsqrt, products and quotients. In bf16 every rounding to bf16 adds
at most U = 2^-8 relative to the magnitude it rounds, which is at most M: a pre-activation rounds
three times (h, the matmul, the bias added), x's gradient once (the result), W's twice (h, the
result), b's once (the result); g stays float32 and so does its gradient.

A SiLU part: silu' lies in [-0.1, 1.1] and |silu''| <= 1/2. Its output silu(p) is within
1.1 (e_p + U + gamma_8) M of the exact one, e_p the pre-activation's bound above (relative to its
M), and its pre-activation cotangent d silu'(p), formed from the kernel's own p, within E = |d|
(e_p M / 2 + gamma_8 (2 + M) + 1.1 U) (the float32 silu' of p within gamma_8 (2 + |p|), the bf16
rounding of the result); every gradient is linear in that cotangent, so each is within its bound
above, with |d| taken as 1.1 |d| on the SiLU parts, plus its M formed from E in place of |d|.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from flash_jax import models, sharding
from flash_jax.layers.gau import FlashLayer
from flash_jax.ops import pallas_gate, pallas_norm_proj
from tests.helpers import tiny_model_config

N, D, WIDTHS = 512, 128, (256, 256, 128)  # backward: two blocks of 256, two core halves; e, e, s
F = sum(WIDTHS)
SILU = (False, True, True)  # the layer's: u's SiLU is the gate's
EPS = 1e-5
U_BF16 = 2.0**-8
NAMES = ["u", "v", "z", "x", "w", "b", "g"]


def gamma(k):
    return k * 2.0**-24


def _inputs(dtype, seed=0):
    """x, W, b, g (float32: the layer's scale is a parameter) and the parts' cotangents."""
    rng = np.random.default_rng(seed)
    x, w = rng.normal(size=(N, D)), rng.normal(size=(D, F)) * D**-0.5
    b, g = rng.normal(size=F), jnp.float32(1.5)
    d_parts = [jnp.asarray(rng.normal(size=(N, width)), dtype) for width in WIDTHS]
    return [jnp.asarray(z, dtype) for z in (x, w, b)] + [g, d_parts]


def _split(a):
    return np.split(a, np.cumsum(WIDTHS)[:-1], axis=-1)


def _per_part(silu, if_silu, otherwise, rows):
    """[rows, F]: `if_silu` on the SiLU parts' columns, `otherwise` on the rest."""
    pairs = zip(WIDTHS, silu, strict=True)
    return np.concatenate([np.full((rows, w), if_silu if on else otherwise) for w, on in pairs], -1)


def _float64(x, w, b, g, d_parts):
    x, w, b, g = (np.asarray(z, np.float64) for z in (x, w, b, g))
    d = np.concatenate([np.asarray(z, np.float64) for z in d_parts], axis=-1)
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)
    return x, w, b, g, d, r


def _gradients(w, g, n, r, d_pre, sign):
    """x's, W's, b's and g's gradients from the pre-activations' cotangents d_pre (sign -1), or
    their sizes from nonnegative ones (sign +1, |w|, |g|, |n|)."""
    dh = d_pre @ w.T
    dx = g * r * (dh + sign * n * np.mean(dh * n, axis=-1, keepdims=True))
    return [dx, (g * n).T @ d_pre, d_pre.sum(0), np.sum(dh * n)]


def _reference(x, w, b, g, d_parts, silu):
    """Float64 outputs and gradients (x, w, b, g)."""
    x, w, b, g, d, r = _float64(x, w, b, g, d_parts)
    n = x * r
    pre = g * n @ w + b
    sigmoid = 1.0 / (1.0 + np.exp(-pre))
    on = _per_part(silu, True, False, len(x))
    out = np.where(on, pre * sigmoid, pre)
    d_pre = np.where(on, d * sigmoid * (1.0 + pre * (1.0 - sigmoid)), d)
    return [*_split(out), *_gradients(w, g, n, r, d_pre, -1.0)]


def _bounds(x, w, b, g, d_parts, silu, unit, more_sums=0):
    """Elementwise error bounds of the outputs and gradients (the module docstring); the sums
    over tokens with `more_sums` more terms."""
    x, w, b, g, d, r = _float64(x, w, b, g, d_parts)
    (tokens, _), on = x.shape, _per_part(silu, True, False, len(x))
    n, w, g, d = np.abs(x) * r, np.abs(w), np.abs(g), np.abs(d)
    m_pre = g * n @ w + np.abs(b)
    e_pre = 3 * unit + gamma(2 * D + 8)
    outputs = np.where(on, 1.1 * (e_pre + unit + gamma(8)) * m_pre, e_pre * m_pre)
    error = np.where(on, d * (e_pre * m_pre / 2 + gamma(8) * (2 + m_pre) + 1.1 * unit), 0.0)
    sizes = _gradients(w, g, n, r, d * np.where(on, 1.1, 1.0), 1.0)
    tokens += more_sums
    roundings = [unit + gamma(F + 2 * D + 8), 2 * unit + gamma(tokens + D + 8)]
    roundings += [unit + gamma(tokens), gamma(F + tokens + 2 * D + 8)]  # g's: float32 throughout
    gradients = [
        rounding * size + silu_size
        for rounding, size, silu_size in zip(
            roundings, sizes, _gradients(w, g, n, r, error, 1.0), strict=True
        )
    ]
    return [*_split(outputs), *gradients]


def _kernel(x, w, b, g, d_parts, silu):
    def call(*args):
        return pallas_norm_proj.norm_projection(
            *args, WIDTHS, silu, EPS, interpret=True, megacore=True
        )

    parts, vjp = jax.vjp(call, x, w, b, g)
    return [*parts, *vjp(tuple(d_parts))]


@pytest.mark.parametrize("silu", [(False,) * 3, SILU])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_outputs_and_gradients_match_float64_reference(dtype, silu):
    assert pallas_gate.core_halves(N // pallas_norm_proj._BACKWARD_MAX_BLOCK_TOKENS, True) == 2
    inputs = _inputs(dtype)
    got = _kernel(*inputs, silu)
    want = _reference(*inputs, silu)
    unit = U_BF16 if dtype == jnp.bfloat16 else 0.0
    bounds = _bounds(*inputs, silu, unit)
    dtypes = [dtype] * 6 + [jnp.float32]
    for name, got_, want_, bound, t in zip(NAMES, got, want, bounds, dtypes, strict=True):
        assert got_.dtype == t, name
        error = np.abs(np.asarray(got_, np.float64) - want_)
        bound = bound * 1.01  # 1% for the bound's own first-order approximation
        assert np.all(error <= bound), (name, float(np.max(error / bound)))


def test_lowers_for_tpu_at_paper_shapes():
    """The paper's widths (d_model = 1024, e = 2048, s = 128) and 65,536 tokens: block shapes
    and the Pallas-to-Mosaic lowering of both kernels (Mosaic's own compiler:
    tests/test_tpu_compile.py and scripts/op_cost.py --tpu_topology)."""
    tokens, d, widths = 65536, 1024, (2048, 2048, 128)

    def step(x, w, b, g, *d_parts):
        def call(*args):
            return pallas_norm_proj.norm_projection(*args, widths, SILU, 1e-5, False, "proj_in")

        parts, vjp = jax.vjp(call, x, w, b, g)
        return parts, vjp(d_parts)

    shapes = [(tokens, d), (d, sum(widths)), (sum(widths),)]
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
    args.append(jax.ShapeDtypeStruct((), jnp.float32))
    args += [jax.ShapeDtypeStruct((tokens, width), jnp.bfloat16) for width in widths]
    exported = jax.export.export(jax.jit(step), platforms=["tpu"])(*args)
    assert exported.mlir_module().count("tpu_custom_call") == 2


@pytest.mark.parametrize(
    "shape, served",
    [
        ((384, 128, WIDTHS), True),
        ((6, 128, WIDTHS), False),
        ((384, 100, WIDTHS), False),
        ((384, 128, (256, 256, 64)), False),
    ],
)
def test_supported_shapes(shape, served):
    assert pallas_norm_proj.supported(*shape) == served


# The smallest FLASH layer the kernel serves: widths multiples of 128; 2 x 128 tokens.
LAYER = tiny_model_config(
    "flash", d_model=128, expansion_dim=256, qk_dim=128, chunk_size=128, proj_impl="pallas_tpu"
)


def _layer_projections_and_gradients(cfg, x, d_parts, mesh=None):
    """The layer's `projections` (norm, input projection, v's and z's SiLUs) and their gradients
    (x, the input projection's kernel and bias, the norm's scale), in the layer's parameters from
    one seed, made larger than the init (scale 1.5, a bias) so that every term matters; with a
    mesh, the parameters placed by their logical axes and the program jitted under it."""
    layer = FlashLayer(cfg, rngs=nnx.Rngs(0))
    layer.norm.scale.value = jnp.float32(1.5)
    layer.proj_in.bias.value = jax.random.normal(jax.random.key(1), (F,))
    graphdef, params = nnx.split(layer, nnx.Param)

    @jax.jit
    def projections_and_gradients(params, x, d_parts):
        def projections(params, x):
            return nnx.merge(graphdef, params).projections(x)

        outputs, vjp = jax.vjp(projections, params, x)
        d_params, d_x = vjp(d_parts)
        proj = d_params["proj_in"]
        scale = d_params["norm"]["scale"].value
        return [*outputs, d_x, proj["kernel"].value, proj["bias"].value, scale]

    if mesh is None:
        return layer, projections_and_gradients(params, x, d_parts)
    with jax.set_mesh(mesh):
        specs = sharding.param_specs(params, cfg.sharding_rules, mesh.axis_names)
        params = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
        return layer, projections_and_gradients(params, x, d_parts)


# Tokens over data and sequence and W gathered from FSDP: each device's 128 tokens in the kernel.
MESH_AXES = ("data", "fsdp", "sequence")


@pytest.mark.parametrize("mesh_shape", [None, (2, 2, 2)])
def test_the_layer_runs_the_kernel_when_asked_and_equals_the_xla_path(mesh_shape):
    """float32: the same sums in another order, each within its bound of the float64 value (the
    module docstring, `_bounds`; on a mesh with 8 more terms in the sums over tokens, the
    devices' parts summed across them), so within twice the bound's largest entry of each
    other."""
    B = 2 if mesh_shape is None else 4
    T = 128 if mesh_shape is None else 256
    mesh = None if mesh_shape is None else sharding.make_mesh(mesh_shape, MESH_AXES)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    d_parts = tuple(jnp.asarray(rng.normal(size=(B, T, w)), jnp.float32) for w in WIDTHS)
    xla = dataclasses.replace(LAYER, proj_impl="xla")
    _, got = _layer_projections_and_gradients(LAYER, x, d_parts, mesh)
    layer, want = _layer_projections_and_gradients(xla, x, d_parts)
    w, b = layer.proj_in.kernel.value, layer.proj_in.bias.value
    flat = [z.reshape(B * T, -1) for z in d_parts]
    bounds = _bounds(x.reshape(B * T, D), w, b, layer.norm.scale.value, flat, SILU, 0.0, 8)
    for name, got_, want_, bound in zip(NAMES, got, want, bounds, strict=True):
        assert float(jnp.max(jnp.abs(got_ - want_))) <= 2 * float(np.max(bound)) * 1.01, name


def test_the_xla_path_runs_unless_asked_or_with_layer_norm_or_e_split_over_devices():
    """`auto` and `xla` run XLA's ops; `pallas_tpu` runs the kernel (a pallas_call in
    `project`'s program), on one device and on each device of a mesh, except with LayerNorm or
    where the mesh splits e (tensor parallelism): XLA's ops then."""

    def pallas_calls(cfg):
        layer = FlashLayer(cfg, rngs=nnx.Rngs(0))
        x, positions = jnp.ones((4, 128, 128)), jnp.zeros((4, 128), jnp.int32)
        return str(jax.make_jaxpr(layer.project)(x, positions)).count("pallas_call")

    assert pallas_calls(LAYER) == 1
    assert pallas_calls(dataclasses.replace(LAYER, proj_impl="auto")) == 0
    assert pallas_calls(dataclasses.replace(LAYER, norm="layer_norm")) == 0
    with jax.set_mesh(sharding.make_mesh((2,), ("data",), devices=jax.devices()[:2])):
        assert pallas_calls(LAYER) == 1
    with jax.set_mesh(sharding.make_mesh((2,), ("tensor",), devices=jax.devices()[:2])):
        assert pallas_calls(LAYER) == 0


def test_a_remat_policy_that_keeps_proj_in_saves_the_kernels_residuals(capsys):
    """With `save_proj`, the backward finds everything it reads of the kernel's forward saved:
    the outputs (u's pre-activation, v, z) and the kernel's residuals (v's and z's
    pre-activations) named "proj_in", and otherwise only the arguments; without the residuals'
    name it would rerun the forward kernel for them."""
    layer = FlashLayer(LAYER, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer, nnx.Param)

    def loss(params, x):
        return sum(jnp.sum(jnp.sin(y)) for y in nnx.merge(graphdef, params).projections(x))

    remat = jax.checkpoint(loss, policy=models.remat_policy("save_proj"))
    jax.ad_checkpoint.print_saved_residuals(remat, params, jnp.ones((2, 128, D)))
    saved = capsys.readouterr().out.strip().splitlines()
    named = [line.split(" named")[0] for line in saved if "named 'proj_in'" in line]
    assert sorted(named) == sorted(
        ["f32[2,128,256]"] * 2 + ["f32[2,128,128]"] + ["f32[256,256]", "f32[256,128]"]
    )
    assert all("named 'proj_in'" in line or "from the argument" in line for line in saved), saved
