"""Every config file loads, builds a valid ModelConfig, and parses its argument."""

import glob
import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# pytest does not put the repository root on sys.path; the config files import `configs.*`.
sys.path.insert(0, REPO)

from configs import base, paper  # noqa: E402
from flash_jax.config import ModelConfig  # noqa: E402
from flash_jax.train import loop  # noqa: E402

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
    loop.validate_config(config, reference=base.get_config())


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
        loop.validate_config(config, reference=base.get_config())
    with pytest.raises(ValueError, match="context length must be one of"):
        module.get_config("1000")
    with pytest.raises(ValueError, match="context length must be one of"):
        module.get_config("long")


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
        loop.validate_config(config, reference=base.get_config())
