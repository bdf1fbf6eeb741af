"""Pieces of training against independent references: loss, schedules, decay mask, the step."""

import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import base
from flash_jax import losses, sharding
from flash_jax.layers.basic import float32_logits
from flash_jax.train import loop, optim, step


def tiny_config(**train):
    config = base.get_config()
    m = config.model
    m.name = "flash"
    m.num_layers, m.d_model, m.expansion_dim, m.qk_dim, m.chunk_size = 2, 32, 64, 16, 8
    m.num_heads, m.mlp_dim, m.vocab_size, m.max_len = 2, 64, 256, 32
    config.data.seq_len, config.data.batch_size = 32, 8
    config.train.update(train)
    return config


def random_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    B, T = config.data.batch_size, config.data.seq_len
    tokens = rng.integers(1, config.model.vocab_size, (B, T + 1))
    # Two packed documents per row, and some zero-weight positions, as real batches have.
    segment_ids = np.where(np.arange(T) < T // 2, 1, 2)[None].repeat(B, 0)
    positions = np.where(np.arange(T) < T // 2, np.arange(T), np.arange(T) - T // 2)[None]
    weights = (rng.random((B, T)) > 0.2).astype(np.float32)
    return {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "weights": weights,
        "segment_ids": segment_ids.astype(np.int32),
        "positions": positions.repeat(B, 0).astype(np.int32),
    }


# ----------------------------------------------------------------------------- metrics


def test_cross_entropy_matches_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, (2, 5))
    weights = rng.random((2, 5)).astype(np.float32) * (rng.random((2, 5)) > 0.3)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    nll_sum, weight_sum = losses.cross_entropy(
        jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights)
    )
    np.testing.assert_allclose(nll_sum, (nll * weights).sum(), rtol=1e-6)
    np.testing.assert_allclose(weight_sum, weights.sum(), rtol=1e-6)


def test_cross_entropy_ignores_masked_positions_even_if_nonfinite():
    logits = jnp.zeros((1, 2, 4)).at[0, 1].set(jnp.inf)
    nll_sum, weight_sum = losses.cross_entropy(
        logits, jnp.zeros((1, 2), jnp.int32), jnp.array([[1.0, 0.0]])
    )
    np.testing.assert_allclose(nll_sum, math.log(4), rtol=1e-6)
    assert float(weight_sum) == 1.0


def test_cross_entropy_gradient_matches_float64_reference():
    # The hand-written backward: d nll_sum / d logits = w (softmax - onehot(target)), here
    # against numpy in float64. Float32 softmax entries (at most 1) carry a few ulps of 2^-24
    # each from exp, log and the subtraction: 1e-6 absolute covers them.
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 7)) * 3
    targets = rng.integers(0, 7, (2, 5))
    weights = rng.random((2, 5)) * (rng.random((2, 5)) > 0.3)
    softmax = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = weights[..., None] * (softmax - np.eye(7)[targets])
    grad = jax.grad(lambda x: losses.cross_entropy(x, targets, weights.astype(np.float32))[0])(
        jnp.asarray(logits, jnp.float32)
    )
    np.testing.assert_allclose(grad, expected, atol=1e-6)


def test_cross_entropy_gradient_is_zero_at_masked_nonfinite_positions():
    logits = jnp.zeros((1, 2, 4)).at[0, 1].set(jnp.inf)
    grad = jax.grad(
        lambda x: losses.cross_entropy(x, jnp.zeros((1, 2), jnp.int32), jnp.array([[1.0, 0.0]]))[0]
    )(logits)
    np.testing.assert_allclose(grad[0, 0], [-0.75, 0.25, 0.25, 0.25], rtol=1e-6)
    np.testing.assert_array_equal(grad[0, 1], 0.0)


def test_cross_entropy_nan_weight_gives_a_nan_gradient_as_autodiff_does():
    # The forward's mask leaves a nan weight's term out of the sum; autodiff of it makes that
    # position's gradient nan (0 * nan), and so does the hand-written backward: the train loop's
    # gradient-norm check (test_train.py) stops on it.
    logits, targets = jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), jnp.int32)
    weights = jnp.array([[1.0, jnp.nan]])
    grad = jax.grad(lambda x: losses.cross_entropy(x, targets, weights)[0])(logits)
    assert np.all(np.isnan(grad[0, 1])) and np.all(np.isfinite(grad[0, 0]))


def test_blocked_head_loss_matches_float64_reference():
    """The projection folded into the loss, in 4 blocks: nll and the x and W gradients against
    numpy in float64, on packed-like weights with zeros. Float32 logits of D = 16 terms and
    float32 sums over the 3 x 20 tokens carry relative errors of a few 2^-24 ulps per term:
    1e-5 relative covers them."""
    rng = np.random.default_rng(3)
    B, T, D, V = 3, 20, 16, 11
    x, W = rng.normal(size=(B, T, D)), rng.normal(size=(D, V)) * 0.5
    targets = rng.integers(0, V, (B, T))
    weights = (rng.random((B, T)) > 0.3).astype(np.float64)
    logits = x @ W
    log_z = np.log(np.exp(logits).sum(-1))
    nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    d_logits = weights[..., None] * (np.exp(logits - log_z[..., None]) - np.eye(V)[targets])

    def loss(x, W):  # 3 shards of rows: W's gradient summed per row shard, then over them
        return losses.blocked_head_cross_entropy(x, W, targets, weights.astype(np.float32), 4, 3)

    (nll_sum, weight_sum), (d_x, d_W) = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    )(jnp.asarray(x, jnp.float32), jnp.asarray(W, jnp.float32))
    np.testing.assert_allclose(nll_sum, (nll * weights).sum(), rtol=1e-5)
    assert float(weight_sum) == weights.sum()
    np.testing.assert_allclose(d_x, d_logits @ W.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_W, np.einsum("btd,btv->dv", x, d_logits), rtol=1e-5, atol=1e-5)
    # Without differentiation: the loss alone, equal.
    np.testing.assert_allclose(loss(x.astype(np.float32), W.astype(np.float32))[0], nll_sum)


def test_blocked_head_loss_in_bf16_equals_the_logits_path():
    """bf16 operands: the same roundings as `float32_logits` + `cross_entropy` (the logit
    cotangent rounded to bf16, float32 accumulation, each gradient rounded once), so only the
    float32 summation order differs: x's gradient is per token and equal; W's sums over the
    blocks in another order, at most one bf16 ulp (2^-8 relative) apart."""
    rng = np.random.default_rng(4)
    B, T, D, V = 2, 24, 32, 40
    x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.bfloat16)
    W = jnp.asarray(rng.normal(size=(D, V)) * 0.2, jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, V, (B, T)))
    weights = jnp.asarray(rng.random((B, T)) > 0.2, jnp.float32)

    def logits_path(x, W):
        return losses.cross_entropy(float32_logits(x, W), targets, weights)[0]

    def blocked(x, W):
        return losses.blocked_head_cross_entropy(x, W, targets, weights, 3)[0]

    want, (want_dx, want_dW) = jax.value_and_grad(logits_path, argnums=(0, 1))(x, W)
    got, (got_dx, got_dW) = jax.value_and_grad(blocked, argnums=(0, 1))(x, W)
    assert got_dx.dtype == got_dW.dtype == jnp.bfloat16
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got_dx, np.float32), np.asarray(want_dx, np.float32))
    ulp = 2.0**-8 * np.abs(np.asarray(want_dW, np.float32))
    assert np.all(np.abs(np.asarray(got_dW, np.float32) - np.asarray(want_dW, np.float32)) <= ulp)


def test_perplexity_and_bits_per_byte():
    assert losses.perplexity(2 * math.log(3), 2) == pytest.approx(3.0)
    assert math.isnan(losses.perplexity(0.0, 0.0))
    assert losses.bits_per_byte(math.log(2) * 10, 5) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="byte count"):
        losses.bits_per_byte(1.0, 0)


# ----------------------------------------------------------------------------- schedules


def schedule_config(decay, warmup=10, total=110):
    return ml_collections.ConfigDict(
        dict(
            learning_rate=1.0,
            warmup_steps=warmup,
            num_steps=total,
            decay=decay,
            end_learning_rate_fraction=0.1,
        )
    )


@pytest.mark.parametrize("decay", optim.DECAYS)
def test_schedule_warmup_then_decay(decay):
    lr = optim.make_schedule(schedule_config(decay))
    # Warm-up: linear, reaching the peak at step warmup - 1.
    np.testing.assert_allclose([lr(s) for s in range(10)], (np.arange(10) + 1) / 10, rtol=1e-6)
    expected_after = {
        # step 10 + k, k steps into the 100-step decay
        "cosine": lambda k: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 100)),
        "linear": lambda k: 1.0 - 0.9 * k / 100,
        "rsqrt": lambda k: math.sqrt(10 / (k + 10)),
        "constant": lambda k: 1.0,
    }[decay]
    for k in (0, 25, 50, 100):
        np.testing.assert_allclose(lr(10 + k), expected_after(k), rtol=1e-5)


def test_schedule_rejects_unknown_decay():
    with pytest.raises(ValueError, match="train.decay"):
        optim.make_schedule(schedule_config("exponential"))


# ----------------------------------------------------------------------------- decay mask


def test_decay_mask_skips_norms_biases_scales_but_not_stacked_matrices():
    params = nnx.State(
        {
            "layers": {
                "norm": {"scale": nnx.Param(jnp.ones((3, 8)), logical_axes=("layers", "embed"))},
                "proj": {
                    "kernel": nnx.Param(
                        jnp.ones((3, 8, 4)), logical_axes=("layers", "embed", "mlp")
                    ),
                    "bias": nnx.Param(jnp.ones((3, 4)), logical_axes=("layers", "mlp")),
                },
                "gamma": nnx.Param(jnp.ones((3, 4, 8)), logical_axes=("layers", None, "qk")),
                "rel_bias": nnx.Param(jnp.ones((3, 9)), logical_axes=("layers", "rel")),
            },
            "embed": {"embedding": nnx.Param(jnp.ones((16, 8)), logical_axes=("vocab", "embed"))},
        }
    )
    mask = nnx.to_pure_dict(optim.decay_mask(params))
    assert mask["layers"]["proj"]["kernel"] is True
    assert mask["embed"]["embedding"] is True
    assert mask["layers"]["norm"]["scale"] is False
    assert mask["layers"]["proj"]["bias"] is False
    assert mask["layers"]["gamma"] is False
    assert mask["layers"]["rel_bias"] is False


def test_weight_decay_applies_only_where_masked():
    train = tiny_config(weight_decay=0.5, learning_rate=0.1, warmup_steps=0, grad_clip=0.0).train
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    tx, _ = optim.make_optimizer(train, {"w": True, "b": False})
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    # Zero gradients: AdamW's only update is the decoupled decay, lr * wd * w.
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["b"], 0.0)


def test_gradient_clipping_bounds_the_update_norm():
    train = tiny_config(
        grad_clip=1.0, learning_rate=1.0, warmup_steps=0, weight_decay=0.0, optimizer="adafactor"
    ).train
    params = {"w": jnp.ones((4, 4))}
    tx, _ = optim.make_optimizer(train, {"w": False})
    clip = optax.clip_by_global_norm(1.0)
    big = {"w": jnp.full((4, 4), 100.0)}
    clipped, _ = clip.update(big, clip.init(params))
    assert float(optax.global_norm(clipped)) == pytest.approx(1.0, rel=1e-6)
    updates, _ = tx.update(big, tx.init(params), params)  # Adafactor runs on clipped grads
    assert np.all(np.isfinite(updates["w"]))


# ----------------------------------------------------------------------------- the step


def run_steps(config, mesh, batches):
    with jax.set_mesh(mesh):
        fns = step.build(config, mesh)
        state, rest = fns.init_state(), fns.init_rest()
        losses = []
        for batch in batches:
            state, out = fns.train_step(state, rest, step.put_batch(batch, fns.batch_sharding))
            losses.append(float(out["loss"]))
        params = jax.tree.map(np.asarray, state["params"])
    return losses, params


def max_abs_diff(a, b):
    return max(
        float(np.max(np.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.slow  # two sharded compiles: ~20-60 s on 2 shared cores
def test_sharded_step_on_2x2x2_mesh_matches_single_device():
    """Data + FSDP + tensor parallel (and micro-batches split per device, the loss in blocks)
    = one device."""
    batches = [random_batch(tiny_config(), seed) for seed in range(2)]
    one = sharding.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
    eight = sharding.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    losses_1, params_1 = run_steps(tiny_config(warmup_steps=0), one, batches)
    # Two micro-batches of 4 rows over the 4 data-parallel devices: the in-step split must keep
    # each device's rows; gradient accumulation alone is compared exactly in the next test.
    config_8 = tiny_config(warmup_steps=0, grad_accum_steps=2, loss_blocks=2)
    losses_8, params_8 = run_steps(config_8, eight, batches)
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
    assert max_abs_diff(params_8, params_1) < 1e-5


def summed_grads_by_setting(config, settings):
    """{setting: (grads, nll_sum, weight_sum)} of `step.summed_grads` on one batch, one device,
    each with its keyword arguments (accum, loss_blocks)."""
    mesh = sharding.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
    batch = random_batch(config)
    with jax.set_mesh(mesh):
        fns = step.build(config, mesh)
        state, rest = fns.init_state(), fns.init_rest()
        key = jax.random.key(0)

        def run(kwargs):
            def grads(params, batch):
                return step.summed_grads(fns.graphdef, params, rest, batch, key, **kwargs)

            return jax.jit(grads)(state["params"], batch)

        return {name: run(kwargs) for name, kwargs in settings.items()}


def assert_same_sums(got, want):
    """Equal summed weight, loss and mean gradients up to float32 summation order."""
    (grads, nll, weight), (grads_want, nll_want, weight_want) = got, want
    np.testing.assert_allclose(weight, weight_want, rtol=1e-6)
    np.testing.assert_allclose(nll, nll_want, rtol=1e-6)
    mean = jax.tree.map(lambda g: np.asarray(g) / float(weight_want), grads)
    mean_want = jax.tree.map(lambda g: np.asarray(g) / float(weight_want), grads_want)
    assert max_abs_diff(mean, mean_want) < 1e-6
    assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(mean_want)) > 1e-3  # not vacuous


@pytest.mark.slow  # ~10-25 s on 2 shared cores
def test_gradient_accumulation_equals_one_big_batch():
    out = summed_grads_by_setting(tiny_config(), {1: dict(accum=1), 4: dict(accum=4)})
    assert_same_sums(out[4], out[1])


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_a_blocked_loss_gives_the_gradients_of_the_whole_logits(tie_embeddings):
    """train.loss_blocks: the step's summed loss and every parameter's gradient as with the
    [B, T, V] logits whole (float32: summation order only)."""
    config = tiny_config()
    config.model.tie_embeddings = tie_embeddings
    out = summed_grads_by_setting(config, {1: dict(loss_blocks=1), 4: dict(loss_blocks=4)})
    assert_same_sums(out[4], out[1])


def test_a_blocked_loss_keeps_no_full_logits():
    """The train step's temporaries (XLA's memory analysis) shrink by most of the float32
    logits and their bf16 cotangent, 6 bytes per token and vocabulary entry, when the loss runs
    in 8 blocks."""
    config = tiny_config()
    config.model.vocab_size, config.model.max_len = 4096, 256
    config.data.seq_len, config.model.dtype = 256, "bfloat16"
    mesh = sharding.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
    temporaries = {}
    for blocks in (1, 8):
        config.train.loss_blocks = blocks
        with jax.set_mesh(mesh):
            fns = step.build(config, mesh)
            compiled = loop.compile_train_step(config, fns, fns.abstract_rest)
        temporaries[blocks] = compiled.memory_analysis().temp_size_in_bytes
    logits_bytes = config.data.batch_size * config.data.seq_len * config.model.vocab_size * 6
    assert temporaries[1] - temporaries[8] > 0.5 * logits_bytes, (temporaries, logits_bytes)


def while_body_lines(hlo_text):
    """The instruction lines of the loop bodies (`while(..., body=%name)`) of an HLO module."""
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo_text))
    lines, inside = [], False
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():  # a computation's header (or its closing brace)
            name = line.split()[0].lstrip("%")
            inside = name in bodies
        elif inside:
            lines.append(line)
    return lines


_COLLECTIVE = re.compile(r" (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)")


# Data parallel, and FSDP (the head's kernel sharded too: the per-shard sum adds no gather).
@pytest.mark.parametrize("mesh_shape", [(4, 1, 1), (1, 4, 1)])
def test_a_blocked_loss_reduces_the_head_gradient_across_devices_once(mesh_shape):
    """On 4 devices that split the batch, the head gradient's sum over the loss blocks stays on
    each device (`batch_shards`): XLA's compiled step moves no vocabulary-sized array between
    devices inside the blocks' loop (it all-reduces `[D, V]` once per block without the
    per-shard sum)."""
    config = tiny_config()
    V = config.model.vocab_size
    mesh = sharding.make_mesh(mesh_shape, ("data", "fsdp", "tensor"), devices=jax.devices()[:4])
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in random_batch(config).items()}
    in_loop = {}
    with jax.set_mesh(mesh):
        fns = step.build(config, mesh)
        for shards in (1, 4):

            def grads(params, batch, shards=shards):
                return step.summed_grads(
                    fns.graphdef,
                    params,
                    fns.abstract_rest,
                    batch,
                    jax.random.key(0),
                    loss_blocks=4,
                    batch_shards=shards,
                )

            shardings = (fns.state_shardings["params"], fns.batch_sharding)
            hlo = (
                jax.jit(grads, in_shardings=shardings)
                .lower(fns.abstract_state["params"], batch)
                .compile()
                .as_text()
            )
            in_loop[shards] = sum(
                bool(re.search(rf"\[[\d,]*\b{V}\b[\d,]*\]", _COLLECTIVE.split(line)[0]))
                for line in while_body_lines(hlo)
                if _COLLECTIVE.search(line)
            )
    assert in_loop == {1: 1, 4: 0}, in_loop


def test_data_parallel_size_follows_the_rules():
    mesh = sharding.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    assert step.data_parallel_size(mesh, sharding.DEFAULT_RULES) == 4
    rules = [(name, "data" if name == "batch" else axes) for name, axes in sharding.DEFAULT_RULES]
    assert step.data_parallel_size(mesh, rules) == 2
