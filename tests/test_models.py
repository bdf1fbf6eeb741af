"""Models and layers against the spec: dense float64 references, causality, document isolation,
remat / jit equivalence, sharding on a simulated (data, fsdp, tensor) mesh, and input errors."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flash_jax import models, sharding
from flash_jax.config import MeshConfig, ModelConfig
from flash_jax.export import numpy_model, weights
from flash_jax.layers import FlashLayer, GAULayer, apply_rope, document_positions
from flash_jax.layers.basic import split_matmul
from flash_jax.layers.gau import rotated_heads
from flash_jax.layers.positions import RelativePositionBias, _toeplitz
from flash_jax.train import checkpoint_format
from tests.helpers import TINY, packed_segments, random_tokens, randomise, tiny_model_config

ALL_MODELS = list(models.LAYER_TYPES)


def first_layer(model):
    """Layer 0 of the scanned stack, as a module of its own."""
    state = jax.tree.map(lambda a: a[0], nnx.state(model.layers))
    return nnx.merge(nnx.graphdef(model.layers), state)


# ---------------------------------------------------------------------------------------------
# The independent float64 numpy reference of the layers, written from the spec:
# flash_jax.export.numpy_model (tests/test_export.py holds whole models to it).


def np_params(module):
    """A module's parameters under the exported names (`proj_in.kernel`, ...), in float64."""
    tensors = weights.parameter_tensors(nnx.state(module, nnx.Param))
    return {name: t.astype(np.float64) for name, t in tensors.items()}


def np_layer(layer, x, seg, pos, cfg, flash):
    layer_fn = numpy_model.flash_layer if flash else numpy_model.flash_quad_layer
    x, seg, pos = np.asarray(x, np.float64), np.asarray(seg), np.asarray(pos, np.float64)
    return layer_fn(np_params(layer), x, seg, pos, checkpoint_format.model_config_dict(cfg))


@pytest.mark.parametrize("flash", [True, False], ids=["flash", "flash_quad"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("rel_pos", ["toeplitz", "rope", "none"])
def test_layer_matches_dense_reference(flash, causal, rel_pos):
    cfg = tiny_model_config("flash" if flash else "flash_quad", causal=causal, rel_pos=rel_pos)
    layer = (FlashLayer if flash else GAULayer)(cfg, rngs=nnx.Rngs(0))
    randomise(layer, 1)
    seg = packed_segments()
    pos = document_positions(seg)
    x = jax.random.normal(jax.random.key(2), seg.shape + (cfg.d_model,))
    got = np.asarray(layer(x, seg, pos), np.float64)
    want = np_layer(layer, x, seg, pos, cfg, flash)
    scale = np.abs(want - np.asarray(x)).max()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


def test_rel_pos_auto_switches_at_512():
    assert tiny_model_config("flash", chunk_size=256).rel_pos_kind == "toeplitz"
    assert tiny_model_config("flash", chunk_size=1024, max_len=2048).rel_pos_kind == "rope"
    assert tiny_model_config("flash_quad", max_len=512).rel_pos_kind == "toeplitz"
    assert tiny_model_config("flash_quad", max_len=8192).rel_pos_kind == "rope"


@pytest.mark.parametrize("span, length", [(8, 8), (8, 5), (5, 1), (256, 256)])
def test_toeplitz_bias_block_equals_its_gather_forward_and_backward(span, length):
    # The block is built by tiling (no gather, so its backward is no scatter): the same values,
    # and a weight gradient that sums each diagonal of the cotangent. Against float64 sums, the
    # float32 ones (any order) are within the recursive-summation bound n * 2^-24 * sum |terms|.
    cfg = tiny_model_config("flash", rel_pos="toeplitz")
    bias = RelativePositionBias("toeplitz", span, cfg, rngs=nnx.Rngs(0))
    w = jax.random.normal(jax.random.key(3), (2 * span - 1,))
    i = jnp.arange(length)
    cotangent = jax.random.normal(jax.random.key(4), (length, length))

    bias.weight.value = w
    np.testing.assert_array_equal(bias(length), bias.rows(i, i))
    np.testing.assert_array_equal(bias(length), w[i[:, None] - i[None, :] + span - 1])
    got = jax.grad(lambda w: jnp.sum(_toeplitz(w, span, length) * cotangent))(w)
    slot = np.asarray(i[:, None] - i[None, :] + span - 1)
    c = np.asarray(cotangent, np.float64)
    want = np.bincount(slot.ravel(), c.ravel(), minlength=2 * span - 1)
    bound = length * 2.0**-24 * np.bincount(slot.ravel(), np.abs(c).ravel(), minlength=2 * span - 1)
    assert np.all(np.abs(np.asarray(got, np.float64) - want) <= bound)


# ---------------------------------------------------------------------------------------------
# Whole models.


def embed_inputs(model, tokens, positions):
    x = model.embed(tokens)
    if model.cfg.name == "transformer":
        x = x + model.position_embed.value[positions]
    return x


@pytest.mark.parametrize("name", ALL_MODELS)
def test_causal_models_never_see_the_future(name):
    model = models.create(tiny_model_config(name), rngs=nnx.Rngs(0))
    T = 24
    tokens = random_tokens(0, (2, T))
    positions = jnp.broadcast_to(jnp.arange(T), (2, T))
    logits = model(tokens)
    i = 13  # inside the second chunk of 8
    changed = tokens.at[:, i + 1 :].set(random_tokens(1, (2, T - i - 1)))
    np.testing.assert_array_equal(model(changed)[:, : i + 1], logits[:, : i + 1])

    x = embed_inputs(model, tokens, positions)

    def logits_at_i(x, model):
        return model.apply_layers(x, None, positions)[:, i].sum()

    grad = nnx.grad(logits_at_i, argnums=0)(x, model)
    assert np.all(np.asarray(grad[:, i + 1 :]) == 0.0), "gradient reaches future tokens"
    assert np.any(np.asarray(grad[:, : i + 1]) != 0.0)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_packed_documents_are_isolated(name, causal):
    model = models.create(tiny_model_config(name, causal=causal), rngs=nnx.Rngs(0))
    seg = packed_segments()
    tokens = random_tokens(0, seg.shape)
    logits = model(tokens, segment_ids=seg)
    # Change document 2 of row 0 (it spans chunks 0-2): documents 1 and 3 must not notice.
    changed = jnp.where(seg == 2, random_tokens(1, seg.shape), tokens).at[1].set(tokens[1])
    new_logits = model(changed, segment_ids=seg)
    others = np.asarray(seg != 2).copy()
    others[1] = True
    np.testing.assert_array_equal(np.asarray(new_logits)[others], np.asarray(logits)[others])
    assert not np.allclose(np.asarray(new_logits)[~others], np.asarray(logits)[~others])


@pytest.mark.parametrize(
    "name, first_length",
    [
        ("flash_quad", 11),
        ("transformer_plus", 11),
        ("transformer", 11),
        ("performer", 11),
        ("flash", 16),
        ("combiner", 16),
    ],
)
def test_packed_row_equals_separate_documents(name, first_length):
    """A document packed after another gives the logits it has alone (positions restart, the
    scale n is fixed, isolation is exact). FLASH and Combiner chunk by row position, so a document
    has the same chunks (spans) only when it starts on a chunk boundary (16 = 2 chunks of 8);
    Performer's chunks are a cost choice only."""
    model = models.create(tiny_model_config(name), rngs=nnx.Rngs(0))
    doc_a, doc_b = random_tokens(0, (1, first_length)), random_tokens(1, (1, 13))
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    seg = jnp.array([[1] * first_length + [2] * 13])
    packed_logits = model(packed, segment_ids=seg)
    np.testing.assert_allclose(packed_logits[:, first_length:], model(doc_b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed_logits[:, :first_length], model(doc_a), rtol=1e-5, atol=1e-5)


def test_flash_with_one_chunk_is_gau_with_the_chunk_as_n():
    """With one chunk covering the sequence FLASH's linear part is empty (causal), so a FLASH layer
    equals a GAU layer using FLASH's quadratic heads, with n = C."""
    T = 16
    flash_cfg = tiny_model_config("flash", chunk_size=T, max_len=T)
    flash = FlashLayer(flash_cfg, rngs=nnx.Rngs(0))
    randomise(flash, 3)
    gau = GAULayer(dataclasses.replace(flash_cfg, name="flash_quad"), rngs=nnx.Rngs(1))
    for name in ("norm", "proj_in", "proj_out", "rel_bias"):
        nnx.update(getattr(gau, name), nnx.state(getattr(flash, name)))
    gau.heads.gamma.value = flash.heads.gamma.value[:2]
    gau.heads.beta.value = flash.heads.beta.value[:2]
    x = jax.random.normal(jax.random.key(4), (2, T, flash_cfg.d_model))
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))
    np.testing.assert_allclose(flash(x, None, pos), gau(x, None, pos), rtol=1e-6, atol=1e-6)

    # ...while with several chunks the linear part does contribute.
    several = tiny_model_config("flash", chunk_size=4, max_len=T)
    short = FlashLayer(several, rngs=nnx.Rngs(0))
    randomise(short, 3)
    assert not np.allclose(short(x, None, pos), gau(x, None, pos), atol=1e-3)


def loss_fn(model, tokens, seg):
    logits = model(tokens, segment_ids=seg)
    targets = jnp.roll(tokens, -1, axis=1)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))


@pytest.mark.parametrize("name", ["flash", "transformer_pp"])
def test_remat_gives_the_same_loss_and_gradients(name):
    seg = packed_segments()
    tokens = random_tokens(0, seg.shape)
    # save_attn differs from save_proj only where attention outputs are tagged (GAU layers).
    policies = ("full", "save_proj") + (("save_attn",) if name == "flash" else ())
    results = {}
    for remat in ("none",) + policies:
        model = models.create(tiny_model_config(name, remat=remat), rngs=nnx.Rngs(0))
        loss, grads = jax.jit(nnx.value_and_grad(loss_fn))(model, tokens, seg)
        results[remat] = (loss, jax.tree.leaves(nnx.state(grads)))
    base_loss, base_grads = results["none"]
    for remat in policies:
        loss, grads = results[remat]
        np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
        for g, g0 in zip(grads, base_grads, strict=True):
            np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["flash", "transformer_pp"])
def test_unrolled_layer_stack_gives_the_same_loss_and_gradients(name):
    # The same layers, parameters and order of operations, with or without the loop: equal
    # results (remat save_attn, as the benchmarks run it).
    seg = packed_segments()
    tokens = random_tokens(0, seg.shape)
    results = []
    for unroll in (False, True):
        cfg = tiny_model_config(name, remat="save_attn", unroll_layers=unroll)
        model = models.create(cfg, rngs=nnx.Rngs(0))
        loss, grads = jax.jit(nnx.value_and_grad(loss_fn))(model, tokens, seg)
        results.append((loss, jax.tree.leaves(nnx.state(grads))))
    (loss, grads), (unrolled_loss, unrolled_grads) = results
    np.testing.assert_allclose(unrolled_loss, loss, rtol=1e-6)
    for g, g0 in zip(unrolled_grads, grads, strict=True):
        np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["flash", "flash_quad", "transformer", "performer"])
def test_jit_and_eager_agree(name):
    model = models.create(tiny_model_config(name), rngs=nnx.Rngs(0))
    seg = packed_segments()
    tokens = random_tokens(0, seg.shape)
    eager = model(tokens, segment_ids=seg)
    jitted = nnx.jit(lambda m, t, s: m(t, segment_ids=s))(model, tokens, seg)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)


def test_layer_stack_is_one_scanned_body():
    """Compile cost must not grow with depth: the traced program is the same size at 2 and 8
    layers (the layers live in one scan body)."""

    def num_equations(num_layers):
        model = models.create(tiny_model_config("flash", num_layers=num_layers), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        tokens = jnp.zeros((1, 16), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens))(state)
        return len(jaxpr.jaxpr.eqns)

    assert num_equations(2) == num_equations(8)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = models.create(tiny_model_config("flash", dtype="bfloat16"), rngs=nnx.Rngs(0))
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    seg = packed_segments()
    tokens = random_tokens(0, seg.shape)
    logits = model(tokens, segment_ids=seg)
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    want = models.create(tiny_model_config("flash"), rngs=nnx.Rngs(0))(tokens, segment_ids=seg)
    # bf16 keeps 8 mantissa bits; through two layers the logits stay within a few percent.
    np.testing.assert_allclose(logits, want, atol=0.05 * float(jnp.abs(want).max()))


def test_multi_head_attention_matches_softmax_reference():
    cfg = tiny_model_config("transformer_plus", num_layers=1)
    mha = first_layer(models.create(cfg, rngs=nnx.Rngs(0))).attention
    seg = packed_segments()
    pos = document_positions(seg)
    x = jax.random.normal(jax.random.key(0), seg.shape + (cfg.d_model,))
    got = np.asarray(mha(x, seg, pos), np.float64)

    p = {f"attention.{name}": t for name, t in np_params(mha).items()}
    segn = np.asarray(seg)
    want = numpy_model.multi_head_attention(
        p,
        np.asarray(x, np.float64),
        segn,
        np.asarray(pos, np.float64),
        checkpoint_format.model_config_dict(cfg),
    )
    real = segn != 0
    np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_rotated_heads_backward_is_autodiffs_of_the_plain_formula():
    """`rotated_heads`' hand-written backward against autodiff of rope(z * gamma[h] + beta[h])
    (apply_rope), in float32: the same math, so agreement to float32 rounding of sums over the 2 x
    8 tokens (about 1e-6 relative; bound 1e-5)."""
    keys = jax.random.split(jax.random.key(0), 4)
    z = jax.random.normal(keys[0], (2, 8, 6), jnp.float32)
    gamma = jax.random.normal(keys[1], (3, 6), jnp.float32)
    beta = jax.random.normal(keys[2], (3, 6), jnp.float32)
    d_heads = tuple(jax.random.normal(keys[3], (3, 2, 8, 6), jnp.float32))
    positions = document_positions(jnp.array([[1] * 5 + [2] * 3, [1] * 8]))

    def plain(z, gamma, beta):
        return tuple(apply_rope(z * gamma[h] + beta[h], positions) for h in range(3))

    heads, vjp = jax.vjp(lambda *a: rotated_heads(*a, positions), z, gamma, beta)
    want_heads, want_vjp = jax.vjp(plain, z, gamma, beta)
    np.testing.assert_allclose(np.stack(heads), np.stack(want_heads), rtol=1e-6, atol=1e-6)
    for got, want in zip(vjp(d_heads), want_vjp(d_heads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _split_matmul_case(dtype, in_shape):
    """x [2, 8, *in_shape], kernel [*in_shape, 10], bias and the parts' cotangents (widths 4, 4,
    2), in `dtype`, and autodiff of the plain formula, split(x . kernel + bias), in float32."""
    keys = jax.random.split(jax.random.key(0), 4)
    widths = (4, 4, 2)
    x = jax.random.normal(keys[0], (2, 8, *in_shape)).astype(dtype)
    kernel = jax.random.normal(keys[1], (*in_shape, 10)).astype(dtype)
    bias = jax.random.normal(keys[2], (10,)).astype(dtype)
    d_parts = tuple(
        d.astype(dtype) for d in jnp.split(jax.random.normal(keys[3], (2, 8, 10)), [4, 8], -1)
    )

    def plain(x, kernel, bias):
        out = jnp.tensordot(x, kernel, axes=len(in_shape)) + bias
        return tuple(jnp.split(out, [4, 8], axis=-1))

    f32 = [a.astype(jnp.float32) for a in (x, kernel, bias)]
    want_parts, want_vjp = jax.vjp(plain, *f32)
    want_grads = want_vjp(tuple(d.astype(jnp.float32) for d in d_parts))
    parts, vjp = jax.vjp(lambda *a: split_matmul(*a, widths), x, kernel, bias)
    return (x, kernel, d_parts), parts, vjp(d_parts), want_parts, want_grads


@pytest.mark.parametrize("in_shape", [(6,), (2, 3)])
def test_split_matmul_backward_is_autodiffs_of_the_plain_formula(in_shape):
    """`split_matmul` (the projection as one matmul per part, its backward by hand: one matmul
    over the parts' cotangents side by side) against autodiff of split(x . kernel + bias), in
    float32: the same sums in another order, so agreement to float32 rounding of sums of at most
    16 terms (about 1e-6 relative; bound 1e-5)."""
    _, parts, grads, want_parts, want_grads = _split_matmul_case(jnp.float32, in_shape)
    for got, want in zip(parts + grads, want_parts + want_grads, strict=True):
        assert got.shape == want.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_split_matmul_backward_in_bf16_is_within_bf16_rounding_of_float32():
    """In bf16, each gradient against float32 autodiff on the same (bf16) values, within the
    worst-case bound of a rounded dot product of n terms: |error| <= g * sum |terms|, g = (n + 1)
    u / (1 - (n + 1) u) with bf16's unit roundoff u = 2^-8 (n roundings of the running sum, in
    whatever order and precision the backend sums, and one of the result). n = 10 outputs for x's
    gradient, 16 tokens for the kernel's and the bias's."""
    (x, kernel, d_parts), _, grads, _, want_grads = _split_matmul_case(jnp.bfloat16, (6,))
    x, kernel = x.astype(jnp.float32), kernel.astype(jnp.float32)
    d_out = jnp.concatenate(d_parts, axis=-1).astype(jnp.float32)

    def bound(n):
        return (n + 1) * 2.0**-8 / (1 - (n + 1) * 2.0**-8)

    abs_terms = (
        jnp.abs(d_out) @ jnp.abs(kernel).T,  # x's gradient: sums over the 10 outputs
        jnp.einsum("btd,btf->df", jnp.abs(x), jnp.abs(d_out)),  # the kernel's: over 16 tokens
        jnp.sum(jnp.abs(d_out), axis=(0, 1)),  # the bias's: over 16 tokens
    )
    for got, want, terms, n in zip(grads, want_grads, abs_terms, (10, 16, 16), strict=True):
        assert got.dtype == jnp.bfloat16
        error = jnp.abs(got.astype(jnp.float32) - want)
        assert bool(jnp.all(error <= bound(n) * terms)), float(jnp.max(error / terms))


def test_rope_and_document_positions():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(document_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 16))

    def score(i, j):  # q . k after RoPE depends only on the position difference
        return float(jnp.sum(apply_rope(q, jnp.array([[i]])) * apply_rope(k, jnp.array([[j]]))))

    assert score(7, 3) == pytest.approx(score(14, 10), rel=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-2)
    np.testing.assert_allclose(
        apply_rope(q, jnp.array([[5]])),
        numpy_model.rope(np.asarray(q, np.float64), np.array([[5.0]])),
        rtol=1e-5,
        atol=1e-6,
    )


# ---------------------------------------------------------------------------------------------
# Sharding on 8 simulated devices.


@pytest.mark.parametrize("name", ["flash", "transformer_pp", "performer", "combiner"])
def test_sharded_forward_matches_single_device(name):
    assert jax.device_count() == 8
    mesh = sharding.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    model = models.create(tiny_model_config(name), rngs=nnx.Rngs(0))
    seg = jnp.concatenate([packed_segments(32)] * 2)  # batch 4: divisible by data x fsdp
    tokens = random_tokens(0, seg.shape)
    want = model(tokens, segment_ids=seg)

    graphdef, state = nnx.split(model)
    specs = sharding.param_specs(state, mesh_axis_names=mesh.axis_names)
    # The rules: embed -> fsdp, vocab / mlp / heads -> tensor, the layer axis stays whole.
    P = jax.sharding.PartitionSpec
    assert specs["embed"]["table"] == P("tensor", "fsdp")
    if name == "flash":
        assert specs["layers"]["proj_in"]["kernel"] == P(None, "fsdp", "tensor")
        assert specs["layers"]["proj_out"]["kernel"] == P(None, "tensor", "fsdp")
    else:
        assert specs["layers"]["attention"]["query"]["kernel"] == P(None, "fsdp", "tensor", None)
    with jax.set_mesh(mesh):
        sharded_state = jax.device_put(state, sharding.param_shardings(state, mesh))
        table = sharded_state["embed"]["table"].value
        assert table.sharding.spec == P("tensor", "fsdp")
        assert table.addressable_shards[0].data.shape == (32, 16)
        batch_spec = sharding.logical_to_spec(("batch", "length"), mesh_axis_names=mesh.axis_names)
        assert batch_spec == P(("data", "fsdp"), None)
        tokens_s, seg_s = jax.device_put(
            (tokens, seg), jax.sharding.NamedSharding(mesh, batch_spec)
        )

        @jax.jit
        def forward(state, tokens, seg):
            return nnx.merge(graphdef, state)(tokens, segment_ids=seg)

        got = forward(sharded_state, tokens_s, seg_s)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mismatched_logical_axes_error_or_replicate():
    """Parameters must match their names; optimizer state with another shape (Adafactor's
    factored statistics keep their parameter's metadata) is replicated when strict=False."""
    factored = nnx.Param(jnp.zeros((4,)), logical_axes=("embed", "mlp"))
    with pytest.raises(ValueError, match="logical_axes"):
        sharding.param_specs({"v": factored})
    loose = sharding.param_specs(
        {"v": factored, "w": nnx.Param(jnp.zeros((4, 2)), logical_axes=("embed", "mlp"))},
        mesh_axis_names=("data", "fsdp", "tensor"),
        strict=False,
    )
    P = jax.sharding.PartitionSpec
    assert loose["v"] == P() and loose["w"] == P("fsdp", "tensor")


def test_mesh_shape_errors():
    with pytest.raises(ValueError, match="mesh.shape"):
        sharding.make_mesh((3, -1, 1), ("data", "fsdp", "tensor"))
    with pytest.raises(ValueError, match="mesh.shape"):
        sharding.make_mesh((2, 2), ("data", "fsdp", "tensor"))
    assert sharding.make_mesh((-1, 2, 1), ("data", "fsdp", "tensor")).shape["data"] == 4


@dataclasses.dataclass(frozen=True)
class StandInDevice:
    """What the mesh reads of a device: its slice, and its platform and kind (not a TPU's, which
    would have it look for the chips' coordinates in the torus). libtpu's real TPU devices of two
    slices are tested in test_tpu_compile.py."""

    id: int
    slice_index: int
    device_kind: str = "stand-in"
    platform: str = "cpu"
    process_index: int = 0


TWO_SLICES_OF_FOUR = [StandInDevice(i, slice_index=i // 4) for i in range(8)]
AXES = ("data", "fsdp", "tensor")


@pytest.mark.parametrize("num_slices", [0, 2])  # 0: as many as the devices lie in
def test_a_mesh_over_two_slices_spans_them_with_the_data_axis_only(num_slices):
    """data 4 = 2 slices x 2: the first half of the data axis lies in slice 0, the second in slice
    1, and every fsdp group stays inside one slice (its all-gathers never cross DCN)."""
    mesh = sharding.make_mesh((-1, 2, 1), AXES, TWO_SLICES_OF_FOUR, num_slices)
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert slices[:, :, 0].tolist() == [[0, 0], [0, 0], [1, 1], [1, 1]]
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize(
    "shape, num_slices, devices, message",
    [
        (
            (1, -1, 1),
            0,
            TWO_SLICES_OF_FOUR,
            "mesh.shape (1, 8, 1): its data entry (1) must be a multiple of the devices' 2 slices "
            "(mesh.num_slices): the data axis spans them",
        ),
        (
            (-1, 1, 1),
            1,
            TWO_SLICES_OF_FOUR,
            "mesh.num_slices=1 but these 8 stand-in devices lie in 2 slice(s)",
        ),
        ((-1, 1, 1), 2, None, "mesh.num_slices=2 but these 8 cpu devices lie in 1 slice(s)"),
    ],
)
def test_a_mesh_that_does_not_match_the_slices_is_one_line(shape, num_slices, devices, message):
    with pytest.raises(ValueError) as error:
        sharding.make_mesh(shape, AXES, devices, num_slices)
    assert str(error.value) == message


@pytest.mark.parametrize(
    "mesh, message",
    [
        (dict(num_slices=-1), "mesh.num_slices must be an integer >= 0, got -1"),
        (
            dict(num_slices=2, axis_names=("fsdp", "tensor"), shape=(-1, 1)),
            "mesh.num_slices=2 needs a 'data' axis in mesh.axis_names ('fsdp', 'tensor')",
        ),
    ],
)
def test_bad_num_slices_is_named(mesh, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MeshConfig.from_config(mesh)


# ---------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(name="gpt"), "model.name"),
        (dict(d_model=0), "model.d_model"),
        (dict(chunk_size=-8), "model.chunk_size"),
        (dict(num_heads=5), "model.d_model"),
        (dict(norm="rms"), "model.norm"),
        (dict(dtype="float64"), "model.dtype"),
        (dict(remat="some"), "model.remat"),
        (dict(bogus=1), "bogus"),
    ],
)
def test_bad_config_is_named(overrides, field):
    with pytest.raises(ValueError, match=field):
        models.create({**TINY, "name": "transformer", **overrides}, rngs=nnx.Rngs(0))


def test_create_keeps_a_model_configs_own_sharding_rules():
    """A RunConfig's model carries config.mesh.rules: `create` keeps them unless told others."""
    rules = (("batch", "data"),) + sharding.DEFAULT_RULES[1:]
    cfg = tiny_model_config("flash", sharding_rules=rules)

    def rules_of(config, **kwargs):
        abstract = nnx.eval_shape(lambda: models.create(config, rngs=nnx.Rngs(0), **kwargs))
        return abstract.cfg.sharding_rules

    assert ModelConfig.from_config(cfg) is cfg  # typed once: not built and checked again
    assert rules_of(cfg) == rules
    assert rules_of(cfg, sharding_rules=sharding.DEFAULT_RULES) == sharding.DEFAULT_RULES
    assert rules_of({**TINY, "name": "flash"}) == sharding.DEFAULT_RULES


def test_bad_call_inputs_are_named():
    model = models.create(tiny_model_config("flash"), rngs=nnx.Rngs(0))
    tokens = jnp.zeros((2, 16), jnp.int32)
    with pytest.raises(ValueError, match="tokens must be \\[batch, length\\]"):
        model(tokens[0])
    with pytest.raises(ValueError, match="tokens must be integers"):
        model(tokens.astype(jnp.float32))
    with pytest.raises(ValueError, match="segment_ids must have"):
        model(tokens, segment_ids=jnp.ones((2, 15), jnp.int32))
    with pytest.raises(ValueError, match="positions must have"):
        model(tokens, positions=jnp.ones((1, 16), jnp.int32))
    # Past max_len (64): refused where the math depends on it, run by FLASH (its scale is C).
    for name in ("transformer", "flash_quad"):
        bound = models.create(tiny_model_config(name), rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match="exceeds model.max_len 64"):
            bound(jnp.zeros((1, 65), jnp.int32))
    assert model(jnp.zeros((1, 65), jnp.int32)).shape == (1, 65, 64)


def test_presets_pair_flash_with_a_transformer_of_about_the_same_size():
    def count(name, size):
        cfg = ModelConfig(**{**models.preset(name, size), "vocab_size": 32000, "max_len": 1024})
        abstract = nnx.eval_shape(lambda: models.create(cfg, rngs=nnx.Rngs(0)))
        return models.count_params(abstract)

    assert models.preset("flash", "base")["num_layers"] == 24
    assert 100e6 < count("transformer_pp", "base") < 160e6
    # Every model within 10% of Transformer++ at every size (the paper's equal-size comparison).
    for size in models.SIZES:
        tpp = count("transformer_pp", size)
        for name in models.LAYER_TYPES:
            assert abs(count(name, size) - tpp) / tpp < 0.1, (name, size, count(name, size), tpp)
    with pytest.raises(ValueError, match="model size"):
        models.preset("flash", "huge")
