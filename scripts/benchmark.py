"""Training-step speed of the paper's six models (FLASH, FLASH-Quad, Transformer, Transformer++,
Performer, Combiner) against context length at a fixed number of tokens per step (issues #6, #12).

For each model and context length T: the project's own jitted train step (flash_jax.train.step:
forward, backward and optimizer update, remat as configured) on synthetic batches of uniformly
random tokens (one document per row), batch = tokens_per_step / T. Reports the median step time over
`--repeats` timed steps after `--warmup` untimed ones, tokens/s, achieved TFLOP/s from the compiled
program's cost analysis and from the analytic count (`flash_jax.flops`), model FLOPs utilisation
against the device's peak where known, and peak device memory (`device.memory_stats()`, n/a where
the backend has none, e.g. CPU; the compiled program's own memory estimate is given too).

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

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # `python scripts/benchmark.py` from anywhere
    sys.path.insert(0, _REPO)

from flash_jax import flops  # noqa: E402 - pure arithmetic: starts no backend
from flash_jax.config import DISPLAY_NAMES, depth_factor  # noqa: E402

MODELS = ("flash", "flash_quad", "transformer", "transformer_pp", "performer", "combiner")
# Models whose cost per token does not grow (or grows slowly) with the context: never skipped by
# --max_quadratic_context, and checked for a flat step time.
SUBQUADRATIC = ("flash", "performer", "combiner")
LABELS = DISPLAY_NAMES
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


# ----------------------------------------------------------------------------- machine


def machine_info() -> dict:
    """What the numbers came from: CPU model, cores, device, jax version, and that it is shared.

    Initialises the JAX backend (call it where the benchmark itself runs)."""
    import jax

    cpu = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    device = jax.devices()[0]
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "platform": device.platform,
        "device": device.device_kind,
        "num_devices": jax.device_count(),
        "jax_version": jax.__version__,
        # Set FLASH_JAX_BENCH_SHARED=0 on a dedicated machine; the default says it was shared.
        "shared": os.environ.get("FLASH_JAX_BENCH_SHARED", "1") == "1",
    }


def device_name(info: dict) -> str:
    """The CPU model on CPU, else the accelerator's kind (for plot titles)."""
    return info["cpu"] if info["platform"] == "cpu" else info["device"]


def machine_line(info: dict) -> str:
    shared = (
        " The machine was shared with other jobs while this ran: timings are noisy."
        if info.get("shared")
        else ""
    )
    return (
        f"Machine: {info['cpu']} ({info['cpu_cores']} cores), {info['num_devices']} x "
        f"{info['platform']} device ({info['device']}), jax {info['jax_version']}.{shared}"
    )


# ----------------------------------------------------------------------------- FLOP counts


def cost_flops(compiled) -> float | None:
    """FLOPs of a compiled program per device from XLA's cost analysis; None if unavailable."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    value = (cost or {}).get("flops")
    return float(value) if value and value > 0 else None


def layer_flops(config, mesh, batch_size: int, context: int) -> float | None:
    """Compiled FLOPs (per device) of one layer's forward + backward, remat as configured: what
    the cost analysis counts once for the scanned layer stack but the step runs num_layers times.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from flash_jax import models, sharding
    from flash_jax.config import ModelConfig
    from flash_jax.train import step

    rules = tuple(tuple(r) for r in config.mesh.rules)
    # The layer's activation constraints use the same rules as the full model (models.create).
    cfg = dataclasses.replace(ModelConfig.from_config(config.model), sharding_rules=rules)
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
    return cost_flops(grad_fn.lower(*abstract).compile())


# ----------------------------------------------------------------------------- one measurement


def split_variant(model: str) -> tuple[str, str | None]:
    """'flash@pallas_gpu' -> ('flash', 'pallas_gpu'): a model with its attention implementation
    (model.flash_impl for FLASH, model.attention_impl for the Transformers); 'flash' -> None."""
    name, _, impl = model.partition("@")
    return name, impl or None


def label(model: str) -> str:
    name, impl = split_variant(model)
    return LABELS.get(name, name) + (f" ({impl})" if impl else "")


def bench_config(args, model: str, context: int):
    """The training config of one model x context (base config + size preset + flags)."""
    from configs import base
    from flash_jax import models

    model, impl = split_variant(model)

    if args.tokens_per_step % context:
        raise ValueError(
            f"--tokens_per_step ({args.tokens_per_step}) must be a multiple of every context "
            f"length; {context} does not divide it"
        )
    config = base.get_config()
    m = config.model
    m.update(models.preset(model, args.size))
    m.max_len = context  # FLASH-Quad's fixed score scale n and the bias span = the training length
    m.chunk_size = args.chunk_size
    if args.qk_dim:
        m.qk_dim = args.qk_dim
    if getattr(args, "transformer_layers", 0):  # FLASH-family models: twice the layers
        m.num_layers = args.transformer_layers * depth_factor(model)
    m.vocab_size = args.vocab_size
    m.dtype = args.dtype
    m.param_dtype = args.param_dtype
    m.remat = args.remat
    m.attention_impl = args.attention_impl
    m.flash_impl = getattr(args, "flash_impl", "auto")  # absent from older benchmark JSONs
    if impl:
        m["attention_impl" if model.startswith("transformer") else "flash_impl"] = impl
    config.data.seq_len = context
    config.data.batch_size = args.tokens_per_step // context
    config.train.warmup_steps = 0  # the learning rate does not change the cost
    return config


def synthetic_batch(batch_size: int, context: int, vocab_size: int, seed: int = 0) -> dict:
    """Uniformly random tokens, one document per row (segment 1), positions 0..T-1."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, size=(batch_size, context + 1), dtype=np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": np.ones((batch_size, context), np.float32),
        "segment_ids": np.ones((batch_size, context), np.int32),
        "positions": np.broadcast_to(np.arange(context, dtype=np.int32), (batch_size, context)),
    }


def measure(args, model: str, context: int) -> dict:
    """Compiles and times the train step of one model at one context length (in this process)."""
    import jax

    from flash_jax import sharding
    from flash_jax.config import ModelConfig
    from flash_jax.train import report, step

    # Only the model and the step: the data stack (TensorFlow, seqio) is never imported, so the
    # benchmark runs on accelerator machines that have JAX and Flax alone.
    config = bench_config(args, model, context)
    model_config = ModelConfig.from_config(config.model)  # ValueError names the key
    mesh = sharding.make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axis_names))
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
            synthetic_batch(B, T, model_config.vocab_size, seed=args.seed), fns.batch_sharding
        )
        batch_abstract = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=fns.batch_sharding)
            for k, v in batch.items()
        }
        t0 = time.perf_counter()
        train_step = fns.train_step.lower(fns.abstract_state, rest, batch_abstract).compile()
        row["compile_s"] = time.perf_counter() - t0

        # Cost analysis is per device (the SPMD program); totals are x the number of devices.
        raw = cost_flops(train_step) if getattr(args, "compiled_flops", True) else None
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
    peak = report.peak_flops_per_device(jax.devices()[0].device_kind)
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


_PASSED_FLAGS = (
    "tokens_per_step",
    "size",
    "dtype",
    "param_dtype",
    "attention_impl",
    "flash_impl",
    "remat",
    "chunk_size",
    "qk_dim",
    "transformer_layers",
    "vocab_size",
    "warmup",
    "repeats",
    "seed",
    "max_quadratic_context",
    "compiled_flops",
)


def _flag(key: str, value) -> str:
    if isinstance(value, bool):  # argparse.BooleanOptionalAction
        return f"--{key}" if value else f"--no-{key}"
    return f"--{key}={value}"


def run_isolated(args, model: str, context: int) -> tuple[dict, dict | None]:
    """One measurement in a fresh Python process; (row, machine info of that process)."""
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
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
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
                split_variant(model)[0] not in SUBQUADRATIC
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
        machine = machine_info()
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
    return next((r["model"] for r in rows if split_variant(r["model"])[0] == "flash"), "flash")


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
    return {m: flatness(rows, m) for m in measured if split_variant(m)[0] in SUBQUADRATIC}


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
        f"{setup['vocab_size']}. Synthetic batches of uniformly random tokens. Step time: median "
        f"of {setup['repeats']} timed steps after {setup['warmup']} warm-up steps (range in "
        f"brackets).",
        "",
        machine_line(report["machine"]),
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fig, (ax_time, ax_rate) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=80)
    for model in dict.fromkeys(r["model"] for r in report["rows"]):
        rows = [r for r in report["rows"] if r["model"] == model and not r["error"]]
        if not rows:
            continue
        contexts = [r["context"] for r in rows]
        label = rows[0]["label"]
        ax_time.plot(contexts, [r["step_time_median_s"] for r in rows], marker="o", label=label)
        ax_rate.plot(contexts, [r["tokens_per_s"] for r in rows], marker="o", label=label)
    all_contexts = sorted({r["context"] for r in report["rows"]})
    for ax, ylabel in ((ax_time, "step time (s), median"), (ax_rate, "tokens / s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_contexts, [str(T) for T in all_contexts])
        ax.xaxis.set_minor_locator(NullLocator())  # only the measured contexts on the x axis
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=8)
    setup = report["setup"]
    fig.suptitle(
        f"Train step at {setup['tokens_per_step']:,} tokens/step, size {setup['size']}, "
        f"{setup['dtype']}: {device_name(report['machine'])}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(report: dict, out_dir: str, name: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, name)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2, allow_nan=False)
    with open(stem + ".md", "w") as f:
        f.write(markdown(report))
    plot(report, stem + ".png")
    return stem


def rerender(path: str, out_dir: str, name: str) -> dict:
    """Rewrites the outputs from a benchmark JSON, recomputing what derives from the measured
    numbers (analytic FLOPs, TFLOP/s, MFU, the FLASH verdict): e.g. after a formula change, or
    to re-plot results copied from another machine. Timings are never recomputed."""
    from flash_jax.config import ModelConfig
    from flash_jax.train import report as train_report

    with open(path) as f:
        report = json.load(f)
    setup, machine = report["setup"], report["machine"]
    peak = train_report.peak_flops_per_device(machine["device"])
    for row in report["rows"]:
        if row["error"]:
            continue
        config = bench_config(argparse.Namespace(**setup), row["model"], row["context"])
        model_config = ModelConfig.from_config(config.model)
        total = flops.analytic_flops(
            model_config, row["context"], row["tokens_per_step"], row["num_params"]
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


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv=None):
    from flash_jax import models
    from flash_jax.config import ATTENTION_IMPLS, DTYPES, FLASH_IMPLS, REMAT

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--contexts", type=_int_list, default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--tokens_per_step", type=int, default=8192)
    parser.add_argument("--size", default="tiny", choices=sorted(models.SIZES))
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--param_dtype", default="float32", choices=DTYPES)
    parser.add_argument("--attention_impl", default="auto", choices=ATTENTION_IMPLS)
    parser.add_argument("--flash_impl", default="auto", choices=FLASH_IMPLS)
    parser.add_argument("--remat", default="none", choices=REMAT)
    parser.add_argument("--chunk_size", type=int, default=256, help="FLASH's C (paper: 256)")
    parser.add_argument("--qk_dim", type=int, default=0, help="s; 0 keeps the size preset's")
    parser.add_argument(
        "--transformer_layers",
        type=int,
        default=0,
        help="depth of the Transformers (FLASH-family: twice that); 0 keeps the size preset's",
    )
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument(
        "--compiled_flops",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also count FLOPs with XLA's cost analysis (compiles one layer more per row)",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max_quadratic_context",
        type=int,
        default=0,
        help="skip (record as skipped) the quadratic models above this context; 0: no limit",
    )
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="each model x context in a fresh process (exact peak memory, survives OOM)",
    )
    parser.add_argument("--out_dir", default="docs/results")
    parser.add_argument("--name", default="scaling_cpu", help="output file name stem")
    parser.add_argument(
        "--render_only",
        default=None,
        help="a benchmark JSON: rewrite <out_dir>/<name>.{json,md,png} from it, measuring nothing",
    )
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # model:context (child)
    parser.add_argument("--row_out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    bad = [m for m in args.models if split_variant(m)[0] not in models.LAYER_TYPES]
    if bad or not args.models:
        parser.error(
            f"--models: unknown {bad}; choose from {sorted(models.LAYER_TYPES)}, each optionally "
            "with @impl (e.g. flash@pallas_gpu, transformer_pp@cudnn)"
        )
    for key, low in (("tokens_per_step", 1), ("chunk_size", 1), ("repeats", 1), ("warmup", 0)):
        if getattr(args, key) < low:
            parser.error(f"--{key} must be >= {low}, got {getattr(args, key)}")
    bad = [T for T in args.contexts if args.tokens_per_step % T]
    if bad:
        parser.error(
            f"--tokens_per_step ({args.tokens_per_step}) must be a multiple of every context; "
            f"{bad} do not divide it"
        )
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.only:  # a child of --isolate: one measurement, written to --row_out
        model, context = args.only.split(":")
        row = measure(args, model, int(context))
        with open(args.row_out, "w") as f:
            json.dump({"row": row, "machine": machine_info()}, f)
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
            rows_file.write(json.dumps(row) + "\n")
            rows_file.flush()

        rows, machine = run_all(args, on_row)
    report = {
        "command": " ".join(
            ["python scripts/benchmark.py", *(sys.argv[1:] if argv is None else argv)]
        ),
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
    main()
