"""What the benchmark scripts share (scripts/benchmark.py, step_breakdown.py, bench_checkpoint.py):
the training config of a model at one context, synthetic batches, a compiled program's FLOPs.

Nothing here imports the data stack (TensorFlow, seqio): benchmarks feed synthetic tokens and run
on accelerator machines that have JAX and Flax alone.
"""

from __future__ import annotations

import numpy as np

from flash_jax import models
from flash_jax.config import RunConfig, default_config_dict, depth_factor

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
        m.num_layers = transformer_layers * depth_factor(name)
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
