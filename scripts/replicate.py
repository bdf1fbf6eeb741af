"""Replication of the paper's speed / quality comparison at a small scale.

Trains the setting's models (configs/replicate.py: FLASH, FLASH-Quad and Transformer++ for "cpu";
also Performer and Combiner at 2,048-token contexts for "long") of about the same parameter count
(FLASH-family models have twice the Transformer's layers) under one budget (same steps and tokens
per step) on the shipped corpus, with the project's own training loop (`train_and_evaluate`, one
workdir per model, periodic eval on the validation split). Then reports validation perplexity
against steps and against training wall time (markdown table, JSON, PNG plot) and the paper's
Table 3 measure: the speed-up at equal perplexity.

    python scripts/replicate.py                          # CPU setting: ~15 min on 2 shared cores
    python scripts/replicate.py --setting=long --workdir=runs/replicate_long \
        --name=replicate_long_cpu                        # long contexts, CPU: under an hour
    python scripts/replicate.py --setting=accelerator --workdir=runs/replicate_acc \
        --name=replicate_accelerator                     # one GPU / TPU host (see the config)

A workdir that already holds a finished run is not retrained (the loop resumes from its final
checkpoint and stops at once), so rerunning only redoes the report.

Training wall time is the loop's own `step_time` (eval and checkpointing excluded; the first step,
which includes the compile, is counted at its log window's mean step rate).
"""

from __future__ import annotations

import os

from absl import flags, logging
from flax import nnx

from configs import replicate
from flash_jax import cli, models, runs
from flash_jax.config import DISPLAY_NAMES as LABELS
from flash_jax.tools import benchmarks, plots

FLAGS = flags.FlagValues()
flags.DEFINE_enum("setting", "cpu", list(replicate.SETTINGS), "Setting.", flag_values=FLAGS)
flags.DEFINE_list("models", None, "Models (default: the setting's).", flag_values=FLAGS)
flags.DEFINE_string("baseline", "transformer_pp", "The speed-ups' baseline.", flag_values=FLAGS)
flags.DEFINE_string("workdir", "runs/replicate", "One sub-folder per model.", flag_values=FLAGS)
flags.DEFINE_string("out_dir", "docs/results", "Where the report goes.", flag_values=FLAGS)
flags.DEFINE_string("name", "replicate_cpu", "Output file name stem.", flag_values=FLAGS)
for _key in ("num_steps", "eval_every", "eval_batches", "log_every"):
    flags.DEFINE_integer(_key, None, f"train.{_key} (default: the setting's).", flag_values=FLAGS)


# ----------------------------------------------------------------------------- curves


def first_reach(xs, perplexities, target: float) -> float | None:
    """The first x at which a curve reaches `target` (perplexity <= target), interpolating
    linearly between consecutive eval points; None if it never does. A curve already at or
    below the target at its first point gives that point's x (there is no earlier point)."""
    if len(xs) != len(perplexities):
        raise ValueError(f"curve has {len(xs)} x values but {len(perplexities)} perplexities")
    for i, (x, p) in enumerate(zip(xs, perplexities, strict=True)):
        if p <= target:
            if i == 0:
                return float(x)
            x0, p0 = xs[i - 1], perplexities[i - 1]
            return float(x0 + (p0 - target) / (p0 - p) * (x - x0))
    return None


def speedup_at_equal_perplexity(baseline_x, baseline_ppl, candidate_x, candidate_ppl) -> dict:
    """The paper's Table 3 measure: the baseline's cost (steps or time) for its final validation
    perplexity over the candidate's cost to first reach that same perplexity (interpolated).

    Returns {"target_perplexity", "baseline", "candidate", "speedup"}; candidate and speedup are
    None when the candidate never reaches the target.
    """
    if not len(baseline_x) or not len(candidate_x):
        raise ValueError("speed-up needs non-empty curves")
    target = float(baseline_ppl[-1])
    baseline_cost = float(baseline_x[-1])
    candidate_cost = first_reach(candidate_x, candidate_ppl, target)
    return {
        "target_perplexity": target,
        "baseline": baseline_cost,
        "candidate": candidate_cost,
        "speedup": None if not candidate_cost else baseline_cost / candidate_cost,
    }


# ----------------------------------------------------------------------------- running


def model_config(model: str, setting: str, args) -> object:
    config = replicate.get_config(f"{model},{setting}")
    t = config.train
    for key in ("num_steps", "eval_every", "eval_batches", "log_every"):
        value = getattr(args, key)
        if value is not None:
            t[key] = value
    if args.num_steps is not None:
        t.checkpoint_every = args.num_steps
        t.warmup_steps = min(t.warmup_steps, max(args.num_steps // 10, 0))
    return config


def count_params(config) -> int:
    abstract = nnx.eval_shape(lambda: models.create(config.model, rngs=nnx.Rngs(0)))
    return models.count_params(abstract)


def run(args) -> dict:
    from flash_jax.train import loop

    trained = {}
    for model in args.models:
        config = model_config(model, args.setting, args)
        workdir = os.path.join(args.workdir, model)
        print(f"== {LABELS.get(model, model)}: training in {workdir}", flush=True)
        summary = loop.train_and_evaluate(config, workdir)
        if summary["status"] != "done":
            raise RuntimeError(f"{model}: training stopped early ({summary['status']})")
        curve = runs.training_curve(workdir)
        trained[model] = {
            "label": LABELS.get(model, model),
            "workdir": workdir,
            "num_params": count_params(config),
            "num_layers": int(config.model.num_layers),
            "final_eval_perplexity": curve["eval_perplexity"][-1],
            "train_time_s": curve["train_time_s"][-1],
            "curve": curve,
        }
    return trained


def speedups(trained: dict, baseline: str) -> dict:
    if baseline not in trained:
        return {}
    base_curve = trained[baseline]["curve"]
    out = {}
    for model, result in trained.items():
        if model == baseline:
            continue
        curve = result["curve"]
        out[model] = {
            key: speedup_at_equal_perplexity(
                base_curve[key], base_curve["eval_perplexity"], curve[key], curve["eval_perplexity"]
            )
            for key in ("step", "train_time_s")
        }
    return out


# ----------------------------------------------------------------------------- reporting


def _fmt_speedup(entry: dict, unit: str) -> str:
    if entry["candidate"] is None:
        return "not reached"
    fmt = "{:.0f}" if unit == "steps" else "{:.0f} s"
    return (
        f"{entry['speedup']:.2f}x ({fmt.format(entry['baseline'])} vs "
        f"{fmt.format(entry['candidate'])})"
    )


def markdown(report: dict) -> str:
    trained, info = report["models"], report["setup"]
    models = list(trained)
    lines = [
        f"# Replication: {', '.join(trained[m]['label'] for m in models)}",
        "",
        f"Setting `{info['setting']}`: {info['tokens_per_step']:,} tokens per step "
        f"({info['batch_size']} x {info['seq_len']}), {info['num_steps']} steps per model, "
        f"eval every {info['eval_every']} steps on {info['eval_batches']} validation batches of "
        f"the shipped corpus ({info['dataset']}, {info['data_source']}).",
        "",
        benchmarks.machine_line(report["machine"]),
        "",
        f"Command: `{report['command']}`",
        "",
        "| model | layers | parameters | final val. perplexity | training time | s / step |",
        "|---|---|---|---|---|---|",
    ]
    for m in models:
        r = trained[m]
        lines.append(
            f"| {r['label']} | {r['num_layers']} | {r['num_params'] / 1e6:.2f}M | "
            f"{r['final_eval_perplexity']:.2f} | {r['train_time_s']:.0f} s | "
            f"{r['curve']['mean_step_time_s']:.2f} |"
        )
    if report["speedup"]:
        base_label = trained[report["baseline"]]["label"]
        lines += [
            "",
            f"Speed-up at equal perplexity (paper's Table 3 measure): {base_label}'s cost for its "
            f"final validation perplexity over the model's cost to first reach it (linear "
            f"interpolation between eval points).",
            "",
            "| model | target perplexity | speed-up in steps | speed-up in training time |",
            "|---|---|---|---|",
        ]
        for m, entry in report["speedup"].items():
            lines.append(
                f"| {trained[m]['label']} | {entry['step']['target_perplexity']:.2f} | "
                f"{_fmt_speedup(entry['step'], 'steps')} | "
                f"{_fmt_speedup(entry['train_time_s'], 'time')} |"
            )
    lines += [
        "",
        "Validation perplexity (training time in seconds in brackets):",
        "",
        "| step | " + " | ".join(trained[m]["label"] for m in models) + " |",
        "|---|" + "---|" * len(models),
    ]
    steps = sorted({s for m in models for s in trained[m]["curve"]["step"]})
    for s in steps:
        cells = []
        for m in models:
            curve = trained[m]["curve"]
            if s in curve["step"]:
                i = curve["step"].index(s)
                cells.append(f"{curve['eval_perplexity'][i]:.2f} ({curve['train_time_s'][i]:.0f})")
            else:
                cells.append("")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    """Validation perplexity against step and against training time, one line per model."""
    lines = {
        f"{r['label']} ({r['num_params'] / 1e6:.1f}M)": r["curve"]
        for r in report["models"].values()
    }
    panels = [
        plots.Panel(
            xlabel,
            "validation perplexity",
            [(k, c[x], c["eval_perplexity"]) for k, c in lines.items()],
        )
        for x, xlabel in (("step", "training step"), ("train_time_s", "training wall time (s)"))
    ]
    title = (
        f"Replication ({report['setup']['setting']}): {benchmarks.device_name(report['machine'])}"
    )
    plots.plot_panels(path, panels, title)


def parse_args(argv=()):
    args = cli.parse_script_flags(FLAGS, argv, "replicate.py")
    args.models = args.models or list(replicate.SETTINGS[args.setting]["models"])
    bad = [m for m in args.models if m not in replicate.MODELS]
    if bad:
        cli.fail("replicate.py", f"--models: choose from {replicate.MODELS}, got {args.models}", 2)
    for key in ("num_steps", "eval_every", "eval_batches", "log_every"):
        value = getattr(args, key)
        if value is not None and value < 1:
            cli.fail("replicate.py", f"--{key} must be >= 1, got {value}", 2)
    return args


def main(argv=()) -> dict:
    args = parse_args(argv)
    trained = run(args)
    config = model_config(args.models[0], args.setting, args)
    report = {
        "command": " ".join(["python scripts/replicate.py", *argv]),
        "machine": benchmarks.machine_info(),
        "setup": {
            "setting": args.setting,
            "seq_len": int(config.data.seq_len),
            "batch_size": int(config.data.batch_size),
            "tokens_per_step": int(config.data.seq_len * config.data.batch_size),
            "num_steps": int(config.train.num_steps),
            "eval_every": int(config.train.eval_every),
            "eval_batches": int(config.train.eval_batches),
            "learning_rate": float(config.train.learning_rate),
            "dataset": config.data.dataset,
            "data_source": os.path.basename(str(config.data.data_dir)),
        },
        "baseline": args.baseline,
        "models": trained,
        "speedup": speedups(trained, args.baseline),
    }
    stem = os.path.join(args.out_dir, args.name)
    text = markdown(report)
    benchmarks.write_report(stem, report, text)
    plot(report, stem + ".png")
    print(text)
    print(f"wrote {stem}.json, {stem}.md, {stem}.png")
    return report


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)  # the loop's progress lines (loss, s/step, ETA)
    cli.run_script(main, FLAGS)
