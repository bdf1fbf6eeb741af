"""Memory traffic and matmul precision of FLASH attention from XLA's cost analysis, against context
length at a fixed number of tokens. Compiles only: nothing is run or timed.

For the op alone (`flash_jax.ops.mixed_chunk_attention`) and for one FLASH layer, forward +
backward (`jax.vjp` with a given output cotangent, so the read-out adds nothing), batch =
tokens / context:

- bytes accessed per token, from the compiled program's `cost_analysis()`;
- matmul FLOPs per token split by the operand dtypes of every `dot` in the lowered HLO (the program
  as JAX hands it to XLA, before the backend's own rewrites: the CPU backend, for one, runs bf16
  dots in float32 and materialises the converts, which its byte count includes; GPUs and TPUs run
  them natively), and the float32 x float32 share.

The defaults are the paper's widths (S = 128, E = 2048, C = 256, d_model = E / 2) with bf16 inputs,
packed-document segment ids and the [C, C] relative bias that the layer passes:

    python scripts/op_cost.py                                  # CPU, about 3 minutes
    python scripts/op_cost.py --contexts=1024,32768 --no-causal --no-layer
"""

from __future__ import annotations

import json
import math
import re
import sys

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from flash_jax import cli, models, ops
from flash_jax.config import DTYPES, REMAT, ModelConfig
from flash_jax.tools import tpu_topology

KIB = 1024.0

FLAGS = flags.FlagValues()
cli.define_int_list("contexts", [1024, 2048, 4096, 8192, 16384, 32768], "Context lengths.", FLAGS)
flags.DEFINE_integer("tokens", 65536, "Tokens per program.", flag_values=FLAGS)
flags.DEFINE_integer("qk_dim", 128, "S.", flag_values=FLAGS)
flags.DEFINE_integer("value_dim", 2048, "E (the layer: d_model E / 2).", flag_values=FLAGS)
flags.DEFINE_integer("chunk_size", 256, "C.", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "bfloat16", DTYPES, "Input dtype.", flag_values=FLAGS)
flags.DEFINE_bool("causal", True, "Causal attention.", flag_values=FLAGS)
flags.DEFINE_bool("layer", True, "Also one FLASH layer.", flag_values=FLAGS)
flags.DEFINE_enum("remat", "none", REMAT, "The layer's remat policy.", flag_values=FLAGS)
flags.DEFINE_string("json", None, "Also write the rows to this JSON file.", flag_values=FLAGS)
flags.DEFINE_string(
    "tpu_topology",
    None,
    "Compile for one chip of this TPU slice (e.g. v5e:2x2; libtpu, no TPU needed: "
    "flash_jax/tools/tpu_topology.py) instead of for this CPU.",
    flag_values=FLAGS,
)


# ----------------------------------------------------------------------------- HLO dots

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]")
_DOT = re.compile(r"\bdot\(%?([\w.\-]+),\s*%?([\w.\-]+)\)")
_LHS_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")


def dot_flops_by_dtype(hlo_text: str) -> dict[str, float]:
    """{"bf16 x bf16": flops, "f32 x f32": flops, ...} over the `dot`s of an HLO module's text.

    A dot's FLOPs are 2 x (output elements) x (contracted elements). Each computation is counted
    once (the body of a loop too, as XLA's own cost analysis does)."""
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
    flops: dict[str, float] = {}
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():  # a computation's header: names are local to it
            shapes = {}
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, dtype, dims = match.groups()
        shape = tuple(int(d) for d in dims.split(",") if d)
        shapes[name] = (dtype, shape)
        dot = _DOT.search(line)
        if not dot:
            continue
        (lhs_dtype, lhs_shape), (rhs_dtype, _) = shapes[dot.group(1)], shapes[dot.group(2)]
        contracting = _LHS_CONTRACTING.search(line).group(1)
        contracted = math.prod(lhs_shape[int(d)] for d in contracting.split(",") if d)
        key = f"{lhs_dtype} x {rhs_dtype}"
        flops[key] = flops.get(key, 0.0) + 2.0 * math.prod(shape) * contracted
    return flops


def program_cost(fn, abstract_args, tokens: int, device=None) -> dict:
    """Bytes accessed and FLOPs per token (compiled cost analysis) and matmul FLOPs per token by
    operand dtypes (lowered HLO) of `jax.jit(fn)` at the given abstract arguments, compiled for
    `device` (None: the default one)."""
    if device is not None:  # every argument on that device; its backend's compiler
        on_device = jax.sharding.SingleDeviceSharding(device)
        abstract_args = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_device), abstract_args
        )
    lowered = jax.jit(fn).lower(*abstract_args)
    cost = lowered.compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    matmul = {k: v / tokens for k, v in dot_flops_by_dtype(lowered.as_text("hlo")).items()}
    total = sum(matmul.values())
    return {
        "bytes_per_token": cost["bytes accessed"] / tokens,
        "flops_per_token": cost["flops"] / tokens,
        "matmul_flops_per_token": matmul,
        "f32_matmul_share": matmul.get("f32 x f32", 0.0) / total if total else 0.0,
    }


# ----------------------------------------------------------------------------- the programs


def op_program(args, context: int):
    """Forward + backward of the op: (fn, abstract args)."""
    B, T, S, E, C = args.tokens // context, context, args.qk_dim, args.value_dim, args.chunk_size
    dtype = jnp.dtype(args.dtype)

    def fwd_bwd(qq, kq, ql, kl, v, segment_ids, quad_bias, d_out):
        def attend(qq, kq, ql, kl, v, quad_bias):
            return ops.mixed_chunk_attention(
                qq,
                kq,
                ql,
                kl,
                v,
                chunk_size=C,
                causal=args.causal,
                segment_ids=segment_ids,
                quad_bias=quad_bias,
            )

        out, vjp = jax.vjp(attend, qq, kq, ql, kl, v, quad_bias)
        return out, vjp(d_out)

    abstract = [jax.ShapeDtypeStruct((B, T, S), dtype)] * 4 + [
        jax.ShapeDtypeStruct((B, T, E), dtype),
        jax.ShapeDtypeStruct((B, T), jnp.int32),
        jax.ShapeDtypeStruct((C, C), jnp.float32),  # the layer's bias is in the param dtype
        jax.ShapeDtypeStruct((B, T, E), dtype),
    ]
    return fwd_bwd, abstract


def layer_program(args, context: int):
    """Forward + backward of one FLASH layer (parameter and input gradients, remat as given)."""
    B, T = args.tokens // context, context
    cfg = ModelConfig(
        name="flash",
        num_layers=1,
        d_model=args.value_dim // 2,
        expansion_dim=args.value_dim,
        qk_dim=args.qk_dim,
        chunk_size=args.chunk_size,
        max_len=context,
        causal=args.causal,
        dtype=args.dtype,
        remat=args.remat,
    )
    layer = nnx.eval_shape(lambda: models.LAYER_TYPES["flash"](cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def fwd_bwd(params, rest, x_BTD, segment_ids, positions, d_out):
        def apply(params, x_BTD):
            return nnx.merge(graphdef, params, rest)(x_BTD, segment_ids, positions)

        if cfg.remat != "none":
            apply = jax.checkpoint(apply, policy=models.remat_policy(cfg.remat))
        out, vjp = jax.vjp(apply, params, x_BTD)
        return out, vjp(d_out)

    def shape_of(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)

    x = jax.ShapeDtypeStruct((B, T, cfg.d_model), cfg.compute_dtype)
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
    abstract = [jax.tree.map(shape_of, params), jax.tree.map(shape_of, rest), x, ids, ids, x]
    return fwd_bwd, abstract


def measure(args) -> list[dict]:
    device = None
    if args.tpu_topology:
        try:
            tpu_topology.use_libtpu()
            device = tpu_topology.devices(args.tpu_topology)[0]
        except ValueError as e:
            cli.fail("op_cost.py", f"--tpu_topology: {e}", 2)
    rows = []
    for context in args.contexts:
        row = {
            "context": context,
            "op": program_cost(*op_program(args, context), args.tokens, device),
        }
        if args.layer:
            row["layer"] = program_cost(*layer_program(args, context), args.tokens, device)
        rows.append(row)
        print(f"context {context}: done", file=sys.stderr, flush=True)
    return rows


# ----------------------------------------------------------------------------- output


def _cells(cost: dict) -> list[str]:
    matmul = cost["matmul_flops_per_token"]
    total = sum(matmul.values())
    return [
        f"{cost['bytes_per_token'] / KIB:,.1f}",
        f"{total / 1e6:,.2f}",
        f"{cost['f32_matmul_share']:.1%}",
    ]


def markdown(rows: list[dict]) -> str:
    parts = ["op"] + (["layer"] if "layer" in rows[0] else [])
    header = ["context"]
    for part in parts:
        header += [f"{part} KiB/token", f"{part} matmul MFLOP/token", f"{part} f32 x f32 share"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for row in rows:
        cells = [f"{row['context']:,}"]
        for part in parts:
            cells += _cells(row[part])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def parse_args(argv=()):
    args = cli.parse_script_flags(FLAGS, argv, "op_cost.py")
    for key in ("tokens", "qk_dim", "value_dim", "chunk_size"):
        if getattr(args, key) < 1:
            cli.fail("op_cost.py", f"--{key} must be >= 1, got {getattr(args, key)}", 2)
    if args.value_dim % 2:
        cli.fail(
            "op_cost.py",
            f"--value_dim must be even (the layer's d_model is E / 2), got {args.value_dim}",
            2,
        )
    bad = [T for T in args.contexts if args.tokens % T]
    if bad or not args.contexts:
        cli.fail(
            "op_cost.py",
            f"--tokens ({args.tokens}) must be a multiple of every context; {bad} are not",
            2,
        )
    return args


def main(argv=()) -> list[dict]:
    args = parse_args(argv)
    rows = measure(args)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": vars(args), "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    cli.run_script(main, FLAGS)
