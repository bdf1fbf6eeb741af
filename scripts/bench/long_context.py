"""Long-context study: trained runs scored at several window lengths and by position
(flash_jax.long_context, what eval.py --context / --stride / --whole_documents do), one table,
JSON and two plots.

    python scripts/bench/long_context.py --workdir=runs/long/flash,runs/long/transformer_pp,\
runs/long/combiner --contexts=512,1024,2048,4096,8192,16384 --name=long_context_cpu

Per run (latest checkpoint, validation split): windows of each context. Models whose cache grows
(Transformer++, FLASH-Quad, ...) are scored only up to their max_len, plus sliding windows of
max_len advancing by max_len / 2 (each token with at least max_len / 2 before it); FLASH,
Performer and Combiner also as whole documents (the state carried, windows of the training
length). Writes
`<out_dir>/<name>.{json,md}`, `<name>_by_context.png` (perplexity against window length) and
`<name>_by_position.png` (perplexity by position, at the longest context and whole documents).
"""

from __future__ import annotations

import json
import math
import os
import sys

from absl import flags

from flash_jax import cli
from flash_jax.cli import console

FLAGS = flags.FlagValues()
flags.DEFINE_list("workdir", None, "Runs to score (latest checkpoint each).", flag_values=FLAGS)
CONTEXTS = ["512", "1024", "2048", "4096", "8192", "16384"]
flags.DEFINE_list("contexts", CONTEXTS, "Window lengths.", flag_values=FLAGS)
flags.DEFINE_string("split", "validation", "Split.", flag_values=FLAGS)
flags.DEFINE_string("out_dir", "docs/results", "Where the report goes.", flag_values=FLAGS)
flags.DEFINE_string("name", "long_context_cpu", "Output file name stem.", flag_values=FLAGS)
flags.DEFINE_string(
    "reuse",
    "",
    "A report of this script whose runs (same workdir and step) are not rescored.",
    flag_values=FLAGS,
)


def settings_for(model_cfg, train_len: int, contexts: list[int]):
    """(label, Settings) to score one run with (see the module docstring)."""
    from flash_jax import long_context as lc

    out = []
    for n in contexts:
        if model_cfg.name in lc.GROWING_CACHE and n > model_cfg.max_len:
            continue
        out.append((str(n), lc.Settings(context=n)))
    if model_cfg.name in lc.GROWING_CACHE:
        m = model_cfg.max_len
        out.append((f"sliding {m}/{m // 2}", lc.Settings(context=m, stride=m // 2)))
    if model_cfg.name in lc.WHOLE_DOCUMENT_MODELS:
        out.append(("whole documents", lc.Settings(context=train_len, whole_documents=True)))
    return out


def markdown(rows: list[dict], contexts: list[int], machine: str) -> str:
    """The table: perplexity per run and window setting ("-": not scored, see the docstring)."""
    from flash_jax.config import DISPLAY_NAMES

    labels = [str(n) for n in contexts] + sorted(
        {k for row in rows for k in row["results"] if not k.isdigit()}
    )
    lines = [
        "# Long context: validation perplexity by window length",
        "",
        machine,
        "",
        "| model | trained at | " + " | ".join(labels) + " | evaluation time |",
        "|---|---|" + "---|" * (len(labels) + 1),
    ]
    for row in rows:
        got = row["results"]
        cells = [f"{got[k]['perplexity']:.2f}" if k in got else "-" for k in labels]
        name = DISPLAY_NAMES.get(row["model"], row["model"])
        eval_seconds = sum(r["seconds"] for r in got.values())
        lines.append(
            f"| {name} | {row['train_len']} | " + " | ".join(cells) + f" | {eval_seconds:.0f} s |"
        )
    lines += [
        "",
        "Perplexity by position in the window (the longest window scored, and whole documents):",
    ]
    for row in rows:
        for label in (longest_window(row), "whole documents"):
            if label not in row["results"]:
                continue
            buckets = [b for b in row["results"][label]["loss_by_position"] if b["tokens"]]
            name = DISPLAY_NAMES.get(row["model"], row["model"])
            lines += [
                "",
                f"{name}, {label if not label.isdigit() else f'windows of {label}'}:",
                "",
                "| positions | " + " | ".join(f"{b['start']}-{b['end']}" for b in buckets) + " |",
                "|---|" + "---|" * len(buckets),
                "| perplexity | "
                + " | ".join(f"{math.exp(b['loss']):.2f}" for b in buckets)
                + " |",
                "| tokens | " + " | ".join(f"{b['tokens']:,}" for b in buckets) + " |",
            ]
    return "\n".join(lines) + "\n"


def longest_window(row: dict) -> str:
    return max((k for k in row["results"] if k.isdigit()), key=int)


def main(argv=()) -> dict:
    args = cli.parse_script_flags(FLAGS, argv, "long_context.py")
    if not args.workdir:
        cli.fail("long_context.py", "--workdir is required", 2)
    try:
        contexts = [int(c) for c in args.contexts]
    except ValueError:
        cli.fail("long_context.py", f"--contexts must be integers, got {args.contexts}", 2)

    from flash_jax import evaluation
    from flash_jax.tools import benchmarks
    from flash_jax.train import checkpoint_reader

    reused = {}
    if args.reuse:
        with open(args.reuse) as f:
            earlier = json.load(f)
        reused = {(r["workdir"], r["step"]): r for r in earlier["runs"]}
    rows = []
    for workdir in args.workdir:
        run = checkpoint_reader.restore(workdir)
        if (workdir, run.step) in reused:
            rows.append(reused[workdir, run.step])
            continue
        train_len = run.config.data.seq_len
        row = {"workdir": workdir, "model": run.model_config.name, "step": run.step}
        row.update(train_len=train_len, max_len=run.model_config.max_len, results={})
        for label, settings in settings_for(run.model_config, train_len, contexts):
            result = evaluation.evaluate_split(run, args.split, settings=settings)
            print(
                f"{workdir} {label}: perplexity {result['perplexity']:.3f} "
                f"({result['tokens']:,} tokens, {result['seconds']:.0f} s)",
                flush=True,
            )
            row["results"][label] = result
        rows.append(row)
    info = benchmarks.machine_info()
    report = {"machine": info, "contexts": contexts, "runs": rows}
    stem = os.path.join(args.out_dir, args.name)
    text = markdown(rows, contexts, benchmarks.machine_line(info))
    benchmarks.write_report(stem, report, text)
    print(text)
    _plots(rows, contexts, stem)
    print(f"wrote {stem}.json, {stem}.md, {stem}_by_context.png, {stem}_by_position.png")
    return report


def _plots(rows: list[dict], contexts: list[int], stem: str) -> None:
    from flash_jax.config import DISPLAY_NAMES
    from flash_jax.tools import plots

    def name(row):
        return DISPLAY_NAMES.get(row["model"], row["model"])

    lines = []
    for row in rows:
        scored = [n for n in contexts if str(n) in row["results"]]
        lines.append((name(row), scored, [row["results"][str(n)]["perplexity"] for n in scored]))
    # A linear y axis: the values span a few percent, where a log axis labels no tick.
    panel = plots.Panel(
        "window length (tokens)", "token perplexity", lines, log_x=True, log_y=False
    )
    plots.plot_panels(f"{stem}_by_context.png", [panel], "validation perplexity by window")
    by_position = []
    for row in rows:
        longest = longest_window(row)
        by_position.append((f"{name(row)}, windows of {longest}", row["results"][longest]))
        if "whole documents" in row["results"]:
            by_position.append((f"{name(row)}, whole documents", row["results"]["whole documents"]))
    plots.plot_by_position(by_position, f"{stem}_by_position.png", title="validation split")


if __name__ == "__main__":
    console.quiet(sys.argv)
    cli.run_script(main, FLAGS)
