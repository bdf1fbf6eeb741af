"""Decode benchmark: tokens/s and decoding-state memory against context length, per model.

    python scripts/bench/bench_decode.py                                # CPU: small width, ~2 min
    python scripts/bench/bench_decode.py --size=base --dtype=bfloat16 --batch_size=8 \
        --lengths=512,1024,2048,4096,8192,16384 --out_dir=runs/bench_decode_gpu      # accelerator

For each model and context length L, the model's own incremental step (`decode_step`, the one
`decoding.generate` scans) decodes `--steps` tokens at positions L - steps .. L - 1, greedily
(each token feeds the next); tokens/s = batch * steps / the best of `--repeats` timed runs after
one compiling run. The state is that of a context of length L: keys and values of every earlier
token for the Transformer and FLASH-Quad (a buffer of L positions, attended under a mask, as in
generation), and for FLASH its constant-size state (chunk sums, count, current chunk). Memory is
`decoding.cache_bytes` of that state. Weights are random: speed does not depend on them.

Sizes follow `models.preset` (FLASH and FLASH-Quad get twice the Transformer's layers: equal
parameters). Writes a markdown table (stdout), `bench_decode.json` and `bench_decode.png`.
"""

import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from flash_jax import cli, decoding, models
from flash_jax.config import CONSTANT_STATE, DISPLAY_NAMES, ModelConfig
from flash_jax.tools import benchmarks, plots

PROGRAM = "bench_decode.py"
FLAGS = flags.FlagValues()
flags.DEFINE_list("models", ["flash", "transformer_pp", "flash_quad"], "Models.", flag_values=FLAGS)
cli.define_int_list("lengths", [256, 512, 1024, 2048, 4096, 8192], "Context lengths.", FLAGS)
flags.DEFINE_enum("size", "tiny", list(models.SIZES), "Width / depth preset.", flag_values=FLAGS)
flags.DEFINE_integer("d_model", None, "Override the preset's width.", flag_values=FLAGS)
flags.DEFINE_integer(
    "num_layers", None, "Override the preset's Transformer depth.", flag_values=FLAGS
)
flags.DEFINE_integer("chunk_size", 256, "FLASH chunk size (the paper's 256).", flag_values=FLAGS)
flags.DEFINE_integer("vocab_size", 4096, "Vocabulary (32000 for T5's).", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 1, "Sequences decoded together.", flag_values=FLAGS)
flags.DEFINE_integer("steps", 64, "Decode steps per timed run.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 3, "Timed runs (the best is kept).", flag_values=FLAGS)
flags.DEFINE_string("out_dir", "runs/bench_decode", "Where the JSON and PNG go.", flag_values=FLAGS)


def model_config(args, name: str, length: int, max_length: int) -> ModelConfig:
    values = models.preset(name, args.size, layers=args.num_layers, d_model=args.d_model)
    return ModelConfig(
        **values,
        chunk_size=args.chunk_size,
        vocab_size=args.vocab_size,
        # FLASH's and Performer's states do not depend on the context: one config (one
        # compile) for every L.
        max_len=max_length if name in CONSTANT_STATE else length,
        dtype=args.dtype,
        param_dtype="float32",
    )


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=(2,))
def decode_run(graphdef, state, cache, token_B, t0, steps):
    """`steps` greedy decode steps from position t0; returns the last token (to block on)."""

    def body(carry, t):
        state, cache, token_B = carry
        logits, cache = nnx.merge(graphdef, state).decode_step(token_B[:, None], t, cache)
        return (state, cache, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)), None

    (_, cache, token_B), _ = jax.lax.scan(body, (state, cache, token_B), t0 + jnp.arange(steps))
    return cache, token_B


def bench_one(args, name: str, length: int, max_length: int) -> dict:
    cfg = model_config(args, name, length, max_length)
    model = models.create(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    batch, steps = args.batch_size, min(args.steps, length)
    cache = model.init_cache(batch, length)
    memory = decoding.cache_bytes(cache)
    token = jnp.zeros((batch,), jnp.int32)
    t0 = jnp.int32(length - steps)
    start = time.perf_counter()
    cache, token = decode_run(graphdef, state, cache, token, t0, steps)
    token.block_until_ready()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        cache, token = decode_run(graphdef, state, cache, token, t0, steps)
        token.block_until_ready()
        times.append(time.perf_counter() - start)
    best = min(times)
    return {
        "model": name,
        "context": length,
        "tokens_per_sec": batch * steps / best,
        "ms_per_step": 1e3 * best / steps,
        "cache_bytes": int(memory),
        "params": models.count_params(model),
        "first_run_s": compile_s,
    }


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def table(rows: list[dict], names: list[str], lengths: list[int]) -> str:
    header = "| context | " + " | ".join(
        f"{DISPLAY_NAMES.get(n, n)} tok/s | {DISPLAY_NAMES.get(n, n)} cache" for n in names
    )
    lines = [header + " |", "|---:|" + "---:|---:|" * len(names)]
    by = {(r["model"], r["context"]): r for r in rows}
    for length in lengths:
        cells = []
        for n in names:
            r = by.get((n, length))
            cells += (
                [f"{r['tokens_per_sec']:,.0f}", fmt_bytes(r["cache_bytes"])] if r else ["-", "-"]
            )
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], names: list[str], path: str, title: str) -> None:
    """Decode speed and decoding-state memory against context, one line per model."""
    by_model = {
        n: sorted((r for r in rows if r["model"] == n), key=lambda r: r["context"]) for n in names
    }
    panels = [
        plots.Panel(
            "context length (tokens)",
            ylabel,
            [
                (DISPLAY_NAMES.get(n, n), [r["context"] for r in rs], [value(r) for r in rs])
                for n, rs in by_model.items()
            ],
            log_x=True,
        )
        for ylabel, value in (
            ("decode tokens/s", lambda r: r["tokens_per_sec"]),
            ("decoding state (MiB)", lambda r: r["cache_bytes"] / 2**20),
        )
    ]
    plots.plot_panels(path, panels, title)


def main(argv=()):
    args = cli.parse_script_flags(FLAGS, argv, PROGRAM)
    names = list(args.models)
    lengths = sorted(args.lengths)
    bad = [n for n in names if n not in models.LAYER_TYPES]
    if bad:
        cli.fail(PROGRAM, f"unknown model {bad}; choose from {sorted(models.LAYER_TYPES)}", 1)
    if not lengths or args.steps < 1 or args.repeats < 1 or args.batch_size < 1:
        cli.fail(PROGRAM, "--lengths, --steps, --repeats and --batch_size must be >= 1", 1)
    machine = benchmarks.machine_line(benchmarks.machine_info())
    rows = []
    for n in names:
        for length in lengths:
            r = bench_one(args, n, length, max(lengths))
            rows.append(r)
            print(
                f"{DISPLAY_NAMES.get(n, n)} L={length}: {r['tokens_per_sec']:,.0f} tok/s, "
                f"{r['ms_per_step']:.2f} ms/step, cache {fmt_bytes(r['cache_bytes'])}, "
                f"first run {r['first_run_s']:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    one = model_config(args, names[0], lengths[0], max(lengths))
    setting = (
        f"size {args.size} (d_model {one.d_model}), chunk {args.chunk_size}, vocab "
        f"{args.vocab_size}, {args.dtype}, batch {args.batch_size}, {args.steps} steps per run, "
        f"best of {args.repeats}"
    )
    text = f"{machine}\nSetting: {setting}\n\n{table(rows, names, lengths)}\n"
    stem = os.path.join(args.out_dir, "bench_decode")
    benchmarks.write_report(stem, {"machine": machine, "setting": setting, "results": rows}, text)
    plot(rows, names, stem + ".png", f"Incremental decoding, {setting}")
    print(text)
    print(f"wrote {stem}.json, {stem}.md and {stem}.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run_script(main, FLAGS)
