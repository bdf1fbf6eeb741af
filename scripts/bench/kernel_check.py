"""Attention kernels against the XLA op on one GPU: FLASH's Mosaic GPU kernels (the default), or
Transformer++ attention on cuDNN (--kernel=cudnn).

    python scripts/bench/kernel_check.py --out_dir=runs/kernel_check      # on an H100: ~2-3 min
    python scripts/bench/kernel_check.py --interpret --tokens=128 --contexts=128 --S=64 --E=64 \
        --C=64 --bidir_contexts= --repeats=1 --out_dir=/tmp/kc              # CPU, the interpreter
    python scripts/bench/kernel_check.py --kernel=cudnn                   # a GPU with cuDNN: ~20 s

--kernel=mosaic_gpu: the Mosaic GPU kernels of mixed chunk attention. For each context T
(B = tokens / T rows of packed random documents with trailing padding; S = 128, E = 2048,
C = 256, bf16, quad_bias):
  1. accuracy: the kernel's output and all six gradients (of sum(out * cotangent)) against a
     float32 reference (the XLA op on the same bf16 inputs upcast, matmuls at "highest"
     precision), next to the XLA op's own bf16 errors; every result finite, padding rows and
     padding tokens' gradients exactly 0, and two runs of the kernel bit-identical (a race or a
     read of uninitialised shared memory would show there; Pallas's buffer poisoning is not
     implemented for Mosaic GPU);
  2. speed of the op alone: forward, and forward + backward, XLA against the kernel, the median of
     `--repeats` runs after a warm-up (jax.block_until_ready).
Every case runs in its own try/except: a failure (a Mosaic compile error, say) is recorded with its
full message in the JSON and the script goes on. Cases that would start after `--max_seconds` are
recorded as skipped. Prints a markdown table; writes <out_dir>/kernel_check.json and .md.

--kernel=cudnn: Transformer++ attention (`ops.dot_product`) on cuDNN against XLA, B = 4,
T = 4096, 16 heads of 64 (d_model 1024), bf16, causal: the padding-length fast path (one document
per row) and the dense-mask fallback (packed rows), their agreement and forward + backward time
(the mean of `--repeats` calls after a warm-up). Prints its lines; recorded in
docs/results/kernel_check_h100/cudnn_check.md.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from flash_jax import cli, ops, runs
from flash_jax.ops import dot_product, pallas_gpu
from flash_jax.tools import benchmarks

GRAD_NAMES = ("quad_q", "quad_k", "lin_q", "lin_k", "v", "quad_bias")


PROGRAM = "kernel_check.py"
FLAGS = flags.FlagValues()
KERNELS = ["mosaic_gpu", "cudnn"]
flags.DEFINE_enum("kernel", "mosaic_gpu", KERNELS, "What to check.", flag_values=FLAGS)
flags.DEFINE_string(
    "out_dir", "runs/kernel_check", "Where kernel_check.json and .md go.", flag_values=FLAGS
)
flags.DEFINE_integer("tokens", 65536, "B * T per case.", flag_values=FLAGS)
cli.define_int_list("contexts", [1024, 2048, 4096, 8192, 16384, 32768], "Causal cases.", FLAGS)
cli.define_int_list("bidir_contexts", [4096], "Non-causal cases (may be empty).", FLAGS)
for _name, _default in (("S", 128), ("E", 2048), ("C", 256)):
    flags.DEFINE_integer(_name, _default, f"{_name} of the inputs.", flag_values=FLAGS)
for _name in ("block_q", "block_k", "block_e"):
    flags.DEFINE_integer(_name, 64, "The kernel's block size.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 5, "Timed runs per case.", flag_values=FLAGS)
flags.DEFINE_float("max_seconds", 165.0, "Start no case after this.", flag_values=FLAGS)
flags.DEFINE_bool("interpret", False, "Run the kernels interpreted (CPU).", flag_values=FLAGS)


def parse_args(argv=()):
    args = cli.parse_script_flags(FLAGS, argv, PROGRAM)
    contexts = args.contexts + args.bidir_contexts if args.kernel == "mosaic_gpu" else []
    for T in contexts:  # (the cuDNN check has shapes of its own)
        if args.tokens % T:
            cli.fail(
                PROGRAM,
                f"--tokens {args.tokens} must be a positive multiple of every context, got {T}",
                2,
            )
    return args


def make_inputs(B, T, S, E, C, seed):
    """bf16 inputs, packed segment ids (documents of random length, ~10% trailing padding)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    for row in seg:
        t, doc = 0, 1
        while t < int(0.9 * T):
            length = int(rng.integers(1, max(2, T // 3)))
            row[t : min(t + length, int(0.9 * T))] = doc
            t, doc = t + length, doc + 1
    xs = [rng.normal(size=(B, T, S)) for _ in range(4)] + [rng.normal(size=(B, T, E))]
    xs = [jnp.asarray(x, jnp.bfloat16) for x in xs]
    bias = jnp.asarray(0.1 * rng.normal(size=(C, C)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(B, T, E)), jnp.bfloat16)
    return xs, jnp.asarray(seg), bias, cotangent


def _functions(args, T, causal, seg):
    """Jitted forward and forward + backward of the XLA op and of the kernel."""
    common = dict(chunk_size=args.C, causal=causal, segment_ids=seg)
    blocks = dict(block_q=args.block_q, block_k=args.block_k, block_e=args.block_e)

    def xla(*a):
        return ops.mixed_chunk_attention(*a[:5], quad_bias=a[5], **common)

    def kernel(*a):
        return pallas_gpu.mixed_chunk_attention_gpu(
            *a[:5], quad_bias=a[5], interpret=args.interpret, **common, **blocks
        )

    def fwd_bwd(fn):
        def run(*a):
            out, vjp = jax.vjp(fn, *a[:6])
            return out, vjp(a[6].astype(out.dtype))

        return jax.jit(run)

    return {
        "xla_fwd": jax.jit(xla),
        "kernel_fwd": jax.jit(kernel),
        "xla_fwd_bwd": fwd_bwd(xla),
        "kernel_fwd_bwd": fwd_bwd(kernel),
    }


def _errors(results, reference):
    """Norm-wise and scale-wise relative errors of out and each gradient."""
    out, grads = results
    out_ref, grads_ref = reference
    errs = {}
    for name, x, r in zip(("out",) + GRAD_NAMES, (out, *grads), (out_ref, *grads_ref), strict=True):
        x, r = np.asarray(x, np.float64), np.asarray(r, np.float64)
        errs[name] = {
            "norm": float(np.linalg.norm(x - r) / max(np.linalg.norm(r), 1e-30)),
            "scale": float(np.max(np.abs(x - r)) / max(np.max(np.abs(r)), 1e-30)),
        }
    return errs


def _median_ms(fn, inputs, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def run_case(args, T, causal):
    B = args.tokens // T
    row = {"T": T, "B": B, "causal": causal, "errors": {}}
    xs, seg, bias, cotangent = make_inputs(B, T, args.S, args.E, args.C, seed=T)
    inputs = (*xs, bias, cotangent)
    fns = _functions(args, T, causal, seg)

    # Accuracy against float32 (the first kernel call also compiles it).
    try:
        with jax.default_matmul_precision("highest"):  # float32 inputs: a separate compile
            reference = fns["xla_fwd_bwd"](*(x.astype(jnp.float32) for x in xs), bias, cotangent)
        start = time.perf_counter()
        got = jax.block_until_ready(fns["kernel_fwd_bwd"](*inputs))
        row["kernel_first_call_s"] = time.perf_counter() - start
        again = jax.block_until_ready(fns["kernel_fwd_bwd"](*inputs))
        row["kernel_error"] = _errors(got, reference)
        row["xla_error"] = _errors(fns["xla_fwd_bwd"](*inputs), reference)
        leaves, leaves_again = jax.tree.leaves(got), jax.tree.leaves(again)
        pad = np.asarray(seg) == 0
        row["finite"] = all(bool(np.all(np.isfinite(np.asarray(x, np.float32)))) for x in leaves)
        row["deterministic"] = all(
            bool(np.array_equal(np.asarray(a), np.asarray(b)))
            for a, b in zip(leaves, leaves_again, strict=True)
        )
        row["padding_zero"] = all(
            bool(np.all(np.asarray(x, np.float32)[pad] == 0.0)) for x in [got[0], *got[1][:5]]
        )
    except Exception:  # noqa: BLE001 - recorded with its full message, the script goes on
        row["errors"]["accuracy"] = traceback.format_exc()

    # Speed of the op alone.
    for name, fn in fns.items():
        fn_inputs = inputs if name.endswith("fwd_bwd") else inputs[:6]
        try:
            jax.block_until_ready(fn(*fn_inputs))  # compile and warm up
            row[f"{name}_ms"] = _median_ms(fn, fn_inputs, args.repeats)
        except Exception:  # noqa: BLE001
            row["errors"][name] = traceback.format_exc()
    if "kernel_fwd_bwd_ms" in row:
        row["kernel_fwd_bwd_tokens_per_s"] = args.tokens / (row["kernel_fwd_bwd_ms"] / 1e3)
    return row


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _worst(errors):
    return None if errors is None else max(e["norm"] for e in errors.values())


def markdown(rows, device):
    lines = [
        f"Mixed chunk attention, op alone, on {device}: ms (median), errors vs float32 "
        "(norm-wise, worst of out and the six gradients).",
        "",
        "| T | B | causal | xla fwd | kernel fwd | xla fwd+bwd | kernel fwd+bwd | speedup fwd+bwd "
        "| kernel err | xla err | checks |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['T']} | {r['B']} | {r['causal']} | skipped: {r['skipped']} |")
            continue
        worst = {k: _worst(r.get(k)) for k in ("kernel_error", "xla_error")}
        xla_fb, ker_fb = r.get("xla_fwd_bwd_ms"), r.get("kernel_fwd_bwd_ms")
        speedup = xla_fb / ker_fb if xla_fb and ker_fb else None
        checks = [k for k in ("finite", "deterministic", "padding_zero") if r.get(k) is False]
        checks = "FAILED: " + ", ".join(checks) if checks else ("ok" if "finite" in r else "-")
        if r["errors"]:
            checks += " (errors: " + ", ".join(r["errors"]) + ")"
        lines.append(
            f"| {r['T']} | {r['B']} | {r['causal']} | {_fmt(r.get('xla_fwd_ms'), '.2f')} "
            f"| {_fmt(r.get('kernel_fwd_ms'), '.2f')} | {_fmt(xla_fb, '.2f')} "
            f"| {_fmt(ker_fb, '.2f')} | {_fmt(speedup, '.2f')} "
            f"| {_fmt(worst['kernel_error'], '.2e')} | {_fmt(worst['xla_error'], '.2e')} "
            f"| {checks} |"
        )
    return "\n".join(lines) + "\n"


def check_mosaic_gpu(args):
    start = time.perf_counter()
    device = str(jax.devices()[0].device_kind)
    print(f"jax {jax.__version__} on {device}", flush=True)
    cases = [(T, True) for T in args.contexts] + [(T, False) for T in args.bidir_contexts]
    rows = []
    for T, causal in cases:
        if time.perf_counter() - start > args.max_seconds:
            rows.append({"T": T, "B": args.tokens // T, "causal": causal, "skipped": "time budget"})
            continue
        case_start = time.perf_counter()
        rows.append(run_case(args, T, causal))
        rows[-1]["case_s"] = time.perf_counter() - case_start
        print(runs.to_json({k: v for k, v in rows[-1].items() if k != "errors"}), flush=True)
        for stage, message in rows[-1]["errors"].items():
            print(f"T={T} causal={causal} {stage} FAILED:\n{message}", flush=True)
    table = markdown(rows, device)
    print(table)
    summary = {
        "device": device,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "args": vars(args),
        "total_s": time.perf_counter() - start,
        "rows": rows,
    }
    benchmarks.write_report(os.path.join(args.out_dir, "kernel_check"), summary, table)
    return summary


# ----------------------------------------------------------------------------- --kernel=cudnn

B_CUDNN, T_CUDNN, H_CUDNN, D_CUDNN = 4, 4096, 16, 64  # Transformer++ at d_model 1024


def segment_cases():
    """One document per row with trailing padding (the fast path), and a packed row."""
    T = T_CUDNN
    single_BT = jnp.where(jnp.arange(T) < jnp.array([[T], [3000], [T], [700]]), 3, 0)
    single_BT = single_BT.astype(jnp.int32)
    return {"one document per row": single_BT, "packed": single_BT.at[0, 1000:].set(5)}


def attention_fns(impl):
    def attend(q, k, v, seg):
        return dot_product.dot_product_attention(q, k, v, causal=True, segment_ids=seg, impl=impl)

    def loss(q, k, v, seg):
        return jnp.sum(jnp.square(attend(q, k, v, seg).astype(jnp.float32)))

    return jax.jit(attend), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def mean_ms(grad_fn, args, repeats) -> float:
    """The mean of `repeats` calls dispatched back to back, after a warm-up call."""
    jax.block_until_ready(grad_fn(*args))  # compile and warm up
    start = time.perf_counter()
    for _ in range(repeats):
        grads = grad_fn(*args)
    jax.block_until_ready(grads)
    return (time.perf_counter() - start) / repeats * 1e3


def check_cudnn(args):
    keys = jax.random.split(jax.random.key(0), 3)
    shape = (B_CUDNN, T_CUDNN, H_CUDNN, D_CUDNN)
    q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    for name, seg in segment_cases().items():
        fast = bool(dot_product.single_document_rows(seg))
        outputs = {}
        for impl in ("cudnn", "xla"):
            attend, grad_fn = attention_fns(impl)
            outputs[impl] = attend(q, k, v, seg)
            ms = mean_ms(grad_fn, (q, k, v, seg), args.repeats)
            finite = bool(jnp.isfinite(outputs[impl]).all())
            print(f"{name}, {impl}: fast path {fast}, finite {finite}, fwd+bwd {ms:.2f} ms")
        real = np.asarray(seg != 0)
        diff = jnp.abs((outputs["cudnn"] - outputs["xla"]).astype(jnp.float32))
        print(f"{name}: max |cudnn - xla| on real tokens {float(np.asarray(diff)[real].max()):.4f}")


def main(argv=()):
    args = parse_args(argv)
    return check_mosaic_gpu(args) if args.kernel == "mosaic_gpu" else check_cudnn(args)


if __name__ == "__main__":
    cli.run_script(main, FLAGS)
