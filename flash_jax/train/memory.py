"""Device memory: what the compiled train step needs, what the device has, the peak in use.

After compiling, the loop logs the step's memory analysis per device (XLA's
`compiled.memory_analysis()`: arguments, outputs, temporaries, generated code) and refuses, before
the first step, a config whose estimate exceeds the device's capacity (`device.memory_stats()`'s
"bytes_limit"). Each log line and metrics.jsonl record carry the peak bytes in use
("peak_bytes_in_use", the largest over this process's devices).

The CPU backend reports no memory statistics (`memory_stats()` is None; GPUs and TPUs report
them): there its capacity is the host's physical memory shared equally by this process's CPU
devices (a paper config's batch on a laptop stops here with the estimate instead of running out
of memory), and no peak is logged.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"


def step_memory(compiled) -> dict[str, int] | None:
    """Bytes per device of a compiled step: arguments, outputs, temporaries, generated code, the
    outputs that reuse (alias) donated arguments, and `total`, their sum with aliased bytes
    counted once. None if the backend gives no analysis."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    sizes = {
        "arguments": analysis.argument_size_in_bytes,
        "outputs": analysis.output_size_in_bytes,
        "temporaries": analysis.temp_size_in_bytes,
        "generated_code": analysis.generated_code_size_in_bytes,
        "aliased": analysis.alias_size_in_bytes,
    }
    sizes = {k: int(v) for k, v in sizes.items()}
    sizes["total"] = (
        sizes["arguments"]
        + sizes["outputs"]
        + sizes["temporaries"]
        + sizes["generated_code"]
        - sizes["aliased"]
    )
    return sizes


def memory_stats() -> list[dict]:
    """`memory_stats()` of this process's devices; empty where the backend reports none (CPU)."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    return [s for s in stats if s]


def host_memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def capacity_bytes() -> int | None:
    """The smallest "bytes_limit" of this process's devices; for CPU devices (which report none)
    an equal share of the host's memory; None where unknown."""
    limits = [s["bytes_limit"] for s in memory_stats() if "bytes_limit" in s]
    if limits:
        return min(limits)
    devices = jax.local_devices()
    if all(d.platform == "cpu" for d in devices):
        return host_memory_bytes() // len(devices)
    return None


def peak_bytes() -> int | None:
    """The largest "peak_bytes_in_use" of this process's devices; None where unknown (CPU)."""
    peaks = [s["peak_bytes_in_use"] for s in memory_stats() if "peak_bytes_in_use" in s]
    return max(peaks) if peaks else None


def check_fits(sizes: dict[str, int] | None, capacity: int | None) -> None:
    """ValueError (one line, with the estimate) if the step needs more than `capacity` bytes per
    device. Nothing to check without an analysis or a capacity."""
    if sizes is None or capacity is None or sizes["total"] <= capacity:
        return
    raise ValueError(
        f"the train step needs about {gib(sizes['total'])} per device (arguments "
        f"{gib(sizes['arguments'])}, outputs {gib(sizes['outputs'])}, temporaries "
        f"{gib(sizes['temporaries'])}) and the device has {gib(capacity)}: lower "
        "data.batch_size, raise train.grad_accum_steps or train.loss_blocks, set model.remat, or "
        "shard over more devices (mesh.shape)"
    )


def log_and_check(compiled) -> dict[str, int] | None:
    """Logs the compiled step's memory per device and checks it fits (see `check_fits`)."""
    sizes = step_memory(compiled)
    capacity = capacity_bytes()
    if sizes is None:
        logging.info("train step memory: the backend gives no memory analysis")
        return None
    logging.info(
        "train step memory per device: %s (arguments %s, outputs %s, temporaries %s, code %s, "
        "aliased %s); device capacity %s",
        gib(sizes["total"]),
        gib(sizes["arguments"]),
        gib(sizes["outputs"]),
        gib(sizes["temporaries"]),
        gib(sizes["generated_code"]),
        gib(sizes["aliased"]),
        gib(capacity) if capacity is not None else "not reported by this backend (not checked)",
    )
    check_fits(sizes, capacity)
    return sizes
