"""flash_jax.long_context and eval.py's --context / --stride / --whole_documents / --bucket:
against today's eval, against per-token losses computed here from the model's own forward on
windows cut here (SentencePiece tokenizes the texts, as in tests/test_eval.py), and bad input.

The tiny FLASH run of tests/test_eval.py (trained once per pytest session): chunks of 8,
trained at 32 tokens, max_len 32; tiny Performer and Combiner runs of the same shape for
whole documents.
"""

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from flax import nnx

from configs import base
from flash_jax import evaluation, long_context, models, runs
from flash_jax.train import checkpoint_reader
from tests.helpers import (
    SEQ_LEN,
    error_line,
    eval_cli,
    randomise,
    snapshot,
    tiny_model_config,
    train_tiny_run,
)

C = 8  # the tiny run's chunk size
# The eval's forward runs packed rows of another shape (several windows per row, padding, other
# chunk layouts) than the direct forward here, both in float32: their per-token NLLs of ~8 nats
# differ by ~1e-4 (measured: 1.4e-4 at most, as a bucket's mean), which averages down to ~1e-6
# relative over the split's loss but not over a bucket of 32 tokens.
RTOL = 1e-5  # losses over the whole split
BUCKET_ATOL = 5e-4  # nats, the mean loss of one bucket


def tiny_run(tmp_path_factory, name="flash"):
    """(restored run, validation texts) of the tiny `name` run (trained once per session)."""
    root = "eval_tiny_run" if name == "flash" else f"eval_tiny_run_{name}"
    workdir, texts = train_tiny_run(tmp_path_factory.getbasetemp() / root, name)
    return checkpoint_reader.restore(workdir), texts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_run(tmp_path_factory)


def documents(texts):
    sp = spm.SentencePieceProcessor(model_file=base.SHIPPED_VOCAB)
    return [np.array(sp.encode(t) + [sp.eos_id()], np.int32) for t in texts]


def window_nll(model, tokens, begin, end):
    """Per-token NLL (float64) of tokens[begin:end] scored alone: input 0, then the window."""
    window = tokens[begin:end]
    inputs = np.concatenate([[0], window[:-1]]).astype(np.int32)[None]
    logits = np.asarray(model(jnp.asarray(inputs)), np.float64)[0]
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return -log_probs[np.arange(len(window)), window]


def hand_buckets(nll, positions, edges):
    """[(start, end, tokens, loss)] of explicit bucket edges."""
    out = []
    for start, end in zip(edges[:-1], edges[1:], strict=True):
        inside = (positions >= start) & (positions < end)
        n = int(inside.sum())
        out.append((start, end, n, nll[inside].sum() / n if n else None))
    return out


def assert_buckets(got, want):
    assert [(b["start"], b["end"], b["tokens"]) for b in got] == [w[:3] for w in want]
    for b, w in zip(got, want, strict=True):
        if w[3] is None:
            assert b["loss"] is None
        else:
            np.testing.assert_allclose(b["loss"], w[3], rtol=0, atol=BUCKET_ATOL)


# ----------------------------------------------------------------------------- windows


def test_default_context_is_todays_eval_exactly(tiny):
    run, _ = tiny
    result = evaluation.evaluate_split(run, "validation")
    today = evaluation.evaluate(run.fns, run.params, run.rest, run.config, "validation")
    assert result["nll_sum"] == today["nll_sum"]  # the same float32 sums, bit for bit
    assert result["tokens"] == today["tokens"] and result["batches"] == today["batches"]
    assert result["context"] == SEQ_LEN and result["stride"] is None
    buckets = result["loss_by_position"]
    assert [(b["start"], b["end"]) for b in buckets] == [(0, 8), (8, 16), (16, 32)]
    assert sum(b["tokens"] for b in buckets) == result["tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("factor", [8, 64])
def test_flash_scores_windows_far_past_max_len_against_a_direct_forward(tiny, factor):
    run, texts = tiny
    context = factor * SEQ_LEN
    result = evaluation.evaluate_split(
        run, "validation", settings=long_context.Settings(context=context)
    )
    model, nll, positions = run.model(), [], []
    for tokens in documents(texts):
        for begin in range(0, len(tokens), context):
            end = min(begin + context, len(tokens))
            nll.append(window_nll(model, tokens, begin, end))
            positions.append(np.arange(end - begin))
    nll, positions = np.concatenate(nll), np.concatenate(positions)
    assert result["tokens"] == len(nll) and math.isfinite(result["loss"])
    np.testing.assert_allclose(result["loss"], nll.mean(), rtol=RTOL)
    # Doubling from C up to the window (the buckets past the longest document are empty).
    edges = [0] + [C * 2**k for k in range(20) if C * 2**k <= context]
    assert_buckets(result["loss_by_position"], hand_buckets(nll, positions, edges))


@pytest.mark.slow
def test_sliding_windows_score_each_token_once_with_the_context_before_it(tiny):
    run, texts = tiny
    context, stride = 16, 5
    settings = long_context.Settings(context=context, stride=stride, bucket=4)
    result = evaluation.evaluate_split(run, "validation", settings=settings)
    model, nll, positions = run.model(), [], []
    for tokens in documents(texts):
        scored_to, begin = 0, 0
        while scored_to < len(tokens):  # windows every `stride` tokens, cut here independently
            end = min(begin + context, len(tokens))
            assert scored_to == 0 or scored_to - begin >= context - stride
            nll.append(window_nll(model, tokens, begin, end)[scored_to - begin :])
            positions.append(np.arange(scored_to - begin, end - begin))
            scored_to, begin = end, begin + stride
    nll, positions = np.concatenate(nll), np.concatenate(positions)
    total = sum(len(t) for t in documents(texts))
    assert result["tokens"] == len(nll) == total
    np.testing.assert_allclose(result["loss"], nll.mean(), rtol=RTOL)
    want = hand_buckets(nll, positions, [0, 4, 8, 12, 16])
    assert_buckets(result["loss_by_position"], want)


# ----------------------------------------------------------------------------- whole documents


def test_whole_document_state_carried_equals_one_forward_over_the_document(tiny):
    run, texts = tiny
    tokens = documents(texts)[0]  # 285 tokens: nine windows of 32, the last one padded
    assert len(tokens) > 8 * SEQ_LEN and len(tokens) % SEQ_LEN
    carried = long_context.score_document(run.model(), tokens, SEQ_LEN)
    whole = window_nll(run.model(), tokens, 0, len(tokens))  # one forward, past max_len
    # Same float32 math in another order (chunk sums, then the carried sum): per-token NLLs of
    # ~8 nats agree to a few float32 ulps of the logits.
    np.testing.assert_allclose(carried, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["performer", "combiner"])
def test_baselines_whole_document_state_carried_equals_one_forward(name):
    model = models.create(tiny_model_config(name), rngs=nnx.Rngs(0))  # spans/chunks of 8
    randomise(model, 1)  # larger weights than the init: far tokens change every NLL
    tokens = np.asarray(jax.random.randint(jax.random.key(2), (150,), 1, 64), np.int32)
    window = 32  # four windows and a partial fifth (22 tokens, then padding)
    carried = long_context.score_document(model, tokens, window)
    whole = window_nll(model, tokens, 0, len(tokens))  # one forward, past max_len (64)
    # The same float32 math summed in another order (the carried state, then the window's
    # sums; for Combiner one softmax over the prior and the window's span logits): each sum
    # of at most 150 terms rounds at ~sqrt(150) float32 eps (1.2e-7) relative, ~1.5e-6, and
    # that reaches NLLs of ~5-10 nats through two layers (measured: 4.4e-6 at most, Combiner).
    np.testing.assert_allclose(carried, whole, rtol=1e-5, atol=1e-5)
    # The carried state is what makes them equal: windows scored alone differ by nats.
    alone = np.concatenate(
        [window_nll(model, tokens, b, min(b + window, len(tokens))) for b in range(0, 150, window)]
    )
    assert np.abs(alone - whole).max() > 0.5


def test_window_states_are_constant_or_grow_with_the_spans():
    def size(name, length):
        state = long_context.init_window_state(tiny_model_config(name), 1, length)
        return sum(a.size for a in jax.tree.leaves(state))

    for name in ("flash", "performer"):
        assert size(name, 32) == size(name, 1 << 20)
    # Combiner: one slot per span of 8, rounded up to a power of two of spans (few compiles).
    assert size("combiner", 8 * 33) == size("combiner", 8 * 64) == 2 * size("combiner", 8 * 32)
    assert size("combiner", 8) * 64 == size("combiner", 8 * 64)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flash", "performer", "combiner"])
def test_whole_documents_score_every_token_bucketed_by_position_in_the_document(
    tmp_path_factory, name
):
    run, texts = tiny_run(tmp_path_factory, name)
    settings = long_context.Settings(context=16, whole_documents=True)
    result = evaluation.evaluate_split(run, "validation", settings=settings)
    plain = evaluation.evaluate_split(run, "validation")
    docs = documents(texts)
    assert result["tokens"] == plain["tokens"] == sum(len(d) for d in docs)
    model = run.model()
    nll = np.concatenate([window_nll(model, d, 0, len(d)) for d in docs])
    positions = np.concatenate([np.arange(len(d)) for d in docs])
    np.testing.assert_allclose(result["loss"], nll.mean(), rtol=RTOL)
    longest = max(len(d) for d in docs)
    edges = [0, 8, 16, 32, 64, 128, 256, 512]
    edges = [e for e in edges if e < longest] + [longest]
    assert_buckets(result["loss_by_position"], hand_buckets(nll, positions, edges))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "name, settings, message",
    [
        ("flash", dict(context=0), "--context must be >= 1, got 0"),
        ("flash", dict(context=32, stride=0), r"--stride must be in \[1, --context=32\], got 0"),
        ("flash", dict(context=32, stride=33), r"--stride must be in \[1, --context=32\]"),
        ("transformer_pp", dict(whole_documents=True), "--whole_documents needs a model"),
        ("flash_quad", dict(whole_documents=True), "flash_quad's cache grows"),
        ("transformer", dict(whole_documents=True), "use --context, or --stride"),
        ("flash", dict(context=20, whole_documents=True), "multiple of model.chunk_size"),
        ("transformer_pp", dict(context=128), "score sliding windows with --context<=64"),
        ("flash_quad", dict(context=65, stride=8), "--stride=S"),
        ("flash", dict(context=32, bucket=5), "--bucket must divide the window of 32"),
        ("flash", dict(context=32, bucket=0), "--bucket must divide"),
        ("flash", dict(context=8192, bucket=1), "at most 4096"),
    ],
)
def test_bad_settings_are_one_line_naming_the_flag(name, settings, message):
    with pytest.raises(ValueError, match=message):
        long_context.check(long_context.Settings(**settings), tiny_model_config(name), 64)


def test_settings_models_may_use():
    check = long_context.check
    for name in ("flash", "performer", "combiner"):  # any length
        assert check(
            long_context.Settings(context=1 << 20), tiny_model_config(name), 64
        ).context == (1 << 20)
    stride = long_context.Settings(context=64, stride=16)
    assert check(stride, tiny_model_config("transformer_pp"), 64) == stride
    assert check(long_context.Settings(), tiny_model_config("flash"), 32).context == 32
    for name in ("flash", "performer", "combiner"):
        whole = long_context.Settings(context=64, whole_documents=True)
        assert check(whole, tiny_model_config(name), 64) == whole


def test_sliding_windows_cover_a_document_once():
    for length, context, stride in [(1, 4, 1), (10, 4, 4), (10, 4, 3), (11, 4, 1), (3, 8, 2)]:
        scored = []
        for begin, end, first in long_context.sliding_windows(length, context, stride):
            assert end - begin <= context and begin <= first < end
            assert first == 0 or first - begin >= context - stride
            scored += range(first, end)
        assert scored == list(range(length))


def test_doubling_buckets_from_the_chunk_size():
    buckets = long_context.Buckets(chunk_size=8)
    positions = np.array([0, 7, 8, 15, 16, 31, 32, 63, 64, (1 << 30) - 1, 1 << 30])
    want = [0, 0, 1, 1, 2, 2, 3, 3, 4, 27, 28]  # [2^29, 2^30) is bucket 27
    assert np.asarray(buckets.index(positions)).tolist() == want
    assert [buckets.bounds(k) for k in range(4)] == [(0, 8), (8, 16), (16, 32), (32, 64)]


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_eval_cli_context_results_tensorboard_and_plot(tiny, tmp_path):
    run, _ = tiny
    # A copy: the trained run is shared with other test files, whose checks of results.jsonl
    # must not see this test's record.
    workdir = str(tmp_path / "run")
    shutil.copytree(run.workdir, workdir)
    plot = tmp_path / "by_position.png"
    proc = eval_cli(f"--workdir={workdir}", "--context=256", f"--plot={plot}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    records = runs.read_jsonl(runs.results_path(workdir))
    assert len(records) == 1 and records[0]["loss_by_position"] == line["loss_by_position"]
    assert (
        line["context"] == 256
        and sum(b["tokens"] for b in line["loss_by_position"]) == (line["tokens"])
    )
    assert plot.stat().st_size > 0
    events = "".join(os.listdir(os.path.join(workdir, "tensorboard")))
    assert events  # the scalars' tags are checked by tests of report.windows_tag below


@pytest.mark.slow
def test_eval_cli_bad_settings_write_nothing(tiny):
    run, _ = tiny
    before = snapshot(run.workdir)
    for args, message in [
        (["--context=0"], "--context must be >= 1, got 0"),
        (["--stride=40"], r"--stride must be in [1, --context=32], got 40"),
    ]:
        proc = eval_cli(f"--workdir={run.workdir}", *args)
        assert proc.returncode == 1 and message in error_line(proc)
    assert snapshot(run.workdir) == before


def test_results_of_other_windows_get_tags_of_their_own():
    """(Their curves are their own too: `runs.curve` matches a record's whole settings,
    windows included; tests/test_eval.py.)"""
    from flash_jax.train import report

    base_result = {"seq_len": 32, "context": 32, "stride": None, "whole_documents": False}
    assert report.windows_tag(base_result) == ""
    assert report.windows_tag({**base_result, "context": 256}) == "_context256"
    assert report.windows_tag({**base_result, "stride": 8}) == "_context32_stride8"
    assert report.windows_tag({**base_result, "whole_documents": True}) == "_whole_documents32"


def test_the_study_scores_growing_cache_models_up_to_max_len_then_sliding():
    from scripts.bench import long_context as study

    def labels(name):
        return [
            label for label, _ in study.settings_for(tiny_model_config(name), 32, [32, 64, 128])
        ]

    assert labels("transformer_pp") == ["32", "64", "sliding 64/32"]  # max_len 64
    assert labels("flash") == ["32", "64", "128", "whole documents"]
    assert labels("combiner") == ["32", "64", "128", "whole documents"]
