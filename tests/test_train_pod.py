"""The pod-scale loop parts, in-process on the synthetic pipeline of tests/helpers.py: retention
by Orbax's policies, profiling, memory, the compilation cache, and the distributed flags (the input
stream in checkpoints and the host layout: tests/test_train.py; two processes:
tests/test_multiprocess.py).
"""

import glob
import os
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from flash_jax.train import checkpoint, distributed, loop, memory
from tests.helpers import files_under, free_port, read_jsonl, tiny_train_config

pytestmark = pytest.mark.usefixtures("compile_cache", "synthetic_data")

# ----------------------------------------------------------------------------- retention


def test_retention_keeps_the_newest_every_nth_and_the_best_of_the_checked_steps(tmp_path):
    """Orbax's policies choose among checked steps only: a step whose own loss was not finite is
    removed whatever its eval loss, and the step being checked is never deleted."""
    state = {"w": jnp.arange(4.0)}
    eval_losses = {1: 5.0, 2: 3.0, 3: 4.0, 4: 6.0, 5: 1.0, 6: 2.5, 7: None, 8: 7.0}

    def run(steps, **keep):
        ckpts = checkpoint.Checkpoints(str(tmp_path), 1, async_save=False, **keep)
        for s in steps:
            meta = {"step": s} if eval_losses.get(s) is None else {"eval_loss": eval_losses[s]}
            assert ckpts.save(s, state, meta)
            assert s in ckpts.all_steps()  # the newest, unchecked: kept
            if s == 5:  # its own loss is not finite: removed although its eval loss is best
                assert ckpts.discard(s)
            else:
                ckpts.confirm(s)
        ckpts.finish()
        steps_kept = ckpts.all_steps()
        ckpts.close()
        return steps_kept

    # Newest (8), every 4th (4, 8), the 2 best eval losses of the checked steps (6: 2.5, 2: 3.0).
    assert run(range(1, 9), keep_every_steps=4, keep_best=2) == [2, 4, 6, 8]
    # A restarted run reads the eval losses back from the checkpoints' meta.
    eval_losses[9] = 9.0
    assert run([9], keep_every_steps=4, keep_best=2) == [2, 4, 6, 8, 9]


# ----------------------------------------------------------------------------- profile, memory


def test_profile_memory_and_compilation_cache(tmp_path, monkeypatch):
    workdir, cache = str(tmp_path / "run"), str(tmp_path / "cache")
    previous_cache = jax.config.jax_compilation_cache_dir
    # The CPU backend reports no memory statistics: a GPU's, faked (capacity ample).
    stats = {"bytes_limit": 2**40, "peak_bytes_in_use": 12345}
    monkeypatch.setattr(memory, "memory_stats", lambda: [stats])
    config = tiny_train_config(
        num_steps=4,
        eval_every=0,
        profile_start=1,
        profile_steps=2,
        profile_port=free_port(),
        compilation_cache_dir=cache,
    )
    try:
        loop.train_and_evaluate(config, workdir)
    finally:
        loop.use_compilation_cache(previous_cache)  # this module's cache again
    traces = glob.glob(os.path.join(workdir, "tensorboard", "plugins", "profile", "*", "*.pb"))
    assert traces, files_under(workdir)
    assert os.listdir(cache)  # the train step was written to the persistent cache
    records = [r for r in read_jsonl(workdir) if "loss" in r]
    assert [r["peak_bytes_in_use"] for r in records] == [12345] * 4


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_a_step_that_cannot_fit_the_device_stops_before_the_first_step(
    device, tmp_path, monkeypatch
):
    if device == "gpu":  # a device that reports its capacity (faked)
        monkeypatch.setattr(memory, "memory_stats", lambda: [{"bytes_limit": 1000}])
    else:  # CPU devices report none: they share the host's memory (faked small)
        assert memory.memory_stats() == []
        monkeypatch.setattr(memory, "host_memory_bytes", lambda: 1000 * jax.local_device_count())
        assert memory.capacity_bytes() == 1000
    workdir = str(tmp_path / "run")
    with pytest.raises(ValueError, match=r"the train step needs about .* per device \(arguments"):
        loop.train_and_evaluate(tiny_train_config(), workdir)
    assert not os.path.exists(workdir)  # nothing written: the workdir it made is gone again
    os.mkdir(workdir)  # a workdir that was there stays, as it was
    with pytest.raises(ValueError, match=r"the train step needs about"):
        loop.train_and_evaluate(tiny_train_config(), workdir)
    assert os.listdir(workdir) == []


def test_a_wandb_run_that_cannot_start_stops_the_run_before_anything_is_written(
    tmp_path, monkeypatch
):
    """Not logged in to W&B (a fake module whose init fails as wandb's does): one line naming
    the field, after the compile (the memory check comes first) and before any file of the run."""

    def init(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)\ncall wandb.login(key=...)")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    config = tiny_train_config()
    config.log.wandb_project = "flash-jax-test"
    workdir = str(tmp_path / "run")
    with pytest.raises(ValueError) as raised:
        loop.train_and_evaluate(config, workdir)
    assert str(raised.value) == (
        "log.wandb_project='flash-jax-test': W&B could not start (RuntimeError: api_key not "
        "configured (no-tty)); run `wandb login`, set WANDB_MODE=offline, or leave "
        "log.wandb_project empty"
    )
    assert not os.path.exists(workdir)


def test_step_memory_counts_aliased_outputs_once():
    compiled = (
        jax.jit(lambda x: x * 2, donate_argnums=0)
        .lower(jax.ShapeDtypeStruct((256,), jnp.float32))
        .compile()
    )
    sizes = memory.step_memory(compiled)
    assert sizes["arguments"] == 1024 and sizes["outputs"] == 1024
    assert sizes["total"] == (
        sizes["arguments"]
        + sizes["outputs"]
        + sizes["temporaries"]
        + sizes["generated_code"]
        - sizes["aliased"]
    )
    memory.check_fits(sizes, sizes["total"])  # exactly fits
    with pytest.raises(ValueError, match="the device has"):
        memory.check_fits(sizes, sizes["total"] - 1)


# ----------------------------------------------------------------------------- distributed flags


@pytest.mark.parametrize(
    "values, message",
    [
        ({"num_processes": 2}, "--num_processes and --process_id need --coordinator_address"),
        ({"coordinator_address": "host"}, "--coordinator_address must be HOST:PORT"),
        ({"coordinator_address": "h:1", "process_id": 0}, "needs --num_processes and --process_id"),
        (
            {"coordinator_address": "h:1", "num_processes": 2, "process_id": 2},
            "--process_id must be in [0, --num_processes=2), got --process_id=2",
        ),
    ],
)
def test_distributed_flags_are_checked(values, message):
    flags = {
        "coordinator_address": None,
        "num_processes": None,
        "process_id": None,
        "heartbeat_timeout_seconds": 100,
        **values,
    }
    with pytest.raises(ValueError) as error:
        distributed.check_flags(flags)
    assert message in str(error.value)
