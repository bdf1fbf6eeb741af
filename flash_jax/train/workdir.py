"""The run directory: created with one-line errors, and locked so that one trainer writes it.

    lock = workdir.lock(path)   # ValueError naming the holder if another trainer has it
    ...
    lock.release()

The lock is `<workdir>/LOCK`, a JSON record of its holder (host, process id, since when).

Local paths (and NFS v4): the file is held with `fcntl.flock`, which the kernel drops when the
holder ends however it ends (kill -9 included). A second trainer stops at once; a record left by a
process that is gone is taken over with a warning naming it. Two trainers started at the same
instant cannot both get the lock.

gs:// has no locks: the record carries a heartbeat, rewritten every HEARTBEAT_SECONDS by a
background thread. A trainer that finds a record refreshed less than STALE_SECONDS ago stops; an
older one is taken over with a warning. After writing its record a trainer reads it back
READ_BACK_SECONDS later and stops if another trainer's record replaced it. Guaranteed: a trainer
started while another one runs is refused; two started within the same instant are not always
told apart (GCS offers no create-if-absent through `tf.io.gfile`); a trainer killed without
cleanup (kill -9, a lost VM) holds the workdir until its record is STALE_SECONDS old.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import threading
import time
import uuid

from absl import logging
from etils import epath

LOCK_FILE = "LOCK"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 120.0
READ_BACK_SECONDS = 2.0


def prepare(workdir: str) -> bool:
    """Creates `workdir` (local or gs://); ValueError (one line) if it cannot be a directory.
    Returns whether it was created (it did not exist)."""
    path = epath.Path(workdir)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"workdir {workdir!r} is a file, not a directory")
        return False
    try:
        path.mkdir(parents=True, exist_ok=True)
    except Exception as e:  # noqa: BLE001 - OSError locally, tf / gcs errors remotely
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise ValueError(f"workdir {workdir!r} cannot be created: {reason}") from e
    return True


def remove_if_unused(workdir: str) -> None:
    """Removes a local `workdir` that this run created (the caller knows) if the run left nothing
    worth keeping: no checkpoint step and no logged record (a run stopped before or during its
    first compile, by its config or Ctrl-C). Everything in it is then this run's own skeleton
    (config.json, empty checkpoints/ and tensorboard/ folders). gs:// is left as it is."""
    if "://" in workdir or not os.path.isdir(workdir):
        return
    checkpoints = os.path.join(workdir, "checkpoints")
    if os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints)):
        return
    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
        return
    shutil.rmtree(workdir, ignore_errors=True)


def _holder_record(token: str = "") -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "heartbeat": time.time(),
        "token": token,
    }


def describe(holder: dict) -> str:
    return (
        f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} "
        f"(since {holder.get('since', '?')})"
    )


def _parse(text: str) -> dict:
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


class WorkdirLock:
    """See the module docstring. `remote` defaults to whether the path is a URL (gs://)."""

    def __init__(self, workdir: str, *, remote: bool | None = None):
        self.workdir = workdir
        self.remote = "://" in workdir if remote is None else remote
        self.path = epath.Path(workdir) / LOCK_FILE
        self._fd: int | None = None
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _busy(self, holder: dict, extra: str = "") -> ValueError:
        return ValueError(
            f"workdir {self.workdir!r} is in use by {describe(holder)}{extra}; lock file "
            f"{self.path}. Wait for that run to end, stop it, or use another workdir"
        )

    # ---- local: flock
    def _acquire_local(self) -> None:
        path = os.fspath(self.path)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _parse(os.pread(fd, 4096, 0).decode(errors="replace"))
                os.close(fd)
                raise self._busy(holder) from None
            # The holder removes the file on release: make sure the locked file is the one there.
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        left = _parse(os.pread(fd, 4096, 0).decode(errors="replace"))
        if left:
            logging.warning(
                "taking over the lock of %s, which is gone (it did not release %s)",
                describe(left),
                path,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder_record()).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _release_local(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.fspath(self.path))  # still holding the flock: nobody else wrote it
        os.close(self._fd)
        self._fd = None

    # ---- remote: heartbeat
    def _read_remote(self) -> dict:
        try:
            return _parse(self.path.read_text())
        except FileNotFoundError:
            return {}

    def _acquire_remote(self) -> None:
        holder = self._read_remote() if self.path.exists() else {}
        if holder:
            age = time.time() - float(holder.get("heartbeat", 0))
            if age < STALE_SECONDS:
                raise self._busy(holder, f", last seen {age:.0f} s ago")
            logging.warning(
                "taking over the lock of %s, last seen %.0f s ago (%s)",
                describe(holder),
                age,
                self.path,
            )
        record = _holder_record(self._token)
        self.path.write_text(json.dumps(record))
        time.sleep(READ_BACK_SECONDS)
        now = self._read_remote()
        if now.get("token") != self._token:
            raise self._busy(now, ", which started at the same time")
        self._heartbeat = threading.Thread(
            target=self._beat, args=(record,), daemon=True, name="WorkdirLock"
        )
        self._heartbeat.start()

    def _beat(self, record: dict) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self.path.write_text(json.dumps({**record, "heartbeat": time.time()}))
            except Exception as e:  # noqa: BLE001 - keep beating; storage may come back
                logging.warning("could not refresh the workdir lock %s: %s", self.path, e)

    def _release_remote(self) -> None:
        if self._heartbeat is None:
            return
        self._stop.set()
        self._heartbeat.join()
        self._heartbeat = None
        with contextlib.suppress(Exception):
            if self._read_remote().get("token") == self._token:
                self.path.unlink()

    # ---- public
    def acquire(self) -> WorkdirLock:
        """Takes the lock; ValueError (one line) naming the holder, or the lock file when it
        cannot be written (a read-only or full workdir)."""
        try:
            if self.remote:
                self._acquire_remote()
            else:
                self._acquire_local()
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - OSError locally, tf / gcs errors remotely
            self.release()
            reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
            raise ValueError(
                f"workdir {self.workdir!r} cannot be written: its lock file {self.path} cannot "
                f"be created ({reason}); use a writable --workdir"
            ) from e
        return self

    def release(self) -> None:
        """Idempotent; also safe from a signal handler's emergency exit."""
        if self.remote:
            self._release_remote()
        else:
            self._release_local()


def lock(workdir: str, *, remote: bool | None = None) -> WorkdirLock:
    """Takes the workdir's lock (see the module docstring); ValueError naming the holder."""
    return WorkdirLock(workdir, remote=remote).acquire()


def holder(workdir: str) -> dict | None:
    """The lock record of the trainer holding `workdir` ({} if it wrote none yet), or None when
    no trainer holds it. Creates nothing: for readers of a run that may be live (eval.py).

    Local: a shared flock tried without waiting (a trainer's exclusive one refuses it), released
    at once. gs://: a record whose heartbeat is younger than STALE_SECONDS.
    """
    lock_path = WorkdirLock(workdir)
    if lock_path.remote:
        record = lock_path._read_remote()
        fresh = time.time() - float(record.get("heartbeat", 0)) < STALE_SECONDS
        return record if record and fresh else None
    try:
        fd = os.open(os.fspath(lock_path.path), os.O_RDONLY)
    except OSError:  # no lock file: no trainer
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _parse(os.pread(fd, 4096, 0).decode(errors="replace"))
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
