"""flash_jax.dispatch: which implementation `auto` runs, the names the config accepts, and the
device the traced program is for."""

import jax
import jax.numpy as jnp
import pytest

from flash_jax import dispatch, sharding
from flash_jax.config import ModelConfig


def test_flash_auto_is_xla_until_a_kernel_is_measured_faster():
    assert dispatch.flash_impl("auto") == "xla"
    assert dispatch.flash_impl("pallas_gpu") == "pallas_gpu"  # a name asked for is kept


def test_attention_auto_is_xla_on_cpu():
    assert dispatch.attention_impl("auto", 1024, 64, jnp.bfloat16) == "xla"
    assert dispatch.attention_impl("splash", 1024, 64, jnp.bfloat16) == "splash"


def test_unknown_names_are_one_line_errors_here_and_in_the_config():
    with pytest.raises(ValueError, match=r"mixed_chunk_attention impl must be one of .*'triton'"):
        dispatch.flash_impl("triton")
    with pytest.raises(ValueError, match=r"attention impl must be one of .*'flash'"):
        dispatch.attention_impl("flash", 1024, 64, jnp.float32)
    with pytest.raises(ValueError, match=r"proj impl must be one of .*'triton'"):
        dispatch.proj_impl("triton")
    assert dispatch.proj_impl("auto") == "xla"
    config_keys = {
        "flash_impl": dispatch.FLASH_IMPLS,
        "attention_impl": dispatch.ATTENTION_IMPLS,
        "proj_impl": dispatch.PROJ_IMPLS,
    }
    for key, names in config_keys.items():
        for name in names:
            ModelConfig(**{key: name})
        with pytest.raises(ValueError, match=f"model.{key} must be one of"):
            ModelConfig(**{key: "cuda"})


def test_the_target_is_the_active_meshs_device_else_the_default_backend():
    assert dispatch.target_device() is None
    assert dispatch.target_platform() == jax.default_backend() == "cpu"
    with jax.set_mesh(sharding.make_mesh((8,), ("data",))):
        assert dispatch.target_device().platform == "cpu"
        assert dispatch.target_platform() == "cpu"


def test_megacore_names_chips_the_tpu_tables_know_and_not_this_cpu():
    """A kind misspelt would never match a chip (its kernels' backward would leave a core idle):
    each is one of the device kinds libtpu reports (flash_jax/tools/tpu_topology.py's tables),
    and v5e's ("TPU v5 lite", one core) is not v5p's ("TPU v5")."""
    from flash_jax.tools import tpu_topology

    assert set(dispatch.MEGACORE_KINDS) <= set(tpu_topology.HBM_BYTES_BY_KIND)
    assert not dispatch.megacore()
