"""The paper's experiments (Hua et al., 2022, "Transformer Quality in Linear Time") in one helper.

Each `configs/<dataset>_<model>.py` file is one line over `paper_config(model, dataset, arg)`.
The argument is the context length (512 ... 8192), optionally followed by ",large" for the bigger
PG-19 scale: `--config=configs/pg19_flash.py:8192` or `--config=configs/pg19_flash.py:8192,large`.

What comes from the paper (see shared/docs/paper-notes.md) and what is a guess is said per line.
"""

from configs import base
from flash_jax import models

CONTEXTS = (512, 1024, 2048, 4096, 8192)  # the paper's context lengths
MODELS = ("flash", "flash_quad", "transformer_plus", "transformer_pp")
DATASETS = ("pg19", "wiki40b", "c4")
SCALES = ("base", "large")
# Tokens per batch, held fixed across context lengths (paper); the value 2^18 is a documented guess.
TOKENS_PER_BATCH = 2**18
# T5's 32k SentencePiece vocabulary, padded to a multiple of 128 (as T5 does: 32128) so that
# sentinel / mask ids fit and the vocab dimension shards evenly.
T5_VOCAB_SIZE = 32128

# Model sizes come from flash_jax.models.SIZES (one place): "base" (~110M parameters, BERT-Base
# shape) is the paper's speed-comparison scale: 12 Transformer layers of width 768, twice as many
# GAU layers for FLASH / FLASH-Quad. "large" stands for the bigger PG-19 scale (one aggregator
# says ~500M): NOT verified, a guess (24 Transformer layers of width 1024) keeping the 2x rule.


def parse_arg(arg) -> tuple[int, str]:
    """'8192' -> (8192, 'base'); '8192,large' -> (8192, 'large'); None -> (512, 'base')."""
    if arg is None or arg == "":
        return 512, "base"
    parts = str(arg).split(",")
    try:
        context = int(parts[0])
    except ValueError:
        raise ValueError(
            f"config argument {arg!r}: the context length must be one of {CONTEXTS}"
        ) from None
    if context not in CONTEXTS:
        raise ValueError(f"config argument {arg!r}: context length must be one of {CONTEXTS}")
    scale = parts[1] if len(parts) > 1 else "base"
    if scale not in SCALES or len(parts) > 2:
        raise ValueError(f"config argument {arg!r}: the scale after ',' must be one of {SCALES}")
    return context, scale


def paper_config(model: str, dataset: str, arg=None):
    if model not in MODELS:
        raise ValueError(f"paper_config: model must be one of {MODELS}, got {model!r}")
    if dataset not in DATASETS:
        raise ValueError(f"paper_config: dataset must be one of {DATASETS}, got {dataset!r}")
    context, scale = parse_arg(arg)
    config = base.get_config()

    m = config.model
    m.name = model
    # Two GAU layers ~ one Transformer layer (3de with e = 2d vs 12d^2); e = 2d, s = 128: paper.
    m.update(models.preset(model, scale))
    if model in ("flash", "flash_quad"):
        m.chunk_size = 256  # C = 256: paper default
    m.vocab_size = T5_VOCAB_SIZE
    m.max_len = context  # also FLASH-Quad's fixed score scale n = the training length
    m.causal = dataset != "c4"  # C4 is the paper's masked-LM task (bidirectional)
    m.dtype = "bfloat16"  # bf16 compute, float32 parameters
    m.param_dtype = "float32"

    d = config.data
    d.dataset = dataset
    d.objective = "mlm" if dataset == "c4" else "lm"
    d.source = "tfds"
    d.vocab = base.T5_VOCAB  # guess: the paper's vocabulary is not stated; T5's is the default
    d.seq_len = context
    d.batch_size = TOKENS_PER_BATCH // context  # 512 sequences at 512 ... 32 at 8192

    t = config.train
    t.num_steps = 125_000  # paper: the main comparisons at 125K steps
    # Optimizer values are not in the sources we have: standard choices for ~100M-parameter
    # T5-era language models, marked as guesses.
    t.optimizer = "adamw"
    t.learning_rate = 7e-4  # guess
    t.warmup_steps = 10_000  # guess (8% of training)
    t.decay = "cosine"  # guess
    t.end_learning_rate_fraction = 0.1  # guess
    t.b1, t.b2 = 0.9, 0.98  # guess (RoBERTa / T5-era)
    t.weight_decay = 0.01  # guess
    t.grad_clip = 1.0  # guess
    t.log_every = 100
    t.eval_every = 5000
    t.eval_batches = 16  # 16 x 2^18 = ~4M validation tokens per eval
    t.checkpoint_every = 5000
    t.keep_checkpoints = 3
    return config
