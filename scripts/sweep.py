"""Expands a config file's `sweep()` into runs of train.py: run them in turn, or print them.

    python scripts/sweep.py configs/quickstart.py --workdir=runs/sweep           # run in turn
    python scripts/sweep.py configs/quickstart.py --workdir=runs/sweep --print   # one command a run
    python scripts/sweep.py configs/quickstart.py --workdir=runs/s -- --config.train.num_steps=100

`sweep()` returns a list of {"section.key": value} overrides; each run gets its own workdir
(`<workdir>/<key>=<value>,...`) and the overrides as `--config.section.key=value` flags. Extra
arguments after `--` go to every run.
"""

import os
import re
import shlex
import subprocess
import sys

from absl import flags

from flash_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where train.py is

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "Root folder; one subfolder per run.", flag_values=FLAGS)
flags.DEFINE_bool("print", False, "Print the commands, run nothing.", flag_values=FLAGS)
flags.mark_flag_as_required("workdir", flag_values=FLAGS)


def load_sweep(config_path: str) -> list[dict]:
    path = config_path.split(":", 1)[0]
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    module = cli.config_module(path)
    if not hasattr(module, "sweep"):
        raise ValueError(f"{path} has no sweep() function")
    runs = list(module.sweep())
    for overrides in runs:
        for key in overrides:
            if key.count(".") < 1:
                raise ValueError(f"sweep key {key!r} must look like 'section.key'")
    return runs


def flag_value(value) -> str:
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def run_name(overrides: dict) -> str:
    name = ",".join(f"{k.split('.')[-1]}={flag_value(v)}" for k, v in overrides.items())
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name) or "default"


def commands(config: str, workdir: str, runs: list[dict], extra: list[str]) -> list[list[str]]:
    out = []
    for overrides in runs:
        cmd = [
            sys.executable,
            "train.py",
            f"--config={config}",
            f"--workdir={os.path.join(workdir, run_name(overrides))}",
        ]
        cmd += [f"--config.{k}={flag_value(v)}" for k, v in overrides.items()]
        out.append(cmd + list(extra))
    return out


def main(argv=()) -> int:
    args = cli.parse_script_flags(FLAGS, argv, "sweep.py", positional=True)
    if not args.positional:
        cli.fail("sweep.py", "expected a config file with a sweep() function", 2)
    config, *extra = args.positional  # extra: the arguments after --, for every run
    try:
        runs = load_sweep(config)
    except ValueError as e:
        print(f"sweep.py: error: {e}", file=sys.stderr)
        return 2
    cmds = commands(config, args.workdir, runs, extra)
    if args.print:
        for cmd in cmds:
            print(shlex.join(["python", *cmd[1:]]))
        return 0
    failed = 0
    for i, cmd in enumerate(cmds, 1):
        print(f"[{i}/{len(cmds)}] {shlex.join(cmd[1:])}", flush=True)
        failed += subprocess.run(cmd, cwd=REPO).returncode != 0
    if failed:
        print(f"sweep.py: {failed} of {len(cmds)} runs failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    cli.run_script(main, FLAGS)
