"""Weights out of JAX: scripts/export.py, flash_jax.export.weights, the safetensors file (read
back by the `safetensors` package, an independent reader) and flash_jax.export.numpy_model against
the JAX logits of every model family and of the quickstart model trained by the project's own
loop."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from flax import nnx

from flash_jax import models
from flash_jax.export import numpy_model, weights
from flash_jax.train import checkpoint_format, checkpoint_reader
from tests.helpers import REPO, TINY, packed_segments, random_tokens, randomise, tiny_model_config

ALL_MODELS = list(models.LAYER_TYPES)

# float32 JAX against float64 numpy. The numpy side is exact to ~1e-16, so the difference is JAX's
# float32 rounding (unit 2^-24 = 6e-8). A float32 sum of K products carries a relative error of
# about sqrt(K) * 2^-24 (rounding errors add like a random walk; K * 2^-24 at worst); K <= 256 in
# these models (256 = the quickstart's e), so ~1e-6 per contraction. A logit goes through about
# three contractions per layer (projection in, attention, projection out; the squared ReLU doubles
# a relative error) in at most 4 layers, then the head: ~15 in series, ~1.5e-5 if all of them
# erred the same way. Allowed: 2e-5 of the largest |logit|. (Measured: below 1e-6.)
TOLERANCE = 2e-5


def assert_logits_match(got, want, real=None):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if real is not None:  # logits at padding positions carry no meaning
        got, want = got[real], want[real]
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE * np.abs(want).max())


def save_and_load(tmp_path, model, cfg, dtype="float32"):
    weights.save(str(tmp_path), nnx.state(model, weights.EXPORTED), cfg, dtype)
    return numpy_model.load(str(tmp_path))


# ----------------------------------------------------------------------------- the file format


def test_written_tensors_are_read_back_by_the_safetensors_package_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "matrix": rng.normal(size=(3, 5)).astype(np.float32),
        "scalar": np.array(1.5, np.float32),
        "stack": rng.normal(size=(2, 3, 4)).astype(np.float32),
        "transposed": rng.normal(size=(4, 3)).astype(np.float32).T,  # not C-contiguous
        "half": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
    }
    path = str(tmp_path / "t.safetensors")
    weights.write_safetensors(path, tensors, metadata={"source": "flash_jax", "model": "flash"})

    theirs = safetensors.numpy.load_file(path)
    with safetensors.safe_open(path, framework="numpy") as f:
        metadata = f.metadata()
    header = {
        name: info["dtype"] for name, info in safetensors.deserialize(open(path, "rb").read())
    }
    assert metadata == {"source": "flash_jax", "model": "flash"}
    assert header == {"matrix": "F32", "scalar": "F32", "stack": "F32", "transposed": "F32"} | {
        "half": "BF16"
    }
    assert set(theirs) == set(tensors)
    for name, want in tensors.items():
        assert theirs[name].dtype == want.dtype and theirs[name].shape == want.shape, name
        assert theirs[name].tobytes() == want.tobytes(), name  # C order, bit for bit


def test_the_safetensors_package_reads_an_export_bit_for_bit(tmp_path):
    cfg = tiny_model_config("flash")
    model = models.create(cfg, rngs=nnx.Rngs(0))
    randomise(model, 1)
    params = nnx.state(model, weights.EXPORTED)
    weights.save(str(tmp_path), params, cfg)
    path = str(tmp_path / numpy_model.WEIGHTS_FILE)

    theirs = safetensors.numpy.load_file(path)
    with safetensors.safe_open(path, framework="numpy") as f:
        assert f.metadata() == {"source": "flash_jax", "model": "flash"}
    want = weights.parameter_tensors(params)
    assert set(theirs) == set(want)
    for name, value in want.items():
        assert theirs[name].dtype == np.float32 and theirs[name].shape == value.shape, name
        assert theirs[name].tobytes() == value.tobytes(), name


def test_reading_a_file_that_is_not_safetensors_is_named(tmp_path):
    (tmp_path / numpy_model.CONFIG_FILE).write_text("{}")
    path = tmp_path / numpy_model.WEIGHTS_FILE
    path.write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match=f"{path} is not a safetensors file"):
        numpy_model.load(str(tmp_path))


# ----------------------------------------------------------------------------- names and shapes


def documented_shapes(name, cfg):
    """scripts/export.py's table of names and shapes, for a 2-layer model."""
    d, e, s, H = cfg.d_model, cfg.expansion_dim, cfg.qk_dim, cfg.num_heads
    V, n, C, m, k = cfg.vocab_size, cfg.max_len, cfg.chunk_size, cfg.mlp_dim, d // H
    shapes = {"embed.table": (V, d), "final_norm.scale": (), "head.kernel": (d, V)}
    if cfg.is_transformer:
        hidden = m * 2 // 3 if cfg.uses_glu else m
        layer = {"attention_norm.scale": (), "mlp_norm.scale": ()}
        for proj in ("query", "key", "value"):
            layer |= {f"attention.{proj}.kernel": (d, H, k), f"attention.{proj}.bias": (H, k)}
        layer |= {"attention.out.kernel": (H, k, d), "attention.out.bias": (d,)}
        mlp = ("wi", "wg") if cfg.uses_glu else ("wi",)
        layer |= {f"mlp.{w}.kernel": (d, hidden) for w in mlp}
        layer |= {f"mlp.{w}.bias": (hidden,) for w in mlp}
        layer |= {"mlp.wo.kernel": (hidden, d), "mlp.wo.bias": (d,)}
        if name == "transformer":
            shapes["position_embed"] = (n, d)
        if name == "performer":  # the fixed random features (not trained, but exported)
            layer["attention.features"] = (cfg.random_features, k)
    else:
        h, span = (4, C) if name == "flash" else (2, n)
        layer = {
            "norm.scale": (),
            "proj_in.kernel": (d, 2 * e + s),
            "proj_in.bias": (2 * e + s,),
            "heads.gamma": (h, s),
            "heads.beta": (h, s),
            "rel_bias.weight": (2 * span - 1,),
            "proj_out.kernel": (e, d),
            "proj_out.bias": (d,),
        }
    for i in range(cfg.num_layers):
        shapes |= {f"layers.{i}.{key}": shape for key, shape in layer.items()}
    return shapes


@pytest.mark.parametrize("name", ALL_MODELS)
def test_parameter_names_and_shapes_are_the_documented_ones(name):
    cfg = tiny_model_config(name)
    model = models.create(cfg, rngs=nnx.Rngs(0))
    tensors = weights.parameter_tensors(nnx.state(model, weights.EXPORTED))
    assert {k: v.shape for k, v in tensors.items()} == documented_shapes(name, cfg)
    assert all(v.dtype == np.float32 for v in tensors.values())
    # One tensor per layer: layer i of the file is slice i of the scanned stack.
    for path, param in nnx.to_flat_state(nnx.state(model, weights.EXPORTED)["layers"]):
        for i in range(cfg.num_layers):
            name = f"layers.{i}." + ".".join(path)
            np.testing.assert_array_equal(tensors[name], np.asarray(param.value[i]))


def test_layer_norm_rope_bias_and_tied_embeddings_change_the_names():
    cfg = tiny_model_config("flash", norm="layer_norm", rel_pos="rope", tie_embeddings=True)
    names = weights.parameter_tensors(nnx.state(models.create(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    assert names["final_norm.scale"].shape == names["final_norm.bias"].shape == (cfg.d_model,)
    assert names["layers.1.rel_bias.a"].shape == names["layers.1.rel_bias.b"].shape == (16,)
    assert "head.kernel" not in names and "layers.0.rel_bias.weight" not in names
    cfg = tiny_model_config("flash_quad", rel_pos="none")
    names = weights.parameter_tensors(nnx.state(models.create(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    assert not any("rel_bias" in name for name in names)


# ----------------------------------------------------------------------------- numpy model


VARIANTS = {
    "default": {},  # scale norm, Toeplitz bias, causal, untied
    "layer_norm-rope_bias-tied": dict(norm="layer_norm", rel_pos="rope", tie_embeddings=True),
    "bidirectional": dict(causal=False),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ALL_MODELS)
def test_numpy_model_matches_jax(tmp_path, name, variant):
    cfg = tiny_model_config(name, **VARIANTS[variant])
    model = models.create(cfg, rngs=nnx.Rngs(0))
    randomise(model, 1)  # larger than the init, so that every term matters
    seg = packed_segments()  # documents inside and across chunks of 8, then padding
    tokens = random_tokens(0, seg.shape)
    want = model(tokens, segment_ids=seg)
    got = numpy_model.forward(save_and_load(tmp_path, model, cfg), tokens, seg)
    assert got.dtype == np.float64
    assert_logits_match(got, want, real=np.asarray(seg) != 0)


def test_swapped_layers_are_far_outside_the_tolerance(tmp_path):
    """The tolerance is tight enough to see the layers out of order (what a wrong unstacking of
    the scanned [num_layers, ...] arrays would give)."""
    cfg = tiny_model_config("flash")
    model = models.create(cfg, rngs=nnx.Rngs(0))
    randomise(model, 1)
    tokens = random_tokens(0, (2, 24))
    loaded = save_and_load(tmp_path, model, cfg)
    swapped = {
        name.replace("layers.0.", "layers.X.")
        .replace("layers.1.", "layers.0.")
        .replace("layers.X.", "layers.1."): value
        for name, value in loaded.params.items()
    }
    want = np.asarray(model(tokens), np.float64)
    got = numpy_model.forward(numpy_model.Model(loaded.config, swapped), tokens)
    assert np.abs(got - want).max() > 100 * TOLERANCE * np.abs(want).max()


def test_bfloat16_export_rounds_each_parameter_once(tmp_path):
    cfg = tiny_model_config("flash_quad")
    model = models.create(cfg, rngs=nnx.Rngs(0))
    randomise(model, 1)
    loaded = save_and_load(tmp_path, model, cfg, dtype="bfloat16")
    theirs = safetensors.numpy.load_file(str(tmp_path / numpy_model.WEIGHTS_FILE))
    assert all(t.dtype == ml_dtypes.bfloat16 for t in theirs.values())
    assert json.loads((tmp_path / numpy_model.CONFIG_FILE).read_text())["export"] == {
        "dtype": "bfloat16"
    }
    # The same model with every parameter rounded to bfloat16 (and computed in float32).
    nnx.update(
        model,
        jax.tree.map(
            lambda p: p.astype(jnp.bfloat16).astype(jnp.float32), nnx.state(model, nnx.Param)
        ),
    )
    for name, value in weights.parameter_tensors(nnx.state(model, nnx.Param)).items():
        np.testing.assert_array_equal(loaded.params[name], value)
        np.testing.assert_array_equal(theirs[name].astype(np.float32), value)
    tokens = random_tokens(0, (2, 24))
    assert_logits_match(numpy_model.forward(loaded, tokens), model(tokens))


def test_numpy_model_names_what_it_cannot_run():
    model = numpy_model.Model({**TINY, "name": "mamba"}, {})
    with pytest.raises(ValueError, match="no numpy forward pass for model 'mamba'"):
        numpy_model.forward(model, np.zeros((1, 4), np.int32))
    with pytest.raises(ValueError, match="dtype must be one of"):
        weights.parameter_tensors(
            nnx.state(models.create(tiny_model_config("flash"), rngs=nnx.Rngs(0))), "float16"
        )


# ----------------------------------------------------------------------------- the quickstart


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """configs/quickstart.py trained for one step by the project's own loop."""
    from configs import quickstart
    from flash_jax.train import loop

    workdir = str(tmp_path_factory.mktemp("quickstart") / "run")
    config = quickstart.get_config()
    config.train.update(num_steps=1, eval_every=0, checkpoint_every=1, log_every=1)
    config.data.update(shuffle_buffer=16)
    assert loop.train_and_evaluate(config, workdir)["status"] == "done"
    return workdir


def _export_cli(*args):
    # This checkout's flash_jax, whichever one the environment has installed.
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    # TensorFlow's log level as a user's shell has it: the quiet console is what keeps it down.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=path)
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "export.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.slow
def test_exported_quickstart_model_gives_the_jax_logits(quickstart_run, tmp_path):
    from flash_jax import data

    out = tmp_path / "export"
    result = _export_cli(f"--workdir={quickstart_run}", f"--out={out}")
    assert result.returncode == 0, result.stderr
    startup = ("E0000", "cuInit", "cudart_stub", "InitializeLog", "oneDNN", "read only")
    assert not [line for line in result.stderr.splitlines() if any(n in line for n in startup)]
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "sentencepiece.model"]
    assert result.stdout.split() == [
        str(out / name) for name in ("model.safetensors", "config.json", "sentencepiece.model")
    ]

    run = checkpoint_reader.restore(quickstart_run, single_device=True)
    config = json.loads((out / "config.json").read_text())
    exported = config.pop("export")
    assert config == checkpoint_format.model_config_dict(run.model_config)
    assert exported["step"] == run.step == 1 and exported["dtype"] == "float32"
    assert exported["vocabulary"] == dict(
        kind="sentencepiece",
        file="sentencepiece.model",
        size=4096,
        extra_ids=0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
    )
    shipped = data.get_vocabulary(run.config.data).sentencepiece_model_file
    assert (out / "sentencepiece.model").read_bytes() == open(shipped, "rb").read()

    loaded = numpy_model.load(str(out))
    tokens = random_tokens(0, (2, run.model_config.max_len), vocab=4096)
    seg = np.ones(tokens.shape, np.int32)
    seg[1, 50:] = 2  # two documents in the second row
    want = run.model()(tokens, segment_ids=jnp.asarray(seg))
    assert_logits_match(numpy_model.forward(loaded, tokens, seg), want)
    assert_logits_match(numpy_model.forward(loaded, tokens[:1]), run.model()(tokens[:1]))


@pytest.mark.slow
def test_export_cli_errors_are_one_line_and_write_nothing(quickstart_run, tmp_path):
    out = tmp_path / "never"
    bad_step = _export_cli(f"--workdir={quickstart_run}", "--step=7", f"--out={out}")
    assert bad_step.returncode == 1
    assert bad_step.stderr.strip().splitlines()[-1].startswith("export.py: error: no checkpoint")
    assert "Traceback" not in bad_step.stderr
    bad_dtype = _export_cli(f"--workdir={quickstart_run}", "--dtype=float16", f"--out={out}")
    assert bad_dtype.returncode == 2
    assert bad_dtype.stderr.strip().splitlines()[-1] == (
        "export.py: error: --dtype must be one of ('float32', 'bfloat16'), got 'float16'"
    )
    assert not out.exists()
    # An --out that cannot be written: one line before the checkpoint is read, and no noise of
    # TensorFlow's or CUDA's startup on stderr (the quiet console).
    afile = tmp_path / "afile"
    afile.write_text("")
    bad_out = _export_cli(f"--workdir={quickstart_run}", f"--out={afile}/out")
    assert bad_out.returncode == 1
    assert bad_out.stderr.strip().splitlines() == [
        f"export.py: error: --out '{afile}/out' cannot be a folder: {afile} is a file"
    ]


def test_an_out_folder_that_cannot_be_written_is_one_line_before_any_work(tmp_path, monkeypatch):
    """Tests run as root, which writes through chmod: a path under a regular file, and a
    read-only file system injected (EROFS) where the probe writes."""
    import errno
    import tempfile

    from flash_jax.export import weights

    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ValueError, match=f"--out '{afile}/out' cannot be a folder: {afile} is a"):
        weights.check_out(str(afile / "out"))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(ValueError, match="cannot be written: Read-only file system"):
        weights.check_out(str(tmp_path / "new" / "out"))
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    weights.check_out(str(tmp_path / "new" / "out"))  # writable: nothing is left behind
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_numpy_reads_a_bfloat16_export_once_ml_dtypes_is_imported(tmp_path):
    """What docs/evaluation.md tells NumPy users: safetensors.numpy needs ml_dtypes imported
    first."""
    path = str(tmp_path / "model.safetensors")
    weights.write_safetensors(path, {"w": np.ones(3, ml_dtypes.bfloat16)}, metadata={})
    read = f"from safetensors.numpy import load_file; print(load_file({path!r})['w'].dtype)"
    without = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True)
    assert without.returncode != 0 and "data type 'bfloat16' not understood" in without.stderr
    with_ = subprocess.run(
        [sys.executable, "-c", "import ml_dtypes; " + read], capture_output=True, text=True
    )
    assert with_.returncode == 0 and with_.stdout.strip() == "bfloat16", with_.stderr
