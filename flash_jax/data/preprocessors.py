"""tf.data preprocessors of the flash_jax tasks: text cleanup, windows, BERT masking, packing.

Order inside a task (see tasks.py): raw text -> `clean_wiki40b` (Wiki-40B only) -> drop empty
documents -> tokenize + EOS -> (in-memory cache of small corpora) -> `split_into_windows` ->
`bert_mask` (masked LM only). The input pipeline then packs with `pack_windows`.
"""

from __future__ import annotations

import seqio
import tensorflow as tf

from flash_jax.data import vocabularies

AUTOTUNE = tf.data.AUTOTUNE
# Windows are read round-robin from this many documents at once, so that the shuffle buffer
# holds windows of many books instead of one book's consecutive windows.
WINDOW_CYCLE_LENGTH = 16
# seqio's packer takes its input seq_len windows at a time: seq_len^2 tokens per feature, held in
# memory and in every saved pipeline state (256 MB at 8192). Past this many tokens, windows are
# packed in groups of PACK_TOKENS // seq_len instead (a group's end closes the open row: at most
# one row per group could have taken one more window).
PACK_TOKENS = 2**20
# Masked-LM flag values. seqio's packer treats 0 as padding, so real tokens need non-zero flags.
NOT_SELECTED, SELECTED = 1, 2


def clean_wiki40b(dataset: tf.data.Dataset, key: str = "text") -> tf.data.Dataset:
    """Wiki-40B markers -> plain text.

    `_START_ARTICLE_`, `_START_SECTION_`, `_START_PARAGRAPH_` (each on its own line) become a
    blank line between title, section titles and paragraphs; `_NEWLINE_` inside a paragraph
    becomes a newline. Leading and trailing whitespace is stripped.
    """

    def clean(ex):
        text = ex[key]
        text = tf.strings.regex_replace(text, r"\n?_START_(ARTICLE|SECTION|PARAGRAPH)_\n", "\n\n")
        text = tf.strings.regex_replace(text, "_NEWLINE_", "\n")
        return {**ex, key: tf.strings.strip(text)}

    return dataset.map(clean, num_parallel_calls=AUTOTUNE, deterministic=True)


def drop_empty(dataset: tf.data.Dataset, key: str = "text") -> tf.data.Dataset:
    return dataset.filter(lambda ex: tf.strings.length(ex[key]) > 0)


def split_into_windows(
    dataset: tf.data.Dataset,
    sequence_length: dict[str, int],
    output_features=None,
    cycle_length: int = WINDOW_CYCLE_LENGTH,
) -> tf.data.Dataset:
    """Cuts each tokenized document into consecutive windows of `sequence_length["targets"]`.

    Nothing is truncated: a document of N tokens gives ceil(N / L) windows, all of length L but the
    last (the remainder, packed later with others). Windows of one document keep their order;
    `cycle_length` documents are interleaved window by window (deterministically). Features other
    than "targets" are copied to every window; "window_index" numbers the windows of a document.
    """
    del output_features
    length = int(sequence_length["targets"])

    def windows(ex):
        tokens = ex["targets"]
        n = tf.size(tokens)
        num = (n + length - 1) // length
        # Dense [num, L] rows plus each row's length: slicing these per window is cheap (slicing
        # a RaggedTensor element by element copies the whole document each time).
        rows = tf.reshape(tf.pad(tokens, [[0, num * length - n]]), [num, length])
        lengths = tf.minimum(length, n - tf.range(num) * length)
        out = {
            k: tf.repeat(tf.expand_dims(v, 0), num, axis=0) for k, v in ex.items() if k != "targets"
        }
        out.update(targets=rows, window_length=lengths, window_index=tf.range(num))
        return tf.data.Dataset.from_tensor_slices(out).map(_trim_window)

    if cycle_length == 1:
        return dataset.flat_map(windows)
    return dataset.interleave(
        windows,
        cycle_length=cycle_length,
        block_length=1,
        num_parallel_calls=AUTOTUNE,
        deterministic=True,
    )


def _trim_window(ex):
    ex = dict(ex)
    ex["targets"] = ex["targets"][: ex.pop("window_length")]
    return ex


def bert_mask(
    dataset: tf.data.Dataset,
    output_features,
    mask_rate: float,
    seed_offset: int = 0,
) -> tf.data.Dataset:
    """BERT-style corruption of each window, for masked LM.

    Each token is selected independently with probability `mask_rate` (so about that fraction of
    tokens; BERT's 15% by default). A selected token becomes the mask token with probability 0.8,
    a uniformly random ordinary token with probability 0.1, and stays unchanged with probability
    0.1. Outputs: "inputs" (corrupted), "targets" (the original tokens) and "mlm_flags":
    SELECTED (2) where the loss is taken, NOT_SELECTED (1) elsewhere; flags are non-zero so that
    seqio's packer keeps them aligned with the tokens. The randomness comes from seqio's per-example
    seeds (`map_seed_manager`), so a fixed task seed gives fixed masks.
    """
    spec = vocabularies.mlm_mask_spec(output_features["targets"].vocabulary)

    @seqio.map_over_dataset(num_seeds=3)
    def corrupt(ex, seeds):
        targets = ex["targets"]
        shape = tf.shape(targets)
        selected = tf.random.stateless_uniform(shape, seed=seeds[0]) < mask_rate
        choice = tf.random.stateless_uniform(shape, seed=seeds[1])
        random_tokens = tf.random.stateless_uniform(
            shape, seed=seeds[2], minval=spec.random_low, maxval=spec.random_high, dtype=tf.int32
        )
        corrupted = tf.where(
            choice < 0.8, spec.mask_id, tf.where(choice < 0.9, random_tokens, targets)
        )
        inputs = tf.where(selected, corrupted, targets)
        flags = tf.where(selected, SELECTED, NOT_SELECTED)
        return {**ex, "inputs": inputs, "mlm_flags": tf.cast(flags, tf.int32)}

    del seed_offset
    return corrupt(dataset)


def pack_windows(dataset: tf.data.Dataset, seq_len: int, objective: str) -> tf.data.Dataset:
    """Packs windows into rows of `seq_len` and builds the model features (numpy-ready dicts).

    seqio/T5 packing, seq_len windows at a time (fewer past PACK_TOKENS): windows are concatenated
    greedily into rows; each piece gets a segment id (1, 2, ... within the row; 0 = padding) and
    positions counting from 0 within the piece. Full windows fill a row alone. LM: `inputs` are
    the targets shifted right by one inside each segment (0 at each segment start), weights 1 on
    every real token. MLM: inputs are the corrupted tokens, weights 1 only where a token was
    selected for the loss.
    """
    keys = ["targets"] + (["inputs", "mlm_flags"] if objective == "mlm" else [])
    dataset = dataset.map(lambda ex: {k: ex[k] for k in keys}, num_parallel_calls=AUTOTUNE)
    lengths = {k: seq_len for k in keys}
    group = PACK_TOKENS // seq_len
    if group >= seq_len:  # seq_len <= 1024: seqio's own groups of seq_len windows
        packed = seqio.utils.trim_and_pack_dataset(dataset, lengths)
    else:
        groups = dataset.padded_batch(group, padded_shapes={k: [seq_len] for k in keys})
        packed = groups.flat_map(
            # seqio's packer drops the zero padding (tokens and flags are never 0).
            lambda windows: seqio.utils.trim_and_pack_dataset(
                tf.data.Dataset.from_tensor_slices(windows), lengths
            )
        )

    def to_model_features(ex):
        targets = ex["targets"]
        segment_ids = ex["targets_segment_ids"]
        if objective == "mlm":
            inputs = ex["inputs"]
            weights = tf.cast(tf.equal(ex["mlm_flags"], SELECTED), tf.float32)
        else:
            inputs = seqio.utils.make_autoregressive_inputs(targets, sequence_id=segment_ids)
            weights = tf.cast(tf.not_equal(segment_ids, 0), tf.float32)
        return {
            "inputs": tf.cast(inputs, tf.int32),
            "targets": tf.cast(targets, tf.int32),
            "weights": weights,
            "segment_ids": tf.cast(segment_ids, tf.int32),
            "positions": tf.cast(ex["targets_positions"], tf.int32),
        }

    return packed.map(to_model_features, num_parallel_calls=AUTOTUNE)
