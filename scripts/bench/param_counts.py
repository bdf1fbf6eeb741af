"""Prints a markdown table of parameter counts for every model at every size preset.

    python scripts/bench/param_counts.py [--vocab_size=32000] [--max_len=1024]

Counts come from abstract shapes (nnx.eval_shape): nothing is allocated, so even `large` is instant.
"""

from absl import flags
from flax import nnx

from flash_jax import cli, models
from flash_jax.config import ModelConfig

FLAGS = flags.FlagValues()
flags.DEFINE_integer("vocab_size", 32000, "Vocabulary size.", flag_values=FLAGS)
flags.DEFINE_integer(
    "max_len", 1024, "Training length (position table, biases).", flag_values=FLAGS
)


def count(name: str, size: str, vocab_size: int, max_len: int) -> tuple[int, int]:
    overrides = models.preset(name, size)
    cfg = ModelConfig(**{**overrides, "vocab_size": vocab_size, "max_len": max_len})
    abstract = nnx.eval_shape(lambda: models.create(cfg, rngs=nnx.Rngs(0)))
    return overrides["num_layers"], models.count_params(abstract)


def main(argv=()):
    args = cli.parse_script_flags(FLAGS, argv, "param_counts.py")
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
    cli.run_script(main, FLAGS)
