"""A quiet console: the startup lines of TensorFlow, XLA, absl and the CUDA stubs that say nothing
about the user's run stay off stderr; `--verbose` shows them.

    from flash_jax.cli import console
    console.quiet(sys.argv)  # first thing in a command-line entry point, before TF / JAX load

Two layers, both set before those libraries load:
- environment defaults (a value the user set wins): TF_CPP_MIN_LOG_LEVEL=1 drops TensorFlow's
  and XLA's C++ INFO lines (warnings and errors stay), GRPC_VERBOSITY=ERROR;
- a filter on file descriptor 2 for the lines no setting reaches: those C++ libraries print
  before absl's logging is initialised ("All log messages before absl::InitializeLog()", the
  cudart stub, oneDNN, cuInit on a machine without a GPU) and sentencepiece's INFO line. Only
  the lines matched by `NOISE` (each a known message) are dropped; every other line, warnings
  and errors included, passes unchanged and in order.

The filter is this file run as a child process (standard library only) reading a pipe that
becomes the process's stderr: it survives a crash of the parent (the last lines still come
out), ignores the terminal's Ctrl-C (its own session), and ends when every writer has closed the
pipe. At exit the parent hands its stderr back and waits for the filter to drain.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys

# Known startup and shutdown messages that are not about the run. A C++ log line looks like
# "I0000 00:00:1795793386.604587    3768 port.cc:153] message".
_CPP = r"[IWE]\d{4} [\d:.]+\s+\d+ "
NOISE = re.compile(
    "|".join(
        (
            r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
            r"STDERR",
            _CPP + r"cudart_stub\.cc:\d+\] Could not find cuda drivers",
            _CPP + r"cuda_platform\.cc:\d+\] failed call to cuInit",  # no GPU (TF's probe)
            _CPP + r"port\.cc:\d+\] oneDNN custom operations are on",
            _CPP + r"cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized",
            r"To enable the following instructions: .*rebuild TensorFlow",  # the line above's end
            _CPP + r"util\.cc:\d+\] oneDNN supports DT_INT64 only on platforms with AVX-512",
            _CPP + r"local_rendezvous\.cc:\d+\] Local rendezvous is aborting with status: "
            r"OUT_OF_RANGE: End of sequence",  # tf.data at the end of a split
            _CPP + r"\S+\.cc:\d+\] Unable to register cu(DNN|FFT|BLAS) factory",  # TF beside JAX
            # TF's GCS file system without credentials (offline): the data check's one line
            # names the gs:// path it could not read.
            _CPP + r"google_auth_provider\.cc:\d+\] All attempts to get a Google authentication "
            r"bearer token failed",
            r"normalizer\.cc\(\d+\) LOG\(INFO\) precompiled_charsmap is empty",  # sentencepiece
            # TensorBoard's note on its data loader (three lines), at every start.
            r"NOTE: Using experimental fast data loading logic\. To disable, pass",
            r'    "--load_fast=false" and report issues on GitHub\. More details:',
            r"    https://github\.com/tensorflow/tensorboard/issues/4784",
            # JAX's probe for a TPU, at INFO, on a machine without one.
            r"I\d{4} [\d:.]+ \d+ xla_bridge\.py:\d+\] Unable to initialize backend 'tpu'",
        )
    )
)
ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "1", "GRPC_VERBOSITY": "ERROR"}
PARTIAL_LINE_SECONDS = 0.2  # a line without its newline (a prompt) is shown after this long


def wants_verbose(argv) -> bool:
    """`--verbose` (absl's boolean forms) among the arguments."""
    return any(arg in ("--verbose", "--verbose=true", "--verbose=1") for arg in argv[1:])


def quiet(argv) -> None:
    """Sets the environment defaults and starts the stderr filter, unless `--verbose` is in
    `argv` (then nothing changes). Call it once, before TensorFlow or JAX is imported."""
    if wants_verbose(argv):
        return
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    sys.stderr.flush()
    try:
        read_end, write_end = os.pipe()
        original = os.dup(2)
        child = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__)],
            stdin=read_end,
            stdout=original,
            stderr=original,
            start_new_session=True,  # the terminal's Ctrl-C is the parent's to handle
        )
    except OSError:  # no filter then: the console is noisy, the run unaffected
        return
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)

    def drain():
        sys.stderr.flush()
        os.dup2(original, 2)  # closes the pipe's last write end here: the filter sees its end
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:  # a child process of ours still holds the pipe
            pass

    import atexit

    atexit.register(drain)


def _filter(source: int, sink) -> None:
    """Copies lines from file descriptor `source` to `sink` (binary), dropping `NOISE` lines."""
    pending = b""
    while True:
        if pending:
            ready, _, _ = select.select([source], [], [], PARTIAL_LINE_SECONDS)
            if not ready:  # a line without a newline for a while: show it as it is
                sink.write(pending)
                sink.flush()
                pending = b""
                continue
        chunk = os.read(source, 65536)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        kept = [line for line in lines if not NOISE.match(line.decode("utf-8", "replace"))]
        if kept:
            sink.write(b"\n".join(kept) + b"\n")
            sink.flush()
    if pending and not NOISE.match(pending.decode("utf-8", "replace")):
        sink.write(pending)
        sink.flush()


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _filter(0, sys.stdout.buffer)
    except BrokenPipeError:  # the terminal or reader went away
        pass
