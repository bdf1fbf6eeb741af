"""Measures the figures the README quotes about its own commands and writes them to
docs/results/readme_figures.json (and .md), where the README's figures come from.

    python scripts/bench/readme_figures.py                 # the memory example (about a minute)
    python scripts/bench/readme_figures.py --train --smoke # also make train, make smoke (minutes)
    python scripts/bench/readme_figures.py --tests         # also CI's `.ci/run` on a fresh clone

Each figure records the command, its wall time from start to exit, what it printed that the
README quotes, and the machine (and whether it was shared with other jobs, as timings then
vary). tests/test_readme.py checks that the README quotes the recorded figures.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time

from absl import flags

from flash_jax import cli
from flash_jax.cli import console
from flash_jax.tools import benchmarks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(REPO, "docs", "results", "readme_figures")
# configs/pg19_flash.py at its full size on the shipped corpus and vocabulary: the train step
# does not fit a small machine, which says so before the first step.
MEMORY_COMMAND = [
    "train.py",
    "--config=configs/pg19_flash.py",
    "--config.data.source=local",
    "--config.data.vocab=flash_jax/data/vocabs/austen_spm_4k.model",
    "--config.model.vocab_size=4096",
    "--workdir=/tmp/flash_jax_readme_memory",
]
SMOKE_COMMAND = ["make", "smoke", "SMOKE_WORKDIR=/tmp/flash_jax_readme_smoke"]
TRAIN_COMMAND = ["make", "train", "WORKDIR=/tmp/flash_jax_readme_train"]

FLAGS = flags.FlagValues()
flags.DEFINE_bool("smoke", False, "Also time `make smoke` (a fresh workdir).", flag_values=FLAGS)
flags.DEFINE_bool("train", False, "Also time `make train` (a fresh workdir).", flag_values=FLAGS)
flags.DEFINE_bool(
    "tests",
    False,
    "Also time `bash .ci/run` (creates .venv, installs, `make test`) in a fresh clone of HEAD.",
    flag_values=FLAGS,
)


def timed(command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    argv = [sys.executable, *command] if command[0].endswith(".py") else command
    start = time.time()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    return round(time.time() - start, 1), proc


def memory_example() -> dict:
    seconds, proc = timed(MEMORY_COMMAND)
    found = re.search(
        r"needs about ([\d.]+) GiB per device .* the device has ([\d.]+) GiB", proc.stderr
    )
    if proc.returncode != 1 or not found:
        raise RuntimeError(
            f"unexpected output of {' '.join(MEMORY_COMMAND)}:\n{proc.stderr[-2000:]}"
        )
    return {
        "command": " ".join(MEMORY_COMMAND),
        "seconds": seconds,
        "needs_gib": float(found.group(1)),
        "device_gib": float(found.group(2)),
    }


def make_target(command: list[str]) -> dict:
    """Times `make <target> VAR=workdir` in a fresh workdir (the one VAR names)."""
    subprocess.run(["rm", "-rf", command[-1].split("=", 1)[1]], check=True)
    seconds, proc = timed(command)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
    return {"command": " ".join(command), "seconds": seconds}


def ci_run() -> dict:
    """Times CI's script, `.ci/run`, on a fresh clone of HEAD: setup, libtpu and the whole suite."""
    with tempfile.TemporaryDirectory() as clone:
        subprocess.run(["git", "clone", "-q", REPO, clone], check=True)
        start = time.time()
        proc = subprocess.run(["bash", ".ci/run"], cwd=clone, capture_output=True, text=True)
        seconds = round(time.time() - start, 1)
    passed = re.search(r"(\d+) passed", proc.stdout)
    if proc.returncode != 0 or not passed:
        raise RuntimeError(f".ci/run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    return {"command": "bash .ci/run", "seconds": seconds, "passed": int(passed.group(1))}


def main(argv=()):
    args = cli.parse_script_flags(FLAGS, argv, "readme_figures.py")
    report = {}
    if os.path.exists(OUT + ".json"):
        with open(OUT + ".json") as f:
            report = json.load(f)
    report["memory_example"] = memory_example()
    if args.train:
        report["make_train"] = make_target(TRAIN_COMMAND)
    if args.smoke:
        report["make_smoke"] = make_target(SMOKE_COMMAND)
    if args.tests:
        report["ci_run"] = ci_run()
    report["machine"] = benchmarks.machine_info()
    print("\n".join(benchmarks.write_report(OUT, report, markdown(report))))


def markdown(report: dict) -> str:
    lines = ["# Figures the README quotes", "", benchmarks.machine_line(report["machine"]), ""]
    for name, figure in report.items():
        if name != "machine":
            found = ", ".join(
                f"{k} {v}" for k, v in figure.items() if k not in ("command", "seconds")
            )
            lines.append(f"- {name}: `{figure['command']}`: {figure['seconds']} s ({found})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    console.quiet(sys.argv)  # before JAX loads (machine_info): its startup lines stay off
    cli.run_script(main, FLAGS)
