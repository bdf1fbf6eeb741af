"""TPU devices without a TPU: libtpu describes a slice (`v5e:2x2`, `v4:2x2x2`, ...) whose devices
programs can be compiled for ahead of time on any host (scripts/tpu_compile.py,
scripts/op_cost.py --tpu_topology). Nothing runs on them.

libtpu is the TPU compiler, a PyPI package at the version jax pins (its `tpu` extra). `make
tpu-compile` (and `make test`) install it into `.venv/libtpu`, apart from the environment: where
jax can import it, jax tries to start a TPU at its first use of a backend.

    devices = tpu_topology.devices("v5e:2x2")   # after use_libtpu()
"""

from __future__ import annotations

import os
import re
import sys

import jax

DEFAULT_LIBTPU_DIR = os.path.join(sys.prefix, "libtpu")  # where the Makefile installs it
# Chip generations by device kind: HBM per chip (a v4 / v5p chip's two TensorCores are one
# "megacore" device). The usable share is a little lower (XLA:TPU reports 30.75 GiB on v4).
HBM_BYTES_BY_KIND = {
    "TPU v4": 32 * 2**30,
    "TPU v5 lite": 16 * 2**30,  # v5e
    "TPU v5": 95 * 2**30,  # v5p
    "TPU v6 lite": 32 * 2**30,  # v6e (Trillium)
}
# Published per-chip peaks, for roofline estimates (scripts/op_cost.py --config): bf16 matmul
# FLOP/s and HBM bytes/s, from Google Cloud's TPU system architecture pages (cloud.google.com/
# tpu/docs/v4, /v5e, /v5p, /v6e: "Peak compute per chip (bf16)" and "HBM bandwidth").
PEAK_BF16_FLOPS_BY_KIND = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
}
HBM_BYTES_PER_SECOND_BY_KIND = {
    "TPU v4": 1200e9,
    "TPU v5 lite": 819e9,
    "TPU v5": 2765e9,
    "TPU v6 lite": 1640e9,
}


def use_libtpu(libtpu_dir: str = DEFAULT_LIBTPU_DIR) -> None:
    """Makes libtpu importable, and quiet (it otherwise asks the absent TPU VM's metadata server
    what it is, and warns); this process's own backend stays the CPU. ValueError (one line) when
    libtpu is not there."""
    jax.config.update("jax_platforms", "cpu")  # never a TPU client: no TPU is attached
    if os.path.isdir(libtpu_dir) and libtpu_dir not in sys.path:
        sys.path.insert(0, libtpu_dir)
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ValueError(
            f"libtpu is not installed in {libtpu_dir}: `make tpu-compile` installs it there"
        ) from None
    for key, value in {
        "TPU_SKIP_MDS_QUERY": "1",
        "TPU_ACCELERATOR_TYPE": "v5litepod-4",  # any valid name: each topology is named below
        "TPU_WORKER_HOSTNAMES": "localhost",
        # libtpu otherwise holds /tmp/libtpu_lockfile, refusing a second process that compiles
        # at the same time; with no TPU attached there is nothing to guard.
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    }.items():
        os.environ.setdefault(key, value)


def devices(name: str, num_slices: int = 1) -> list:
    """The devices of the TPU slice `name` (as jax names it: "v5e:2x4", "v5p:4x4x4"), across all
    its hosts; with `num_slices` > 1, of that many such slices joined by DCN (multi-slice: each
    device's `slice_index` says its slice). ValueError (one line) for a name libtpu does not
    know."""
    from jax.experimental import topologies

    # v4 and v5p chips hold two TensorCores that JAX drives as one device ("megacore"), as on a
    # TPU VM; without this libtpu describes each core as a device.
    options = {"chip_config_name": "megacore"} if name.split(":")[0] in ("v4", "v5p") else {}
    if num_slices > 1:
        options["num_slices"] = num_slices
    try:
        topology = topologies.get_topology_desc(platform="tpu", topology_name=name, **options)
    except Exception as e:  # noqa: BLE001 - libtpu's errors for a bad name are many
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{name!r} is not a TPU topology libtpu knows ({first})") from None
    return list(topology.devices)


def compile_train_step(config, devices):
    """`config`'s train step compiled for `devices` (a slice, or several), its mesh laid over
    them: (mesh, its `step.StepFns`, compiled). ValueError for a mesh the devices cannot hold or
    a batch the mesh cannot split."""
    from flash_jax.train import loop, step  # imports TensorFlow (the data): only when asked

    mesh = loop.make_mesh(config, devices)
    loop.check_mesh_fit(config, mesh)
    with jax.set_mesh(mesh):
        fns = step.build(config, mesh)
        return mesh, fns, loop.compile_train_step(config, fns, fns.abstract_rest)


# A compiled multi-slice program is each slice's own: its collectives' replica groups name the
# slice's chips only, and what crosses slices (DCN) is a host transfer that libtpu's multi-slice
# runtime ("megascale") carries, one send and one recv per collective, tagged with its kind.
_DCN_TRANSFER = re.compile(
    r'_xla_host_transfer_rendezvous="([^"]+)".*?_xla_megascale_transfer_type="(\w+)"'
)


def dcn_collectives(hlo_text: str) -> dict[str, int]:
    """The collectives of a compiled multi-slice program that cross slices, counted by kind
    ("ALL_REDUCE", "ALL_GATHER", "ONE_TO_ONE" for a collective permute, ...); each counts once
    however often the program runs it (one inside a loop counts once)."""
    found = set(_DCN_TRANSFER.findall(hlo_text))
    counts: dict[str, int] = {}
    for _, kind in sorted(found):
        counts[kind] = counts.get(kind, 0) + 1
    return counts
