"""flash_jax.train.workdir: the workdir lock (local flock and the gs:// heartbeat record) and
one-line errors for a workdir that cannot be a directory."""

import errno
import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from flash_jax.train import workdir


def test_a_held_lock_stops_a_second_holder_naming_the_first(tmp_path):
    first = workdir.lock(str(tmp_path))
    with pytest.raises(ValueError) as error:
        workdir.lock(str(tmp_path))
    message = str(error.value)
    assert f"is in use by process {os.getpid()} on host {socket.gethostname()} (since " in message
    assert str(tmp_path / workdir.LOCK_FILE) in message and "\n" not in message
    first.release()
    assert not (tmp_path / workdir.LOCK_FILE).exists()
    workdir.lock(str(tmp_path)).release()  # free again


def test_a_read_only_workdir_is_one_line_naming_the_lock_file(tmp_path, monkeypatch):
    """The lock file cannot be created (EROFS, a read-only mount; injected: tests run as root):
    ValueError naming the file, no OSError traceback."""
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(workdir.LOCK_FILE):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(ValueError) as error:
        workdir.lock(str(tmp_path))
    assert str(error.value) == (
        f"workdir {str(tmp_path)!r} cannot be written: its lock file {tmp_path / 'LOCK'} cannot "
        "be created (Read-only file system); use a writable --workdir"
    )


def test_a_lock_held_by_another_process_is_refused_and_freed_when_it_dies(tmp_path):
    # flock is per open file: a holder that is killed (no clean-up at all) frees the lock.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from flash_jax.train import workdir; "
            f"workdir.lock({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"in use by process {holder.pid} on host"):
            workdir.lock(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    workdir.lock(str(tmp_path)).release()


def test_a_stale_record_is_taken_over_with_a_warning(tmp_path, caplog):
    gone = {"host": "old-host", "pid": 999999, "since": "2020-01-01 00:00:00 UTC"}
    (tmp_path / workdir.LOCK_FILE).write_text(json.dumps(gone))  # its holder never released it
    with caplog.at_level(logging.WARNING):
        lock = workdir.lock(str(tmp_path))
    assert any(
        "taking over the lock of process 999999 on host old-host (since 2020-01-01" in r.message
        for r in caplog.records
    )
    record = json.loads((tmp_path / workdir.LOCK_FILE).read_text())
    assert record["pid"] == os.getpid()
    lock.release()


def test_remote_records_fresh_refuse_stale_are_taken_over(tmp_path, monkeypatch, caplog):
    """The gs:// path (no flock), run on a local folder."""
    monkeypatch.setattr(workdir, "READ_BACK_SECONDS", 0.0)
    lock = workdir.lock(str(tmp_path), remote=True)
    with pytest.raises(ValueError, match=r"in use by process .* last seen \d+ s ago"):
        workdir.lock(str(tmp_path), remote=True)
    lock._stop.set()  # as if killed: no release, the record stays
    record = json.loads((tmp_path / workdir.LOCK_FILE).read_text())
    record["heartbeat"] -= workdir.STALE_SECONDS + 1
    (tmp_path / workdir.LOCK_FILE).write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING):
        second = workdir.lock(str(tmp_path), remote=True)
    assert any("taking over the lock of process" in r.message for r in caplog.records)
    second.release()
    assert not (tmp_path / workdir.LOCK_FILE).exists()


def test_remote_race_the_later_writer_wins_the_earlier_stops(tmp_path, monkeypatch):
    # Another trainer writes its record while this one waits to read its own back.
    def other_trainer_writes(seconds):
        (tmp_path / workdir.LOCK_FILE).write_text(
            json.dumps({"host": "h2", "pid": 4242, "since": "now", "token": "theirs"})
        )

    monkeypatch.setattr(workdir.time, "sleep", other_trainer_writes)
    with pytest.raises(ValueError, match="process 4242 on host h2 .*which started at the same"):
        workdir.lock(str(tmp_path), remote=True)


@pytest.mark.parametrize("where", ["is a file", "under a file"])
def test_prepare_names_a_workdir_that_cannot_be_a_directory(tmp_path, where):
    (tmp_path / "file").write_text("x")
    path = tmp_path / "file" if where == "is a file" else tmp_path / "file" / "run"
    with pytest.raises(ValueError, match=r"workdir .* (is a file|cannot be created)"):
        workdir.prepare(str(path))
    workdir.prepare(str(tmp_path / "new" / "run"))
    assert (tmp_path / "new" / "run").is_dir()


def test_remove_if_unused_keeps_a_workdir_with_a_checkpoint_or_a_record(tmp_path):
    skeleton = tmp_path / "skeleton"
    for folder in ("checkpoints", "tensorboard"):
        (skeleton / folder).mkdir(parents=True)
    (skeleton / "config.json").write_text("{}")
    (skeleton / "metrics.jsonl").write_text("")
    saved = tmp_path / "saved"
    (saved / "checkpoints" / "2").mkdir(parents=True)
    logged = tmp_path / "logged"
    logged.mkdir()
    (logged / "metrics.jsonl").write_text('{"step": 1}\n')
    for path in (skeleton, saved, logged):
        workdir.remove_if_unused(str(path))
    assert sorted(os.listdir(tmp_path)) == ["logged", "saved"]
