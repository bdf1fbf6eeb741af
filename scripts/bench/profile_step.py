"""Where a train step's time goes: a profiler trace summed per kernel and per JAX op, or
(--mode=parts) a FLASH step's parts timed alone.

    python scripts/bench/profile_step.py                                # CPU, tiny: checks it runs
    python scripts/bench/profile_step.py --model=flash@xla --size=large --transformer_layers=4 \
        --dtype=bfloat16 --remat=save_attn --vocab_size=32128 --tokens_per_step=65536 \
        --context=4096                                                 # one H100: about 1 minute
    python scripts/bench/profile_step.py --mode=parts                   # CPU, tiny: checks it runs
    python scripts/bench/profile_step.py --mode=parts --size=large --transformer_layers=4 \
        --dtype=bfloat16 --remat=save_attn --vocab_size=32128 --tokens_per_step=65536 \
        --context=4096 --impls=xla,pallas_gpu                          # one H100: about 2 minutes

The step is `scripts/benchmark.py`'s (`benchmarks.bench_config`, synthetic tokens).

--mode=trace (the default): after a warm-up, `--steps` steps are traced by `jax.profiler` with
Perfetto output; the trace's device events (GPU kernels, TPU ops) are summed by name, and each
name is traced back to the JAX operation that made it through the compiled HLO's metadata
(`op_name`, e.g. `jit(train_step)/.../dot_general`). Prints the top rows of both tables per step
and writes them to <out_dir>/profile.json, with the compiled HLO text (step_hlo.txt).

--mode=parts (FLASH only): the parts of the step, forward + backward, each timed alone on one
device, on random inputs (bf16 activations of the model's shapes):

  attention op   `ops.mixed_chunk_attention` alone, per `--impls`
  layer          one FLASH layer (projections, attention, gate), per `--impls`, remat as set
  layer, no attn the same layer with attention replaced by v itself (what is not attention)
  head + loss    final norm, float32 logits and the cross-entropy
  optimizer      the AdamW update of every parameter
  step           the whole train step, for the sum to be checked against

Each is the median of `--repeats` calls after a warm-up; `num_layers x layer + head + optimizer`
should come close to `step`. Writes <out_dir>/step_parts.json and .md.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import shutil
import statistics
import time

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from flash_jax import cli, losses, models, ops, sharding
from flash_jax.config import DTYPES, REMAT
from flash_jax.layers import FlashLayer
from flash_jax.tools import benchmarks
from flash_jax.train import optim, step

PROGRAM = "profile_step.py"
FLAGS = flags.FlagValues()
flags.DEFINE_enum("mode", "trace", ["trace", "parts"], "What to measure.", flag_values=FLAGS)
flags.DEFINE_string("model", "flash", "Model, optionally @impl (parts: flash).", flag_values=FLAGS)
flags.DEFINE_integer("context", 256, "Context length.", flag_values=FLAGS)
flags.DEFINE_integer("tokens_per_step", 1024, "Tokens per step.", flag_values=FLAGS)
flags.DEFINE_enum("size", "tiny", list(models.SIZES), "Size preset.", flag_values=FLAGS)
flags.DEFINE_integer("transformer_layers", 0, "Depth / 2 (0: the preset's).", flag_values=FLAGS)
flags.DEFINE_integer("chunk_size", 64, "FLASH's C.", flag_values=FLAGS)
flags.DEFINE_integer("qk_dim", 0, "s (0: the preset's).", flag_values=FLAGS)
flags.DEFINE_integer("vocab_size", 4096, "Vocabulary size.", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", DTYPES, "Compute dtype.", flag_values=FLAGS)
flags.DEFINE_enum("param_dtype", "float32", DTYPES, "Parameter dtype.", flag_values=FLAGS)
flags.DEFINE_enum("remat", "none", REMAT, "Remat policy.", flag_values=FLAGS)
flags.DEFINE_bool("unroll_layers", False, "Unrolled layer stack.", flag_values=FLAGS)
flags.DEFINE_integer("steps", 2, "trace: traced steps.", flag_values=FLAGS)
flags.DEFINE_integer("top", 30, "trace: rows printed per table.", flag_values=FLAGS)
flags.DEFINE_list("impls", ["xla"], "parts: FLASH attention impls.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 5, "parts: timed calls per part (median).", flag_values=FLAGS)
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


def trace_step(args, config):
    """The trace of `args.steps` train steps, summed per kernel and per source op."""
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
    return report


def median_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def fwd_bwd(loss_fn, argnums):
    return jax.jit(jax.grad(lambda *a: jnp.sum(loss_fn(*a).astype(jnp.float32)), argnums))


def layer_ms(cfg, x, seg, pos, repeats, attention=True):
    layer = FlashLayer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)

    def apply(params, x):
        layer = nnx.merge(graphdef, params)
        if not attention:  # identity attention: everything of the layer but the attention op
            u, v, _ = layer.project(x, pos)
            return layer.output(x, u, v)
        return layer(x, seg, pos)

    if cfg.remat != "none":
        apply = jax.checkpoint(apply, policy=models.remat_policy(cfg.remat))
    return median_ms(fwd_bwd(apply, (0, 1)), params, x, repeats=repeats)


def time_parts(args, config) -> dict:
    """The FLASH step's parts timed alone (see the module docstring), in ms."""
    cfg, repeats = config.model, args.repeats
    B, T = config.data.batch_size, config.data.seq_len
    dtype = cfg.compute_dtype
    keys = jax.random.split(jax.random.key(0), 8)
    x = jax.random.normal(keys[0], (B, T, cfg.d_model), dtype)
    seg = jnp.ones((B, T), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    parts = {}

    def record(name, ms):  # printed as measured: a run stopped early keeps what it has
        parts[name] = ms
        print(f"{name}: {ms:.2f} ms", flush=True)

    S, E, C = cfg.qk_dim, cfg.expansion_dim, cfg.chunk_size
    qk = [jax.random.normal(k, (B, T, S), dtype) for k in keys[1:5]]
    v = jax.random.normal(keys[5], (B, T, E), dtype)
    for impl in args.impls:

        def attend(*a, impl=impl):
            return ops.mixed_chunk_attention(*a, chunk_size=C, causal=cfg.causal, impl=impl)

        grad_fn = fwd_bwd(attend, (0, 1, 2, 3, 4))
        record(f"attention op ({impl})", median_ms(grad_fn, *qk, v, repeats=repeats))
        impl_cfg = dataclasses.replace(cfg, flash_impl=impl)
        record(f"layer ({impl})", layer_ms(impl_cfg, x, seg, pos, repeats))
    record("layer, attention replaced by v", layer_ms(cfg, x, seg, pos, repeats, False))

    model = models.create(cfg, rngs=nnx.Rngs(0))
    head_graph, head_params = nnx.split(model)
    targets = jax.random.randint(keys[6], (B, T), 0, cfg.vocab_size, jnp.int32)
    weights = jnp.ones((B, T), jnp.float32)

    def head_loss(params, x):
        logits = nnx.merge(head_graph, params).logits(x)
        return losses.cross_entropy(logits, targets, weights)[0]

    head_grad = jax.jit(jax.grad(head_loss, (0, 1)))
    record("head + loss", median_ms(head_grad, head_params, x, repeats=repeats))

    mesh = sharding.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        fns = step.build(config, mesh)
        state, rest = fns.init_state(), fns.init_rest()
        batch = benchmarks.synthetic_batch(B, T, cfg.vocab_size)
        batch = step.put_batch(batch, fns.batch_sharding)
        grads = jax.tree.map(jnp.ones_like, state["params"])
        tx, _ = optim.make_optimizer(config.train, optim.decay_mask(state["params"]))
        update = jax.jit(lambda g, s, p: tx.update(g, s, p))
        opt_args = (grads, state["opt_state"], state["params"])
        record("optimizer", median_ms(update, *opt_args, repeats=repeats))
        times = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            state, out = fns.train_step(state, rest, batch)
            jax.block_until_ready(out)
            if i:
                times.append(time.perf_counter() - start)
        record("step", statistics.median(times) * 1e3)
    result = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "context": T,
        "batch": B,
        "num_layers": cfg.num_layers,
        "remat": cfg.remat,
        "parts_ms": parts,
    }
    text = parts_markdown(result)
    print(text)
    benchmarks.write_report(os.path.join(args.out_dir, "step_parts"), result, text)
    return result


def parts_markdown(result: dict) -> str:
    parts = result["parts_ms"]
    lines = [
        f"FLASH train step parts on {result['device']} (jax {result['jax']}), context "
        f"{result['context']}, batch {result['batch']}, {result['num_layers']} layers, remat "
        f"{result['remat']}; forward + backward, median ms:",
        "",
        "| part | ms |",
        "|---|---:|",
        *(f"| {name} | {ms:.2f} |" for name, ms in parts.items()),
    ]
    return "\n".join(lines) + "\n"


def main(argv=()):
    args = cli.parse_script_flags(FLAGS, argv, PROGRAM)
    if args.mode == "parts" and args.model != "flash":
        cli.fail(PROGRAM, f"--mode=parts times FLASH's parts, not --model={args.model}", 2)
    try:
        config = benchmarks.bench_config(
            args.model,
            args.context,
            size=args.size,
            tokens_per_step=args.tokens_per_step,
            transformer_layers=args.transformer_layers,
            qk_dim=args.qk_dim,
            chunk_size=args.chunk_size,
            vocab_size=args.vocab_size,
            dtype=args.dtype,
            param_dtype=args.param_dtype,
            remat=args.remat,
            unroll_layers=args.unroll_layers,
        )
    except ValueError as e:
        cli.fail(PROGRAM, str(e), 2)
    return trace_step(args, config) if args.mode == "trace" else time_parts(args, config)


if __name__ == "__main__":
    cli.run_script(main, FLAGS)
