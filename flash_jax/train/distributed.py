"""Several processes (hosts): `jax.distributed` for train.py and eval.py.

    python train.py ... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0
    python train.py ... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=1

Without these flags JAX's cluster auto-detection decides: Cloud TPU pod slices, SLURM and Open
MPI jobs of several tasks, or JAX_COORDINATOR_ADDRESS in the environment start `jax.distributed`
with what the environment says; a single process needs nothing. CPU processes talk through gloo
(jax's CPU collectives).

A process that dies (killed, out of memory, a lost host) stops the others with one line naming
it (`PeerWatch`): each process stamps a key of the coordination service every second and watches
the others'; a stamp that stops changing for half of `--heartbeat_timeout_seconds` (or the
coordination service, process 0's, that stops answering) ends the process with that line, exit
code 1, before JAX's own heartbeat check would abort it with a stack dump at the full timeout.
A process that ends normally says so first, so it is never taken for dead.

Importing this module is cheap (no JAX): scripts define their flags before parsing them.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

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
    global _watch
    _watch = PeerWatch(values["heartbeat_timeout_seconds"] / 2)
    atexit.register(_watch.stop)  # after JAX's shutdown hook, so it runs first
    return True


_watch: PeerWatch | None = None  # this process's, once `initialize` started several


def wait_for_dead_peer() -> None:
    """After an unexpected error in a run of several processes: a collective with a peer that
    died fails at once (gloo closes the connection), often before `PeerWatch` can tell that the
    peer is gone, and the error's way out runs JAX's shutdown, which then aborts with a stack
    dump. So wait as long as the watch needs: if a peer died, the watch ends this process with its
    one line naming it; if none did, return and let the error be reported as it is."""
    if _watch is not None:
        time.sleep(_watch.dead_after + 2 * PeerWatch.STAMP_SECONDS)


class PeerWatch:
    """Ends this process with one line naming a peer that died (see the module docstring)."""

    STAMP_SECONDS = 1.0

    def __init__(self, dead_after_seconds: float):
        import jax
        from jax._src import distributed as jax_distributed  # the coordination service client

        self.client = jax_distributed.global_state.client
        self.me, self.count = jax.process_index(), jax.process_count()
        self.dead_after = max(dead_after_seconds, 2 * self.STAMP_SECONDS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="PeerWatch")
        self._thread.start()

    def _key(self, process: int) -> str:
        return f"flash_jax/alive/{process}"

    def _run(self) -> None:
        seen: dict[int, tuple[str, float]] = {}  # process -> (its last stamp, when it changed)
        stamp = 0
        while not self._stop.wait(self.STAMP_SECONDS):
            stamp += 1
            try:
                self.client.key_value_set(self._key(self.me), str(stamp), allow_overwrite=True)
                stamps = {p: self._try_get(p) for p in range(self.count) if p != self.me}
            except Exception:  # noqa: BLE001 - the coordination service itself is gone
                if not self._stop.is_set():
                    self._exit("process 0 (it runs the coordination service)")
                return
            now = time.monotonic()
            for process, value in stamps.items():
                if value is None or value == "done":  # not started yet, or ended normally
                    continue
                if seen.get(process, (None,))[0] != value:
                    seen[process] = (value, now)
                elif now - seen[process][1] > self.dead_after and not self._stop.is_set():
                    self._exit(f"process {process}")

    def _try_get(self, process: int) -> str | None:
        try:
            return self.client.key_value_try_get(self._key(process))
        except Exception as e:  # noqa: BLE001 - NOT_FOUND: not stamped yet
            if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
                return None
            raise

    def _exit(self, who: str) -> None:
        from flash_jax.train import signals

        program = os.path.basename(sys.argv[0]) or "python"
        signals.exit_now(
            1,
            f"{program}: error: {who} of this run of {self.count} processes died or lost its "
            f"connection (no sign of life for {self.dead_after:.0f} s; its log says why); "
            f"process {self.me} stopped too. Rerun every process to resume from the last "
            "checkpoint",
        )

    def stop(self) -> None:
        """This process ends normally: the others are told, so they do not take it for dead."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.client.key_value_set(self._key(self.me), "done", allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the service may be gone already
            pass


def barrier(name: str, timeout_seconds: int = 3600) -> None:
    """Waits until every process reaches `name` (unique per barrier), through the coordination
    service, which allows long waits; a collective would not: gloo, the CPU collectives, gives up
    on a peer that is 30 s late to its first collective (e.g. one still compiling)."""
    import jax

    if jax.process_count() == 1:
        return
    import orbax.checkpoint as ocp

    ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_seconds * 1000)
