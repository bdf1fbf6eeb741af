"""Where a train step's device time goes, op by op: a `jax.profiler` trace of a few steps of the
benchmark's configuration, summed per kernel and per JAX source op.

The step is `scripts/benchmark.py`'s (`benchmarks.bench_config`, synthetic tokens). After a
warm-up, `--steps` steps are traced with Perfetto output; the trace's device events (GPU kernels,
TPU ops) are summed by name, and each name is traced back to the JAX operation that made it
through the compiled HLO's metadata (`op_name`, e.g. `jit(train_step)/.../dot_general`). Prints
the top rows of both tables per step and writes them as JSON with the compiled HLO text.

    python scripts/profile_step.py                                     # CPU, tiny: checks it runs
    python scripts/profile_step.py --model=flash@xla --size=large --transformer_layers=4 \
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
from absl import app, flags

from flash_jax import benchmarks, sharding
from flash_jax.config import DTYPES, REMAT
from flash_jax.train import step

_MODEL = flags.DEFINE_string("model", "flash", "Model, optionally @impl.")
_CONTEXT = flags.DEFINE_integer("context", 256, "Context length.")
_TOKENS = flags.DEFINE_integer("tokens_per_step", 1024, "Tokens per step.")
_SIZE = flags.DEFINE_string("size", "tiny", "Size preset.")
_LAYERS = flags.DEFINE_integer("transformer_layers", 0, "Depth / 2 (0: the preset's).")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "FLASH's C.")
_VOCAB = flags.DEFINE_integer("vocab_size", 4096, "Vocabulary size.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", DTYPES, "Compute dtype.")
_REMAT = flags.DEFINE_enum("remat", "none", REMAT, "Remat policy.")
_UNROLL = flags.DEFINE_bool("unroll_layers", False, "Unrolled layer stack.")
_STEPS = flags.DEFINE_integer("steps", 2, "Traced steps.")
_TOP = flags.DEFINE_integer("top", 30, "Rows printed per table.")
_OUT_DIR = flags.DEFINE_string("out_dir", "runs/profile_step", "Where the outputs go.")


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


def summarize(events: list[dict], sources: dict[str, str], steps: int, top: int):
    by_kernel = collections.Counter()
    by_source = collections.Counter()
    for e in events:
        args = e.get("args", {})
        hlo_op = args.get("hlo_op") or e["name"]
        by_kernel[e["name"]] += e["dur"] / 1e3 / steps
        by_source[short_source(sources.get(hlo_op, hlo_op))] += e["dur"] / 1e3 / steps
    total = sum(by_kernel.values())
    return total, by_kernel.most_common(top), by_source.most_common(top)


def main(argv):
    del argv
    config = benchmarks.bench_config(
        _MODEL.value,
        _CONTEXT.value,
        size=_SIZE.value,
        tokens_per_step=_TOKENS.value,
        transformer_layers=_LAYERS.value,
        chunk_size=_CHUNK.value,
        vocab_size=_VOCAB.value,
        dtype=_DTYPE.value,
        remat=_REMAT.value,
        unroll_layers=_UNROLL.value,
    )
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axis_names)
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    B, T = config.data.batch_size, _CONTEXT.value
    with jax.set_mesh(mesh):
        fns = step.build(config, mesh)
        rest, state = fns.init_rest(), fns.init_state()
        batch = step.put_batch(
            benchmarks.synthetic_batch(B, T, config.model.vocab_size), fns.batch_sharding
        )
        compiled = fns.train_step.lower(state, rest, batch).compile()
        hlo_text = compiled.as_text()
        with open(os.path.join(_OUT_DIR.value, "step_hlo.txt"), "w") as f:
            f.write(hlo_text)
        for _ in range(2):
            state, metrics = compiled(state, rest, batch)
        jax.block_until_ready(state)
        trace_dir = os.path.join(_OUT_DIR.value, "trace")
        shutil.rmtree(trace_dir, ignore_errors=True)  # one trace: this run's
        t0 = time.perf_counter()
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(_STEPS.value):
                state, metrics = compiled(state, rest, batch)
            jax.block_until_ready(state)
        wall_ms = (time.perf_counter() - t0) * 1e3 / _STEPS.value
    (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        trace = json.load(f)
    total, kernels, sources = summarize(
        device_events(trace), op_sources(hlo_text), _STEPS.value, _TOP.value
    )
    report = {
        "model": _MODEL.value,
        "context": T,
        "batch_size": B,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "wall_ms_per_step": wall_ms,
        "device_ms_per_step": total,
        "by_kernel_ms": kernels,
        "by_source_ms": sources,
    }
    with open(os.path.join(_OUT_DIR.value, "profile.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(
        f"{_MODEL.value} T={T} B={B} on {report['device']}: {wall_ms:.1f} ms per step (wall), "
        f"{total:.1f} ms of device events per step"
    )
    for title, rows in (("by kernel", kernels), ("by source op", sources)):
        print(f"\n{title}: ms per step, share")
        for name, ms in rows:
            print(f"{ms:9.3f} {100 * ms / total:5.1f}%  {name[:150]}")


if __name__ == "__main__":
    app.run(main)
