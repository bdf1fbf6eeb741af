"""Input-pipeline throughput (tokenize, window, pack, batch) on this machine, per vocabulary.

    .venv/bin/python scripts/bench/bench_data.py                      # shipped corpus, both vocabs
    python scripts/bench/bench_data.py --seq_len=2048 --batch_size=16 --data_dir=/data/pg19

Two figures per vocabulary, in tokens (non-padding) per second on one host:
- cold: the first pass over the training split: read, tokenize, window, shuffle, pack, batch
  (timed from the first batch request; the pipeline's one-time build is shown apart);
- warm: later epochs of a small local corpus, whose tokenized documents stay in memory
  (window, shuffle, pack, batch only).
Prints a markdown table.
"""

from __future__ import annotations

import os
import time

from absl import flags

from flash_jax import cli, data
from flash_jax.config import DataConfig

FLAGS = flags.FlagValues()
flags.DEFINE_string("data_dir", data.SHIPPED_CORPUS, "Local corpus to read.", flag_values=FLAGS)
flags.DEFINE_list(
    "vocabs", [data.SHIPPED_VOCAB, "byte"], "Vocabularies to time.", flag_values=FLAGS
)
flags.DEFINE_integer("seq_len", 512, "Tokens per row.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 8, "Rows per batch.", flag_values=FLAGS)
flags.DEFINE_integer(
    "warm_batches", 2000, "Batches timed after the first epoch.", flag_values=FLAGS
)


def bench(args, vocab: str) -> dict:
    cfg = DataConfig(
        data_dir=args.data_dir, vocab=vocab, seq_len=args.seq_len, batch_size=args.batch_size
    )
    # Cold: one pass (repeat=False) over the split from the raw files, timed from the first
    # next() (building the pipeline, a one-time graph trace, is reported apart).
    start = time.perf_counter()
    pipe = data.InputPipeline(cfg, "train", seed=0, repeat=False, shard_index=0, num_shards=1)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    tokens = batches = 0
    for batch in pipe:
        tokens += int(batch["weights"].sum())
        batches += 1
    cold_s = time.perf_counter() - start
    pipe.close()
    # Warm: skip the first epoch's batches, then time the in-memory epochs.
    pipe = data.InputPipeline(cfg, "train", seed=0, shard_index=0, num_shards=1)
    for _ in range(batches + 10):
        next(pipe)
    start = time.perf_counter()
    warm_tokens = 0
    for _ in range(args.warm_batches):
        warm_tokens += int(next(pipe)["weights"].sum())
    warm_s = time.perf_counter() - start
    pipe.close()
    name = "byte" if vocab == "byte" else os.path.basename(vocab)
    return dict(
        vocab=name,
        epoch_tokens=tokens,
        build=build_s,
        cold=tokens / cold_s,
        warm=warm_tokens / warm_s,
    )


def main(argv=()):
    args = cli.parse_script_flags(FLAGS, argv, "bench_data.py")
    rows = [bench(args, v) for v in args.vocabs]
    print(
        f"\ninput pipeline, {os.cpu_count()} CPU cores, seq_len {args.seq_len}, "
        f"batch {args.batch_size}, corpus {os.path.basename(args.data_dir)} (train)\n"
    )
    print(
        "| vocabulary | tokens per epoch | build (s) | cold: first epoch (M tokens/s) | "
        "warm: cached epochs (M tokens/s) |"
    )
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['vocab']} | {r['epoch_tokens']:,} | {r['build']:.1f} | "
            f"{r['cold'] / 1e6:.2f} | {r['warm'] / 1e6:.2f} |"
        )


if __name__ == "__main__":
    cli.run_script(main, FLAGS)
