"""Training-step speed of the paper's six models (FLASH, FLASH-Quad, Transformer, Transformer++,
Performer, Combiner) against context length at a fixed number of tokens per step.

For each model and context length T: the project's own jitted train step (flash_jax.train.step:
forward, backward and optimizer update, remat as configured) on synthetic batches of uniformly
random tokens (one document per row), batch = tokens_per_step / T. Reports the median step time over
`--repeats` timed steps after `--warmup` untimed ones, tokens/s, achieved TFLOP/s from the compiled
program's cost analysis and from the analytic count (`flash_jax.train.flops`), model FLOPs
utilisation against the device's peak where known, and peak device memory
(`device.memory_stats()`, n/a where the backend has none, e.g. CPU; the compiled program's own
memory estimate is given too).

    # CPU (small widths: a few minutes)
    python scripts/benchmark.py
    # GPU / TPU at the paper's ~110M scale
    python scripts/benchmark.py --size=base --dtype=bfloat16 --attention_impl=cudnn \
        --contexts=512,1024,2048,4096,8192,16384,32768 --tokens_per_step=65536 \
        --vocab_size=32128 --remat=full --name=scaling_gpu

Each model x context runs in a fresh process by default (`--isolate`): peak memory is then that
configuration's own, and one that runs out of memory is recorded as an error instead of ending the
benchmark. Writes <out_dir>/<name>.json, .md and .png.

Note on XLA's cost analysis: it counts the body of a while loop once, and the layers are one
scanned body (flash_jax.models), so its raw FLOP count misses (num_layers - 1) layers. The reported
"compiled" FLOPs add them back from a separately compiled forward + backward of one layer
(`layer_flops`); the raw number is kept in the JSON as `flops_compiled_raw`.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import flash_jax
from flash_jax import cli, models, runs, sharding
from flash_jax.config import DISPLAY_NAMES, DTYPES, REMAT
from flash_jax.dispatch import ATTENTION_IMPLS, FLASH_IMPLS
from flash_jax.tools import benchmarks, plots
from flash_jax.train import flops, step

MODELS = ("flash", "flash_quad", "transformer", "transformer_pp", "performer", "combiner")
# Models whose cost per token does not grow (or grows slowly) with the context: never skipped by
# --max_quadratic_context, and checked for a flat step time.
SUBQUADRATIC = ("flash", "performer", "combiner")
ROW_KEYS = (
    "model",
    "label",
    "context",
    "batch_size",
    "tokens_per_step",
    "num_params",
    "num_layers",
    "compile_s",
    "step_times_s",
    "step_time_median_s",
    "tokens_per_s",
    "flops_compiled_raw",
    "flops_compiled",
    "flops_analytic",
    "tflops_compiled",
    "tflops_analytic",
    "mfu",
    "peak_memory_bytes",
    "compiled_memory_bytes",
    "error",
)

FLAGS = flags.FlagValues()
flags.DEFINE_list("models", list(MODELS), "Models, each optionally @impl.", flag_values=FLAGS)
cli.define_int_list("contexts", [512, 1024, 2048, 4096, 8192], "Context lengths.", FLAGS)
flags.DEFINE_integer("tokens_per_step", 8192, "Tokens per step.", flag_values=FLAGS)
flags.DEFINE_enum("size", "tiny", list(models.SIZES), "Size preset.", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", DTYPES, "Compute dtype.", flag_values=FLAGS)
flags.DEFINE_enum("param_dtype", "float32", DTYPES, "Parameter dtype.", flag_values=FLAGS)
flags.DEFINE_enum("attention_impl", "auto", ATTENTION_IMPLS, "Transformer MHSA.", flag_values=FLAGS)
flags.DEFINE_enum("flash_impl", "auto", FLASH_IMPLS, "FLASH's attention.", flag_values=FLAGS)
flags.DEFINE_enum("remat", "none", REMAT, "Remat policy.", flag_values=FLAGS)
flags.DEFINE_bool("unroll_layers", False, "Unrolled layer stack.", flag_values=FLAGS)
flags.DEFINE_integer(
    "loss_blocks",
    1,
    "train.loss_blocks: the loss in blocks, no whole logits (> 1: no compiled FLOPs, XLA counts "
    "the blocks' scan body once).",
    flag_values=FLAGS,
)
flags.DEFINE_integer("chunk_size", 256, "FLASH's C (paper: 256).", flag_values=FLAGS)
flags.DEFINE_integer("qk_dim", 0, "s; 0 keeps the size preset's.", flag_values=FLAGS)
flags.DEFINE_integer(
    "transformer_layers", 0, "Transformers' depth; 0: the preset's.", flag_values=FLAGS
)
flags.DEFINE_integer("vocab_size", 4096, "Vocabulary size.", flag_values=FLAGS)
flags.DEFINE_bool(
    "compiled_flops", True, "Also XLA's FLOP count (compiles more).", flag_values=FLAGS
)
flags.DEFINE_integer("warmup", 2, "Untimed steps.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 10, "Timed steps.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed of the synthetic batch.", flag_values=FLAGS)
flags.DEFINE_integer(
    "max_quadratic_context", 0, "Skip quadratic models above (0: none).", flag_values=FLAGS
)
flags.DEFINE_bool("isolate", True, "A fresh process per row (own peak memory).", flag_values=FLAGS)
flags.DEFINE_string("out_dir", "docs/results", "Where the outputs go.", flag_values=FLAGS)
flags.DEFINE_string("name", "scaling_cpu", "Output file name stem.", flag_values=FLAGS)
flags.DEFINE_string(
    "render_only", None, "Rewrite from this JSON; measure nothing.", flag_values=FLAGS
)
flags.DEFINE_string("only", None, "model:context, for a child of --isolate.", flag_values=FLAGS)
flags.DEFINE_string("row_out", None, "Where a child of --isolate writes.", flag_values=FLAGS)
# The flags that make the config of a row (benchmarks.bench_config's arguments).
CONFIG_FLAGS = (
    "size",
    "tokens_per_step",
    "chunk_size",
    "vocab_size",
    "dtype",
    "param_dtype",
    "remat",
    "unroll_layers",
    "loss_blocks",
    "attention_impl",
    "flash_impl",
    "qk_dim",
    "transformer_layers",
)


def config_flags(args) -> dict:
    """bench_config's arguments from the flags (or a saved report's setup: older ones lack some)."""
    values = args if isinstance(args, dict) else vars(args)
    return {k: values[k] for k in CONFIG_FLAGS if k in values}


# ----------------------------------------------------------------------------- FLOP counts


def layer_flops(config, mesh, batch_size: int, context: int) -> float | None:
    """Compiled FLOPs (per device) of one layer's forward + backward, remat as configured: what
    the cost analysis counts once for the scanned layer stack but the step runs num_layers times.
    """
    rules = config.mesh.rules
    cfg = config.model  # its activation constraints use the mesh's rules, as the full model's
    abstract_layer = nnx.eval_shape(lambda: models.LAYER_TYPES[cfg.name](cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract_layer, nnx.Param, ...)

    def loss(params, rest, x_BTD, segment_ids, positions):
        layer = nnx.merge(graphdef, params, rest)

        def apply(x):
            return layer(x, segment_ids, positions)

        if cfg.remat != "none":
            apply = jax.checkpoint(apply, policy=models.remat_policy(cfg.remat))
        return jnp.sum(apply(x_BTD).astype(jnp.float32))

    spec_BT = sharding.logical_to_spec(step.BATCH_AXES, rules, mesh.axis_names)
    bt = NamedSharding(mesh, spec_BT)
    btd = NamedSharding(mesh, PartitionSpec(*spec_BT, None))
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = (
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), params),
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), rest),
        jax.ShapeDtypeStruct((batch_size, context, cfg.d_model), cfg.compute_dtype, sharding=btd),
        jax.ShapeDtypeStruct((batch_size, context), jnp.int32, sharding=bt),
        jax.ShapeDtypeStruct((batch_size, context), jnp.int32, sharding=bt),
    )
    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 2)))
    return benchmarks.cost_flops(grad_fn.lower(*abstract).compile())


# ----------------------------------------------------------------------------- one measurement


def label(model: str) -> str:
    name, impl = benchmarks.split_variant(model)
    return DISPLAY_NAMES.get(name, name) + (f" ({impl})" if impl else "")


def measure(args, model: str, context: int) -> dict:
    """Compiles and times the train step of one model at one context length (in this process)."""
    config = benchmarks.bench_config(model, context, **config_flags(args))
    model_config = config.model
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axis_names)
    data_parallel = step.data_parallel_size(mesh, config.mesh.rules)
    if config.data.batch_size % data_parallel:
        raise ValueError(
            f"data.batch_size ({config.data.batch_size}) must be divisible by the "
            f"data-parallel size ({data_parallel})"
        )
    B, T = config.data.batch_size, context
    row = {
        "model": model,
        "label": label(model),
        "context": T,
        "batch_size": B,
        "tokens_per_step": B * T,
        "num_layers": model_config.num_layers,
    }
    with jax.set_mesh(mesh):
        fns = step.build(config, mesh)
        row["num_params"] = fns.num_params
        rest = fns.init_rest()
        state = fns.init_state()
        batch = step.put_batch(
            benchmarks.synthetic_batch(B, T, model_config.vocab_size, seed=args.seed),
            fns.batch_sharding,
        )
        batch_abstract = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=fns.batch_sharding)
            for k, v in batch.items()
        }
        t0 = time.perf_counter()
        train_step = fns.train_step.lower(fns.abstract_state, rest, batch_abstract).compile()
        row["compile_s"] = time.perf_counter() - t0

        # Cost analysis is per device (the SPMD program); totals are x the number of devices.
        counted = args.compiled_flops and config.train.loss_blocks == 1
        raw = benchmarks.cost_flops(train_step) if counted else None
        one_layer = layer_flops(config, mesh, B, T) if raw is not None else None
        num_devices = mesh.size
        row["flops_compiled_raw"] = None if raw is None else raw * num_devices
        row["flops_compiled"] = (
            None
            if raw is None or one_layer is None
            else (raw + (model_config.num_layers - 1) * one_layer) * num_devices
        )
        row["flops_analytic"] = flops.analytic_flops(model_config, T, B * T, fns.num_params)[
            "total"
        ]

        for _ in range(args.warmup):
            state, metrics = train_step(state, rest, batch)
        jax.block_until_ready((state, metrics) if args.warmup else state)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            state, metrics = train_step(state, rest, batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            raise FloatingPointError(f"{model} at T={T}: non-finite loss {loss}")

        memory = train_step.memory_analysis()
        row["compiled_memory_bytes"] = (
            None
            if memory is None
            else int(
                memory.temp_size_in_bytes
                + memory.argument_size_in_bytes
                + memory.output_size_in_bytes
                - memory.alias_size_in_bytes
            )
        )
        stats = jax.devices()[0].memory_stats()
        row["peak_memory_bytes"] = (stats or {}).get("peak_bytes_in_use")

    median = statistics.median(times)
    peak = flops.peak_flops_per_device(jax.devices()[0].device_kind)
    row.update(
        step_times_s=times,
        step_time_median_s=median,
        tokens_per_s=B * T / median,
        tflops_compiled=None
        if row["flops_compiled"] is None
        else row["flops_compiled"] / median / 1e12,
        tflops_analytic=row["flops_analytic"] / median / 1e12,
        mfu=None if peak is None else row["flops_analytic"] / median / (peak * num_devices),
        error=None,
    )
    return row


def error_row(model: str, context: int, tokens_per_step: int, message: str) -> dict:
    row = dict.fromkeys(ROW_KEYS)
    row.update(
        model=model,
        label=label(model),
        context=context,
        batch_size=tokens_per_step // context,
        tokens_per_step=tokens_per_step,
        step_times_s=[],
        error=message,
    )
    return row


# ----------------------------------------------------------------------------- running all


# What a child of --isolate is given.
_PASSED_FLAGS = (
    *CONFIG_FLAGS,
    "warmup",
    "repeats",
    "seed",
    "max_quadratic_context",
    "compiled_flops",
)


def _flag(key: str, value) -> str:
    if isinstance(value, bool):
        return f"--{key}" if value else f"--no{key}"
    return f"--{key}={value}"


def run_isolated(args, model: str, context: int) -> tuple[dict, dict | None]:
    """One measurement in a fresh Python process; (row, machine info of that process)."""
    # The child imports this process's flash_jax, whichever copy of the package is installed.
    package_root = os.path.dirname(os.path.dirname(flash_jax.__file__))
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        command = [
            sys.executable,
            os.path.abspath(__file__),
            f"--only={model}:{context}",
            f"--row_out={out}",
            f"--contexts={context}",
            *(_flag(key, getattr(args, key)) for key in _PASSED_FLAGS),
        ]
        env = dict(os.environ, PYTHONPATH=path)
        proc = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0 or not os.path.isfile(out):
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            why = lines[-1] if lines else f"exit status {proc.returncode}"
            if proc.returncode < 0:
                why = f"killed by signal {-proc.returncode} (out of memory?)"
            return error_row(model, context, args.tokens_per_step, why[:300]), None
        with open(out) as f:
            result = json.load(f)
    return result["row"], result["machine"]


def run_all(args, on_row=None) -> tuple[list[dict], dict]:
    """Every model x context; `on_row(row)` is called as each row is done."""
    rows, machine = [], None
    for model in args.models:
        for context in args.contexts:
            print(f"{label(model)} at context {context} ...", flush=True)
            if (
                benchmarks.split_variant(model)[0] not in SUBQUADRATIC
                and 0 < args.max_quadratic_context < context
            ):
                why = f"skipped: above --max_quadratic_context={args.max_quadratic_context}"
                row = error_row(model, context, args.tokens_per_step, why)
            elif args.isolate:
                row, info = run_isolated(args, model, context)
                machine = machine or info
            else:
                try:
                    row = measure(args, model, context)
                except Exception as e:  # noqa: BLE001 - recorded per row (e.g. out of memory)
                    message = str(e).strip().splitlines()
                    why = f"{type(e).__name__}: {message[0] if message else ''}"
                    row = error_row(model, context, args.tokens_per_step, why[:300])
            rows.append(row)
            print("   " + _row_summary(row), flush=True)
            if on_row is not None:
                on_row(row)
    if machine is None:  # not isolated, or no child succeeded: describe this process
        machine = benchmarks.machine_info()
    return rows, machine


def _row_summary(row: dict) -> str:
    if row["error"]:
        return f"error: {row['error']}"
    return (
        f"batch {row['batch_size']}: {row['step_time_median_s'] * 1e3:.1f} ms/step, "
        f"{row['tokens_per_s']:,.0f} tokens/s, {row['tflops_analytic']:.3f} TFLOP/s (analytic)"
    )


# ----------------------------------------------------------------------------- outputs


def first_flash(rows: list[dict]) -> str:
    """The first FLASH variant measured ('flash', or e.g. 'flash@xla')."""
    return next(
        (r["model"] for r in rows if benchmarks.split_variant(r["model"])[0] == "flash"), "flash"
    )


def flatness(rows: list[dict], model: str = "flash", low: int = 512, high: int = 8192) -> dict:
    """Step time of `model` at each context in [low, high] relative to its time at `low`.

    within_20_percent: every ratio lies in [0.8, 1.2] (None if `low` or `high` was not measured).
    """
    times = {
        r["context"]: r["step_time_median_s"]
        for r in rows
        if r["model"] == model and not r["error"] and low <= r["context"] <= high
    }
    if low not in times or high not in times:
        return {"model": model, "ratios": {}, "within_20_percent": None}
    ratios = {T: times[T] / times[low] for T in sorted(times)}
    return {
        "model": model,
        "ratios": ratios,
        "within_20_percent": all(0.8 <= r <= 1.2 for r in ratios.values()),
    }


def all_flatness(rows: list[dict]) -> dict:
    """`flatness` of every sub-quadratic model (and attention variant, e.g. 'flash@xla') that
    was measured, in the order measured."""
    measured = dict.fromkeys(r["model"] for r in rows)
    return {
        m: flatness(rows, m) for m in measured if benchmarks.split_variant(m)[0] in SUBQUADRATIC
    }


def _fmt(value, fmt: str, missing: str = "n/a") -> str:
    return missing if value is None else fmt.format(value)


def _gib(value) -> str:
    return _fmt(None if value is None else value / 2**30, "{:.2f} GiB")


def markdown(report: dict) -> str:
    setup, rows = report["setup"], report["rows"]
    lines = [
        "# Training-step benchmark",
        "",
        f"{setup['tokens_per_step']:,} tokens per step (batch = tokens / context), size preset "
        f"`{setup['size']}`, {setup['dtype']} compute, remat `{setup['remat']}`, attention "
        f"`{setup['attention_impl']}`, FLASH chunk {setup['chunk_size']}, vocabulary "
        f"{setup['vocab_size']}"
        + (
            f", the loss in {setup['loss_blocks']} blocks (`train.loss_blocks`)"
            if setup.get("loss_blocks", 1) > 1
            else ""
        )
        + ". Synthetic batches of uniformly random tokens. Step time: median "
        f"of {setup['repeats']} timed steps after {setup['warmup']} warm-up steps (range in "
        f"brackets).",
        "",
        benchmarks.machine_line(report["machine"]),
        "",
        f"Command: `{report['command']}`",
        "",
        "| model | context | batch | step time (ms) | tokens/s | GFLOP/step analytic | "
        "TFLOP/s analytic | TFLOP/s compiled | MFU | peak memory | compiled memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['label']} | {r['context']} | {r['batch_size']} |"
        if r["error"]:
            what = r["error"] if r["error"].startswith("skipped") else f"error: {r['error']}"
            lines.append(f"{head} {what} |" + " |" * 8)
            continue
        times = r["step_times_s"]
        lines.append(
            f"{head} {r['step_time_median_s'] * 1e3:.1f} "
            f"[{min(times) * 1e3:.0f}-{max(times) * 1e3:.0f}] | {r['tokens_per_s']:,.0f} | "
            f"{r['flops_analytic'] / 1e9:.1f} | {r['tflops_analytic']:.4f} | "
            f"{_fmt(r['tflops_compiled'], '{:.4f}')} | {_fmt(r['mfu'], '{:.1%}')} | "
            f"{_gib(r['peak_memory_bytes'])} | {_gib(r['compiled_memory_bytes'])} |"
        )
    for flat in report.get("flatness", {"flash": report["flash_flatness"]}).values():
        if not flat["ratios"]:
            continue
        ratios = ", ".join(f"{T}: {ratio:.2f}" for T, ratio in flat["ratios"].items())
        verdict = "yes" if flat["within_20_percent"] else "no"
        lines += [
            "",
            f"{label(flat['model'])} step time relative to context 512 "
            f"({ratios}); within 20% from 512 to 8192: **{verdict}**.",
        ]
    lines += [
        "",
        "Peak memory: `device.memory_stats()['peak_bytes_in_use']` (n/a: the backend reports "
        "none). Compiled memory: the step program's arguments + outputs + temporaries from "
        "`compiled.memory_analysis()`. TFLOP/s compiled: XLA cost analysis with the scanned "
        "layer body counted num_layers times (see scripts/benchmark.py).",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    """Step time and tokens/s against context, one line per model."""
    by_model = {}
    for r in report["rows"]:
        if not r["error"]:
            by_model.setdefault(r["label"], []).append(r)
    panels = [
        plots.Panel(
            "context length (tokens)",
            ylabel,
            [
                (name, [r["context"] for r in rs], [r[key] for r in rs])
                for name, rs in by_model.items()
            ],
            log_x=True,
        )
        for key, ylabel in (
            ("step_time_median_s", "step time (s), median"),
            ("tokens_per_s", "tokens / s"),
        )
    ]
    setup = report["setup"]
    title = (
        f"Train step at {setup['tokens_per_step']:,} tokens/step, size {setup['size']}, "
        f"{setup['dtype']}: {benchmarks.device_name(report['machine'])}"
    )
    plots.plot_panels(path, panels, title)


def write_outputs(report: dict, out_dir: str, name: str) -> str:
    stem = os.path.join(out_dir, name)
    benchmarks.write_report(stem, report, markdown(report))
    plot(report, stem + ".png")
    return stem


def rerender(path: str, out_dir: str, name: str) -> dict:
    """Rewrites the outputs from a benchmark JSON, recomputing what derives from the measured
    numbers (analytic FLOPs, TFLOP/s, MFU, the FLASH verdict): e.g. after a formula change, or
    to re-plot results copied from another machine. Timings are never recomputed."""
    with open(path) as f:
        report = json.load(f)
    setup, machine = report["setup"], report["machine"]
    peak = flops.peak_flops_per_device(machine["device"])
    for row in report["rows"]:
        if row["error"]:
            continue
        config = benchmarks.bench_config(row["model"], row["context"], **config_flags(setup))
        total = flops.analytic_flops(
            config.model, row["context"], row["tokens_per_step"], row["num_params"]
        )["total"]
        median = row["step_time_median_s"]
        row["flops_analytic"] = total
        row["tflops_analytic"] = total / median / 1e12
        row["mfu"] = None if peak is None else total / median / (peak * machine["num_devices"])
    report["flash_flatness"] = flatness(report["rows"], first_flash(report["rows"]))
    report["flatness"] = all_flatness(report["rows"])
    write_outputs(report, out_dir, name)
    return report


# ----------------------------------------------------------------------------- command line


def parse_args(argv=()):
    args = cli.parse_script_flags(FLAGS, argv, "benchmark.py")
    try:
        bad = [m for m in args.models if benchmarks.split_variant(m)[0] not in models.LAYER_TYPES]
    except ValueError as e:
        cli.fail("benchmark.py", f"--models: {e}", 2)
    if bad or not args.models:
        cli.fail(
            "benchmark.py",
            f"--models: unknown {bad}; choose from {sorted(models.LAYER_TYPES)}, each optionally "
            "with @impl (e.g. flash@pallas_gpu, transformer_pp@cudnn)",
            2,
        )
    for key, low in (("tokens_per_step", 1), ("chunk_size", 1), ("repeats", 1), ("warmup", 0)):
        if getattr(args, key) < low:
            cli.fail("benchmark.py", f"--{key} must be >= {low}, got {getattr(args, key)}", 2)
    bad = [T for T in args.contexts if args.tokens_per_step % T]
    if bad or not args.contexts:
        cli.fail(
            "benchmark.py",
            f"--tokens_per_step ({args.tokens_per_step}) must be a multiple of every context; "
            f"{bad} do not divide it",
            2,
        )
    return args


def main(argv=()) -> dict | None:
    args = parse_args(argv)
    if args.only:  # a child of --isolate: one measurement, written to --row_out
        model, context = args.only.split(":")
        row = measure(args, model, int(context))
        with open(args.row_out, "w") as f:
            f.write(runs.to_json({"row": row, "machine": benchmarks.machine_info()}))
        return None
    if args.render_only:
        report = rerender(args.render_only, args.out_dir, args.name)
        print(markdown(report))
        return report
    # Rows are also appended to <name>.rows.jsonl as they come: a run stopped early keeps them.
    os.makedirs(args.out_dir, exist_ok=True)
    rows_path = os.path.join(args.out_dir, f"{args.name}.rows.jsonl")
    with open(rows_path, "w") as rows_file:

        def on_row(row):
            rows_file.write(runs.to_json(row) + "\n")
            rows_file.flush()

        rows, machine = run_all(args, on_row)
    report = {
        "command": " ".join(["python scripts/benchmark.py", *argv]),
        "machine": machine,
        "setup": {key: getattr(args, key) for key in (*_PASSED_FLAGS, "models", "contexts")},
        "data": "synthetic: uniformly random tokens, one document per row",
        "rows": rows,
        "flash_flatness": flatness(rows, first_flash(rows)),
        "flatness": all_flatness(rows),
    }
    stem = write_outputs(report, args.out_dir, args.name)
    print(markdown(report))
    print(f"wrote {stem}.json, {stem}.md, {stem}.png")
    return report


if __name__ == "__main__":
    cli.run_script(main, FLAGS)
