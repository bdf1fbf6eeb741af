"""Incremental decoding equals the full forward pass, for every causal model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flash_jax import decoding, models
from tests.helpers import tiny_model_config


def tiny_model(name, **overrides):
    return models.create(tiny_model_config(name, **overrides), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("prompt_length", [13, 16], ids=["inside_chunk", "chunk_end"])
@pytest.mark.parametrize("name", list(models.LAYER_TYPES))
def test_decoding_matches_the_full_forward_pass(name, prompt_length):
    model = tiny_model(name)
    prompt = jax.random.randint(jax.random.key(0), (2, prompt_length), 0, 64)
    tokens, logits = decoding.generate(model, prompt, 11, key=jax.random.key(1), top_k=5)
    assert tokens.shape == (2, prompt_length + 11)
    np.testing.assert_array_equal(tokens[:, :prompt_length], prompt)
    np.testing.assert_allclose(logits, model(tokens)[:, :-1], rtol=1e-5, atol=1e-5)


def test_greedy_decoding_takes_the_argmax():
    model = tiny_model("flash")
    prompt = jax.random.randint(jax.random.key(0), (1, 5), 0, 64)
    tokens, logits = decoding.generate(model, prompt, 6, key=jax.random.key(1), temperature=0.0)
    np.testing.assert_array_equal(tokens[:, 5:], jnp.argmax(logits[:, 4:], axis=-1))


def test_top_k_keeps_only_the_k_largest():
    logits = jnp.array([[0.0, 5.0, 4.0, -1.0, 3.0]])
    draws = jax.vmap(lambda k: decoding.sample_logits(logits, k, 1.0, 2))(
        jax.random.split(jax.random.key(0), 200)
    )
    assert set(np.unique(draws)) == {1, 2}


@pytest.mark.parametrize("name", ["flash", "performer"])
def test_constant_states_do_not_grow_with_the_context(name):
    model, quad = tiny_model(name), tiny_model("flash_quad")
    assert decoding.cache_bytes(model.init_cache(1, 16)) == decoding.cache_bytes(
        model.init_cache(1, 4096)
    )
    assert decoding.cache_bytes(quad.init_cache(1, 64)) == 4 * decoding.cache_bytes(
        quad.init_cache(1, 16)
    )
    # FLASH and Performer decode past max_len (64 here); the others refuse with a message.
    tokens, _ = decoding.generate(model, jnp.ones((1, 4), jnp.int32), 70, key=jax.random.key(0))
    assert tokens.shape == (1, 74)
    with pytest.raises(ValueError, match="model.max_len"):
        decoding.generate(quad, jnp.ones((1, 4), jnp.int32), 70, key=jax.random.key(0))


def test_combiner_state_grows_one_summary_per_span():
    combiner = tiny_model("combiner")  # spans of 8: one summary per 8 tokens of context
    small, large = (decoding.cache_bytes(combiner.init_cache(1, n)) for n in (16, 64))
    per_span = decoding.cache_bytes(combiner.init_cache(1, 24)) - small
    assert per_span > 0 and large - small == 6 * per_span


def test_decoding_rejects_bidirectional_models_and_bad_prompts():
    with pytest.raises(ValueError, match="causal"):
        decoding.generate(
            tiny_model("flash", causal=False), jnp.ones((1, 4), jnp.int32), 2, key=jax.random.key(0)
        )
    with pytest.raises(ValueError, match="prompt"):
        decoding.generate(tiny_model("flash"), jnp.ones((4,), jnp.int32), 2, key=jax.random.key(0))
