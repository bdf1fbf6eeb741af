"""Vocabularies: SentencePiece by path (T5 conventions: pad=0, eos=1, unk=2, no bos) or bytes.

`config.data.vocab` is "byte" (seqio.ByteVocabulary: 256 byte ids after pad/eos/unk, 259 in all)
or the path of a SentencePiece model: the shipped 4096-piece Austen model (the default), T5's 32k
model on GCS (`T5_VOCAB`, the paper-scale default), or one made by `scripts/data/train_spm.py`.

Masked LM needs a mask token (`mlm_mask_spec`): the model's `<mask>` piece when it has one
(`scripts/data/train_spm.py` adds it, so the shipped model has it at id 3); for the byte
vocabulary the unk id 2, which byte encoding never produces; for any other SentencePiece model one
extra id is appended (`<extra_id_0>`, the last id), so T5's vocabulary has 32001 ids under masked
LM.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import seqio
import tensorflow as tf
from sentencepiece import sentencepiece_model_pb2

from flash_jax.config import T5_VOCAB

MASK_PIECE = "<mask>"
# SentencePiece models known not to hold a <mask> piece: no need to read them to decide.
_KNOWN_WITHOUT_MASK = (T5_VOCAB,)


def get_vocabulary(data_config) -> seqio.Vocabulary:
    """The seqio Vocabulary for a `config.data` (its `vocab` and `objective` keys)."""
    return vocabulary(str(data_config.vocab), str(data_config.objective))


@functools.cache
def vocabulary(vocab: str, objective: str = "lm") -> seqio.Vocabulary:
    if vocab == "byte":
        return seqio.ByteVocabulary()
    path = vocab if "://" in vocab else os.path.abspath(os.path.expanduser(vocab))
    if "://" not in path and not os.path.isfile(path):
        raise ValueError(
            f"data.vocab {vocab!r} does not exist; expected 'byte' or the path of a "
            "SentencePiece .model file (scripts/data/train_spm.py makes one)"
        )
    extra_ids = 1 if objective == "mlm" and not _has_mask_piece(path) else 0
    return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


def _has_mask_piece(path: str) -> bool:
    if path in _KNOWN_WITHOUT_MASK:
        return False
    return MASK_PIECE in _pieces(path)


@functools.cache
def _pieces(path: str) -> dict[str, int]:
    try:  # gfile: gs:// paths too
        with tf.io.gfile.GFile(path, "rb") as f:
            model = sentencepiece_model_pb2.ModelProto.FromString(f.read())
    except Exception as e:  # any failure here means: not a readable model
        raise ValueError(
            f"data.vocab {path!r} could not be read as a SentencePiece model ({e})"
        ) from e
    if not model.pieces:
        raise ValueError(f"data.vocab {path!r} is not a SentencePiece model (no pieces)")
    return {p.piece: i for i, p in enumerate(model.pieces)}


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """BERT-style corruption ids: the mask token and the range [low, high) of random tokens."""

    mask_id: int
    random_low: int
    random_high: int


def mlm_mask_spec(vocab: seqio.Vocabulary) -> MaskSpec:
    if isinstance(vocab, seqio.ByteVocabulary):
        # Byte ids are 3..258; unk (2) never comes out of byte encoding, so it is free.
        return MaskSpec(mask_id=vocab.unk_id, random_low=3, random_high=vocab.vocab_size)
    if isinstance(vocab, seqio.SentencePieceVocabulary):
        pieces = _pieces(vocab.sentencepiece_model_file)
        reserved = {vocab.pad_id, vocab.eos_id, vocab.unk_id}
        if MASK_PIECE in pieces:
            mask_id = pieces[MASK_PIECE]
            reserved.add(mask_id)
        elif vocab.extra_ids:
            mask_id = vocab.vocab_size - 1  # <extra_id_0> (seqio numbers extra ids downwards)
        else:
            raise ValueError(
                f"data.vocab {vocab.sentencepiece_model_file!r} has no {MASK_PIECE} piece and no "
                "extra id; build it with get_vocabulary for objective 'mlm'"
            )
        # Random replacements come from the ordinary pieces that follow the reserved ids.
        low = max(i for i in reserved if i is not None) + 1
        return MaskSpec(mask_id=mask_id, random_low=low, random_high=len(pieces))
    raise ValueError(f"masked LM needs a byte or SentencePiece vocabulary, got {vocab!r}")
