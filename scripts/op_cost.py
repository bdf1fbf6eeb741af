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

With `--config`, also the whole train step of that run config, compiled for the slice of
`--tpu_topology` (the config's mesh over its chips; every layer unrolled, since XLA's cost
analysis counts a scanned stack's body once): bytes and FLOPs per token per chip, and the
roofline estimate of the step on that chip, max(FLOPs / peak, bytes / HBM bandwidth) with the
chip's published figures (flash_jax/tools/tpu_topology.py), with the model FLOPs utilisation it
implies (analytic model FLOPs, flash_jax/train/flops.py, over that time at the peak):

    python scripts/op_cost.py --tpu_topology=v5p:2x2x1 --contexts=1024 --no-layer \\
        --config=configs/pg19_flash.py

`--top=N` lists the layer program's N largest compiled instructions by bytes per token (each
fusion, kernel or copy with its operands and result: where the traffic goes).

`--layer_in_step` adds one layer as that step runs it (the step with two layers less the step
with one, both compiled): what a change to the layer saves in training, where the layer program
above leaves out what its neighbours do with its input and output.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx
from ml_collections import config_flags

from flash_jax import cli, models, ops, sharding
from flash_jax.config import DTYPES, REMAT, ModelConfig, RunConfig
from flash_jax.dispatch import FLASH_IMPLS, PROJ_IMPLS
from flash_jax.tools import hlo_traffic, tpu_topology
from flash_jax.train import flops

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
flags.DEFINE_enum(
    "flash_impl",
    "auto",
    FLASH_IMPLS,
    "The op's (and the layer's) attention (model.flash_impl; pallas_tpu needs --tpu_topology).",
    flag_values=FLAGS,
)
flags.DEFINE_enum(
    "proj_impl",
    "auto",
    PROJ_IMPLS,
    "The layer's projections: norm + input, gate + output (model.proj_impl; pallas_tpu needs "
    "--tpu_topology).",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "top",
    0,
    "Also list the layer program's (or with --nolayer the op's) largest compiled instructions "
    "by bytes per token (flash_jax/tools/hlo_traffic.py: an attribution, not the exact count).",
    flag_values=FLAGS,
)
flags.DEFINE_string("json", None, "Also write the rows to this JSON file.", flag_values=FLAGS)
flags.DEFINE_string(
    "tpu_topology",
    None,
    "Compile for one chip of this TPU slice (e.g. v5e:2x2; libtpu, no TPU needed: "
    "flash_jax/tools/tpu_topology.py) instead of for this CPU.",
    flag_values=FLAGS,
)
config_flags.DEFINE_config_file(
    "config", None, "Also the train step of this run config (per chip of --tpu_topology).", FLAGS
)
flags.DEFINE_bool(
    "layer_in_step",
    False,
    "With --config: also one layer as the train step runs it (the step with two layers less the "
    "step with one; two more compiles).",
    flag_values=FLAGS,
)


# ----------------------------------------------------------------------------- HLO dots

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]")
_DOT = re.compile(r"\bdot\(%?([\w.\-]+),\s*%?([\w.\-]+)\)")
_LHS_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")


def dot_flops_by_dtype(hlo_text: str) -> dict[str, float]:
    """{"bf16 x bf16": flops, "f32 x f32": flops, ...} over the `dot`s of an HLO module's text.

    A dot's FLOPs are 2 x (output elements) x (contracted elements). Each computation is counted
    once (the body of a loop too, as XLA's own cost analysis does). A Pallas kernel's matmuls are
    not `dot`s of the module: they are not counted here."""
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
    flops: dict[str, float] = {}
    for line in hlo_text.splitlines():
        # A computation's header (names are local to it). Not every unindented line is one: a
        # Pallas call's cost estimate spreads its JSON over lines of its own.
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
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


def program_cost(fn, abstract_args, tokens: int, device=None, top: int = 0) -> dict:
    """Bytes accessed and FLOPs per token (compiled cost analysis) and matmul FLOPs per token by
    operand dtypes (lowered HLO) of `jax.jit(fn)` at the given abstract arguments, compiled for
    `device` (None: the default one); with `top`, that many of the compiled program's largest
    instructions by bytes (`hlo_traffic.instructions`, per token)."""
    if device is not None:  # every argument on that device; its backend's compiler
        on_device = jax.sharding.SingleDeviceSharding(device)
        abstract_args = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_device), abstract_args
        )
        # Traced under a mesh of that one device, so that the layers see it as their target
        # (`dispatch.target_device`: a Pallas kernel then lowers for it, not interpreted).
        with jax.set_mesh(sharding.make_mesh((1,), ("data",), devices=[device])):
            lowered = jax.jit(fn).lower(*abstract_args)
    else:
        lowered = jax.jit(fn).lower(*abstract_args)
    compiled = lowered.compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    matmul = {k: v / tokens for k, v in dot_flops_by_dtype(lowered.as_text("hlo")).items()}
    total = sum(matmul.values())
    row = {
        "bytes_per_token": cost["bytes accessed"] / tokens,
        "flops_per_token": cost["flops"] / tokens,
        "matmul_flops_per_token": matmul,
        "f32_matmul_share": matmul.get("f32 x f32", 0.0) / total if total else 0.0,
    }
    if top:
        largest = hlo_traffic.instructions(compiled.as_text())[:top]
        row["largest"] = [{**r, "bytes": r["bytes"] / tokens} for r in largest]
    return row


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
                impl=args.flash_impl,
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
        proj_impl=args.proj_impl,
        flash_impl=args.flash_impl,
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


def _compiled_step_cost(config: RunConfig, devices: list):
    """(mesh, StepFns, bytes per chip, FLOPs per chip) of `config`'s train step compiled for
    `devices`, its layers unrolled so that XLA's cost analysis counts every one."""
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, unroll_layers=True)
    )
    mesh, fns, compiled = tpu_topology.compile_train_step(config, devices)
    cost = compiled.cost_analysis()  # per device: each runs its share of the batch
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return mesh, fns, cost["bytes accessed"], cost["flops"]


def step_cost(config: RunConfig, devices: list) -> dict:
    """Bytes and FLOPs per token per chip of `config`'s train step compiled for `devices`, and,
    for a TPU chip whose figures are known, the step's roofline time and the model FLOPs
    utilisation it implies."""
    mesh, fns, bytes_per_chip, flops_per_chip = _compiled_step_cost(config, devices)
    chips = len(devices)
    tokens = config.data.batch_size * config.data.seq_len
    model_flops = flops.analytic_flops(config.model, config.data.seq_len, tokens, fns.num_params)
    row = {
        "chip": devices[0].device_kind,
        "chips": chips,
        "mesh": dict(mesh.shape),
        "context": config.data.seq_len,
        "tokens_per_chip": tokens // chips,
        "bytes_per_token": bytes_per_chip * chips / tokens,
        "flops_per_token": flops_per_chip * chips / tokens,
        "model_flops_per_token": model_flops["total"] / tokens,
    }
    peak = tpu_topology.PEAK_BF16_FLOPS_BY_KIND.get(row["chip"])
    bandwidth = tpu_topology.HBM_BYTES_PER_SECOND_BY_KIND.get(row["chip"])
    if peak and bandwidth:
        compute_s, memory_s = flops_per_chip / peak, bytes_per_chip / bandwidth
        step_s = max(compute_s, memory_s)
        row.update(
            roofline_step_seconds=step_s,
            bound="memory" if memory_s > compute_s else "compute",
            mfu=model_flops["total"] / chips / (step_s * peak),
        )
    return row


def layer_in_step_cost(config: RunConfig, devices: list) -> dict:
    """Bytes and FLOPs per token per chip of one layer as `config`'s train step runs it: the
    step with two layers less the step with one (and the analytic model FLOPs likewise). Unlike
    the layer program above (`--layer`), this counts what the layer's neighbours change: its
    input made by the layer before (a kernel's output XLA cannot fuse into), its output's
    consumers, the residual stream's gradient, the optimizer's update of its parameters."""
    tokens = config.data.batch_size * config.data.seq_len
    costs = []
    for num_layers in (1, 2):
        model = dataclasses.replace(config.model, num_layers=num_layers)
        _, fns, bytes_per_chip, flops_per_chip = _compiled_step_cost(
            dataclasses.replace(config, model=model), devices
        )
        model_flops = flops.analytic_flops(model, config.data.seq_len, tokens, fns.num_params)
        costs.append((bytes_per_chip, flops_per_chip, model_flops["total"]))
    (bytes_1, flops_1, model_1), (bytes_2, flops_2, model_2) = costs
    chips = len(devices)
    return {
        "bytes_per_token": (bytes_2 - bytes_1) * chips / tokens,
        "flops_per_token": (flops_2 - flops_1) * chips / tokens,
        "model_flops_per_token": (model_2 - model_1) / tokens,
    }


def target_devices(args) -> list | None:
    """The devices of `--tpu_topology`'s slice, None for this CPU."""
    if not args.tpu_topology:
        return None
    try:
        tpu_topology.use_libtpu()
        return tpu_topology.devices(args.tpu_topology)
    except ValueError as e:
        cli.fail("op_cost.py", f"--tpu_topology: {e}", 2)


def measure(args, devices: list | None) -> list[dict]:
    device = None if devices is None else devices[0]
    rows = []
    for context in args.contexts:
        op_top, layer_top = (0, args.top) if args.layer else (args.top, 0)
        row = {
            "context": context,
            "op": program_cost(*op_program(args, context), args.tokens, device, op_top),
        }
        if args.layer:
            program = layer_program(args, context)
            row["layer"] = program_cost(*program, args.tokens, device, layer_top)
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


def step_markdown(step: dict) -> str:
    """The train step's row: per token per chip, and the roofline estimate where known."""
    header = ["chip", "chips", "context", "KiB/token", "MFLOP/token", "model MFLOP/token"]
    cells = [
        step["chip"],
        str(step["chips"]),
        f"{step['context']:,}",
        f"{step['bytes_per_token'] / KIB:,.1f}",
        f"{step['flops_per_token'] / 1e6:,.1f}",
        f"{step['model_flops_per_token'] / 1e6:,.1f}",
    ]
    if "roofline_step_seconds" in step:
        header += ["roofline step", "bound", "MFU estimate"]
        cells += [
            f"{step['roofline_step_seconds'] * 1e3:,.1f} ms",
            step["bound"],
            f"{step['mfu']:.1%}",
        ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---:|" * len(header),
        "| " + " | ".join(cells) + " |",
    ]
    if "layer" in step:
        layer = step["layer"]
        lines.append(
            f"\none layer in the step: {layer['bytes_per_token'] / KIB:,.1f} KiB/token, "
            f"{layer['flops_per_token'] / 1e6:,.2f} MFLOP/token, "
            f"{layer['model_flops_per_token'] / 1e6:,.2f} model MFLOP/token (two layers less one)"
        )
    return "\n".join(lines)


def largest_markdown(rows: list[dict]) -> str:
    """The largest compiled instructions of the layer program (else the op's), by context."""
    lines = []
    for row in rows:
        part = "layer" if "layer" in row else "op"
        lines += [
            f"{part} at {row['context']:,}: largest instructions (KiB/token, operands + result)",
            "| KiB/token | opcode | op name | shape |",
            "|---:|---|---|---|",
        ]
        for r in row[part]["largest"]:
            shape = r["shape"] if len(r["shape"]) <= 60 else r["shape"][:57] + "..."
            cells = [f"{r['bytes'] / KIB:,.2f}", r["opcode"], r["op_name"][-80:], shape]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    for key in ("proj_impl", "flash_impl"):
        if getattr(args, key) == "pallas_tpu" and not args.tpu_topology:
            # On this CPU the kernel would run interpreted: a program whose cost means nothing.
            cli.fail("op_cost.py", f"--{key}=pallas_tpu needs --tpu_topology", 2)
    if args.layer_in_step and args.config is None:
        cli.fail("op_cost.py", "--layer_in_step needs --config", 2)
    bad = [T for T in args.contexts if args.tokens % T]
    if bad or not args.contexts:
        cli.fail(
            "op_cost.py",
            f"--tokens ({args.tokens}) must be a multiple of every context; {bad} are not",
            2,
        )
    return args


def main(argv=()) -> list[dict]:
    """The rows of the op (and layer) by context; with `--config`, the train step's row is the
    JSON file's `step`."""
    args = parse_args(argv)
    devices = target_devices(args)
    rows = measure(args, devices)
    print(markdown(rows))
    if args.top:
        print("\n" + largest_markdown(rows))
    step = None
    if args.config is not None:
        try:
            config = RunConfig.from_config(args.config)
            step = step_cost(config, devices or jax.devices())
            if args.layer_in_step:
                step["layer"] = layer_in_step_cost(config, devices or jax.devices())
        except ValueError as e:
            cli.fail("op_cost.py", f"--config: {e}", 2)
        print("\n" + step_markdown(step))
    if args.json:
        setup = {**vars(args), "config": None if args.config is None else args.config.to_dict()}
        with open(args.json, "w") as f:
            json.dump({"setup": setup, "rows": rows, "step": step}, f, indent=1)
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    cli.run_script(main, FLAGS)
