"""What the command-line entry points share: one-line errors and quiet library logs."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Sequence

from absl import flags


def fail(program: str, message: str, code: int) -> None:
    """One line on stderr and exit `code`: no traceback wall for the user's input."""
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(code)


def parse_flags(argv: Sequence[str], config_flag, program: str) -> list[str]:
    """absl's parser, but a bad flag, config file or override exits 2 with one line."""
    for arg in argv[1:]:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1].split(":", 1)[0]
            if not os.path.isfile(path):
                fail(program, f"config file {path!r} does not exist", 2)
    try:
        argv = flags.FLAGS(argv)
        if config_flag.value is not None:
            config_flag.value.keys()  # loads the config file now, inside the try
    except flags.Error as e:
        # config_flags folds the config file's traceback into the message; its last line says it.
        fail(program, _last_line(e) or repr(e), 2)
    except (AttributeError, KeyError) as e:  # an override of a key the config does not have
        words = re.findall(r"\w+", str(e))
        key = words[0] if words else str(e)
        given = [a.split("=")[0] for a in argv if a.startswith("--config.") and f".{key}" in a]
        hint = re.search(r'Did you mean "(\w+)"', str(e))
        fail(
            program,
            f"unknown config key {given[0] if given else key}"
            + (f" (did you mean {hint.group(1)!r}?)" if hint else ""),
            2,
        )
    except Exception as e:  # noqa: BLE001 - e.g. the config file raises on import
        fail(program, f"{type(e).__name__}: {_last_line(e)}", 2)
    return argv


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else ""


class QuietLibraries(logging.Filter):
    """At absl INFO verbosity: our INFO lines and everyone's warnings, not the libraries' INFO
    chatter (Orbax's per-save and per-restore lines, JAX's backend probing), nor the tracebacks
    that echo an Orbax failure flash_jax reports in one line: Orbax's own error logs, and
    asyncio's reports of the futures of that save or restore whose exceptions nobody retrieved
    (flash_jax runs no asyncio code: every future in its processes is Orbax's or TensorStore's).
    asyncio reports them when they are garbage-collected, at a moment that varies from run to run.
    """

    def __init__(self, own_files: Sequence[str] = ()):
        super().__init__()
        self.own_files = tuple(own_files)

    def filter(self, record):
        if "flash_jax" in record.pathname or record.pathname.endswith(self.own_files):
            return True
        from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname
        if record.exc_info and (from_orbax or record.name == "asyncio"):
            return False
        if from_orbax and "read only" in record.getMessage():
            return False
        return record.levelno >= logging.WARNING


def _echo_of_a_reported_failure(unraisable) -> bool:
    """Errors Python would print after flash_jax has reported an Orbax failure in one line:
    coroutines of the same failed save or restore, garbage-collected with their exceptions, and
    TensorStore callbacks that find the event loop of Orbax's call closed ("Event loop is closed",
    dozens of times on a full disk)."""
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
        return True
    tb = unraisable.exc_traceback
    while tb is not None:
        if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def quiet_library_logs(*own_files: str) -> None:
    """Installs `QuietLibraries` on absl's logger and asyncio's; `own_files`: the script's file
    names.

    Also keeps `sys.unraisablehook` from printing the tracebacks that echo an Orbax failure
    flash_jax has already reported (`_echo_of_a_reported_failure`).
    """
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(QuietLibraries(own_files))
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _echo_of_a_reported_failure(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
