"""Logical axis names -> device mesh: one table of rules decides data / FSDP / tensor parallelism.

Parameters carry their logical axis names as `logical_axes` metadata; activations are constrained by
name with `constrain`. Without an active mesh (`jax.set_mesh`), constraints are no-ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | Sequence[str] | None]]

# The default table; configs/base.py exposes it as config.mesh.rules.
DEFAULT_RULES: tuple = (
    ("batch", ("data", "fsdp")),
    # Context parallelism: a `sequence` mesh axis cuts every sequence into stretches of whole
    # chunks, one per device (FLASH passes only its edge states between them).
    ("length", "sequence"),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("qk", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("rel", None),
)

# Metadata key under which parameters carry their logical axis names.
LOGICAL_AXES = "logical_axes"
# Tells nnx.vmap / nnx.scan to prepend the stacked-layer axis to `logical_axes`.
LAYER_AXIS_METADATA = {nnx.PARTITION_NAME: "layers", LOGICAL_AXES: "layers"}


def make_mesh(
    shape: Sequence[int], axis_names: Sequence[str], devices=None, num_slices: int = 0
) -> jax.sharding.Mesh:
    """A mesh with Auto axes (logical-rule sharding); one -1 entry takes the remaining devices.

    Devices in several slices (TPU multi-slice, GPU hosts) get a hybrid mesh: the "data" axis
    spans the slices and the other axes stay inside each one
    (`mesh_utils.create_hybrid_device_mesh`). `num_slices` > 0: the devices must lie in that many
    slices (ValueError otherwise); 0: as many as they do."""
    devices = jax.devices() if devices is None else devices
    shape = _resolved_shape(shape, axis_names, len(devices))
    found = _slice_count(devices)
    if num_slices and found != num_slices:
        raise ValueError(
            f"mesh.num_slices={num_slices} but these {len(devices)} "
            f"{devices[0].device_kind} devices lie in {found} slice(s)"
        )
    try:
        if found > 1:
            grid = _hybrid_device_grid(shape, axis_names, devices, found)
            return jax.sharding.Mesh(grid, tuple(axis_names), (AxisType.Auto,) * len(shape))
        return jax.make_mesh(
            tuple(shape),
            tuple(axis_names),
            axis_types=(AxisType.Auto,) * len(shape),
            devices=devices,
        )
    except NotImplementedError as e:  # jax lays TPU meshes on the slice's torus (mesh_utils)
        reason = str(e).split(". ")[0]
        raise ValueError(
            f"mesh.shape {tuple(shape)} cannot be laid on these {len(devices)} "
            f"{devices[0].device_kind} devices: each mesh axis must be a product of some of the "
            f"slice's physical axes (jax: {reason})"
        ) from None


def _resolved_shape(shape: Sequence[int], axis_names: Sequence[str], num_devices: int) -> list:
    """`shape` with its -1 filled; ValueError (one line) when it does not fit the devices."""
    shape = list(shape)
    if len(shape) != len(axis_names):
        raise ValueError(f"mesh.shape {tuple(shape)} needs one entry per axis {tuple(axis_names)}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh.shape {tuple(shape)} may hold at most one -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if any(s == 0 or s < -1 for s in shape) or num_devices % known:
        raise ValueError(f"mesh.shape {tuple(shape)} does not fit {num_devices} devices")
    if -1 in shape:
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ValueError(
            f"mesh.shape {tuple(shape)} uses {int(np.prod(shape))} of "
            f"{num_devices} devices; use -1 to fill an axis"
        )
    return shape


def _slice_count(devices) -> int:
    """How many slices `devices` lie in: TPU slices, GPU hosts (JAX gives each host's GPUs one
    `slice_index`); 1 for devices without one (CPU)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def _hybrid_device_grid(shape: list, axis_names: Sequence[str], devices, num_slices: int):
    """The devices in `shape`, the "data" axis split into `num_slices` slices (outer, over DCN)
    times the data-parallel devices inside each slice (inner, over ICI)."""
    from jax.experimental import mesh_utils

    if "data" not in axis_names:
        raise ValueError(
            f"mesh.axis_names {tuple(axis_names)} need a 'data' axis to span the devices' "
            f"{num_slices} slices"
        )
    data = list(axis_names).index("data")
    if shape[data] % num_slices:
        raise ValueError(
            f"mesh.shape {tuple(shape)}: its data entry ({shape[data]}) must be a multiple of "
            f"the devices' {num_slices} slices (mesh.num_slices): the data axis spans them"
        )
    inside = [s // num_slices if i == data else s for i, s in enumerate(shape)]
    across = [num_slices if i == data else 1 for i in range(len(shape))]
    return mesh_utils.create_hybrid_device_mesh(inside, across, devices)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: Rules = DEFAULT_RULES,
    mesh_axis_names: Sequence[str] | None = None,
) -> PartitionSpec:
    """Maps logical names to a PartitionSpec; a mesh axis is used at most once per array."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule")
        target = table[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        if mesh_axis_names is not None:
            axes = tuple(a for a in axes if a in mesh_axis_names)
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _active_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Rules = DEFAULT_RULES):
    """with_sharding_constraint by logical names; a no-op when no mesh is active."""
    mesh = _active_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(
        x, logical_to_spec(logical_axes, rules, mesh.axis_names)
    )


def shard_count(mesh: jax.sharding.Mesh, logical_axis: str, rules: Rules = DEFAULT_RULES) -> int:
    """Into how many pieces `mesh` splits a dimension of this logical name (e.g. the
    data-parallel size for "batch")."""
    spec = logical_to_spec((logical_axis,), rules, mesh.axis_names)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return int(np.prod([mesh.shape[a] for a in axes]))


def active_shard_count(logical_axis: str, rules: Rules = DEFAULT_RULES) -> int:
    """Into how many pieces the active mesh splits a dimension of this logical name; 1 without
    a mesh."""
    mesh = _active_mesh()
    return 1 if mesh is None else shard_count(mesh, logical_axis, rules)


def sequence_axis(rules: Rules = DEFAULT_RULES):
    """The mesh axis (or axes) that the active mesh cuts sequences along ("length"), None when
    it does not (no mesh, or one device along it)."""
    mesh = _active_mesh()
    if mesh is None:
        return None
    spec = logical_to_spec(("length",), rules, mesh.axis_names)[0]
    return spec if spec is not None and shard_count(mesh, "length", rules) > 1 else None


def per_shard(fn, in_axes, out_axes, rules: Rules = DEFAULT_RULES):
    """`fn` run on each device's shard (`jax.shard_map`) when a mesh of several devices is active.

    For kernels XLA cannot partition (Pallas calls): without this, GSPMD would gather their
    inputs onto every device. `in_axes` (one tuple of logical names per positional argument, None
    for an argument passed whole) and `out_axes` give the layout; `fn` must be correct on any
    shard of it (e.g. per batch row); `out_axes` a list of them for an `fn` that returns a tuple.
    Without a mesh, or on one device, `fn` itself.
    """
    mesh = _active_mesh()
    if mesh is None or mesh.size == 1:
        return fn

    def spec(axes):
        return PartitionSpec() if axes is None else logical_to_spec(axes, rules, mesh.axis_names)

    return jax.shard_map(
        fn,
        in_specs=tuple(spec(a) for a in in_axes),
        out_specs=tuple(map(spec, out_axes)) if isinstance(out_axes, list) else spec(out_axes),
        check_vma=False,
    )


def param_specs(tree, rules: Rules = DEFAULT_RULES, mesh_axis_names=None, *, strict: bool = True):
    """PartitionSpecs for a tree of Variables, from their `logical_axes` metadata.

    Anything without logical axes is replicated. With `strict=False`, a Variable whose rank differs
    from its logical axes is replicated too: optimizer state made by `tx.init` keeps its
    parameter's metadata, and Adafactor's factored rows / columns have another shape.
    """

    def spec(x):
        if not isinstance(x, nnx.Variable):
            return PartitionSpec()
        axes = x.get_metadata().get(LOGICAL_AXES)
        if axes is None:
            return PartitionSpec()
        if len(axes) != x.get_value().ndim:
            if not strict:
                return PartitionSpec()
            raise ValueError(f"logical_axes {axes} do not match shape {x.get_value().shape}")
        return logical_to_spec(axes, rules, mesh_axis_names)

    return jax.tree.map(spec, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(
    tree, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES, *, strict: bool = True
):
    """NamedShardings for every leaf of `tree` on `mesh` (see param_specs)."""
    specs = param_specs(tree, rules, mesh.axis_names, strict=strict)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
