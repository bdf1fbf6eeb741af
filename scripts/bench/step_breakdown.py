"""Where a FLASH train step's time goes: its parts timed alone, forward + backward, on one device.

The parts of `flash_jax.train.step`'s step at one context (the benchmark's configuration: size
preset, `--transformer_layers`, bf16, remat, vocabulary, tokens per step):

  attention op   `ops.mixed_chunk_attention` alone, per FLASH impl
  layer          one FLASH layer (projections, attention, gate), per FLASH impl, remat as set
  layer, no attn the same layer with attention replaced by v itself (what is not attention)
  head + loss    final norm, float32 logits and the cross-entropy
  optimizer      the AdamW update of every parameter
  step           the whole train step, for the sum to be checked against

Each is the median of `--repeats` calls after a warm-up, on random inputs (bf16 activations of
the model's shapes). `num_layers x layer + head + optimizer` should come close to `step`.

    python scripts/bench/step_breakdown.py                          # CPU, tiny: checks it runs
    python scripts/bench/step_breakdown.py --size=large --transformer_layers=4 --dtype=bfloat16 \
        --remat=save_attn --vocab_size=32128 --tokens_per_step=65536 --context=4096 \
        --impls=xla,pallas_gpu                                # one H100: about 2 minutes
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from flash_jax import losses, models, ops, sharding
from flash_jax.config import DTYPES, REMAT
from flash_jax.layers import FlashLayer
from flash_jax.tools import benchmarks
from flash_jax.train import optim, step

_CONTEXT = flags.DEFINE_integer("context", 256, "Context length.")
_TOKENS = flags.DEFINE_integer("tokens_per_step", 1024, "Tokens per step.")
_SIZE = flags.DEFINE_enum("size", "tiny", list(models.SIZES), "Size preset.")
_LAYERS = flags.DEFINE_integer("transformer_layers", 0, "Depth / 2 (0: the preset's).")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "FLASH's C.")
_QK_DIM = flags.DEFINE_integer("qk_dim", 0, "s (0: the preset's).")
_VOCAB = flags.DEFINE_integer("vocab_size", 4096, "Vocabulary size.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", DTYPES, "Compute dtype.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", DTYPES, "Parameter dtype.")
_REMAT = flags.DEFINE_enum("remat", "none", REMAT, "Remat policy.")
_IMPLS = flags.DEFINE_list("impls", ["xla"], "FLASH attention impls.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per part (the median is kept).")
_OUT_DIR = flags.DEFINE_string("out_dir", "runs/step_breakdown", "Where the outputs go.")
_NAME = flags.DEFINE_string("name", "step_breakdown", "Output file name stem.")


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


def measure(impls: list[str], repeats: int) -> dict:
    config = benchmarks.bench_config(
        "flash",
        _CONTEXT.value,
        size=_SIZE.value,
        tokens_per_step=_TOKENS.value,
        chunk_size=_CHUNK.value,
        vocab_size=_VOCAB.value,
        dtype=_DTYPE.value,
        param_dtype=_PARAM_DTYPE.value,
        remat=_REMAT.value,
        qk_dim=_QK_DIM.value,
        transformer_layers=_LAYERS.value,
    )
    cfg = config.model
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
    for impl in impls:

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
    return {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "context": T,
        "batch": B,
        "num_layers": cfg.num_layers,
        "remat": cfg.remat,
        "parts_ms": parts,
    }


def markdown(result: dict) -> str:
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    result = measure(_IMPLS.value, _REPEATS.value)
    text = markdown(result)
    print(text)
    benchmarks.write_report(os.path.join(_OUT_DIR.value, _NAME.value), result, text)


if __name__ == "__main__":
    app.run(main)
