"""scripts/sample.py: text from a trained checkpoint through incremental decoding, checked against
greedy decoding by repeated full forward passes."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
from flax import nnx

from configs import base
from flash_jax import decoding
from flash_jax.train import checkpoint_reader
from tests.helpers import REPO, train_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    # The same two-step run as tests/test_eval.py (trained once per pytest session).
    workdir, _ = train_tiny_run(tmp_path_factory.getbasetemp() / "eval_tiny_run")
    return checkpoint_reader.restore(workdir, single_device=True)


def test_greedy_sample_is_the_text_of_the_full_forward_argmax(run):
    prompt, n = "she was not in the", 12
    (text,) = decoding.sample_text(run, prompt, n, temperature=0.0)
    # Reference: grow the sequence one argmax at a time with full forward passes.
    sp = spm.SentencePieceProcessor(model_file=base.SHIPPED_VOCAB)
    forward = nnx.jit(lambda model, tokens: model(tokens))
    model, width = run.model(), run.model_config.max_len
    ids = [decoding.START_ID] + sp.encode(prompt)
    prompt_len = len(ids)
    for _ in range(n):
        # One shape for every call (one compile): a causal model ignores the padding after.
        tokens = np.zeros((1, width), np.int32)
        tokens[0, : len(ids)] = ids
        logits = np.asarray(forward(model, tokens))
        ids.append(int(np.argmax(logits[0, len(ids) - 1])))
    new = ids[prompt_len:]
    if sp.eos_id() in new:
        new = new[: new.index(sp.eos_id())]
    assert isinstance(text, str) and text.startswith(prompt)
    assert text == sp.decode(ids[1:prompt_len] + new)
    assert len(text) > len(prompt) or not new


def test_sampling_is_seeded_and_gives_one_text_per_sample(run):
    kwargs = dict(temperature=1.0, top_k=20, num_samples=3)
    first = decoding.sample_text(run, "her", 8, seed=1, **kwargs)
    assert len(first) == 3 and all(t.startswith("her") for t in first)
    assert decoding.sample_text(run, "her", 8, seed=1, **kwargs) == first
    assert decoding.sample_text(run, "her", 8, seed=2, **kwargs) != first


def test_bad_sampling_arguments_are_value_errors(run):
    with pytest.raises(ValueError, match="num_tokens"):
        decoding.sample_text(run, "her", 0)
    with pytest.raises(ValueError, match="top_k"):
        decoding.sample_text(run, "her", 4, top_k=10**6)


def _interrupted(script, args, started):
    """Runs `script`, sends Ctrl-C's SIGINT once a stderr line contains `started` (an INFO line
    of its main), and returns (exit status, stderr)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    # A child inherits an ignored SIGINT (as under a shell's `cmd &`), and Python then installs
    # no KeyboardInterrupt handler: start it as a terminal would, with SIGINT's default.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, os.path.join(REPO, script), *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if started in line:
            proc.send_signal(signal.SIGINT)
            break
    lines += proc.stderr.read().splitlines(keepends=True)
    return proc.wait(timeout=120), "".join(lines)


@pytest.mark.slow  # two processes: about 40 s on 2 busy cores
@pytest.mark.parametrize(
    "script, args, started",
    [
        # Decoding 100,000 tokens outlasts the signal by far.
        ("scripts/sample.py", ["--num_tokens=100000"], "sampling from"),
        # Its first line, before the data check, the restore and the compile (seconds).
        ("eval.py", [], ": evaluating step 2 on validation"),
    ],
    ids=["sample", "eval"],
)
def test_ctrl_c_is_one_line_and_exit_status_130(run, script, args, started):
    status, stderr = _interrupted(script, [f"--workdir={run.workdir}", *args], started)
    assert status == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert stderr.rstrip().splitlines()[-1] == f"{os.path.basename(script)}: interrupted (Ctrl-C)"
