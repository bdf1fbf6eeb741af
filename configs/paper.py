"""The paper's experiments (Hua et al., 2022, "Transformer Quality in Linear Time") in one helper.

Each `configs/<dataset>_<model>.py` file is one line over `paper_config(model, dataset, arg)`.
The argument is comma-separated: the context length (512 ... 8192; default 512), a model size
(flash_jax.models.SIZES: tiny, small, base, large; default base) and `smoke`:

    --config=configs/pg19_flash.py:8192          the paper's PG-19 run at 8192 tokens
    --config=configs/pg19_flash.py:8192,large    the bigger PG-19 scale (a guess, see below)
    --config=configs/pg19_flash.py:512,tiny      the paper's data and schedule, the tiny model
    --config=configs/pg19_flash.py:smoke         runs anywhere: see `smoke_scale`

`smoke` (size tiny unless one is given) keeps the model family, the context length and the
objective, and swaps in what a laptop CPU can run: the shipped corpus and vocabulary (no download),
a small batch, a short warm-up and few steps; the loss falls visibly within about a minute.

What comes from the paper (see docs/paper.md) and what is a guess is said per line.
"""

from configs import base
from flash_jax import models

CONTEXTS = (512, 1024, 2048, 4096, 8192)  # the paper's context lengths
MODELS = ("flash", "flash_quad", "transformer_plus", "transformer_pp", "performer", "combiner")
DATASETS = ("pg19", "wiki40b", "c4")
SMOKE = "smoke"
# Tokens per batch, held fixed across context lengths (paper); the value 2^18 is a documented guess.
TOKENS_PER_BATCH = 2**18
# T5's 32k SentencePiece vocabulary, padded to a multiple of 128 (as T5 does: 32128) so that
# sentinel / mask ids fit and the vocab dimension shards evenly.
T5_VOCAB_SIZE = 32128
# The smoke scale's batch: 4 rows of 512 tokens (at least one row at longer contexts).
SMOKE_TOKENS_PER_BATCH = 2048
SHIPPED_VOCAB_SIZE = 4096  # flash_jax/data/vocabs/austen_spm_4k.model

# Model sizes come from flash_jax.models.SIZES (one place): "base" (~110M parameters, BERT-Base
# shape) is the paper's speed-comparison scale: 12 Transformer layers of width 768, twice as many
# GAU layers for FLASH / FLASH-Quad. "large" stands for the bigger PG-19 scale (one aggregator
# says ~500M): NOT verified, a guess (24 Transformer layers of width 1024) keeping the 2x rule.


def parse_arg(arg) -> tuple[int, str, bool]:
    """'8192' -> (8192, 'base', False); '8192,large' -> (8192, 'large', False);
    'smoke' -> (512, 'tiny', True); '1024,small,smoke' -> (1024, 'small', True);
    None -> (512, 'base', False)."""
    context, size, smoke = None, None, False
    for part in str(arg).split(",") if arg else []:
        if part == SMOKE and not smoke:
            smoke = True
        elif part in models.SIZES and size is None:
            size = part
        elif part.isdigit() and int(part) in CONTEXTS and context is None:
            context = int(part)
        else:
            raise ValueError(
                f"config argument {arg!r}: the context length must be one of {CONTEXTS}, the "
                f"scale one of {tuple(models.SIZES)}, and {SMOKE!r} may be added (each once)"
            )
    return (
        512 if context is None else context,
        size or ("tiny" if smoke else "base"),
        smoke,
    )


def paper_config(model: str, dataset: str, arg=None):
    if model not in MODELS:
        raise ValueError(f"paper_config: model must be one of {MODELS}, got {model!r}")
    if dataset not in DATASETS:
        raise ValueError(f"paper_config: dataset must be one of {DATASETS}, got {dataset!r}")
    context, scale, smoke = parse_arg(arg)
    config = base.get_config()

    m = config.model
    m.name = model
    # Two GAU layers ~ one Transformer layer (3de with e = 2d vs 12d^2); e = 2d, s = 128: paper.
    m.update(models.preset(model, scale))
    if model in ("flash", "flash_quad", "performer"):
        m.chunk_size = 256  # C = 256: paper default (Performer: a cost choice, see ops.performer)
    if model == "combiner":
        # Spans of 128: the Combiner authors' Wiki-40B LM config (google-research combiner,
        # `max_seg_len = 128`); the FLASH paper does not say which it used (guess).
        m.chunk_size = 128
    # Performer: m = 256 FAVOR+ features per head (base.py), ~ d log d at head width 64 (guess:
    # the FLASH paper does not give it).
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
    if smoke:
        smoke_scale(config)
    return config


def smoke_scale(config) -> None:
    """The `smoke` setting: the same model family, context and objective, sized for a laptop CPU.

    The shipped corpus and 4k vocabulary stand in for the dataset (whichever it is) and T5's
    vocabulary; float32 compute (bfloat16 is slower on CPUs); 4 rows of 512 tokens; a warm-up of
    10 steps (the paper's 10,000 would keep the loss flat for hours) and 200 steps at a high peak
    rate; logged every 10 steps. Measured for pg19_flash.py:smoke on this project's 2-core CPU,
    shared with other jobs: 0.8-1.3 s a step after a 10 s compile; loss 8.66 at step 10, 6.09 at
    step 30, 5.61 at step 60.
    """
    m, d, t = config.model, config.data, config.train
    m.vocab_size = SHIPPED_VOCAB_SIZE
    m.dtype = "float32"
    d.source = "local"
    d.data_dir = base.SHIPPED_CORPUS
    d.vocab = base.SHIPPED_VOCAB
    d.batch_size = max(1, SMOKE_TOKENS_PER_BATCH // d.seq_len)
    d.shuffle_buffer = 256
    t.num_steps = 200
    t.warmup_steps = 10
    t.learning_rate = 3e-3
    t.log_every = 10
    t.eval_every = 100
    t.eval_batches = 2
    t.checkpoint_every = 100
    t.keep_checkpoints = 2
