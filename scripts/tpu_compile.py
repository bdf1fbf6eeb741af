"""Compiles for TPU chips on a machine that has none (libtpu's ahead-of-time compile for a TPU
topology): nothing runs, no TPU is attached.

- The Pallas TPU kernels of mixed chunk attention (flash_jax/ops/pallas_tpu.py), forward and
  backward, at the paper's shapes (S = 128, C = 256, bf16; E and the rows below), on the chip of
  each `--topologies` entry, with the E tile planned for that chip's VMEM. Mosaic compiles them as
  on the chip, so a block that overflows VMEM or an operation Mosaic cannot compile fails here;
  the `jax.export` lowering of tests/test_pallas_tpu.py stops before Mosaic's compiler.
- With `--config`: that run config's train step on each slice (the config's mesh over the slice's
  chips, several hosts' when the slice has several): its memory per chip against the chip's HBM
  (XLA:TPU refuses a program over it, and that is the row's error), and how many Mosaic kernels
  it holds. With `--num_slices=N` (as MaxText's compile_topology_num_slices), on N such slices
  joined by the data-center network (DCN), the config's data axis spanning them
  (`mesh.num_slices`): the row also counts the collectives that cross slices, by kind.

libtpu (the TPU compiler) is a PyPI package that jax pins (its `tpu` extra). `make tpu-compile`
installs it into .venv/libtpu, apart from the environment (where jax would try to start a TPU
with it), and runs the kernel check; this script finds it there (`--libtpu_dir`):

    make tpu-compile
    .venv/bin/python scripts/tpu_compile.py --topologies=v5e:2x2 --nokernels \\
        --config=configs/pg19_flash.py --config.model.flash_impl=pallas_tpu
    .venv/bin/python scripts/tpu_compile.py --topologies=v5e:2x4 --nokernels --num_slices=2 \\
        --config=configs/pg19_flash.py --config.model.remat=full

Exit status 1 when anything failed to compile (each failure is one row with its reason).
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from flash_jax import cli, runs
from flash_jax.cli import console
from flash_jax.config import RunConfig
from flash_jax.ops import pallas_tpu
from flash_jax.tools import benchmarks, tpu_topology
from flash_jax.train import memory

# Chip generations: v4, v5e, v5p, v6e (Trillium); 4 to 8 TensorCores on one host.
DEFAULT_TOPOLOGIES = ["v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2"]
# (batch, tokens, causal) per E: causal LM rows, and bidirectional rows whose length is not a
# multiple of C (the wrapper pads them).
KERNEL_ROWS = [(2, 8192, True), (1, 8000, False)]

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A run config whose train step to compile on each topology."
)
_TOPOLOGIES = flags.DEFINE_list(
    "topologies", DEFAULT_TOPOLOGIES, "TPU slices, as jax names them: v5e:2x2, v4:2x2x2, ..."
)
_KERNELS = flags.DEFINE_bool("kernels", True, "Compile the attention kernels.")
_WIDTHS = flags.DEFINE_list("widths", ["1536", "2048"], "The kernels' E (the paper's: 1536, 2048).")
_PLAN_VMEM_MIB = flags.DEFINE_integer(
    "plan_vmem_mib", None, "Plan the E tiles for this much VMEM instead of the chip's own."
)
_LIBTPU_DIR = flags.DEFINE_string(
    "libtpu_dir", tpu_topology.DEFAULT_LIBTPU_DIR, "Where `make tpu-compile` installs libtpu."
)
_NUM_SLICES = flags.DEFINE_integer(
    "num_slices",
    None,
    "Compile the train step for this many slices of each topology, joined by DCN "
    "(sets mesh.num_slices; default: the config's, or 1).",
)
_JSON = flags.DEFINE_string("json", None, "Also write the rows to this JSON file.")

PROGRAM = "tpu_compile.py"


def topology_devices(name: str, num_slices: int = 1) -> list:
    try:
        return tpu_topology.devices(name, num_slices)
    except ValueError as e:
        cli.fail(PROGRAM, f"--topologies: {e}", 2)


def timed(row: dict, compile_fn, *args) -> None:
    """Runs `compile_fn(*args)`, recording in `row` its error's telling line (None if it
    compiled) and its seconds: a failure is reported per row, the point of the check."""
    t0 = time.time()
    try:
        compile_fn(*args)
        row["error"] = None
    except Exception as e:  # noqa: BLE001 - reported per row
        row["error"] = first_line(e)
    row["seconds"] = round(time.time() - t0, 2)


def first_line(error: Exception) -> str:
    """The line of a compile error that says what failed (Mosaic's reason, XLA's status)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "memory" in line.lower() or "error" in line.lower():
            return line[:300]
    return (lines[0] if lines else type(error).__name__)[:300]


# ----------------------------------------------------------------------------- kernels


def compile_kernel(device, batch, tokens, width, causal, plan_vmem_bytes):
    """Forward + backward of `mixed_chunk_attention_tpu` for one chip: the compiled program."""
    mesh = jax.sharding.Mesh(np.array([device]), ("chip",))
    on_chip = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=on_chip)

    qk = [spec((batch, tokens, 128), jnp.bfloat16)] * 4
    args = [*qk, spec((batch, tokens, width), jnp.bfloat16), spec((batch, tokens), jnp.int32)]
    args.append(spec((256, 256), jnp.float32))

    def loss(quad_q, quad_k, lin_q, lin_k, v, segment_ids, quad_bias):
        out = pallas_tpu.mixed_chunk_attention_tpu(
            quad_q,
            quad_k,
            lin_q,
            lin_k,
            v,
            chunk_size=256,
            causal=causal,
            segment_ids=segment_ids,
            quad_bias=quad_bias,
            vmem_capacity_bytes=plan_vmem_bytes,
        )
        return jnp.sum(out.astype(jnp.float32))

    grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 6))
    with jax.set_mesh(mesh):  # the kernels' VMEM plan reads the chip kind from the mesh
        return jax.jit(grads).lower(*args).compile()


def kernel_rows(topologies: list[str], widths: list[int], plan_vmem_mib: int | None) -> list[dict]:
    rows = []
    for name in topologies:
        device = topology_devices(name)[0]
        vmem = pallas_tpu.VMEM_BYTES_BY_KIND.get(device.device_kind)
        plan = plan_vmem_mib * 2**20 if plan_vmem_mib else vmem
        for width in widths:
            for batch, tokens, causal in KERNEL_ROWS:
                row = {
                    "part": "kernels",
                    "topology": name,
                    "chip": device.device_kind,
                    "batch": batch,
                    "tokens": tokens,
                    "E": width,
                    "causal": causal,
                    "vmem_mib": vmem // 2**20 if vmem else None,
                    "block_e": pallas_tpu.planned_block_e(256, 128, width, 2, causal, plan),
                }
                timed(row, compile_kernel, device, batch, tokens, width, causal, plan)
                rows.append(row)
                print(kernel_line(row), flush=True)
    return rows


def kernel_line(row: dict) -> str:
    shape = f"B={row['batch']} T={row['tokens']} E={row['E']} " + (
        "causal" if row["causal"] else "bidirectional"
    )
    where = f"{row['chip']} ({row['vmem_mib']} MiB VMEM), E tile {row['block_e']}"
    result = f"compiled in {row['seconds']:.1f} s" if row["error"] is None else row["error"]
    return f"kernels  {where}, {shape}: {result}"


# ----------------------------------------------------------------------------- train step


def step_rows(config, topologies: list[str]) -> list[dict]:
    rows = []
    num_slices = config.mesh.num_slices or 1
    for name in topologies:
        devices = topology_devices(name, num_slices)
        kind = devices[0].device_kind
        row = {"part": "train step", "topology": name, "chip": kind, "chips": len(devices)}
        row["hosts"] = len({d.process_index for d in devices})
        row["slices"] = num_slices
        timed(row, compile_step, config, devices, row)
        rows.append(row)
        print(step_line(row), flush=True)
    return rows


def compile_step(config, devices, row: dict) -> None:
    """Compiles `config`'s train step for `devices` (a slice, or several), putting in `row` its
    mesh, its memory per chip against the chip's HBM, its count of Mosaic kernels and its
    collectives across slices."""
    mesh, _, compiled = tpu_topology.compile_train_step(config, devices)
    sizes = memory.step_memory(compiled)
    hbm = tpu_topology.HBM_BYTES_BY_KIND.get(devices[0].device_kind)
    text = compiled.as_text()
    row.update(
        mesh=dict(mesh.shape),
        memory_per_chip_bytes=sizes["total"] if sizes else None,
        hbm_bytes=hbm,
        fits=(sizes["total"] <= hbm) if sizes and hbm else None,
        # Mosaic kernels in the compiled program: the Pallas attention compiled as kernels
        # (flash_impl=pallas_tpu), not interpreted as XLA ops.
        mosaic_kernels=text.count('custom_call_target="tpu_custom_call"'),
        dcn_collectives=tpu_topology.dcn_collectives(text),
        # What the step's collectives move per chip, by kind (HLO result sizes).
        collective_bytes=benchmarks.collective_bytes(text),
    )


def step_line(row: dict) -> str:
    slices = f"{row['slices']} x " if row["slices"] > 1 else ""
    where = f"{row['chip']} x {row['chips']} ({slices}{row['topology']}, {row['hosts']} host(s))"
    if row["error"] is not None:
        return f"train step  {where}: {row['error']}"
    gib = row["memory_per_chip_bytes"] / 2**30
    hbm = f" of {row['hbm_bytes'] / 2**30:.0f} GiB HBM" if row["hbm_bytes"] else ""
    verdict = {True: "fits", False: "DOES NOT FIT", None: "capacity unknown"}[row["fits"]]
    dcn = ""
    if row["slices"] > 1:
        kinds = ", ".join(f"{n} {k}" for k, n in row["dcn_collectives"].items()) or "none"
        dcn = f", collectives across slices: {kinds}"
    moved = sum(row["collective_bytes"].values()) / 2**20
    return (
        f"train step  {where}, mesh {row['mesh']}: {gib:.2f} GiB per chip{hbm} ({verdict}), "
        f"collectives {moved:.1f} MiB per chip, {row['mosaic_kernels']} Mosaic kernel "
        f"calls{dcn}; compiled in {row['seconds']:.1f} s"
    )


# ----------------------------------------------------------------------------- command line


def main(argv):
    if len(argv) > 1:
        cli.fail(PROGRAM, f"unexpected arguments {argv[1:]}", 2)
    try:
        tpu_topology.use_libtpu(_LIBTPU_DIR.value)
    except ValueError as e:
        cli.fail(PROGRAM, str(e), 2)
    try:
        widths = [int(w) for w in _WIDTHS.value]
    except ValueError:
        cli.fail(PROGRAM, f"--widths must be integers, got {_WIDTHS.value}", 2)
    if _NUM_SLICES.value is not None and _NUM_SLICES.value < 1:
        cli.fail(PROGRAM, f"--num_slices must be >= 1, got {_NUM_SLICES.value}", 2)
    config = None
    if _CONFIG.value is not None:
        try:
            config = RunConfig.from_config(_CONFIG.value)
            if _NUM_SLICES.value is not None:
                mesh = dataclasses.replace(config.mesh, num_slices=_NUM_SLICES.value)
                config = dataclasses.replace(config, mesh=mesh)
        except ValueError as e:
            cli.fail(PROGRAM, str(e), 2)
    rows = []
    if _KERNELS.value:
        rows += kernel_rows(_TOPOLOGIES.value, widths, _PLAN_VMEM_MIB.value)
    if config is not None:
        rows += step_rows(config, _TOPOLOGIES.value)
    failed = [r for r in rows if r["error"] is not None]
    print(f"{PROGRAM}: {len(rows) - len(failed)} of {len(rows)} compiled for TPU")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            f.write(runs.to_json({"jax": jax.__version__, "rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    console.quiet(sys.argv)  # before TensorFlow and XLA load: their startup lines stay off
    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, _CONFIG, PROGRAM))
