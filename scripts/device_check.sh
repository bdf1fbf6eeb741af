#!/usr/bin/env bash
# The accelerator check, as one command: train-step speed of FLASH on the XLA path and on the
# fused Mosaic GPU kernel, and of Transformer++ on cuDNN, at contexts 1K-32K, d_model 1024, bf16,
# 65,536 tokens per step, forward + backward with the layer stack unrolled and no remat (at these
# shapes everything the backward needs fits: 28 GiB on an H100 for FLASH, and the step is 10%
# faster than with `save_attn`), in one process; JSON, a markdown table and a plot under OUT_DIR.
# About 5 minutes on one H100.
#
#   bash scripts/device_check.sh                      # writes runs/device_check/
#   OUT_DIR=/some/dir CONTEXTS=1024,4096 bash scripts/device_check.sh
#   REMAT=save_attn bash scripts/device_check.sh      # keep projections and attention outputs
#   REMAT=full bash scripts/device_check.sh           # recompute every layer (least memory)
#   UNROLL=nounroll_layers bash scripts/device_check.sh  # the scanned layer stack
#   MODELS=flash@xla,flash@pallas_tpu,transformer_pp@splash bash scripts/device_check.sh  # TPU
#   LOSS_BLOCKS=8 MODELS=flash@xla bash scripts/device_check.sh  # the loss without whole logits
#
# The data stack (TensorFlow, seqio) is not needed: the benchmark feeds synthetic tokens.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${OUT_DIR:-runs/device_check}
CONTEXTS=${CONTEXTS:-1024,2048,4096,8192,16384,32768}
MODELS=${MODELS:-flash@xla,flash@pallas_gpu,transformer_pp@cudnn}
REMAT=${REMAT:-none}
UNROLL=${UNROLL:-unroll_layers}  # or nounroll_layers: one scanned layer body
LOSS_BLOCKS=${LOSS_BLOCKS:-1}  # train.loss_blocks
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT_DIR"

export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 FLASH_JAX_BENCH_SHARED=0

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv || true
"$PYTHON" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

# d_model 1024 (size `large`'s width) with 4 Transformer++ layers against 8 FLASH layers (equal
# parameters); the paper's C = 256 and s = 128; T5's vocabulary size. FLASH on the XLA path and on
# the fused kernel of this backend, Transformer++ on cuDNN (TPU: MODELS=...@pallas_tpu,...@splash).
"$PYTHON" scripts/benchmark.py --no-isolate --models="$MODELS" \
  --size=large --transformer_layers=4 --dtype=bfloat16 --remat="$REMAT" --"$UNROLL" \
  --loss_blocks="$LOSS_BLOCKS" \
  --vocab_size=32128 --tokens_per_step=65536 --contexts="$CONTEXTS" --no-compiled_flops \
  --warmup=1 --repeats=4 --out_dir="$OUT_DIR" --name=device_check
