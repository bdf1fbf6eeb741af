"""Where a train step's device time goes, op by op: a `jax.profiler` trace of a few steps of the
benchmark's configuration, summed per kernel and per JAX source op.

The step is `scripts/benchmark.py`'s (`benchmarks.bench_config`, synthetic tokens). After a
warm-up, `--steps` steps are traced with Perfetto output; the trace's device events (GPU kernels,
TPU ops) are summed by name, and each name is traced back to the JAX operation that made it
through the compiled HLO's metadata (`op_name`, e.g. `jit(train_step)/.../dot_general`). Prints
the top rows of both tables per step and writes them as JSON with the compiled HLO text.

    python scripts/bench/profile_step.py                                # CPU, tiny: checks it runs
    python scripts/bench/profile_step.py --model=flash@xla --size=large --transformer_layers=4 \
        --dtype=bfloat16 --remat=save_attn --vocab_size=32128 --tokens_per_step=65536 \
        --context=4096                                                 # one H100: about 1 minute
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import shutil
import time

import jax
from absl import flags

from flash_jax import cli, sharding
from flash_jax.config import DTYPES, REMAT
from flash_jax.tools import benchmarks
from flash_jax.train import step

FLAGS = flags.FlagValues()
flags.DEFINE_string("model", "flash", "Model, optionally @impl.", flag_values=FLAGS)
flags.DEFINE_integer("context", 256, "Context length.", flag_values=FLAGS)
flags.DEFINE_integer("tokens_per_step", 1024, "Tokens per step.", flag_values=FLAGS)
flags.DEFINE_string("size", "tiny", "Size preset.", flag_values=FLAGS)
flags.DEFINE_integer("transformer_layers", 0, "Depth / 2 (0: the preset's).", flag_values=FLAGS)
flags.DEFINE_integer("chunk_size", 64, "FLASH's C.", flag_values=FLAGS)
flags.DEFINE_integer("vocab_size", 4096, "Vocabulary size.", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", DTYPES, "Compute dtype.", flag_values=FLAGS)
flags.DEFINE_enum("remat", "none", REMAT, "Remat policy.", flag_values=FLAGS)
flags.DEFINE_bool("unroll_layers", False, "Unrolled layer stack.", flag_values=FLAGS)
flags.DEFINE_integer("steps", 2, "Traced steps.", flag_values=FLAGS)
flags.DEFINE_integer("top", 30, "Rows printed per table.", flag_values=FLAGS)
flags.DEFINE_string("out_dir", "runs/profile_step", "Where the outputs go.", flag_values=FLAGS)


def device_events(trace: dict) -> list[dict]:
    """Complete events ('X') of the device's busy time, counted once: on a GPU the kernels of its
    stream tracks, on a TPU its "XLA Ops" track (not the module and step tracks above them); on a
    CPU-only trace, the events that carry an `hlo_op` argument (XLA's CPU ops)."""
    meta = [e for e in trace["traceEvents"] if e.get("ph") == "M"]
    processes = {e["pid"]: e["args"]["name"] for e in meta if e.get("name") == "process_name"}
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"] for e in meta if e.get("name") == "thread_name"
    }
    device_pids = {pid for pid, name in processes.items() if re.search(r"(?i)gpu|tpu", name)}
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    on_device = [e for e in events if e["pid"] in device_pids]
    for track in ("Stream", "XLA Ops"):
        chosen = [e for e in on_device if track in threads.get((e["pid"], e["tid"]), "")]
        if chosen:
            return chosen
    return on_device or [e for e in events if "hlo_op" in e.get("args", {})]


def op_sources(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the JAX op_name of its metadata, with the jit prefix and
    transform wrappers dropped, so that the same source line groups across layers."""
    sources = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*op_name=\"([^\"]+)\"", line)
        if m:
            sources[m.group(1)] = m.group(2)
    return sources


def short_source(op_name: str) -> str:
    """'jit(train_step)/transpose(jvp())/while/body/closed_call/bgik,bgke->bgie/dot_general' ->
    'bwd closed_call/bgik,bgke->bgie/dot_general': forward or backward, and the op's own path."""
    direction = "bwd" if "transpose(" in op_name else "fwd"
    wrappers = r"^(jit|jvp|transpose|while|body|cond|checkpoint|remat|rematted_computation)\b"
    parts = [p for p in op_name.split("/") if not re.match(wrappers, p)]
    return f"{direction} {'/'.join(parts[-3:])}"


def source_of(event: dict, sources: dict[str, str]) -> str | None:
    """The op_name behind a device event: its kernel's HLO instruction (a GPU kernel is named
    after its fusion, `loop_multiply_fusion_3` for `loop_multiply_fusion.3`, while its `hlo_op`
    is the CUDA-graph command buffer that launched it) or its `hlo_op` (TPU, CPU); None for a
    library kernel (e.g. cuBLAS's `nvjet_*`)."""
    name = event["name"]
    for candidate in (name, re.sub(r"_(\d+)$", r".\1", name), event.get("args", {}).get("hlo_op")):
        if candidate in sources:
            return sources[candidate]
    return None


def summarize(events: list[dict], sources: dict[str, str], steps: int, top: int):
    by_kernel = collections.Counter()
    by_source = collections.Counter()
    for e in events:
        ms = e["dur"] / 1e3 / steps
        by_kernel[e["name"]] += ms
        source = source_of(e, sources)
        by_source[short_source(source) if source else f"library {e['name']}"] += ms
    total = sum(by_kernel.values())
    return total, by_kernel.most_common(top), by_source.most_common(top)


def main(argv=()):
    args = cli.parse_script_flags(FLAGS, argv, "profile_step.py")
    config = benchmarks.bench_config(
        args.model,
        args.context,
        size=args.size,
        tokens_per_step=args.tokens_per_step,
        transformer_layers=args.transformer_layers,
        chunk_size=args.chunk_size,
        vocab_size=args.vocab_size,
        dtype=args.dtype,
        remat=args.remat,
        unroll_layers=args.unroll_layers,
    )
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axis_names)
    os.makedirs(args.out_dir, exist_ok=True)
    B, T = config.data.batch_size, args.context
    with jax.set_mesh(mesh):
        fns = step.build(config, mesh)
        rest, state = fns.init_rest(), fns.init_state()
        batch = step.put_batch(
            benchmarks.synthetic_batch(B, T, config.model.vocab_size), fns.batch_sharding
        )
        compiled = fns.train_step.lower(state, rest, batch).compile()
        hlo_text = compiled.as_text()
        with open(os.path.join(args.out_dir, "step_hlo.txt"), "w") as f:
            f.write(hlo_text)
        for _ in range(2):
            state, metrics = compiled(state, rest, batch)
        jax.block_until_ready(state)
        trace_dir = os.path.join(args.out_dir, "trace")
        shutil.rmtree(trace_dir, ignore_errors=True)  # one trace: this run's
        t0 = time.perf_counter()
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                state, metrics = compiled(state, rest, batch)
            jax.block_until_ready(state)
        wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        trace = json.load(f)
    total, kernels, sources = summarize(
        device_events(trace), op_sources(hlo_text), args.steps, args.top
    )
    report = {
        "model": args.model,
        "context": T,
        "batch_size": B,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "wall_ms_per_step": wall_ms,
        "device_ms_per_step": total,
        "by_kernel_ms": kernels,
        "by_source_ms": sources,
    }
    with open(os.path.join(args.out_dir, "profile.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(
        f"{args.model} T={T} B={B} on {report['device']}: {wall_ms:.1f} ms per step (wall), "
        f"{total:.1f} ms of device events per step"
    )
    for title, rows in (("by kernel", kernels), ("by source op", sources)):
        print(f"\n{title}: ms per step, share")
        for name, ms in rows:
            print(f"{ms:9.3f} {100 * ms / total:5.1f}%  {name[:150]}")


if __name__ == "__main__":
    cli.run_script(main, FLAGS)
