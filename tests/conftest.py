"""Test-wide setup: eight simulated CPU devices, so mesh tests run anywhere; shared fixtures."""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent compilation cache for the whole session, shared with the CLI subprocesses the
# tests start (they inherit the environment): the same quickstart programs compile once.
# Under pytest-xdist (`make test` runs two workers) each worker has a cache of its own: JAX
# writes cache entries in place, and a worker could read another's half-written entry.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
_CACHE = os.path.join(tempfile.gettempdir(), f"flash_jax_test_cache_{os.getuid()}{_WORKER}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

# Must happen before any JAX backend is initialised.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

import pytest  # noqa: E402

# Shared fixtures, active only where a module names them (`pytestmark = pytest.mark.usefixtures`).
# Their imports are inside them: flash_jax.data imports TensorFlow, which a test session that
# never uses these fixtures need not load.


@pytest.fixture
def synthetic_data(monkeypatch):
    """data.InputPipeline is tests/helpers.py's SyntheticPipeline (and no batches turn nan)."""
    from flash_jax import data
    from tests.helpers import SyntheticPipeline

    monkeypatch.setattr(data, "InputPipeline", SyntheticPipeline)
    monkeypatch.setattr(SyntheticPipeline, "nan_from", None)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """Identical runs in this module compile once (each run builds fresh jitted functions)."""
    options = {
        "jax_compilation_cache_dir": str(tmp_path_factory.mktemp("jax_cache")),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    previous = {k: getattr(jax.config, k) for k in options}
    for k, v in options.items():
        jax.config.update(k, v)
    yield
    for k, v in previous.items():
        jax.config.update(k, v)
