"""What the command-line entry points share: one-line errors, flag parsing, quiet library logs.

train.py, eval.py and the scripts that take a `--config` parse absl's global flags
(`parse_flags`). Scripts whose functions tests import side by side (scripts/benchmark.py,
op_cost.py, ...) keep their flags in a `flags.FlagValues` of their own, so that two of them may
both have a `--contexts`: `main(argv)` parses it (`parse_script_flags`), `run_script` runs it.

The stderr filter for the C++ libraries' startup lines is `flash_jax.cli.console`, a module of its
own: it also runs as the filter's child process, on the standard library alone. No library module
imports either: they serve the entry points.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import re
import sys
import types
from collections.abc import Callable, Sequence

from absl import app, flags


def fail(program: str, message: str, code: int) -> None:
    """One line on stderr and exit `code`: no traceback wall for the user's input."""
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(code)


def parse_flags(argv: Sequence[str], config_flag, program: str) -> list[str]:
    """absl's parser, but a bad flag, config file or override exits 2 with one line."""
    path = _config_path(argv)
    if path is not None and not os.path.isfile(path.split(":", 1)[0]):
        fail(program, f"config file {path.split(':', 1)[0]!r} does not exist", 2)
    try:
        argv = flags.FLAGS(argv)
        if config_flag.value is not None:
            config_flag.value.keys()  # loads the config file now, inside the try
    except flags.Error as e:
        # config_flags folds the config file's traceback into the message; its last line says it.
        fail(program, _plain(_last_line(e)) or repr(e), 2)
    except Exception as e:  # noqa: BLE001 - e.g. the config file raises on import
        message = f"{type(e).__name__}: {_last_line(e)}"
        if isinstance(e, (AttributeError, KeyError)):  # perhaps an override of an unknown key
            message = _unknown_override(argv, path) or message
        fail(program, _plain(message), 2)
    return argv


# Python's words for a value that does not parse, and ours; a config file's ValueError (folded
# into absl's message as its traceback's last line) is its own one-line refusal.
_PLAIN_WORDS = (
    (re.compile(r"^ValueError: "), ""),
    (re.compile(r"invalid literal for int\(\) with base 10: (.*)"), r"expected an integer, got \1"),
    (re.compile(r"could not convert string to float: (.*)"), r"expected a number, got \1"),
)


def _plain(message: str) -> str:
    """`message` with Python's parse errors in plain words."""
    for pattern, words in _PLAIN_WORDS:
        message = pattern.sub(words, message)
    return message


def interruptible(main: Callable[[list[str]], object], program: str) -> Callable:
    """`main` for absl's `app.run`, with Ctrl-C as one line and exit status 130 (128 + SIGINT)
    instead of a KeyboardInterrupt traceback. What was printed before stays valid."""

    def run(argv):
        try:
            return main(argv)
        except KeyboardInterrupt:
            sys.stderr.write(f"\n{program}: interrupted (Ctrl-C)\n")
            sys.exit(130)

    return run


def _config_path(argv: Sequence[str]) -> str | None:
    """The value of --config (with its :argument), or None."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _unknown_override(argv: Sequence[str], path: str | None) -> str | None:
    """'unknown config key --config.a.b (did you mean ...?)' for the first override that names a
    key the config file does not have; None if every override names one."""
    if path is None:
        return None
    try:
        file, _, arg = path.partition(":")
        module = config_module(file)
        config = module.get_config(arg) if arg else module.get_config()
    except Exception:  # noqa: BLE001 - the config file itself fails: reported as such
        return None
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        name = arg.split("=", 1)[0]
        node = config
        for key in name.removeprefix("--config.").split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if key not in keys:
                close = difflib.get_close_matches(key, keys, n=1)
                return f"unknown config key {name}" + (
                    f" (did you mean {close[0]!r}?)" if close else ""
                )
            node = node[key]
    return None


def config_module(path: str) -> types.ModuleType:
    """A config file (configs/*.py) loaded as a module, as `--config` loads it."""
    name = "_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _IntListParser(flags.ArgumentParser):
    def parse(self, argument):
        if isinstance(argument, (list, tuple)):
            return [int(v) for v in argument]
        values = [int(v) for v in argument.split(",") if v.strip()]
        if any(v < 1 for v in values):
            raise ValueError(f"expected positive integers, got {argument!r}")
        return values

    def flag_type(self):
        return "comma-separated positive integers"


def define_int_list(name: str, default, help: str, flag_values=flags.FLAGS) -> flags.FlagHolder:
    """A flag of comma-separated positive integers (`--contexts=512,1024`; may be empty)."""
    serializer = flags.CsvListSerializer(",")
    return flags.DEFINE(_IntListParser(), name, default, help, flag_values, serializer)


def parse_script_flags(
    flag_values: flags.FlagValues, argv: Sequence[str], program: str, *, positional: bool = False
) -> types.SimpleNamespace:
    """A script's flags from `argv` (without the program name), every flag not given at its
    default; with `positional`, the other arguments in `.positional` (else they are an error).
    A bad flag is one line and exit 2. argparse's `--no-name` is accepted for absl's `--noname`."""
    argv = [f"--no{arg[5:]}" if arg.startswith("--no-") else arg for arg in argv]
    for name in flag_values:
        flag_values[name].unparse()  # the defaults again (main may run twice in one process)
    try:
        rest = flag_values([program, *argv])[1:]
    except flags.Error as e:
        fail(program, str(e), 2)
    args = types.SimpleNamespace(**flag_values.flag_values_dict())
    if positional:
        args.positional = rest
    elif rest:
        fail(program, f"unexpected arguments: {' '.join(rest)}", 2)
    return args


def run_script(main: Callable[[list[str]], object], flag_values: flags.FlagValues) -> None:
    """absl's `app.run` for a script with its own FlagValues: absl's flags (--verbosity, ...) are
    parsed here, the script's by `main(argv)`; --help lists the script's. Exit status: what
    `main` returns when it is an int, else 0."""

    def parse(argv):
        if any(arg in ("-h", "--help", "--helpshort", "--helpfull") for arg in argv[1:]):
            print(sys.modules["__main__"].__doc__ or "", flag_values.get_help(), sep="\n")
            sys.exit(0)
        return flags.FLAGS(argv, known_only=True)

    def run(argv):
        status = main(argv[1:])
        return status if isinstance(status, int) else 0

    app.run(run, flags_parser=parse)


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


def quiet_library_logs(*own_files: str, verbose: bool = False) -> None:
    """Installs `QuietLibraries` on absl's logger and asyncio's, and (unless `verbose`) on absl's
    handler, which also prints the records of the libraries' own Python loggers (JAX's backend
    probing); `own_files`: the script's file names.

    Also keeps `sys.unraisablehook` from printing the tracebacks that echo an Orbax failure
    flash_jax has already reported (`_echo_of_a_reported_failure`).
    """
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(QuietLibraries(own_files))
    if not verbose:
        from absl import logging as absl_logging

        absl_logging.get_absl_handler().addFilter(QuietLibraries(own_files))
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _echo_of_a_reported_failure(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
