"""Expands a config file's `sweep()` into runs of train.py: run them in turn, or print them; then
a table of every run's final eval perplexity and speed.

    python scripts/sweep.py configs/quickstart.py --workdir=runs/sweep           # run in turn
    python scripts/sweep.py configs/quickstart.py --workdir=runs/sweep --print   # one command a run
    python scripts/sweep.py configs/quickstart.py --workdir=runs/sweep --table   # table only
    python scripts/sweep.py configs/quickstart.py --workdir=runs/s -- --config.train.num_steps=100

`sweep()` returns a list of {"section.key": value} overrides; each run gets its own workdir
(`<workdir>/<key>=<value>,...`) and the overrides as `--config.section.key=value` flags. Extra
arguments after `--` go to every run. After the runs (or with --table, for runs made elsewhere,
e.g. from --print's commands on a cluster), `<workdir>/sweep.md` and `sweep.json` list every run:
its last step, its last periodic eval (token perplexity and loss over train.eval_batches batches
of train.eval_split, from its metrics.jsonl) and its speed (median tokens/s and s/step over its
logged windows); a run without records is listed as missing.
"""

import json
import os
import re
import shlex
import statistics
import subprocess
import sys

from absl import flags

from flash_jax import cli, runs
from flash_jax.tools import benchmarks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where train.py is

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "Root folder; one subfolder per run.", flag_values=FLAGS)
flags.DEFINE_bool("print", False, "Print the commands, run nothing.", flag_values=FLAGS)
flags.DEFINE_bool(
    "table",
    False,
    "Write the table of the runs already in --workdir, run nothing.",
    flag_values=FLAGS,
)
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


def run_row(name: str, workdir: str) -> dict:
    """One run's line of the table, from its workdir's config.json and metrics.jsonl."""
    row = {"run": name, "workdir": workdir}
    records = runs.read_jsonl(os.path.join(workdir, runs.METRICS_FILE))
    train = [r for r in records if "loss" in r and "eval_perplexity" not in r]
    evals = [r for r in records if "eval_perplexity" in r]
    if not train:
        return {**row, "status": "missing"}
    config_path = os.path.join(workdir, runs.CONFIG_FILE)
    config = {}
    if os.path.exists(config_path):
        with open(config_path) as f:
            config = json.load(f)
    train_config = config.get("train", {})
    row.update(
        status="ok",
        model=config.get("model", {}).get("name"),
        step=max(r["step"] for r in train),
        num_steps=train_config.get("num_steps"),
        train_loss=train[-1]["loss"],
    )
    if evals:
        row.update(
            eval_step=evals[-1]["step"],
            eval_split=train_config.get("eval_split"),
            eval_batches=train_config.get("eval_batches"),
            eval_loss=evals[-1]["eval_loss"],
            eval_perplexity=evals[-1]["eval_perplexity"],
        )
    for key in ("tokens_per_sec", "step_time"):
        values = [r[key] for r in train if isinstance(r.get(key), (int, float))]
        row[key] = statistics.median(values) if values else None
    return row


def _cell(value, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| run | model | step | eval perplexity (token) | eval loss | train loss | tokens/s "
        "| s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['run']} | {r['status']} | | | | | | |")
            continue
        lines.append(
            f"| {r['run']} | {r['model']} | {r['step']} "
            f"| {_cell(r.get('eval_perplexity'), '{:.2f}')} "
            f"| {_cell(r.get('eval_loss'), '{:.4f}')} | {r['train_loss']:.4f} "
            f"| {_cell(r['tokens_per_sec'], '{:,.0f}')} | {_cell(r['step_time'], '{:.3f}')} |"
        )
    evals = {(r.get("eval_split"), r.get("eval_batches")) for r in rows if "eval_split" in r}
    note = "; ".join(f"{split}, {batches} batches" for split, batches in sorted(evals, key=str))
    return "\n".join(
        [
            *lines,
            "",
            "eval: the last periodic evaluation of each run (" + (note or "none") + "); speed: "
            "median over its logged windows.",
            "",
        ]
    )


def write_table(workdir: str, runs: list[dict]) -> list[str]:
    """`<workdir>/sweep.md` and `sweep.json`: one row per run of the sweep."""
    rows = [run_row(run_name(o), os.path.join(workdir, run_name(o))) for o in runs]
    return benchmarks.write_report(
        os.path.join(workdir, "sweep"), {"runs": rows}, markdown_table(rows)
    )


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
    if not args.table:
        for i, cmd in enumerate(cmds, 1):
            print(f"[{i}/{len(cmds)}] {shlex.join(cmd[1:])}", flush=True)
            failed += subprocess.run(cmd, cwd=REPO).returncode != 0
    paths = write_table(args.workdir, runs)
    with open(paths[1]) as f:
        print(f.read(), end="")
    print(f"table: {' and '.join(paths)}", flush=True)
    if failed:
        print(f"sweep.py: {failed} of {len(cmds)} runs failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    cli.run_script(main, FLAGS)
