"""The replication runs (scripts/replicate.py): models of about the same parameter count, trained
under one budget (same steps, same tokens per step) on the shipped corpus (the default data
config of configs/base.py), evaluated on the validation split.

    python train.py --config=configs/replicate.py:flash --workdir=runs/replicate/flash
    python train.py --config=configs/replicate.py:performer,long --workdir=...
    python train.py --config=configs/replicate.py:transformer_pp,accelerator --workdir=...

The argument is `<model>[,<setting>]`: model one of MODELS, setting one of SETTINGS (default "cpu").
Each setting lists the models scripts/replicate.py trains by default.

- "cpu": ~1.9M-parameter models (width 128, vocabulary 4k; 4 Transformer++ layers, 8 GAU layers),
  256-token context, 8 x 256 = 2,048 tokens per step, 300 steps each (0.6-1.0 s per step on
  2 shared CPU cores, measured): the three runs took 15 minutes there.
- "long": the paper's long-context claim on a CPU: FLASH, FLASH-Quad, Transformer++, Performer
  and Combiner at the "cpu" setting's width and depth, at 2,048-token contexts (C = 256: 8 chunks
  per sequence; Combiner spans of 128 as in paper.py), 1 x 2,048 tokens per step, 250 steps
  each, evaluated every 25 steps on 8 validation windows of 2,048 tokens. Sized to finish in
  under an hour on 2 shared CPU cores (measured time in docs/results/replicate_long_cpu.md).
- "accelerator": the `small` preset of flash_jax.models (width 512, 6 Transformer++ / 12 GAU
  layers, ~25M parameters with the 4k vocabulary), 1,024-token context, 32 x 1,024 tokens per step,
  bf16 compute, 10k steps. A documented setting for one GPU / TPU host, not run here.

FLASH-family models get twice the Transformer's layers at the same width (flash_jax.models.preset
and docs/model.md: two GAU layers ~ one Transformer layer in parameters and cost).
"""

from configs import base
from flash_jax import models

MODELS = ("flash", "flash_quad", "transformer_pp", "performer", "combiner")
SETTINGS = {
    # setting: model size preset knobs and the training budget
    "cpu": dict(
        size="tiny",  # width 128 (flash_jax.models.SIZES)
        transformer_layers=4,
        qk_dim=64,  # s: 64 rather than the paper's 128 at this tiny width (keeps params matched)
        chunk_size=64,  # C: 4 chunks per 256-token sequence, so FLASH's linear part is exercised
        seq_len=256,
        batch_size=8,
        num_steps=300,
        warmup_steps=30,
        learning_rate=3e-3,  # small models, short run: a high peak rate (as configs/quickstart.py)
        eval_every=20,
        eval_batches=6,
        dtype="float32",  # CPU: no bf16 speed-up
        models=("flash", "flash_quad", "transformer_pp"),
    ),
    "long": dict(
        size="tiny",
        transformer_layers=4,
        qk_dim=64,
        chunk_size=256,  # C = 256: paper default (Combiner: spans of 128, see get_config)
        seq_len=2048,
        batch_size=1,
        num_steps=250,
        warmup_steps=25,
        learning_rate=3e-3,
        eval_every=25,
        eval_batches=8,
        dtype="float32",
        models=("flash", "flash_quad", "transformer_pp", "performer", "combiner"),
    ),
    "accelerator": dict(
        size="small",
        transformer_layers=models.SIZES["small"][0],
        qk_dim=128,  # s = 128: paper
        chunk_size=256,  # C = 256: paper default
        seq_len=1024,
        batch_size=32,
        num_steps=10_000,
        warmup_steps=500,
        learning_rate=1e-3,  # documented guess (T5-era LM training at this width)
        eval_every=500,
        eval_batches=32,
        dtype="bfloat16",
        models=MODELS,
    ),
}


def parse_arg(arg) -> tuple[str, str]:
    """'flash' -> ('flash', 'cpu'); 'flash,accelerator' -> ('flash', 'accelerator')."""
    parts = str(arg or "flash").split(",")
    model = parts[0]
    setting = parts[1] if len(parts) > 1 else "cpu"
    if model not in MODELS or setting not in SETTINGS or len(parts) > 2:
        raise ValueError(
            f"config argument {arg!r}: expected <model>[,<setting>] with model one of {MODELS} "
            f"and setting one of {tuple(SETTINGS)}"
        )
    return model, setting


def get_config(arg=None):
    model, setting = parse_arg(arg)
    s = SETTINGS[setting]
    config = base.get_config()  # the data config stays the default: the shipped Austen corpus

    m = config.model
    m.update(models.preset(model, s["size"], layers=s["transformer_layers"]))
    m.qk_dim = s["qk_dim"]
    # Combiner's spans: 128 at contexts of 2,048 and more (the Combiner authors' LM config, as in
    # configs/paper.py), at most the setting's chunk.
    m.chunk_size = min(128, s["chunk_size"]) if model == "combiner" else s["chunk_size"]
    m.vocab_size = 4096  # the shipped 4k SentencePiece vocabulary
    m.max_len = s["seq_len"]  # also FLASH-Quad's fixed score scale n
    m.dtype = s["dtype"]

    d = config.data
    d.seq_len = s["seq_len"]
    d.batch_size = s["batch_size"]

    t = config.train
    t.num_steps = s["num_steps"]
    t.warmup_steps = s["warmup_steps"]
    t.learning_rate = s["learning_rate"]
    t.decay = "cosine"
    t.eval_every = s["eval_every"]
    t.eval_batches = s["eval_batches"]
    # Logging at every eval step too, so that each eval point has an exact training-time stamp.
    t.log_every = min(20, s["eval_every"])
    t.checkpoint_every = s["num_steps"]  # the budget is short: checkpoint at the end only
    t.keep_checkpoints = 1
    return config
