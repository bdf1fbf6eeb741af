"""Every config file loads, builds a valid ModelConfig, and parses its argument."""

import glob
import importlib.util
import json
import logging
import os
import subprocess
import sys

import pytest

from configs import base, paper, replicate
from flash_jax import data, models
from flash_jax.config import DataConfig, MeshConfig, ModelConfig, RunConfig
from flash_jax.data import sources
from flash_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HELPER_MODULES = ("__init__.py", "paper.py")  # shared code, not runnable configs
CONFIG_FILES = sorted(
    p
    for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
    if os.path.basename(p) not in HELPER_MODULES
)
EXPERIMENTS = [p for p in CONFIG_FILES if os.path.basename(p).split("_")[0] in paper.DATASETS]


def load(path):
    name = "_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_file_per_paper_experiment():
    names = {os.path.splitext(os.path.basename(p))[0] for p in EXPERIMENTS}
    assert names == {f"{d}_{m}" for d in paper.DATASETS for m in paper.MODELS}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_loads_and_validates(path):
    config = load(path).get_config()
    ModelConfig.from_config(config.model)
    RunConfig.from_config(config)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_paper_config_takes_the_context_length(path):
    module = load(path)
    dataset, model = os.path.basename(path)[:-3].split("_", 1)
    for context in paper.CONTEXTS:
        config = module.get_config(str(context))
        assert config.data.seq_len == context == config.model.max_len
        assert config.data.batch_size * context == paper.TOKENS_PER_BATCH  # fixed batch tokens
        assert config.model.name == model and config.data.dataset == dataset
        assert (config.data.objective == "mlm") == (dataset == "c4") == (not config.model.causal)
        assert config.data.source == "tfds" and config.data.vocab == base.T5_VOCAB
        assert config.model.dtype == "bfloat16" and config.train.num_steps == 125_000
        RunConfig.from_config(config)
    with pytest.raises(ValueError, match="context length must be one of"):
        module.get_config("1000")
    with pytest.raises(ValueError, match="context length must be one of"):
        module.get_config("long")


def test_a_saved_config_read_back_is_the_same_typed_config():
    """config.json holds lists where the config holds tuples (mesh.shape, mesh.rules); MeshConfig
    makes them tuples again however it is built, so the config stays hashable and equal."""
    config = RunConfig.from_config(base.get_config())
    saved = json.loads(json.dumps(config.to_dict()))
    assert isinstance(saved["mesh"]["rules"][0], list)
    read_back = RunConfig.from_config(saved)
    assert read_back == config and hash(read_back) == hash(config)
    assert read_back.model.sharding_rules == read_back.mesh.rules
    mesh = MeshConfig(axis_names=["data,fsdp"], shape=[2, 1], rules=[["batch", ["data", "fsdp"]]])
    assert mesh == MeshConfig(("data", "fsdp"), (2, 1), (("batch", ("data", "fsdp")),))


def test_paper_sizes():
    flash = ModelConfig.from_config(paper.paper_config("flash", "pg19", "512").model)
    tfm = ModelConfig.from_config(paper.paper_config("transformer_pp", "pg19", "512").model)
    assert (flash.num_layers, flash.d_model, flash.expansion_dim) == (24, 768, 1536)
    assert (flash.qk_dim, flash.chunk_size) == (128, 256)
    assert (tfm.num_layers, tfm.d_model) == (12, 768)
    large = paper.paper_config("flash", "pg19", "8192,large").model
    assert (
        large.num_layers
        == 2 * paper.paper_config("transformer_plus", "pg19", "8192,large").model.num_layers
    )
    with pytest.raises(ValueError, match="scale"):
        paper.paper_config("flash", "pg19", "8192,huge")


def test_quickstart_sweep_overrides_existing_keys():
    module = load(os.path.join(REPO, "configs", "quickstart.py"))
    runs = module.sweep()
    assert len(runs) >= 2
    for overrides in runs:
        config = module.get_config()
        for key, value in overrides.items():
            section, name = key.split(".")
            assert name in config[section], key
            config[section][name] = value
        RunConfig.from_config(config)


# ----------------------------------------------------------------------------- sizes and smoke


def test_paper_config_argument_takes_every_size_and_smoke():
    assert paper.parse_arg(None) == (512, "base", False)
    assert paper.parse_arg("smoke") == (512, "tiny", True)
    assert paper.parse_arg("2048,smoke") == (2048, "tiny", True)
    assert paper.parse_arg("small,1024,smoke") == (1024, "small", True)
    for size, (layers, d_model, _) in models.SIZES.items():
        config = paper.paper_config("flash", "pg19", f"512,{size}")
        assert (config.model.num_layers, config.model.d_model) == (2 * layers, d_model)
        assert config.data.source == "tfds"  # a size alone keeps the paper's data
        RunConfig.from_config(config)
    for bad in ("512,512", "smoke,smoke", "tiny,small", "512,", "huge", "8192,large,x"):
        with pytest.raises(ValueError, match="context length must be one of"):
            paper.parse_arg(bad)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_smoke_scale_runs_on_the_shipped_corpus(path):
    dataset, model = os.path.basename(path)[:-3].split("_", 1)
    config = load(path).get_config("smoke")
    m, d, t = config.model, config.data, config.train
    # The experiment stays itself: model family, context length, objective.
    assert m.name == model and d.dataset == dataset and d.seq_len == m.max_len == 512
    assert (d.objective == "mlm") == (dataset == "c4") == (not m.causal)
    assert (m.num_layers, m.d_model) == (models.preset(model, "tiny")["num_layers"], 128)
    # ...on what a laptop has: the shipped corpus and vocabulary, float32, a small batch.
    assert (d.source, d.data_dir, d.vocab) == ("local", base.SHIPPED_CORPUS, base.SHIPPED_VOCAB)
    assert data.get_vocabulary(d).vocab_size <= m.vocab_size == 4096
    assert m.dtype == "float32" and d.batch_size * d.seq_len == paper.SMOKE_TOKENS_PER_BATCH
    assert t.warmup_steps <= t.num_steps // 10 and t.num_steps <= 200
    RunConfig.from_config(config)
    data.check_data(DataConfig.from_config(d))
    assert load(path).get_config("8192,smoke").data.batch_size == 1


@pytest.mark.slow
def test_smoke_scale_trains_and_its_loss_falls(tmp_path):
    """The documented command, a few steps: one CPU device, the shipped corpus, nothing else."""
    workdir = tmp_path / "smoke"
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config=configs/pg19_flash.py:smoke",
            f"--workdir={workdir}",
            "--config.train.num_steps=16",
            "--config.train.log_every=4",
            "--config.train.eval_every=0",
        ],
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(workdir / "metrics.jsonl") as f:
        losses = {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
    assert sorted(losses) == [1, 4, 8, 12, 16]  # the first step is always recorded
    assert losses[16] < losses[4] - 0.5, losses  # measured: 8.80 -> 7.75


# ----------------------------------------------------------------------------- unreachable data


def headline_config_offline(tmp_path):
    """configs/pg19_flash.py as an offline machine sees it, without touching the network: a
    vocabulary whose file system cannot be reached, and TFDS data never prepared."""
    config = load(os.path.join(REPO, "configs", "pg19_flash.py")).get_config()
    config.data.vocab = "nope://t5-data/vocabs/sentencepiece.model"  # as gs:// offline: an error
    config.data.tfds_data_dir = str(tmp_path / "tensorflow_datasets")
    return config


def test_unreachable_data_is_one_line_naming_the_overrides(tmp_path, caplog):
    config = headline_config_offline(tmp_path)
    absl_level = logging.getLogger("absl").level
    with pytest.raises(ValueError) as error:
        data.check_data(DataConfig.from_config(config.data))
    # TFDS's own warning about the folder it probed is not shown: the line below says it. The
    # absl logger is left as it was (later INFO records of this process still reach handlers).
    assert not [r for r in caplog.records if "tensorflow_datasets" in r.pathname]
    assert logging.getLogger("absl").level == absl_level
    message = str(error.value)
    assert "\n" not in message
    assert "data.vocab 'nope://t5-data/vocabs/sentencepiece.model' (" in message
    shown = message.split("--config.data.vocab=")[1].split(" ")[0]  # relative to the cwd
    assert os.path.abspath(shown) == base.SHIPPED_VOCAB
    assert "TFDS pg19:0.1.* is not prepared in " + str(tmp_path) in message
    assert "--config.data.tfds_data_dir=<" in message and "--config.data.source=local " in message
    assert "configs/pg19_flash.py:smoke" in message

    config.data.update(source="local", data_dir=str(tmp_path / "missing"), vocab="byte")
    with pytest.raises(ValueError, match=r"data.data_dir '.*missing' \(does not exist\) -> "):
        data.check_data(DataConfig.from_config(config.data))


def test_the_offline_fix_names_the_model_vocab_size_the_shipped_vocabulary_needs(tmp_path):
    """Following the offline line's overrides gives a model of the shipped vocabulary's size: the
    line names model.vocab_size too (T5's 32,128 would train 28,032 embedding rows no token uses),
    and data.vocab alone is one line naming model.vocab_size."""
    config = headline_config_offline(tmp_path)
    assert config.model.vocab_size == paper.T5_VOCAB_SIZE
    with pytest.raises(ValueError) as error:
        data.check_data(DataConfig.from_config(config.data), vocab_size=config.model.vocab_size)
    overrides = str(error.value).split("--config.data.vocab=")[1].split(" (the shipped")[0]
    assert overrides.split(" ")[1] == "--config.model.vocab_size=4096"
    config.data.update(vocab=base.SHIPPED_VOCAB, source="local", data_dir=base.SHIPPED_CORPUS)
    with pytest.raises(ValueError) as error:  # the vocabulary alone: the model's size is named
        data.check_data(DataConfig.from_config(config.data), vocab_size=config.model.vocab_size)
    assert "\n" not in str(error.value)
    assert str(error.value).startswith(
        "model.vocab_size (32128) is larger than needed for the data vocabulary (4096 tokens, "
    )
    assert str(error.value).endswith(
        "-> --config.model.vocab_size=4096 (its size rounded up to a multiple of 128)"
    )
    config.model.vocab_size = 4096  # the line's fix
    data.check_data(DataConfig.from_config(config.data), vocab_size=config.model.vocab_size)
    # The shipped vocabulary with a model already of its size: only data.vocab is named.
    config = headline_config_offline(tmp_path)
    with pytest.raises(ValueError) as error:
        data.check_data(DataConfig.from_config(config.data), vocab_size=4096)
    assert "--config.model.vocab_size" not in str(error.value)


@pytest.mark.parametrize("tokens, fitted", [(259, 384), (4096, 4096), (32100, 32128), (1, 128)])
def test_fitted_vocab_size_rounds_up_to_a_multiple_of_128(tokens, fitted):
    from flash_jax.data import checks

    assert checks.fitted_vocab_size(tokens) == fitted


def test_training_on_unreachable_data_stops_before_writing(tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match="cannot reach the config's data"):
        loop.train_and_evaluate(headline_config_offline(tmp_path), str(workdir))
    assert not workdir.exists()


def test_prepared_tfds_data_and_local_data_are_reachable(tmp_path):
    import tensorflow_datasets as tfds

    config = paper.paper_config("flash", "pg19")
    config.data.update(vocab="byte", tfds_data_dir=str(tmp_path))
    # A prepared dataset's metadata (what is_prepared looks for), written by the builder itself.
    builder = tfds.builder(sources.TFDS_DATASETS["pg19"]["name"], data_dir=str(tmp_path))
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)
    data.check_data(DataConfig.from_config(config.data))
    data.check_data(
        DataConfig.from_config(base.get_config().data)
    )  # the shipped corpus and vocabulary


@pytest.mark.parametrize("setting", sorted(replicate.SETTINGS))
def test_replicate_settings_compare_models_of_equal_size(setting):
    from flax import nnx

    counts = {}
    for model in replicate.SETTINGS[setting]["models"]:
        config = replicate.get_config(f"{model},{setting}")
        RunConfig.from_config(config)
        abstract = nnx.eval_shape(lambda c=config: models.create(c.model, rngs=nnx.Rngs(0)))
        counts[model] = models.count_params(abstract)
        assert config.data.seq_len * config.data.batch_size == (
            replicate.SETTINGS[setting]["seq_len"] * replicate.SETTINGS[setting]["batch_size"]
        )
    for model, count in counts.items():
        assert abs(count - counts["transformer_pp"]) / counts["transformer_pp"] < 0.1, model


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["--config=configs/pg19_flash.py:nosuchpreset"],
            "train.py: error: config argument 'nosuchpreset': the context length must be one of",
        ),
        (
            ["--config=configs/quickstart.py", "--config.train.num_steps=abc"],
            "train.py: error: flag --config.train.num_steps=abc: expected an integer, got 'abc'",
        ),
        (
            ["--config=configs/quickstart.py", "--config.train.learning_rate=1e-3x"],
            "train.py: error: flag --config.train.learning_rate=1e-3x: expected a number, got "
            "'1e-3x'",
        ),
    ],
    ids=["preset", "integer", "number"],
)
def test_config_errors_are_plain_words(args, line, tmp_path):
    """A config file's ValueError without its type name; Python's parse errors in plain words."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "train.py", *args, f"--workdir={tmp_path / 'run'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.rstrip().splitlines()[-1].startswith(line), proc.stderr[-2000:]
    assert "ValueError" not in proc.stderr and "invalid literal" not in proc.stderr
    assert not (tmp_path / "run").exists()
