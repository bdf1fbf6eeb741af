"""Tests of flash_jax.ops.pallas_gpu on a CPU: the Mosaic GPU kernels against the XLA op.

(a) Numerics: the kernels run in Mosaic GPU's interpreter (`interpret=True`, the same kernel
    bodies with the transposed operands pre-transposed by XLA, see the module docstring) and
    must equal `ops.mixed_chunk_attention`, forward and every gradient.
(b) Lowering: `jax.export` for platform "cuda" runs the Mosaic GPU lowering without a GPU, at the
    paper's shapes (S = 128, C = 256, E = 1536 and 2048, T up to 8192, bf16), forward + backward,
    so a block shape or a shared-memory overflow fails here. ptxas and the run itself happen
    only on a GPU (scripts/bench/kernel_check.py).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flash_jax import ops
from flash_jax.ops import pallas_gpu
from scripts.bench import kernel_check

# Tolerances. The kernels round their matmul operands to bf16 (relative error at most 2^-9 each):
# the in-chunk weights W, the cross-chunk states X, the backward's g = dL/ds and dstate, and (for
# bf16 inputs) the output and the incoming cotangent. Every output element or gradient is a sum of
# products whose factors carry at most 4 such roundings on their longest chain (e.g. dv: cotangent,
# W, the bf16 output of dv), so each term is off by at most ~4 * 2^-9 relative; the errors of
# different terms have random signs, so the norm-wise error stays below that bound (measured
# ~0.3%). Element-wise, cancellation in a sum can make one element's relative error larger, so
# that is checked against the array's scale with a 2x margin on the term bound.
NORM_TOL = 4 * 2.0**-9  # ~0.78%
SCALE_TOL = 8 * 2.0**-9  # ~1.6% of max |reference|

S, E, C = 64, 128, 128  # two query blocks, two key blocks and two E tiles of 64 per chunk
T = 300  # 3 chunks, the last one padded (T is not a multiple of C)
SEGMENTS = np.zeros((2, T), np.int32)
# Row 0: documents starting and ending inside chunks, one boundary exactly on a chunk boundary
# (128), padding at the end. Row 1: a document over all three chunks (a two-chunk prefix).
SEGMENTS[0, :40], SEGMENTS[0, 40:128], SEGMENTS[0, 128:170], SEGMENTS[0, 170:290] = 1, 2, 3, 4
SEGMENTS[1, :20], SEGMENTS[1, 20:] = 1, 2


def _inputs(dtype, seed=0):
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(2, T, S)) for _ in range(4)] + [rng.normal(size=(2, T, E))]
    bias = 0.5 * rng.normal(size=(C, C))
    cotangent = rng.normal(size=(2, T, E))
    cast = [jnp.asarray(x, dtype) for x in xs]
    return cast, jnp.asarray(bias, jnp.float32), jnp.asarray(cotangent, jnp.float32)


def _value_and_grads(fn, xs, bias, cotangent, causal):
    def loss(*args):
        out = fn(*args[:5], chunk_size=C, causal=causal, segment_ids=SEGMENTS, quad_bias=args[5])
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    grad_fn = jax.grad(loss, argnums=tuple(range(6)), has_aux=True)
    grads, out = grad_fn(*xs, bias)
    return out, grads


def _assert_close(name, got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got)), name
    norm_err = np.linalg.norm(got - want) / np.linalg.norm(want)
    scale_err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert norm_err < NORM_TOL, (name, norm_err)
    assert scale_err < SCALE_TOL, (name, scale_err)


def _interpreted(*args, **kwargs):
    return pallas_gpu.mixed_chunk_attention_gpu(*args, interpret=True, **kwargs)


@pytest.mark.slow  # ~10 s each: the interpreter simulates every TMA copy and wgmma
@pytest.mark.parametrize("causal", [True, False])
def test_interpreted_kernels_match_xla_forward_and_backward(causal):
    """bf16 inputs, packed documents, padding, bias, T % C != 0: out and all six gradients."""
    xs, bias, cotangent = _inputs(jnp.bfloat16)
    out, grads = _value_and_grads(_interpreted, xs, bias, cotangent, causal)
    # The reference: the XLA op in float32 on the same (bf16-rounded) inputs.
    xs32 = [x.astype(jnp.float32) for x in xs]
    out_ref, grads_ref = _value_and_grads(ops.mixed_chunk_attention, xs32, bias, cotangent, causal)
    assert out.shape == (2, T, E) and out.dtype == jnp.bfloat16
    _assert_close("out", out, out_ref)
    for name, g, g_ref, x in zip(
        ["qq", "kq", "ql", "kl", "v", "bias"], grads, grads_ref, xs + [bias], strict=True
    ):
        assert g.dtype == x.dtype, name
        _assert_close(name, g, g_ref)
    # Padding rows and padding tokens' gradients are exactly zero.
    pad = SEGMENTS == 0
    assert np.all(np.asarray(out, np.float32)[pad] == 0.0)
    for g in grads[:5]:
        assert np.all(np.asarray(g, np.float32)[pad] == 0.0)


@pytest.mark.slow  # ~5 s: the forward alone through the interpreter
def test_interpreted_float32_inputs_give_float32_results():
    """float32 in, float32 out; operands rounded to bf16 inside (the documented precision)."""
    xs, bias, _ = _inputs(jnp.float32, seed=1)
    kwargs = dict(chunk_size=C, causal=True, segment_ids=SEGMENTS, quad_bias=bias)
    out = _interpreted(*xs, **kwargs)
    assert out.dtype == jnp.float32
    # Rounding the five inputs to bf16 adds up to 2^-9 per factor (2 for the squared scores):
    # against the float32 XLA op, twice the bf16 tolerance.
    ref = ops.mixed_chunk_attention(*xs, **kwargs)
    got, want = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2 * NORM_TOL


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(S=96, E=2048, chunk_size=256, dtype=jnp.bfloat16), "width S must be a multiple"),
        (dict(S=256, E=2048, chunk_size=256, dtype=jnp.bfloat16), "at most 128"),
        (dict(S=128, E=2000, chunk_size=256, dtype=jnp.bfloat16), "multiple of block_e"),
        (dict(S=128, E=2048, chunk_size=100, dtype=jnp.bfloat16), "chunk_size 100 must be"),
        (dict(S=128, E=2048, chunk_size=512, dtype=jnp.bfloat16), "at most 256"),
        (dict(S=128, E=2048, chunk_size=256, dtype=jnp.float16), "bfloat16 or float32"),
        (dict(S=128, E=2048, chunk_size=256, dtype=jnp.bfloat16, block_q=32), "block_q"),
    ],
)
def test_unservable_shapes_raise_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pallas_gpu.check_supported(**kwargs)


def test_bad_inputs_raise_named_value_errors():
    x = jnp.zeros((1, 64, 64), jnp.bfloat16)
    v = jnp.zeros((1, 64, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="quad_bias must have shape"):
        pallas_gpu.mixed_chunk_attention_gpu(
            x, x, x, x, v, chunk_size=64, causal=True, quad_bias=jnp.zeros((8, 8))
        )
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        pallas_gpu.mixed_chunk_attention_gpu(
            x, x, x, x, v, chunk_size=64, causal=True, segment_ids=jnp.ones((1, 8), jnp.int32)
        )
    with pytest.raises(ValueError, match="lin_k must have shape"):
        pallas_gpu.mixed_chunk_attention_gpu(x, x, x, x[:, :32], v, chunk_size=64, causal=True)


# ---------------------------------------------------------------- lowering for CUDA ----


def _export_forward_backward(T, E, causal, **blocks):
    B, S, C = 65536 // T if T <= 65536 else 1, 128, 256
    B = min(B, 2)  # the lowering does not depend on B beyond the grid size

    def f(qq, kq, ql, kl, v, bias, seg, cotangent):
        def attend(*xs):
            return pallas_gpu.mixed_chunk_attention_gpu(
                *xs[:5], chunk_size=C, causal=causal, segment_ids=seg, quad_bias=xs[5], **blocks
            )

        out, vjp = jax.vjp(attend, qq, kq, ql, kl, v, bias)
        return out, vjp(cotangent)

    qk = jax.ShapeDtypeStruct((B, T, S), jnp.bfloat16)
    ve = jax.ShapeDtypeStruct((B, T, E), jnp.bfloat16)
    args = [qk] * 4 + [
        ve,
        jax.ShapeDtypeStruct((C, C), jnp.float32),
        jax.ShapeDtypeStruct((B, T), jnp.int32),
        ve,
    ]
    return jax.export.export(jax.jit(f), platforms=["cuda"])(*args)


# Both widths, both modes, the longest context of the check (the shared memory does not depend on
# T; the grid does).
@pytest.mark.parametrize(
    "T, E, causal", [(8192, 2048, True), (8192, 1536, False), (1024, 2048, False)]
)
def test_kernels_lower_for_cuda_at_paper_shapes(T, E, causal):
    exported = _export_forward_backward(T, E, causal)
    text = exported.mlir_module()
    assert text.count("mosaic_gpu") >= 3  # forward, query-side and key-side kernels


def test_lowering_check_can_fail_on_shared_memory_overflow():
    """The export test is not vacuous: E tiles of 128 overflow the forward's shared memory."""
    with pytest.raises(Exception, match="exceeds available shared memory"):
        _export_forward_backward(1024, 2048, False, block_e=128)


# ------------------------------------------------------------ scripts/bench/kernel_check.py ----


def _kernel_check(tmp_path, *flags):
    tiny = ["--tokens=128", "--contexts=128", "--bidir_contexts=", "--C=64", "--E=64"]
    return kernel_check.main([*tiny, "--repeats=1", f"--out_dir={tmp_path}", *flags])


def test_kernel_check_records_a_failing_case_and_goes_on(tmp_path):
    """A case the kernel cannot serve is recorded with its message; the XLA timings still run."""
    summary = _kernel_check(tmp_path, "--S=96", "--contexts=64,128", "--interpret")
    assert [row["T"] for row in summary["rows"]] == [64, 128]
    for row in summary["rows"]:
        assert "must be a multiple of 64" in row["errors"]["accuracy"]
        assert "must be a multiple of 64" in row["errors"]["kernel_fwd"]
        assert row["xla_fwd_ms"] > 0 and row["xla_fwd_bwd_ms"] > 0
    on_disk = json.loads((tmp_path / "kernel_check.json").read_text())
    assert on_disk["rows"][0]["errors"].keys() == summary["rows"][0]["errors"].keys()
    assert "errors: accuracy" in (tmp_path / "kernel_check.md").read_text()


@pytest.mark.slow  # ~15 s: the kernels interpreted, forward and backward, several calls
def test_kernel_check_end_to_end_interpreted(tmp_path):
    (row,) = _kernel_check(tmp_path, "--S=64", "--interpret")["rows"]
    assert row["errors"] == {}
    assert row["finite"] and row["deterministic"] and row["padding_zero"]
    for name, err in row["kernel_error"].items():
        assert err["norm"] < NORM_TOL, name
    assert row["kernel_fwd_ms"] > 0 and row["kernel_fwd_bwd_tokens_per_s"] > 0
    assert "| 128 | 1 | True |" in (tmp_path / "kernel_check.md").read_text()
