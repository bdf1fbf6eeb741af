"""Base configuration: every experiment file imports this and changes a few keys.

Keys here are a contract: `flash_jax`, `train.py`, `eval.py`, the scripts and tests rely on them.
Dtypes are names ("bfloat16", "float32") so that `--config.model.dtype=float32` works.
"""

import os

import ml_collections

from flash_jax import sharding

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The default corpus and vocabulary ship inside the package (no download needed).
SHIPPED_CORPUS = os.path.join(_REPO, "flash_jax", "data", "corpora", "austen-pg19.tar.xz")
SHIPPED_VOCAB = os.path.join(_REPO, "flash_jax", "data", "vocabs", "austen_spm_4k.model")
# The paper-scale default: T5's 32k SentencePiece vocabulary (needs GCS access).
T5_VOCAB = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"

# Logical axis name -> mesh axes (see flash_jax/sharding.py): parameters and activations are
# annotated with logical names; this table decides data / FSDP / tensor parallelism.
DEFAULT_RULES = sharding.DEFAULT_RULES


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0

    # ---- model (flash_jax.config.ModelConfig is built from this) ----
    config.model = m = ml_collections.ConfigDict()
    # flash | flash_quad | transformer | transformer_plus | transformer_pp | performer | combiner
    m.name = "flash"
    m.num_layers = 4
    m.d_model = 256
    m.expansion_dim = 512  # e = 2d
    m.qk_dim = 128  # s
    # C: FLASH's chunk (the paper uses 256), Combiner's span, Performer's prefix-sum chunk
    m.chunk_size = 128
    m.num_heads = 4  # Transformer baselines only
    m.mlp_dim = 1024  # Transformer FFN hidden width (4d; SwiGLU uses 2/3 of it per branch)
    m.random_features = 256  # Performer only: FAVOR+ random features per head (m ~ d log d)
    m.vocab_size = 4096  # must be >= the data vocabulary's size
    m.max_len = 512  # the training length: also FLASH-Quad's fixed score scale n
    m.causal = True  # False: bidirectional (masked LM)
    m.dtype = "float32"  # compute dtype; "bfloat16" on accelerators
    m.param_dtype = "float32"
    m.norm = "scale_norm"  # scale_norm | layer_norm
    m.rel_pos = "auto"  # auto (toeplitz up to 512, rope beyond) | toeplitz | rope | none
    # none | full | save_proj (keep the tagged projection outputs, recompute the rest) |
    # save_attn (save_proj + the attention outputs: the backward never reruns attention)
    m.remat = "none"
    # Transformer MHSA (flash_jax.ops.dot_product): auto (splash on TPU, cuDNN on GPU in bf16,
    # else XLA) | xla | cudnn | splash
    m.attention_impl = "auto"
    # FLASH's mixed chunk attention (flash_jax.ops.mixed_chunk_attention): auto (XLA until a
    # fused kernel is measured faster on hardware; see ops.attention.flash_impl_for) | xla |
    # pallas_tpu | pallas_gpu
    m.flash_impl = "auto"
    m.tie_embeddings = False

    # ---- data (flash_jax.data) ----
    config.data = d = ml_collections.ConfigDict()
    d.dataset = "pg19"  # pg19 | wiki40b | c4
    d.objective = "lm"  # lm | mlm
    d.source = "local"  # tfds | local
    d.data_dir = SHIPPED_CORPUS  # local: PG-19-layout folder/.tar.xz or folder of .txt
    d.tfds_data_dir = ""  # tfds: TFDS data dir ("" = TFDS default)
    d.vocab = SHIPPED_VOCAB  # "byte" or a SentencePiece model path
    d.seq_len = 512
    d.batch_size = 8  # global, over all hosts
    d.mask_rate = 0.15  # mlm only
    d.shuffle_buffer = 1024
    d.prefetch = 2
    # "" tokenizes on the fly; a folder (local or gs://) reads seqio's offline cache of the task
    # there, built by scripts/cache_data.py (or seqio's cache_tasks_main; see the README)
    d.use_cached = ""

    # ---- training (flash_jax.trainer) ----
    config.train = t = ml_collections.ConfigDict()
    t.num_steps = 1000
    t.log_every = 10
    t.eval_every = 200
    t.eval_batches = 8
    t.eval_split = "validation"  # the split periodic eval reads
    t.checkpoint_every = 200
    t.keep_checkpoints = 3
    t.optimizer = "adamw"  # adamw | adafactor
    t.learning_rate = 1e-3
    t.warmup_steps = 100
    t.decay = "cosine"  # cosine | linear | rsqrt | constant
    t.end_learning_rate_fraction = 0.1
    t.b1 = 0.9
    t.b2 = 0.98
    t.weight_decay = 0.01
    t.grad_clip = 1.0
    t.grad_accum_steps = 1

    # ---- device mesh ----
    config.mesh = ms = ml_collections.ConfigDict()
    ms.axis_names = ("data", "fsdp", "tensor")
    ms.shape = (-1, 1, 1)  # -1 fills an axis with the remaining devices
    ms.rules = DEFAULT_RULES  # override to change the parallelism layout
    return config
