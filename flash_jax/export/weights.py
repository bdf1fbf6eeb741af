"""Trained weights out of JAX: a checkpoint as a flat safetensors file, config.json and the
vocabulary (scripts/export.py is the command; its docstring lists the names and shapes).

    from flash_jax.export import weights
    from flash_jax.train import checkpoint_reader
    run = checkpoint_reader.restore("runs/quickstart", single_device=True)
    weights.export(run, "runs/quickstart/export", dtype="float32")

`flash_jax.export.numpy_model` reads the folder back and computes the same logits in numpy.
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from flash_jax.export.numpy_model import CONFIG_FILE, WEIGHTS_FILE
from flash_jax.layers.transformer import RandomFeatures
from flash_jax.train import checkpoint_format

DTYPES = ("float32", "bfloat16")
# What the file holds of a model: its parameters, and Performer's fixed random features
# (non-trained state drawn from the seed, but part of the function the model computes).
EXPORTED = (nnx.Param, RandomFeatures)
SENTENCEPIECE_FILE = "sentencepiece.model"


def parameter_tensors(params: nnx.State, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Flat names -> numpy arrays in `dtype`: the nnx path joined by dots (`embed.table`,
    `final_norm.scale`), and the scanned layer stack [num_layers, ...] cut into one tensor per
    layer (`layers.3.proj_in.kernel`). The state of a single layer gives names without `layers.`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    flat = sorted(nnx.to_flat_state(params), key=lambda item: tuple(map(str, item[0])))
    tensors, layers = {}, {}
    for path, leaf in flat:
        # nnx.Param leaves from a live model, plain arrays from a restored checkpoint.
        array = leaf.value if isinstance(leaf, nnx.Variable) else leaf
        value = np.asarray(jax.device_get(jnp.asarray(array).astype(dtype)))
        if path[0] == "layers":
            rest = ".".join(map(str, path[1:]))
            for i, layer_value in enumerate(value):
                layers.setdefault(i, {})[f"layers.{i}.{rest}"] = layer_value
        else:
            tensors[".".join(map(str, path))] = value
    for i in sorted(layers):
        tensors.update(layers[i])
    return tensors


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]):
    """Writes name -> array to a safetensors file: float32 as F32, `ml_dtypes.bfloat16` (what
    `np.asarray` gives for a JAX bfloat16 array) as BF16."""
    # The package copies each array's memory as it lies, whatever its strides: C order first
    # (np.asarray keeps a scalar 0-d, where np.ascontiguousarray would make it 1-d).
    contiguous = {name: np.asarray(array, order="C") for name, array in tensors.items()}
    safetensors.numpy.save_file(contiguous, path, metadata=metadata)


def vocabulary_entry(data_config) -> dict:
    """config.json's description of the run's vocabulary; ValueError if its file is unreadable."""
    import tensorflow as tf  # with flash_jax.data: imported only when exporting

    from flash_jax import data

    vocab = data.get_vocabulary(data_config)
    ids = dict(pad_id=vocab.pad_id, eos_id=vocab.eos_id, unk_id=vocab.unk_id)
    if str(data_config.vocab) == "byte":
        return dict(kind="byte", size=vocab.vocab_size, first_byte_id=3, **ids)
    try:  # through gfile: the vocabulary may live on gs://
        size = vocab.vocab_size  # reads the model
        found = tf.io.gfile.exists(str(data_config.vocab))
    except (tf.errors.OpError, OSError) as e:
        reason = str(getattr(e, "message", e)).splitlines()[0]
        raise ValueError(f"data.vocab {data_config.vocab!r} cannot be read ({reason})") from e
    if not found:
        raise ValueError(f"data.vocab {data_config.vocab!r} does not exist")
    return dict(
        kind="sentencepiece",
        file=SENTENCEPIECE_FILE,
        size=size,
        extra_ids=vocab.extra_ids,  # ids appended after the model's pieces (masked LM)
        **ids,
    )


def check_out(out_dir: str) -> None:
    """ValueError (one line naming `out_dir`) if a local `out_dir` cannot be created or written:
    its nearest existing folder is a file, or refuses a file (read-only, no permission). Writes
    nothing that stays."""
    if "://" in out_dir:  # gs:// and the like: the write itself reports
        return
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--out {out_dir!r} cannot be a folder: {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ValueError(f"--out {out_dir!r} cannot be written: {e.strerror} ({existing})") from e


def save(out_dir: str, params: nnx.State, model_config, dtype: str = "float32", **extra) -> list:
    """Writes model.safetensors and config.json (the model config, plus `extra` under "export")
    into `out_dir`, created if needed; returns their paths. `params`: `nnx.state(model,
    EXPORTED)` (parameters, and random features where the model has them)."""
    tensors = parameter_tensors(params, dtype)
    config = checkpoint_format.model_config_dict(model_config)
    config["export"] = dict(dtype=dtype, **extra)
    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, WEIGHTS_FILE)
    write_safetensors(weights, tensors, metadata={"source": "flash_jax", "model": config["name"]})
    config_path = os.path.join(out_dir, CONFIG_FILE)
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return [weights, config_path]


def export(run, out_dir: str, dtype: str = "float32") -> list[str]:
    """Writes `run` (a `checkpoint_reader.Restored`) into `out_dir`: model.safetensors,
    config.json and, for a SentencePiece vocabulary, sentencepiece.model. Returns the paths
    written. Bad input (dtype, an unreadable vocabulary) is a ValueError before anything is
    written."""
    import tensorflow as tf

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    vocabulary = vocabulary_entry(run.config.data)
    written = save(
        out_dir,
        nnx.state(run.model(), EXPORTED),
        run.model_config,
        dtype,
        workdir=str(run.workdir),
        step=int(run.step),
        vocabulary=vocabulary,
    )
    if vocabulary["kind"] == "sentencepiece":
        written.append(os.path.join(out_dir, SENTENCEPIECE_FILE))
        tf.io.gfile.copy(str(run.config.data.vocab), written[-1], overwrite=True)
    return written
