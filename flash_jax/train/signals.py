"""Stop requests: SIGTERM (a preemption notice) and Ctrl-C (SIGINT) stop training cleanly.

    with signals.stop_requests() as stop:     # installed once; nested calls share it
        ...
        if stop.is_set(): save, then return   # at a step boundary

The first signal asks the loop to save the step in flight (once it ends) and exit 0. A second
Ctrl-C exits at once (code 130) without saving: it flushes the logs, runs the `at_exit` callbacks
(the workdir lock's release) and calls `os._exit`, which skips the interpreter's teardown of the
threads TensorFlow, XLA and Orbax still run. "At once" holds even while the main thread is inside a
long C++ call (an XLA compile, a device wait), where Python cannot run a signal handler: the
handler's C half also writes the signal number to a pipe (`signal.set_wakeup_fd`) that a watcher
thread reads.

train.py installs it before parsing flags (the config files import JAX), so that no Ctrl-C ever
turns into a KeyboardInterrupt traceback. A run of several processes (a pod slice) stops at the
coordination service's preemption sync point instead, so that every host stops at the same step:
the loop ignores a local request there (a second Ctrl-C still exits at once).
"""

from __future__ import annotations

import contextlib
import logging as py_logging
import os
import signal
import sys
import threading
from collections.abc import Callable

from absl import logging

IMMEDIATE_EXIT_CODE = 130  # 128 + SIGINT, what shells report for a process stopped by Ctrl-C
_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}


class StopRequest:
    """Whether (and by which signal) the run was asked to stop; see the module docstring."""

    def __init__(self, program: str = "train.py"):
        self.program = program
        self.reason: str | None = None  # "SIGTERM" or "Ctrl-C" once asked
        self.at_exit: list[Callable[[], None]] = []  # run before an immediate exit
        self._event = threading.Event()
        self._interrupts = 0
        self._announced = False
        self._lock = threading.RLock()  # the main thread's handler may run inside mark()

    def is_set(self) -> bool:
        return self._event.is_set()

    def mark(self, signum: int) -> None:
        """Sets the request (the Python-level handler: no counting, no logging)."""
        with self._lock:
            if self.reason is None:
                self.reason = _NAMES.get(signum, f"signal {signum}")
            self._event.set()

    def on_signal(self, signum: int) -> None:
        """What each delivered signal does (the watcher thread): log once, count Ctrl-Cs."""
        with self._lock:
            if signum == signal.SIGINT:
                self._interrupts += 1
                if self._interrupts >= 2:
                    self._exit_at_once()
            announce = not self._announced
            self._announced = True
        self.mark(signum)
        if announce:
            again = (
                " (Ctrl-C again exits at once, without saving)" if signum == signal.SIGINT else ""
            )
            logging.warning(
                "%s received: saving a checkpoint of the step in flight, then stopping%s",
                self.reason,
                again,
            )

    def _exit_at_once(self) -> None:
        for callback in self.at_exit:
            with contextlib.suppress(Exception):
                callback()
        exit_now(
            IMMEDIATE_EXIT_CODE,
            f"{self.program}: interrupted twice: stopped at once without saving; rerun the same "
            "command to resume from the last saved checkpoint",
        )


def exit_now(code: int, message: str = "") -> None:
    """Flushes the logs and stdout, prints `message` (if any) on stderr and ends the process with
    `code` at once: `os._exit` skips the interpreter's teardown of the threads TensorFlow, XLA and
    Orbax still run (seconds on a small CPU run), so call it only once everything the process
    writes is closed."""
    for handler in py_logging.getLogger().handlers + py_logging.getLogger("absl").handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        if message:
            print(message, file=sys.stderr, flush=True)
        sys.stderr.flush()
    os._exit(code)


_active: StopRequest | None = None


def _watch(read_fd: int, stop: StopRequest) -> None:
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        for signum in data:
            if signum == 0:  # the sentinel written on uninstall
                return
            if signum in _NAMES:
                stop.on_signal(signum)


@contextlib.contextmanager
def stop_requests(program: str = "train.py", *, enabled: bool = True):
    """Installs the SIGTERM / SIGINT handling for the duration (or shares the installed one).

    Not `enabled` (several processes: JAX's preemption notifier owns SIGTERM there), or outside
    the main thread, it yields a request that no signal sets.
    """
    global _active
    if _active is not None:
        yield _active
        return
    stop = StopRequest(program)
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop  # signals only reach the main thread's handlers
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    watcher = threading.Thread(target=_watch, args=(read_fd, stop), daemon=True, name="signals")
    watcher.start()

    # Python runs this handler in the main thread when it gets there; the watcher thread logs and
    # counts. Marking here too makes a signal that a process sends itself visible at its very
    # next bytecode (tests stop a run from a hook this way).
    def handler(signum, frame):
        stop.mark(signum)

    previous = {s: signal.signal(s, handler) for s in _NAMES}
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    _active = stop
    try:
        yield stop
    finally:
        _active = None
        signal.set_wakeup_fd(previous_fd)
        for s, h in previous.items():
            signal.signal(s, h)
        os.write(write_fd, b"\0")
        watcher.join(timeout=5)
        os.close(read_fd)
        os.close(write_fd)
