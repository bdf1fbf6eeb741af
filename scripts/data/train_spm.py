"""Trains a SentencePiece vocabulary offline from a local corpus (T5 ids: pad=0, eos=1, unk=2).

    .venv/bin/python scripts/data/train_spm.py                      # the shipped vocab, from Austen
    .venv/bin/python scripts/data/train_spm.py --data_dir=/data/pg19 --vocab_size=32000 \
        --output=/tmp/pg19_32k.model

The corpus is read through flash_jax.data's local reader (PG-19-layout folder or .tar.xz, or a
folder of .txt), one training sentence per non-empty line of the `--split` documents.

Conventions: pad=0, eos=1, unk=2, no bos (T5's), then a `<mask>` piece at id 3 for masked LM.
Normalization is the identity and extra whitespace is kept, so decoding gives back the exact text
(newlines included, through byte fallback): bits per byte are then measured on the real bytes.
Byte fallback also means no unknown tokens on text the corpus never showed (other books, accents).
"""

from __future__ import annotations

import os

import sentencepiece as spm
from absl import app, flags

from flash_jax import cli
from flash_jax.config import SHIPPED_CORPUS, SHIPPED_VOCAB
from flash_jax.data import sources, vocabularies

_DATA_DIR = flags.DEFINE_string(
    "data_dir", SHIPPED_CORPUS, "corpus: PG-19-layout folder or .tar.xz, or a folder of .txt files"
)
_SPLIT = flags.DEFINE_string("split", "train", "split to train on")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 4096, "number of pieces, special ones included")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"], "SentencePiece type")
_OUTPUT = flags.DEFINE_string("output", SHIPPED_VOCAB, "where to write the .model")
_MAX_SENTENCES = flags.DEFINE_integer(
    "max_sentences", 5_000_000, "sample at most this many lines (SentencePiece's memory bound)"
)


def train(
    data_dir: str,
    split: str,
    vocab_size: int,
    output: str,
    model_type: str = "unigram",
    max_sentences: int = 5_000_000,
) -> None:
    corpus = sources.LocalCorpus(data_dir)
    paths = corpus.files(split)

    def lines():
        for text in sources.read_documents(paths):
            for line in text.splitlines():
                if line.strip():
                    yield line

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(),
            model_writer=f,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            user_defined_symbols=[vocabularies.MASK_PIECE],
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    print(f"wrote {output} ({vocab_size} pieces, from {len(paths)} {split} documents)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        train(
            _DATA_DIR.value,
            _SPLIT.value,
            _VOCAB_SIZE.value,
            _OUTPUT.value,
            _MODEL_TYPE.value,
            _MAX_SENTENCES.value,
        )
    except ValueError as e:
        cli.fail("train_spm.py", str(e), 1)


if __name__ == "__main__":
    app.run(main)
