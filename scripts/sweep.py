"""Expands a config file's `sweep()` into runs of train.py: run them in turn, or print them.

    python scripts/sweep.py configs/quickstart.py --workdir=runs/sweep           # run in turn
    python scripts/sweep.py configs/quickstart.py --workdir=runs/sweep --print   # one command a run
    python scripts/sweep.py configs/quickstart.py --workdir=runs/s -- --config.train.num_steps=100

`sweep()` returns a list of {"section.key": value} overrides; each run gets its own workdir
(`<workdir>/<key>=<value>,...`) and the overrides as `--config.section.key=value` flags. Extra
arguments after `--` go to every run.
"""

import argparse
import importlib.util
import os
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_sweep(config_path: str) -> list[dict]:
    path = config_path.split(":", 1)[0]
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    sys.path.insert(0, REPO)  # config files import `configs.*`
    spec = importlib.util.spec_from_file_location("_swept_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="config file with a sweep() function, optionally :ARG")
    parser.add_argument("--workdir", required=True, help="root folder; one subfolder per run")
    parser.add_argument("--print", action="store_true", help="print the commands, run nothing")
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    try:
        runs = load_sweep(args.config)
    except ValueError as e:
        print(f"sweep.py: error: {e}", file=sys.stderr)
        return 2
    cmds = commands(args.config, args.workdir, runs, extra)
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
    sys.exit(main())
