"""What the benchmark scripts share (scripts/benchmark.py, profile_step.py, bench_checkpoint.py):
the training config of a model at one context, synthetic batches, a compiled program's FLOPs and
the bytes its collectives move, the machine a measurement ran on and the report files.

Nothing here imports the data stack (TensorFlow, seqio): benchmarks feed synthetic tokens and run
on accelerator machines that have JAX and Flax alone.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess

import jax
import numpy as np

from flash_jax import models, runs
from flash_jax.config import RunConfig, default_config_dict

# The config key that `model@impl` sets: only FLASH and the softmax Transformers have a choice of
# attention implementation (FLASH-Quad, Performer and Combiner run one XLA path).
IMPL_KEYS = {
    "flash": "flash_impl",
    "transformer": "attention_impl",
    "transformer_plus": "attention_impl",
    "transformer_pp": "attention_impl",
}


def split_variant(model: str) -> tuple[str, str | None]:
    """'flash@pallas_gpu' -> ('flash', 'pallas_gpu'): a model with its attention implementation
    (`IMPL_KEYS`); 'flash' -> None. ValueError for an @impl on a model that has no choice."""
    name, _, impl = model.partition("@")
    if impl and name not in IMPL_KEYS:
        raise ValueError(
            f"{model}: {name} has one attention implementation; @impl applies to "
            f"{', '.join(sorted(IMPL_KEYS))}"
        )
    return name, impl or None


def bench_config(
    model: str,
    context: int,
    *,
    size: str = "tiny",
    tokens_per_step: int = 8192,
    qk_dim: int = 0,
    transformer_layers: int = 0,
    loss_blocks: int = 1,
    **model_keys,
) -> RunConfig:
    """The training config of `model` (optionally `name@impl`) at `context` tokens: the size
    preset (`models.preset`; `qk_dim` and FLASH-family models' twice `transformer_layers` when
    given) with `model_keys` (chunk_size, vocab_size, dtype, remat, ...), a batch of
    `tokens_per_step` tokens, the loss in `loss_blocks` blocks (train.loss_blocks), no warm-up
    (the learning rate does not change the cost). ValueError (naming the key) for a context
    that does not divide the tokens per step."""
    name, impl = split_variant(model)
    if tokens_per_step % context:
        raise ValueError(
            f"--tokens_per_step ({tokens_per_step}) must be a multiple of every context "
            f"length; {context} does not divide it"
        )
    config = default_config_dict()
    m = config.model
    # max_len: FLASH-Quad's fixed score scale n and the bias span are the training length.
    m.update(models.preset(name, size), max_len=context, **model_keys)
    if qk_dim:
        m.qk_dim = qk_dim
    if transformer_layers:
        m.num_layers = transformer_layers * models.depth_factor(name)
    if impl:
        m[IMPL_KEYS[name]] = impl
    config.data.update(seq_len=context, batch_size=tokens_per_step // context)
    config.train.warmup_steps = 0
    config.train.loss_blocks = loss_blocks
    return RunConfig.from_config(config)


def synthetic_batch(batch_size: int, context: int, vocab_size: int, seed: int = 0) -> dict:
    """Uniformly random tokens, one document per row (segment 1), positions 0..T-1."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, size=(batch_size, context + 1), dtype=np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": np.ones((batch_size, context), np.float32),
        "segment_ids": np.ones((batch_size, context), np.int32),
        "positions": np.broadcast_to(np.arange(context, dtype=np.int32), (batch_size, context)),
    }


def cost_flops(compiled) -> float | None:
    """FLOPs of a compiled program per device from XLA's cost analysis; None if unavailable."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    value = (cost or {}).get("flops")
    return float(value) if value and value > 0 else None


_COLLECTIVE = re.compile(
    r"= (.*?) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
)
_ARRAY = re.compile(r"\b(pred|s8|u8|s32|u32|bf16|f16|f32)\[([\d,]*)\]")
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4}


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes of the results of a compiled program's collectives that cross devices, per device,
    by kind (all-gather, all-reduce, ...). Collectives over groups of single devices (psums over
    a mesh axis of size 1, which XLA keeps) move nothing and are left out."""
    totals: dict[str, int] = {}
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.search(line)
        if match is None or _group_size(line) == 1:
            continue
        result, kind = match.groups()
        size = sum(
            _ITEM_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
            for dtype, dims in _ARRAY.findall(result)
        )
        totals[kind] = totals.get(kind, 0) + size
    return totals


def _group_size(hlo_line: str) -> int | None:
    """How many devices each group of an HLO collective spans, in the three ways XLA writes
    replica groups (`{{0,1},{2,3}}`, iota `[2,2]<=[4]`, `mesh['x'=2,'y'=2] {'y'}`); None when
    the line has none (collective-permute's pairs)."""
    match = re.search(r"replica_groups=\{\{([\d,]*)\}", hlo_line)
    if match:
        return len(match.group(1).split(","))
    match = re.search(r"replica_groups=\[\d+,(\d+)\]<=", hlo_line)
    if match:
        return int(match.group(1))
    match = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", hlo_line)
    if match:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", match.group(1)))
        return int(np.prod([int(sizes[a]) for a in re.findall(r"'(\w+)'", match.group(2))]))
    return None


# ----------------------------------------------------------------------------- measurements


def machine_info() -> dict:
    """What measurements came from: CPU model, cores, device, jax version, and whether the
    machine was shared (FLASH_JAX_BENCH_SHARED=0 on a dedicated one). Initialises the backend."""
    cpu = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    device = jax.devices()[0]
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "platform": device.platform,
        "device": device.device_kind,
        "num_devices": jax.device_count(),
        "jax_version": jax.__version__,
        "shared": os.environ.get("FLASH_JAX_BENCH_SHARED", "1") == "1",
    }


def device_name(info: dict) -> str:
    """The CPU model on CPU, else the accelerator's kind (for plot titles)."""
    return info["cpu"] if info["platform"] == "cpu" else info["device"]


def machine_line(info: dict) -> str:
    shared = (
        " The machine was shared with other jobs while this ran: timings are noisy."
        if info.get("shared")
        else ""
    )
    return (
        f"Machine: {info['cpu']} ({info['cpu_cores']} cores), {info['num_devices']} x "
        f"{info['platform']} device ({info['device']}), jax {info['jax_version']}.{shared}"
    )


def write_report(stem: str, report: dict, markdown: str) -> list[str]:
    """`<stem>.json` (NaN-safe) and `<stem>.md`; returns their paths."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as f:
        f.write(runs.to_json(report, indent=2))
    with open(stem + ".md", "w") as f:
        f.write(markdown)
    return [stem + ".json", stem + ".md"]
