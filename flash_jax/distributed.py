"""Several processes (hosts): `jax.distributed` for train.py and eval.py.

    python train.py ... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0
    python train.py ... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=1

Without these flags JAX's cluster auto-detection decides: Cloud TPU pod slices, SLURM and Open
MPI jobs of several tasks, or JAX_COORDINATOR_ADDRESS in the environment start `jax.distributed`
with what the environment says; a single process needs nothing. CPU processes talk through gloo
(jax's CPU collectives).

A process that dies (killed, out of memory, a lost host) stops the others: JAX's coordination
service misses its heartbeats for `--heartbeat_timeout_seconds` and terminates every other process
with "Terminating process because the JAX distributed service detected fatal errors ... another
task died"; nothing waits forever.

Importing this module is cheap (no JAX): scripts define their flags before parsing them.
"""

from __future__ import annotations

import os

from absl import flags

HEARTBEAT_TIMEOUT_SECONDS = 100  # JAX's default


def define_flags() -> dict:
    """The flags of a distributed run, defined in absl's global flags; pass to `initialize`."""
    return {
        "coordinator_address": flags.DEFINE_string(
            "coordinator_address",
            None,
            "HOST:PORT of process 0's coordination service (default: JAX's cluster detection).",
        ),
        "num_processes": flags.DEFINE_integer(
            "num_processes", None, "Number of processes (with --coordinator_address)."
        ),
        "process_id": flags.DEFINE_integer(
            "process_id", None, "This process's index in [0, num_processes)."
        ),
        "heartbeat_timeout_seconds": flags.DEFINE_integer(
            "heartbeat_timeout_seconds",
            HEARTBEAT_TIMEOUT_SECONDS,
            "Seconds without a heartbeat after which a process counts as dead and the others stop.",
        ),
    }


def check_flags(values: dict) -> None:
    """ValueError (one line) for an incomplete or inconsistent set of the flags above."""
    address, n, i = values["coordinator_address"], values["num_processes"], values["process_id"]
    if address is None:
        if n is not None or i is not None:
            raise ValueError("--num_processes and --process_id need --coordinator_address")
        return
    if ":" not in address:
        raise ValueError(f"--coordinator_address must be HOST:PORT, got {address!r}")
    if n is None or i is None:
        raise ValueError("--coordinator_address needs --num_processes and --process_id")
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--process_id must be in [0, --num_processes={n}), got --process_id={i}")
    if values["heartbeat_timeout_seconds"] < 1:
        raise ValueError("--heartbeat_timeout_seconds must be >= 1")


def _environment_has_several() -> bool:
    env = os.environ
    return (
        "JAX_COORDINATOR_ADDRESS" in env
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or int(env.get("SLURM_NTASKS", "1") or 1) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
    )


def initialize(flag_holders: dict | None = None) -> bool:
    """Starts `jax.distributed` from the flags (`define_flags`), or from the environment when
    they are not given. Returns whether there are several processes. Call before JAX is used."""
    values = {k: v.value for k, v in (flag_holders or {}).items()}
    values.setdefault("coordinator_address", None)
    values.setdefault("num_processes", None)
    values.setdefault("process_id", None)
    values.setdefault("heartbeat_timeout_seconds", HEARTBEAT_TIMEOUT_SECONDS)
    check_flags(values)
    explicit = values["coordinator_address"] is not None
    if not explicit and not _environment_has_several():
        return False
    import jax

    # Collectives between CPU processes (tests, CPU clusters); accelerators use their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=values["coordinator_address"],
        num_processes=values["num_processes"],
        process_id=values["process_id"],
        heartbeat_timeout_seconds=values["heartbeat_timeout_seconds"],
    )
    return True


def barrier(name: str, timeout_seconds: int = 3600) -> None:
    """Waits until every process reaches `name` (unique per barrier), through the coordination
    service, which allows long waits; a collective would not: gloo, the CPU collectives, gives up
    on a peer that is 30 s late to its first collective (e.g. one still compiling)."""
    import jax

    if jax.process_count() == 1:
        return
    import orbax.checkpoint as ocp

    ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_seconds * 1000)
