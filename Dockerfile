# The project for a TPU or a GPU cluster (xpk on GKE, or any container runtime):
#   docker build --build-arg ACCELERATOR=tpu -t IMAGE .     (or ACCELERATOR=gpu: CUDA 12 wheels)
# jax's accelerator wheels at the version the project pins; the data pipeline runs on the CPU.
FROM python:3.11-slim
ARG ACCELERATOR=tpu
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
WORKDIR /flash-jax
COPY . .
RUN pip install --no-cache-dir -e . \
 && JAX_VERSION=$(python -c 'import importlib.metadata as m; print(m.version("jax"))') \
 && case "$ACCELERATOR" in \
      tpu) pip install --no-cache-dir "jax[tpu]==$JAX_VERSION" ;; \
      gpu) pip install --no-cache-dir "jax[cuda12]==$JAX_VERSION" ;; \
      *) echo "ACCELERATOR must be tpu or gpu, got $ACCELERATOR" >&2; exit 1 ;; \
    esac
