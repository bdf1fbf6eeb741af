"""Incremental decoding and sampling for the causal models.

Each layer keeps a decoding state (`LanguageModel.init_cache`): keys and values for the Transformer
baselines and FLASH-Quad (it grows with the context), the current span and one summary per
completed span for Combiner (grows C times slower), and constant-size states for FLASH (the
spec's running sums and counts over completed chunks plus the current chunk's keys and values) and
Performer (the running sums of phi(k) [v, 1]^T).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flash_jax.models import LanguageModel

START_ID = 0  # training inputs start every document (and window) with 0: see pack_windows


def sample_logits(logits_BV: jax.Array, key: jax.Array, temperature: float, top_k: int):
    """Greedy when temperature == 0; otherwise softmax sampling, over the top_k logits if > 0."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(
    model: LanguageModel,
    prompt_BP: jax.Array,
    num_new_tokens: int,
    *,
    key: jax.Array,
    temperature: float = 1.0,
    top_k: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Extends each prompt row by `num_new_tokens` sampled tokens.

    Returns (tokens [B, P + N], logits [B, P + N - 1, vocab]): the logits that predicted every
    token after the first, so callers can check them against a full forward pass.
    """
    if prompt_BP.ndim != 2 or prompt_BP.shape[1] < 1:
        raise ValueError(f"prompt must be [batch, length >= 1], got shape {prompt_BP.shape}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0 or top_k > model.cfg.vocab_size:
        raise ValueError(f"top_k must be in [0, {model.cfg.vocab_size}], got {top_k}")
    B, P = prompt_BP.shape
    total = P + num_new_tokens
    if not model.cfg.constant_state and total > model.cfg.max_len:
        raise ValueError(
            f"prompt + new tokens = {total} exceeds model.max_len {model.cfg.max_len}"
            " (only FLASH and Performer decode past it, with their constant-size states)"
        )
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef, state, prompt_BP.astype(jnp.int32), key, num_new_tokens, temperature, top_k
    )


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _generate(graphdef, state, prompt_BP, key, num_new_tokens, temperature, top_k):
    B, P = prompt_BP.shape
    total = P + num_new_tokens
    cache = nnx.merge(graphdef, state).init_cache(B, total)

    # The model state rides in the scan carry so each step rebuilds the module inside its own
    # trace (NNX modules may not be captured across trace levels).
    def step(carry, token_B, t):
        state, cache = carry
        logits, cache = nnx.merge(graphdef, state).decode_step(token_B[:, None], t, cache)
        return (state, cache), logits[:, 0]

    def prefill(carry, xs):
        return step(carry, *xs)

    carry, prompt_logits = jax.lax.scan(prefill, (state, cache), (prompt_BP.T, jnp.arange(P)))

    def sample(carry, t):
        model_carry, logits, key = carry
        key, sub = jax.random.split(key)
        token = sample_logits(logits, sub, temperature, top_k)
        model_carry, logits = step(model_carry, token, t)
        return (model_carry, logits, key), (token, logits)

    _, (new_tokens, new_logits) = jax.lax.scan(
        sample, (carry, prompt_logits[-1], key), jnp.arange(P, total)
    )
    tokens = jnp.concatenate([prompt_BP, new_tokens.T], axis=1)
    logits = jnp.concatenate([prompt_logits, new_logits[:-1]], axis=0).transpose(1, 0, 2)
    return tokens, logits


def sample_text(
    run,
    prompt: str,
    num_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    num_samples: int = 1,
) -> list[str]:
    """Prompt + sampled continuation of a restored run (`checkpoint_reader.restore`), one per
    sample.

    The model is conditioned as in training: position 0 sees the start token, then the prompt;
    each continuation is cut at the end-of-document token and decoded by the run's vocabulary.
    """
    from flash_jax import data  # TensorFlow: only for text (generate needs none

    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    vocab = data.get_vocabulary(run.config.data)
    prompt_ids = [START_ID] + list(vocab.encode(prompt))
    prompt_BP = jnp.tile(jnp.asarray(prompt_ids, jnp.int32)[None], (num_samples, 1))
    with jax.set_mesh(run.fns.mesh):
        tokens_BT, _ = generate(
            run.model(),
            prompt_BP,
            num_tokens,
            key=jax.random.key(seed),
            temperature=temperature,
            top_k=top_k,
        )
    texts = []
    for row in np.asarray(tokens_BT):
        new = row[len(prompt_ids) :].tolist()
        if vocab.eos_id in new:  # the end of a document: what follows belongs to no text
            new = new[: new.index(vocab.eos_id)]
        texts.append(vocab.decode(prompt_ids[1:] + new))
    return texts


def cache_bytes(cache) -> int:
    """Memory held by a decoding state."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
