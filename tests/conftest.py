"""Test-wide setup: eight simulated CPU devices, so mesh tests run anywhere."""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent compilation cache for the whole session, shared with the CLI subprocesses the
# tests start (they inherit the environment): the same quickstart programs compile once.
_CACHE = os.path.join(tempfile.gettempdir(), f"flash_jax_test_cache_{os.getuid()}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

# Must happen before any JAX backend is initialised.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
