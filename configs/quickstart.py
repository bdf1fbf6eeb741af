"""A small FLASH model on the shipped Austen corpus: trains visibly on a laptop CPU in minutes.

    python train.py --config=configs/quickstart.py --workdir=runs/quickstart   (or: make train)

Sweep (see scripts/sweep.py): the paper's model families at the same small size.
"""

from configs import base


def get_config(arg=None):
    del arg  # no argument: the context length is fixed at 128
    config = base.get_config()
    m = config.model
    m.name = "flash"
    m.num_layers = 4
    m.d_model = 128
    m.expansion_dim = 256  # e = 2d
    m.qk_dim = 64
    m.chunk_size = 32  # 4 chunks per sequence, so the linear (cross-chunk) part is exercised
    m.num_heads = 4  # Transformer baselines in the sweep
    m.mlp_dim = 512
    m.vocab_size = 4096  # the shipped 4k SentencePiece vocabulary
    m.max_len = 128
    m.dtype = "float32"  # CPU: no bf16 speed-up

    d = config.data
    d.seq_len = 128
    d.batch_size = 8
    d.shuffle_buffer = 256

    t = config.train
    t.num_steps = 400
    t.learning_rate = 3e-3  # small model, short run: a high peak rate
    t.warmup_steps = 50
    t.decay = "cosine"
    t.log_every = 20
    t.eval_every = 200
    t.eval_batches = 4
    t.checkpoint_every = 200
    t.keep_checkpoints = 2
    return config


def sweep():
    """One run per model family, same size and data (`scripts/sweep.py configs/quickstart.py`)."""
    return [
        {"model.name": name}
        for name in ("flash", "flash_quad", "transformer_plus", "transformer_pp")
    ]
