"""Exports a checkpoint's weights out of JAX: safetensors, the model config as JSON, the vocabulary.

    python scripts/export.py --workdir=runs/quickstart --out=runs/quickstart/export
    python scripts/export.py --workdir=runs/quickstart --step=200 --out=DIR --dtype=bfloat16

Writes into --out (created if needed; files of an earlier export there are replaced):

    model.safetensors    every parameter, one flat tensor per layer and parameter, float32 (or
                         --dtype=bfloat16); metadata {"source": "flash_jax", "model": <name>}
    config.json          the model config (ModelConfig's fields: name, num_layers, d_model, ...)
                         plus "export": {workdir, step, dtype, vocabulary}, where vocabulary says
                         kind ("sentencepiece" or "byte"), size, pad_id / eos_id / unk_id and,
                         for SentencePiece, the file and extra_ids (ids after the model's pieces)
    sentencepiece.model  the run's SentencePiece vocabulary (none for the byte vocabulary)

`flash_jax.export.numpy_model.load(DIR)` reads it back; `numpy_model.forward` gives the JAX
model's logits (float64 numpy, written for reading). Inputs are conditioned as in training:
position 0 of each document sees the start token 0 (the shifted-in padding id), then the
document's tokens.

Parameter names and shapes. V = vocab_size, d = d_model, e = expansion_dim, s = qk_dim,
n = max_len, C = chunk_size, H = num_heads, k = d / H, m = mlp_dim, i = 0 ... num_layers - 1.
Dense kernels are [in..., out...] and compute x . kernel + bias (PyTorch's Linear weight is the
transpose). Norms: scale norm is `<norm>.scale` [] (one scalar); layer norm is `<norm>.scale` [d]
and `<norm>.bias` [d].

    every model      embed.table [V, d]; final_norm.*; head.kernel [d, V] (absent with
                     tie_embeddings: the logits use embed.table transposed)
    transformer      position_embed [n, d] (learned absolute positions, added to the embedding)

    flash, flash_quad, per layer (the GAU):
      layers.i.norm.*
      layers.i.proj_in.kernel [d, 2e + s], .bias [2e + s]    silu, then split into u, v, z at e, 2e
      layers.i.heads.gamma [h, s], .beta [h, s]              head j = z * gamma[j] + beta[j]; h = 4
                                                             for flash (quad q, quad k, linear q,
                                                             linear k), 2 for flash_quad (q, k)
      layers.i.rel_bias.weight [2C - 1] (flash) or [2n - 1] (flash_quad): Toeplitz bias,
          w[offset + span - 1]; or layers.i.rel_bias.a [s], .b [s]: the RoPE-form bias
          (R_i a) . (R_j b); neither with rel_pos=none
      layers.i.proj_out.kernel [e, d], .bias [d]

    transformer, transformer_plus, transformer_pp, performer, combiner, per layer:
      layers.i.attention_norm.*, layers.i.mlp_norm.*
      layers.i.attention.query / key / value .kernel [d, H, k], .bias [H, k]
      layers.i.attention.out.kernel [H, k, d], .bias [d]
      layers.i.mlp.wi.kernel [d, m], .bias [m]; layers.i.mlp.wo.kernel [m, d], .bias [d]
      transformer_pp, performer, combiner (SwiGLU, silu(x . wg) * (x . wi)): wg and wi [d, m'],
          wo [m', d] with m' = floor(2m / 3)
      performer: layers.i.attention.features [M, k], M = random_features: FAVOR+'s fixed random
          features W (not trained: drawn from the seed at init), shared by the layer's heads

A missing checkpoint, step or workdir, or an --out that cannot be written (checked first), gives
one line on stderr and exit code 1, and writes nothing. Runs on one device (the first); the config
defaults to the checkpoint's own.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from flash_jax import cli
from flash_jax.cli import console

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (optional; default: the checkpoint's own).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_OUT = flags.DEFINE_string("out", None, "Folder to write model.safetensors, config.json and vocab.")
_DTYPE = flags.DEFINE_string(
    "dtype", "float32", "Dtype of the exported tensors: float32 or bfloat16."
)
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show every library's startup lines and INFO logs (TensorFlow, XLA, ...)."
)
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import jax

    from flash_jax.export import weights
    from flash_jax.train import checkpoint_reader

    if _DTYPE.value not in weights.DTYPES:
        cli.fail("export.py", f"--dtype must be one of {weights.DTYPES}, got {_DTYPE.value!r}", 2)
    logging.set_verbosity(logging.INFO)
    cli.quiet_library_logs("export.py", verbose=_VERBOSE.value)
    try:
        weights.check_out(_OUT.value)  # before the checkpoint is read
        run = checkpoint_reader.restore(
            _WORKDIR.value, _STEP.value, config=_CONFIG.value, single_device=True
        )
        paths = weights.export(run, _OUT.value, _DTYPE.value)
    except ValueError as e:
        cli.fail("export.py", str(e), 1)
    num_params = sum(int(x.size) for x in jax.tree.leaves(run.params))
    logging.info(
        "exported %s step %d (%s, %s parameters, %s)",
        _WORKDIR.value,
        run.step,
        run.model_config.name,
        f"{num_params:,}",
        _DTYPE.value,
    )
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    console.quiet(sys.argv)  # before TensorFlow and XLA load: their startup lines stay off
    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, _CONFIG, "export.py"))
