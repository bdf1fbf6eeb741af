"""Long-context evaluation: windows of any length, sliding windows, whole documents, and the loss
by position inside the window (or the document).

    from flash_jax import long_context
    settings = long_context.Settings(context=16384)             # windows of 16,384 tokens
    settings = long_context.check(settings, run.model_config, run.config.data.seq_len)
    result = evaluation.evaluate_split(run, "validation", settings=settings)

Three ways to cut a split (every token of every document is scored exactly once in each):
- windows (the default; `context` = the training length unless given): each document cut into
  consecutive windows of `context` tokens, the last one shorter, each scored alone. This is the
  input pipeline of training and of today's eval at another `data.seq_len` (packed rows), so at
  the training length the result is eval's own.
- sliding windows (`stride`): windows of `context` tokens starting every `stride` tokens; each
  scores only the tokens the previous one did not, so every token but those of a document's first
  window is scored with at least `context - stride` tokens before it (one window per row).
- whole documents (`whole_documents`: FLASH, Performer, Combiner): each document one stream, run
  `context` tokens at a time with every layer's state carried from one window to the next
  (`init_window_state`, each layer's `window`): every token sees all of its document before it.
  FLASH's state (the linear part's running sum and count over completed chunks) and Performer's
  (the running sum of phi(k) [v, 1]^T) have a constant size; Combiner's (one summary per
  completed span of C tokens) grows with the document as N / C, C times slower than a key/value
  cache, but not constant.

Which models may run past `model.max_len`: the math of FLASH, Performer and Combiner and of the
RoPE Transformers does not depend on it, that of the vanilla Transformer (learned absolute
positions, a max_len table) and FLASH-Quad (score scale n = max_len and a relative bias of that
span) does (`config.MAX_LEN_BOUND`). Evaluation refuses windows above `max_len` for models whose
attention cost and decoding cache grow with the context (the Transformers and FLASH-Quad):
those are scored past it with sliding windows of at most `max_len`.

Loss by position: `[{"start", "end", "tokens", "loss"}]`, one bucket per position range inside
the window (the document for whole documents). By default the buckets double from the chunk
size C: [0, C), [C, 2C), [2C, 4C), ...; `bucket=N` gives equal widths. Token counts sum to the
result's tokens; a bucket's `end` is clipped to the longest window (document) scored.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flash_jax import losses
from flash_jax.config import DataConfig
from flash_jax.sharding import LAYER_AXIS_METADATA

# Models whose attention cost and decoding cache grow with the context: windows past
# model.max_len only as sliding windows of at most max_len.
GROWING_CACHE = ("transformer", "transformer_plus", "transformer_pp", "flash_quad")
# Models scored as whole documents with a carried state (their layers have `window`): constant
# for FLASH and Performer, one summary per span for Combiner.
WHOLE_DOCUMENT_MODELS = ("flash", "performer", "combiner")
MAX_BUCKETS = 4096  # --bucket: at most this many buckets per window


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a split is cut and bucketed (eval.py's flags); part of every result record."""

    context: int | None = None  # window length; None: the training length (data.seq_len)
    stride: int | None = None  # sliding windows advancing by this many tokens
    whole_documents: bool = False
    bucket: int | None = None  # equal bucket widths; None: doubling from the chunk size

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def check(settings: Settings, model_cfg, train_len: int) -> Settings:
    """`settings` with the context resolved (default `train_len`); ValueError, one line naming
    the flag, for settings this model cannot be scored with."""
    context = train_len if settings.context is None else settings.context
    name, max_len = model_cfg.name, model_cfg.max_len
    if context < 1:
        raise ValueError(f"--context must be >= 1, got {context}")
    if settings.stride is not None:
        if settings.whole_documents:
            raise ValueError("--stride and --whole_documents exclude each other")
        if not 1 <= settings.stride <= context:
            raise ValueError(f"--stride must be in [1, --context={context}], got {settings.stride}")
    if settings.whole_documents:
        if name not in WHOLE_DOCUMENT_MODELS:
            raise ValueError(
                f"--whole_documents needs a model whose state between windows does not keep "
                f"every token ({', '.join(WHOLE_DOCUMENT_MODELS)}); {name}'s cache grows with "
                "the context: use --context, or --stride"
            )
        if context % model_cfg.chunk_size:
            raise ValueError(
                f"--context ({context}) must be a multiple of model.chunk_size "
                f"({model_cfg.chunk_size}) with --whole_documents"
            )
    if name in GROWING_CACHE and context > max_len:
        raise ValueError(
            f"--context {context} exceeds model.max_len {max_len} of {name}, whose cache grows "
            f"with the context: score sliding windows with --context<={max_len} --stride=S"
        )
    if settings.bucket is not None and (
        settings.bucket < 1 or context % settings.bucket or context // settings.bucket > MAX_BUCKETS
    ):
        raise ValueError(
            f"--bucket must divide the window of {context} tokens into at most {MAX_BUCKETS} "
            f"equal buckets, got {settings.bucket}"
        )
    return dataclasses.replace(settings, context=context)


# ----------------------------------------------------------------------------- buckets


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Position buckets: equal widths of `width`, or (width None) doubling from `chunk_size`."""

    chunk_size: int
    width: int | None = None

    def index(self, positions):
        """Bucket of each position (an int32 array, on the device)."""
        p = jnp.asarray(positions, jnp.int32)
        if self.width is not None:
            return p // self.width
        q = jnp.maximum(p // self.chunk_size, 1)
        floor_log2 = 31 - jax.lax.clz(q)  # exact in integers (float log2 rounds near 2^k)
        return jnp.where(p < self.chunk_size, 0, floor_log2 + 1)

    def count(self, span: int) -> int:
        """Buckets that positions [0, span) fall in."""
        return int(self.index(span - 1)) + 1

    def bounds(self, k: int) -> tuple[int, int]:
        if self.width is not None:
            return k * self.width, (k + 1) * self.width
        if k == 0:
            return 0, self.chunk_size
        return self.chunk_size * 2 ** (k - 1), self.chunk_size * 2**k

    def summary(self, nll, tokens, span: int) -> list[dict]:
        """[{"start", "end", "tokens", "loss"}] of every bucket up to `span` (the longest window
        or document), from per-bucket summed NLL and token counts; loss None where empty."""
        out = []
        for k in range(self.count(span)):
            start, end = self.bounds(k)
            n = float(tokens[k]) if k < len(tokens) else 0.0
            out.append(
                {
                    "start": start,
                    "end": min(end, span),
                    "tokens": int(round(n)),
                    "loss": float(nll[k]) / n if n > 0 else None,
                }
            )
        return out


def _token_nll(logits_BTV, targets_BT, weights_BT):
    log_probs = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets_BT[..., None], axis=-1)[..., 0]
    return jnp.where(weights_BT > 0, nll * weights_BT, 0.0)


# Replicated sums (called under the run's mesh): every process reads them, as the eval step's.
@functools.partial(jax.jit, static_argnums=(0, 4, 5), out_shardings=jax.sharding.PartitionSpec())
def score_windows(graphdef, params, rest, batch, buckets: Buckets, num_buckets: int):
    """One batch of windows: (nll_sum, weight_sum) exactly as the eval step computes them, and
    the summed NLL and weight per position bucket."""
    model = nnx.merge(graphdef, params, rest)
    logits = model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    nll_sum, weight_sum = losses.cross_entropy(logits, batch["targets"], batch["weights"])
    index = buckets.index(batch["positions"]).reshape(-1)
    weights = batch["weights"].astype(jnp.float32)
    token_nll = _token_nll(logits, batch["targets"], weights).reshape(-1)
    by_bucket = jax.ops.segment_sum(token_nll, index, num_segments=num_buckets)
    tokens = jax.ops.segment_sum(weights.reshape(-1), index, num_segments=num_buckets)
    return nll_sum, weight_sum, by_bucket, tokens


# ----------------------------------------------------------------------------- sources of windows


def window_rows(config, context: int, mesh, rules) -> int:
    """Rows per batch at `context`: about the training batch's tokens (its batch size at the
    training length), a multiple of the mesh's batch shards."""
    from flash_jax.train import step

    shards = step.data_parallel_size(mesh, rules)
    rows = config.data.batch_size * config.data.seq_len // context
    return max(shards, rows // shards * shards)


def documents(cfg: DataConfig, split: str) -> Iterator[np.ndarray]:
    """The split's documents as token arrays (each ending with EOS), in the source's order:
    the task's preprocessing up to where windows are cut."""
    from flash_jax import data
    from flash_jax.data import tasks

    if tasks.cache_dir(tasks.require_typed(cfg)):
        raise ValueError(
            "--stride and --whole_documents read documents from the source; data.use_cached "
            "is not supported with them"
        )
    task = data.get_task(cfg)
    ds = task.preprocess_precache(task.source.get_dataset(split=split, shuffle=False))
    for ex in ds.as_numpy_iterator():
        yield np.asarray(ex["targets"], np.int32)


def sliding_windows(length: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first scored) of each window over a document of `length` tokens: windows
    start every `stride` tokens, and each scores the tokens after the previous one's end."""
    scored_to = 0
    for begin in range(0, length, stride):
        end = min(begin + context, length)
        yield begin, end, scored_to
        scored_to = end
        if end == length:
            return


def sliding_window_batches(docs, context: int, stride: int, rows: int) -> Iterator[dict]:
    """Batches of `rows` sliding windows (one per row; the last batch padded with zero rows) in
    the pipeline's features: input 0 starts each window, as in training."""

    def empty():
        shape = (rows, context)
        return {
            k: np.zeros(shape, np.float32 if k == "weights" else np.int32)
            for k in ("inputs", "targets", "weights", "segment_ids", "positions")
        }

    batch, row = empty(), 0
    for tokens in docs:
        for begin, end, first in sliding_windows(len(tokens), context, stride):
            n = end - begin
            batch["inputs"][row, 1:n] = tokens[begin : end - 1]
            batch["targets"][row, :n] = tokens[begin:end]
            batch["weights"][row, first - begin : n] = 1.0
            batch["segment_ids"][row, :n] = 1
            batch["positions"][row, :n] = np.arange(n)
            row += 1
            if row == rows:
                yield batch
                batch, row = empty(), 0
    if row:
        yield batch


# ----------------------------------------------------------------------------- whole documents


def init_window_state(model_cfg, batch_size: int, length: int) -> dict:
    """Every layer's state between windows of documents of `length` tokens (a whole number of
    windows), stacked on a leading layer axis: each layer type's `init_window_state` (FLASH's
    and Performer's constant, Combiner's one summary per span)."""
    from flash_jax import models

    layer_type = models.LAYER_TYPES[model_cfg.name]
    one_layer = layer_type.init_window_state(model_cfg, batch_size, length)
    return jax.tree.map(lambda a: jnp.zeros((model_cfg.num_layers,) + a.shape, a.dtype), one_layer)


@functools.partial(jax.jit, static_argnums=(0,))
def whole_document_window(graphdef, params, rest, inputs_BW, targets_BW, positions_BW, state):
    """One window of documents (every layer's state carried in, each layer's `window`):
    per-token NLL [B, W] and the state after the window."""
    model = nnx.merge(graphdef, params, rest)
    x = model.embed(inputs_BW)

    def one_layer(x_BWD, layer, layer_state):
        return layer.window(x_BWD, positions_BW, layer_state)

    x, state = nnx.scan(
        one_layer,
        in_axes=(nnx.Carry, 0, 0),
        out_axes=(nnx.Carry, 0),
        transform_metadata=LAYER_AXIS_METADATA,
    )(x, model.layers, state)
    nll = _token_nll(model.logits(x), targets_BW, jnp.ones(targets_BW.shape, jnp.float32))
    return nll, state


def score_document(model, tokens: np.ndarray, window: int) -> np.ndarray:
    """Per-token NLL (float32, [len(tokens)]) of one whole document under `model` (a
    `LanguageModel` of `WHOLE_DOCUMENT_MODELS`), scored `window` tokens at a time (a multiple
    of the chunk size) with the state carried; the input is 0 then the document, as in
    training."""
    n = len(tokens)
    padded = -(-n // window) * window
    inputs = np.zeros(padded, np.int32)
    targets = np.zeros(padded, np.int32)
    inputs[1:n] = tokens[:-1]
    targets[:n] = tokens
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = init_window_state(model.cfg, 1, padded)
    out = []
    for begin in range(0, padded, window):
        piece = slice(begin, begin + window)
        positions = np.arange(begin, begin + window, dtype=np.int32)[None]
        nll, state = whole_document_window(
            graphdef, params, rest, inputs[None, piece], targets[None, piece], positions, state
        )
        out.append(np.asarray(nll[0]))
    return np.concatenate(out)[:n]


# ----------------------------------------------------------------------------- whole splits


def _sums(nll_sum, tokens, batches, complete, bucket_nll, bucket_tokens, span) -> dict:
    return {
        "nll_sum": float(nll_sum),
        "tokens": float(tokens),
        "batches": batches,
        "complete": complete,
        "bucket_nll": np.asarray(bucket_nll, np.float64),
        "bucket_tokens": np.asarray(bucket_tokens, np.float64),
        "span": span,
    }


def score_sliding_windows(
    run, split: str, settings: Settings, buckets: Buckets, *, max_batches=None, progress=None
) -> dict:
    """Summed NLL, tokens and position buckets over `split` in sliding windows (see `evaluate`'s
    sums; one process)."""
    context, stride = settings.context, settings.stride
    fns, num_buckets = run.fns, buckets.count(settings.context)
    rows = window_rows(run.config, context, fns.mesh, run.config.mesh.rules)
    totals = [jnp.float32(0)] * 4
    batches, complete = 0, True
    from flash_jax.train import step

    with jax.set_mesh(fns.mesh):
        for batch in sliding_window_batches(
            documents(run.config.data, split), context, stride, rows
        ):
            if max_batches is not None and batches == max_batches:
                complete = False
                break
            out = score_windows(
                fns.graphdef,
                run.params,
                run.rest,
                step.put_batch(batch, fns.batch_sharding),
                buckets,
                num_buckets,
            )
            totals = [t + o for t, o in zip(totals, out, strict=True)]
            batches += 1
            if progress is not None:
                progress(batches, None, totals[1])
    return _sums(*totals[:2], batches, complete, *totals[2:], span=context)


def score_whole_documents(
    run, split: str, settings: Settings, buckets: Buckets, *, max_batches=None, progress=None
) -> dict:
    """Summed NLL, tokens and position buckets over `split`, each document one stream scored
    with the carried state (`score_document`); `max_batches` counts documents (one process)."""
    nll_sum, tokens, docs, complete, span = 0.0, 0, 0, True, 1
    bucket_nll, bucket_tokens = np.zeros(0), np.zeros(0)
    model = run.model()
    with jax.set_mesh(run.fns.mesh):
        for doc in documents(run.config.data, split):
            if max_batches is not None and docs == max_batches:
                complete = False
                break
            nll = score_document(model, doc, settings.context).astype(np.float64)
            index = np.asarray(buckets.index(np.arange(len(doc))))
            size = max(len(bucket_nll), int(index[-1]) + 1)
            bucket_nll = np.pad(bucket_nll, (0, size - len(bucket_nll)))
            bucket_tokens = np.pad(bucket_tokens, (0, size - len(bucket_tokens)))
            np.add.at(bucket_nll, index, nll)
            np.add.at(bucket_tokens, index, 1.0)
            nll_sum, tokens, docs = nll_sum + nll.sum(), tokens + len(doc), docs + 1
            span = max(span, len(doc))
            if progress is not None:
                progress(docs, None, tokens)
    return _sums(nll_sum, tokens, docs, complete, bucket_nll, bucket_tokens, span)


def check_one_process(settings: Settings) -> None:
    if (settings.stride is not None or settings.whole_documents) and jax.process_count() > 1:
        raise ValueError("--stride and --whole_documents run in one process")
