"""Prints a markdown table of parameter counts for every model at every size preset.

    python scripts/param_counts.py [--vocab_size=32000] [--max_len=1024]

Counts come from abstract shapes (nnx.eval_shape): nothing is allocated, so even `large` is instant.
"""

import argparse

from flax import nnx

from flash_jax import models
from flash_jax.config import ModelConfig


def count(name: str, size: str, vocab_size: int, max_len: int) -> tuple[int, int]:
    overrides = models.preset(name, size)
    cfg = ModelConfig(**{**overrides, "vocab_size": vocab_size, "max_len": max_len})
    abstract = nnx.eval_shape(lambda: models.create(cfg, rngs=nnx.Rngs(0)))
    return overrides["num_layers"], models.count_params(abstract)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--max_len", type=int, default=1024)
    args = parser.parse_args()
    names = list(models.LAYER_TYPES)
    print("| size | d_model | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for size, (_, d_model, _) in models.SIZES.items():
        cells = []
        for name in names:
            layers, params = count(name, size, args.vocab_size, args.max_len)
            cells.append(f"{params / 1e6:.1f}M ({layers} layers)")
        print(f"| {size} | {d_model} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
