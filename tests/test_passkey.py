"""scripts/passkey.py: the prompt (length, where the key sits), the candidates' log-likelihood
against a full forward, and the lengths a model may take."""

import numpy as np
import pytest
from flax import nnx

from flash_jax import models
from scripts import passkey
from tests.helpers import tiny_model_config


def encode(text):
    """A stand-in tokenizer: one token per character (the tiny vocabulary of 64)."""
    return [2 + ord(c) % 62 for c in text]


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_the_prompt_has_the_length_and_the_key_at_its_depth(depth):
    keys = ["12345", "67890"]
    inputs, targets, weights = passkey.trial_batch(encode, 400, depth, keys)
    assert targets.shape == (2, 400)  # both candidates have 6 tokens here: no padding
    assert (weights.sum(axis=1) == 6).all() and (weights[:, -6:] == 1).all()
    assert targets[1, -6:].tolist() == encode(" 67890")
    prompt = targets[0, :-6].tolist()
    assert prompt == targets[1, :-6].tolist()  # the same prompt (the true key) in every row
    needle = encode(passkey.NEEDLE.format(key="12345"))
    at = next(i for i in range(len(prompt)) if prompt[i : i + len(needle)] == needle)
    intro, question = len(encode(passkey.INTRO)), len(encode(passkey.QUESTION))
    filler = len(prompt) - intro - len(needle) - question
    assert at - intro == round(depth * filler)
    assert inputs[0, 0] == 0 and (inputs[:, 1:] == targets[:, :-1]).all()


def test_candidates_are_scored_as_a_full_forward_does():
    model = models.create(tiny_model_config("flash"), rngs=nnx.Rngs(0))
    inputs, targets, weights = passkey.trial_batch(encode, 260, 0.5, ["11111", "2222", "333333"])
    got = passkey.score_rows(model, inputs, targets, weights)
    logits = np.asarray(model(inputs), np.float64)
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    want = (picked * weights).sum(axis=1)
    # float32 logits of a tiny model (|log p| ~ 4 nats per token, 5-7 tokens): ~1e-6 relative.
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_lengths_past_max_len_only_for_constant_state_models():
    passkey.check_lengths(tiny_model_config("flash"), [1 << 16])  # max_len 64: any length
    passkey.check_lengths(tiny_model_config("combiner"), [1 << 16])
    with pytest.raises(ValueError, match="exceed model.max_len 64 of transformer_pp"):
        passkey.check_lengths(tiny_model_config("transformer_pp"), [64, 65])
