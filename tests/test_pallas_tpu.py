"""Tests of flash_jax.ops.pallas_tpu, the Pallas TPU kernels of mixed chunk attention, on a CPU.

The kernels run in Pallas interpret mode and must equal `ops.mixed_chunk_attention` (the XLA path)
forward and backward, within bounds derived below from a float64 dense reference (`_dense`, built
from the spec's definitions: same chunk, same non-zero segment, j <= i, L(i), N_i); they lower for
TPU through `jax.export` at the paper's shapes. What this does not prove (Mosaic's own compiler,
speed) is said in the module's docstring.

Error bounds: every quantity the kernel returns is a sum of products, and `_dense(...,
mode="abs")` gives, elementwise, the same sums over the absolute values of their terms (M). A
float32 evaluation of a sum of at most K terms is within gamma_K M of the exact sum, gamma_K =
K 2^-24 (K counts the longest chain: up to Tp state terms, C in-chunk and S contraction terms, a
few scalings); the float32 scores' own error (gamma_{S+2} relative to the sum of their absolute
terms) enters through relu^2 and dS (`mode="score"`). Two float32 evaluations differ by at most
twice that (`_bounds`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from flash_jax import ops
from flash_jax.ops import pallas_tpu

B, T, S, E, C = 2, 300, 128, 256, 128  # the kernel's smallest widths; T pads to 3 chunks
BLOCK_E = 128  # two E tiles, so the per-tile partial sums are exercised
U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits, round to nearest)
GAMMA_F32 = (384 + C + S + 8) * 2.0**-24  # gamma_K of the module docstring, Tp = 384
GAMMA_SCORES = (S + 2) * 2.0**-24  # a score: S products, the 1/C scaling, + bias

# Segment layouts [B, T]: documents ending exactly on a chunk boundary (chunk 0 of row 0), crossing
# one (rows 0 and 1) or running through a whole chunk (doc 8), padding inside a chunk and trailing.
PACKED = np.asarray(
    [
        [1] * 128 + [2] * 72 + [0] * 10 + [3] * 80 + [0] * 10,
        [4] * 20 + [8] * 250 + [9] * 30,
    ],
    np.int32,
)
# Breaks the contiguity precondition (id 1 comes back): the kernel still follows the XLA path's
# link rule exactly, so the two agree, while the spec's dense reference does not apply.
REAPPEARING = np.asarray([[1] * 100 + [2] * 100 + [1] * 100, [3] * 150 + [0] * 20 + [3] * 130])
LAYOUTS = {"packed": PACKED, "one_doc": None, "reappearing": REAPPEARING}
GRAD_NAMES = ("quad_q", "quad_k", "lin_q", "lin_k", "v", "quad_bias")


def _inputs(seed, dtype=jnp.float32):
    """Inputs whose quadratic and linear parts are of similar size (scores of order 1)."""
    rng = np.random.default_rng(seed)
    qk_quad = [3.0 * rng.normal(size=(B, T, S)) for _ in range(2)]  # qq.kq / C ~ 0.8
    qk_lin = [rng.normal(size=(B, T, S)) for _ in range(2)]
    xs = [jnp.asarray(x, dtype) for x in qk_quad + qk_lin + [rng.normal(size=(B, T, E))]]
    bias = jnp.asarray(0.5 * rng.normal(size=(C, C)), jnp.float32)
    d_out = jnp.asarray(rng.normal(size=(B, T, E)), dtype)
    return xs, bias, d_out


def _vjp(fn, xs, bias, d_out, **kwargs):
    """Output and the gradients of <out, d_out> with respect to the five inputs and quad_bias."""

    def f(*args):
        return fn(*args[:5], chunk_size=C, quad_bias=args[5], **kwargs)

    out, pullback = jax.vjp(f, *xs, bias)
    return [out, *pullback(d_out)]


def _kernel(xs, bias, d_out, *, causal, seg, interpret=True):
    def fn(*args, **kwargs):
        return pallas_tpu.mixed_chunk_attention_tpu(
            *args, **kwargs, block_e=BLOCK_E, interpret=interpret
        )

    return jax.jit(lambda *a: _vjp(fn, *a, causal=causal, segment_ids=seg))(xs, bias, d_out)


def _xla(xs, bias, d_out, *, causal, seg):
    run = jax.jit(lambda *a: _vjp(ops.mixed_chunk_attention, *a, causal=causal, segment_ids=seg))
    return run(xs, bias, d_out)


# ---------------------------------------------------------------- float64 dense reference ----


def _dense(qq, kq, ql, kl, v, d_out, bias, seg, *, causal, mode="value"):
    """Output and gradients (order of `_vjp`) from the spec's dense [T, T] definitions, float64.

    mode "value": the values. "abs": the same sums over the absolute values of their terms (M).
    "score": how far they move per unit of relative error in the scores, whose float32 error is
    at most gamma_{S+2} (sum over s of |qq||kq| / C + |bias|) elementwise; relu^2 moves by twice
    relu times that, dS = dmix * 2 relu by twice |dmix| times that (M_score).
    """
    seg = np.ones((B, T), np.int32) if seg is None else np.asarray(seg)
    qq, kq, ql, kl, v, d_out = (np.asarray(x, np.float64) for x in (qq, kq, ql, kl, v, d_out))
    chunk = np.arange(T) // C
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
    quad_mask = same & (chunk[:, None] == chunk[None, :])
    if causal:
        quad_mask = quad_mask & np.tril(np.ones((T, T), bool))
    lin_set = same & (chunk[None, :] < chunk[:, None]) if causal else same  # L(i)
    lin_w = lin_set / np.maximum(lin_set.sum(-1, keepdims=True), 1)  # 1/N_i on L(i)

    bias_TT = np.asarray(bias, np.float64)[np.arange(T) % C][:, np.arange(T) % C]
    relu = np.where(quad_mask, np.maximum(np.einsum("bis,bjs->bij", qq, kq) / C + bias_TT, 0), 0)
    if mode != "value":
        qq, kq, ql, kl, v, d_out = (np.abs(x) for x in (qq, kq, ql, kl, v, d_out))
    d_mix = np.einsum("bie,bje->bij", d_out, v)
    mix = relu**2 + np.einsum("bis,bjs->bij", ql, kl) * lin_w
    d_scores = d_mix * 2 * relu
    d_lin = d_mix * lin_w
    if mode == "score":
        score_abs = np.where(quad_mask, np.einsum("bis,bjs->bij", qq, kq) / C + np.abs(bias_TT), 0)
        mix, d_scores, d_lin = 2 * relu * score_abs, 2 * d_mix * score_abs, 0 * d_lin
    d_bias = np.zeros((C, C))
    for g in range(-(-T // C)):
        rows = slice(g * C, min((g + 1) * C, T))
        n = rows.stop - rows.start
        d_bias[:n, :n] += d_scores[:, rows, rows].sum(0)
    return [
        np.einsum("bij,bje->bie", mix, v),
        np.einsum("bij,bjs->bis", d_scores, kq) / C,
        np.einsum("bij,bis->bjs", d_scores, qq) / C,
        np.einsum("bij,bjs->bis", d_lin, kl),
        np.einsum("bij,bis->bjs", d_lin, ql),
        np.einsum("bij,bie->bje", mix, d_out),
        d_bias,
    ]


def _bounds(xs, bias, d_out, *, causal, seg, roundings=None):
    """Bounds on |kernel - XLA| per result: (k u + (k u)^2 + 2 gamma_K) M + 2 gamma_S M_score,
    k = roundings[name] (bf16 operand roundings, see the bf16 test; none for float32)."""
    args = (*xs, d_out, bias, seg)
    m_abs = _dense(*args, causal=causal, mode="abs")
    m_score = _dense(*args, causal=causal, mode="score")
    bounds = []
    for name, ma, ms in zip(("out",) + GRAD_NAMES, m_abs, m_score, strict=True):
        ku = (roundings or {}).get(name, 0) * U_BF16
        bounds.append((ku + ku**2 + 2 * GAMMA_F32) * ma + 2 * GAMMA_SCORES * ms)
    return bounds


def _assert_within(got, want, bound, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    excess = np.abs(got - want) - bound
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert np.all(excess <= 0), (
        f"{what}: |got - want| = {abs(got - want)[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"
    )


# ---------------------------------------------------------------- interpret mode ----


@pytest.mark.parametrize(
    "causal, layout",
    [(True, "packed"), (False, "packed"), (True, "reappearing"), (False, "reappearing")]
    + [(False, "one_doc")],  # segment_ids=None: the wrapper's path is the same for both modes
)
def test_float32_matches_xla_and_dense_reference(causal, layout):
    seg = LAYOUTS[layout]
    xs, bias, d_out = _inputs(seed=1)
    got = _kernel(xs, bias, d_out, causal=causal, seg=seg)
    want = _xla(xs, bias, d_out, causal=causal, seg=seg)
    exact = _dense(*xs, d_out, bias, seg, causal=causal)
    bounds = _bounds(xs, bias, d_out, causal=causal, seg=seg)
    for name, g, w, x, bound in zip(("out",) + GRAD_NAMES, got, want, exact, bounds, strict=True):
        assert g.dtype == w.dtype
        _assert_within(g, w, bound, f"{name} vs the XLA op")
        if layout != "reappearing":  # one float32 evaluation against the exact value
            _assert_within(g, x, bound / 2, f"{name} vs float64")
    if seg is not None:  # padding rows are exactly 0, not merely small
        assert np.all(np.asarray(got[0])[seg == 0] == 0)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_bfloat16_matches_xla_within_operand_rounding(causal):
    """bf16 inputs: the kernel rounds matmul operands to bf16, the XLA path does not.

    Each rounding of an operand to bf16 moves each product of a sum by at most u = 2^-8 relative,
    so the sum by at most u M. The kernel rounds, on the way to each result (counting the final
    rounding of the result to bf16): out 2 (the [C, C] weights or the state P / Q, then out);
    d quad_q, d quad_k 2 (dS, result); d lin_q, d lin_k, dv 3 (dO / N or dS, the state or its
    gradient, which already carries one rounding of dO / N, result); d quad_bias none (float32
    output, float32 sums). The XLA path rounds once (the result). So k = 3 for out, d quad_q,
    d quad_k, 4 for d lin_q, d lin_k, dv, and 0 for d quad_bias in `_bounds`; k^2 u^2 bounds the
    products of roundings.
    """
    xs, bias, d_out = _inputs(seed=2, dtype=jnp.bfloat16)
    got = _kernel(xs, bias, d_out, causal=causal, seg=PACKED)
    want = _xla(xs, bias, d_out, causal=causal, seg=PACKED)
    roundings = {"out": 3, "quad_q": 3, "quad_k": 3, "lin_q": 4, "lin_k": 4, "v": 4}
    bounds = _bounds(xs, bias, d_out, causal=causal, seg=PACKED, roundings=roundings)
    for name, g, w, bound in zip(("out",) + GRAD_NAMES, got, want, bounds, strict=True):
        assert g.dtype == w.dtype
        _assert_within(g, w, bound, name)
    assert np.all(np.asarray(got[0], np.float32)[PACKED == 0] == 0)


@pytest.mark.slow  # 9 s alone, 25 s on a busy CPU: the TPU interpreter simulates every access
def test_interpreter_with_two_cores_finds_no_race(capsys):
    """The TPU interpreter: two simulated cores share the parallel grid axes (batch, E tiles),
    memory starts as NaN, reads out of bounds raise, and the race detector watches every access."""
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2, random_seed=3)
    xs, bias, d_out = _inputs(seed=3)
    got = _kernel(xs, bias, d_out, causal=False, seg=PACKED, interpret=params)
    jax.block_until_ready(got)
    assert "RACE DETECTED" not in capsys.readouterr().out
    want = _xla(xs, bias, d_out, causal=False, seg=PACKED)
    bounds = _bounds(xs, bias, d_out, causal=False, seg=PACKED)
    for name, g, w, bound in zip(("out",) + GRAD_NAMES, got, want, bounds, strict=True):
        _assert_within(g, w, bound, name)


def test_race_detector_reports_a_race(capsys):
    """The check above can fail: two cores writing one output block is reported."""

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    x = jnp.ones((2, 8, 128), jnp.float32)
    racy = pl.pallas_call(
        kernel,
        grid=(2,),
        in_specs=[pl.BlockSpec((None, 8, 128), lambda i: (i, 0, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),  # the same block from both cores
        out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2),
    )
    jax.block_until_ready(racy(x))
    assert "RACE DETECTED" in capsys.readouterr().out


# ---------------------------------------------------------------- lowering for TPU ----


@pytest.mark.parametrize("vmem_mib", [16, 128], ids=["v4", "v5e"])
@pytest.mark.parametrize(
    "batch, tokens, width, causal",
    [(2, 8192, 2048, True), (1, 8192, 1536, False), (1, 8000, 2048, False), (2, 4096, 1536, True)],
)
def test_lowers_for_tpu_at_paper_shapes(batch, tokens, width, causal, vmem_mib):
    """Forward and backward lower to Mosaic (block shapes, every operation) without a TPU."""
    shapes = [jax.ShapeDtypeStruct((batch, tokens, 128), jnp.bfloat16)] * 4
    shapes.append(jax.ShapeDtypeStruct((batch, tokens, width), jnp.bfloat16))
    seg = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)
    bias = jax.ShapeDtypeStruct((256, 256), jnp.float32)

    def loss(*args):
        out = pallas_tpu.mixed_chunk_attention_tpu(
            *args[:5],
            chunk_size=256,
            causal=causal,
            segment_ids=args[5],
            quad_bias=args[6],
            vmem_capacity_bytes=vmem_mib * 2**20,
        )
        return jnp.sum(out.astype(jnp.float32))

    step = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 6))
    exported = jax.export.export(jax.jit(step), platforms=["tpu"])(*shapes, seg, bias)
    kernels = 3 if causal else 4  # forward (+ right state) and the two backward passes
    assert exported.mlir_module().count("tpu_custom_call") == kernels


@pytest.mark.parametrize(
    "vmem_mib, width, causal, block_e",
    [
        (16, 2048, True, 1024),
        (16, 2048, False, 512),
        (16, 1536, True, 768),
        (16, 1536, False, 768),
        (128, 2048, True, 2048),
        (128, 2048, False, 2048),
        (128, 1536, False, 1536),
    ],
)
def test_default_block_e_per_chip(vmem_mib, width, causal, block_e):
    """The E tiles the module docstring states for v4 (16 MiB) and v5e (128 MiB), C = 256."""
    chosen = pallas_tpu._default_block_e(256, 128, width, 2, causal, vmem_mib * 2**20)
    assert chosen == block_e


def _outer_avals(jaxpr):
    """Abstract values of a jaxpr and its sub-jaxprs, but only the outputs of kernels (what
    reaches HBM), not their insides."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    yield from (var.aval for var in jaxpr.invars)
    for eqn in jaxpr.eqns:
        yield from (var.aval for var in eqn.outvars)
        if eqn.primitive.name == "pallas_call":
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    yield from _outer_avals(sub)


def test_states_never_reach_hbm():
    """No [S, E]-shaped state (nor a stack of them) leaves a kernel, forward or backward."""
    width_s, width_e = 256, 384  # distinct from C = 128 and T, so a state's shape is telling
    rng = np.random.default_rng(4)
    xs = [rng.normal(size=(B, T, width_s)).astype(np.float32) for _ in range(4)]
    xs.append(rng.normal(size=(B, T, width_e)).astype(np.float32))
    for causal in (True, False):

        def loss(*args, causal=causal):
            out = pallas_tpu.mixed_chunk_attention_tpu(
                *args, chunk_size=C, causal=causal, segment_ids=PACKED, block_e=128
            )
            return jnp.sum(out)

        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*xs)
        shapes = [tuple(getattr(a, "shape", ())) for a in _outer_avals(jaxpr)]
        assert not [s for s in shapes if len(s) >= 2 and s[-2] == width_s], shapes
        assert (B, 384, width_e) in shapes  # the walk does see the kernels' outputs


# ---------------------------------------------------------------- what cannot be served ----


def _shapes(t=256, s=128, e=256, dtypes=("bfloat16",) * 5):
    widths = [s, s, s, s, e]
    return [jax.ShapeDtypeStruct((1, t, w), d) for w, d in zip(widths, dtypes, strict=True)]


@pytest.mark.parametrize(
    "shapes, kwargs, match",
    [
        (_shapes(), dict(chunk_size=64), "chunk_size to be a multiple of 128"),
        (_shapes(), dict(chunk_size=0), "chunk_size to be a multiple of 128"),
        (_shapes(), dict(chunk_size=128.0), "chunk_size must be a positive integer"),
        (_shapes(s=64), dict(chunk_size=128), "width S to be a multiple of 128"),
        (_shapes(e=200), dict(chunk_size=128), "value width E to be a multiple of 128"),
        (
            _shapes(dtypes=("bfloat16",) * 4 + ("float32",)),
            dict(chunk_size=128),
            "all inputs bfloat16 or all float32",
        ),
        (_shapes(dtypes=("float16",) * 5), dict(chunk_size=128), "all inputs bfloat16"),
        (_shapes(), dict(chunk_size=128, block_e=100), "block_e must be a positive multiple"),
        (_shapes(e=384), dict(chunk_size=128, block_e=256), "block_e = 256 must divide E = 384"),
        (
            _shapes(e=4096),
            dict(chunk_size=256, block_e=4096, vmem_capacity_bytes=16 * 2**20),
            "needs about .* MiB of VMEM",
        ),
        (
            _shapes(),
            dict(chunk_size=128, segment_ids=jax.ShapeDtypeStruct((1, 255), jnp.int32)),
            "segment_ids must have shape",
        ),
        (
            _shapes(),
            dict(chunk_size=128, segment_ids=jax.ShapeDtypeStruct((1, 256), jnp.float32)),
            "segment_ids must be integers",
        ),
        (
            _shapes(),
            dict(chunk_size=128, quad_bias=jax.ShapeDtypeStruct((256, 256), jnp.float32)),
            "quad_bias must have shape",
        ),
        (
            [jax.ShapeDtypeStruct((1, 256), jnp.bfloat16)] + _shapes()[1:],
            dict(chunk_size=128),
            "quad_q must have rank 3",
        ),
        (
            _shapes()[:3] + [jax.ShapeDtypeStruct((1, 255, 128), jnp.bfloat16)] + _shapes()[4:],
            dict(chunk_size=128),
            "lin_k has shape",
        ),
    ],
)
def test_unservable_calls_name_the_reason(shapes, kwargs, match):
    kwargs = dict(causal=True) | kwargs
    assert not pallas_tpu.supported(*shapes, **kwargs)
    with pytest.raises(ValueError, match=match):
        pallas_tpu.mixed_chunk_attention_tpu(
            *(jnp.zeros(x.shape, x.dtype) for x in shapes),
            **{
                k: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x
                for k, x in kwargs.items()
            },
        )


def test_paper_shapes_are_served():
    for width in (1536, 2048):
        shapes = _shapes(t=8192, e=width)
        for causal in (True, False):
            assert pallas_tpu.supported(*shapes, chunk_size=256, causal=causal)


def test_the_declared_traffic_counts_each_block_when_its_index_changes():
    """`_fetched_bytes`, the kernels' cost estimate, on a grid (2, 3, 4), the last axis fastest:
    a block whose index never changes moves once; one indexed by the last axis at every step
    (24); one by the first two only when they change (6, its 4 chunk steps reusing it); one that
    runs back over the chunks, as the reverse pass does, also at every step."""
    grid = (2, 3, 4)
    f32, bf16 = jnp.float32, jnp.bfloat16
    whole = pl.BlockSpec((8, 128), lambda b, e, g, _: (0, 0))
    per_chunk = pl.BlockSpec((None, 8, 128), lambda b, e, g, _: (b, g, 0))
    per_tile = pl.BlockSpec((None, None, 8, 128), lambda b, e, g, _: (b, e, 0, 0))
    reverse = pl.BlockSpec((None, 8, 128), lambda b, e, g, _: (b, 3 - g, e))
    block = 8 * 128
    assert pallas_tpu._fetched_bytes(grid, [(whole, f32)]) == block * 4
    assert pallas_tpu._fetched_bytes(grid, [(per_chunk, bf16)]) == 24 * block * 2
    assert pallas_tpu._fetched_bytes(grid, [(per_tile, f32)]) == 6 * block * 4
    assert pallas_tpu._fetched_bytes(grid, [(reverse, f32), (whole, f32)]) == 25 * block * 4


def _dot_flops(jaxpr) -> int:
    """2 x output elements x contracted elements of every dot_general in a jaxpr, its sub-jaxprs
    (`pl.when` branches) included."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract_lhs, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            contracted = int(np.prod([lhs_shape[d] for d in contract_lhs]))
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * contracted
        for sub in jax.core.jaxprs_in_params(eqn.params):
            total += _dot_flops(sub)
    return total


def _pallas_calls(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        for sub in jax.core.jaxprs_in_params(eqn.params):
            yield from _pallas_calls(sub)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_each_call_declares_the_matmul_flops_of_its_body(causal):
    """`_STEP_MATMULS` (each body's matmuls per grid step, the declared FLOPs) against the dots
    in the kernel bodies as traced, times the grid: forward and backward, two E tiles."""
    xs, bias, d_out = _inputs(seed=1)

    def fn(*args, **kwargs):
        return pallas_tpu.mixed_chunk_attention_tpu(
            *args, **kwargs, block_e=BLOCK_E, interpret=True
        )

    jaxpr = jax.make_jaxpr(lambda *a: _vjp(fn, *a, causal=causal, segment_ids=None))(
        xs, bias, d_out
    )
    calls = list(_pallas_calls(jaxpr.jaxpr))
    assert len(calls) == (3 if causal else 4)  # forward (and right states), backward, reverse
    for eqn in calls:
        grid = eqn.params["grid_mapping"].grid
        assert eqn.params["grid_mapping"].grid[1] == E // BLOCK_E == 2
        declared = eqn.params["cost_estimate"].flops
        assert declared == _dot_flops(eqn.params["jaxpr"]) * int(np.prod(grid)), eqn.params["name"]
