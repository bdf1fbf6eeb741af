"""What checkpoint checksums cost: the checksum pass against the save it protects.

    python scripts/bench_checkpoint.py --sizes=tiny,small,base --repeats=3

For FLASH at each size preset (32k vocabulary, AdamW state), on the default device: the time of
`checkpoint.inspect_arrays` over the whole train state (the per-array checksums and finiteness
check every save and restore runs, `flash_jax/train/checkpoint.py`), and of `Checkpoints.save`:
its blocking part (what training waits for; it includes one checksum pass) and the whole save
until committed. Medians of `--repeats`; writes under `--dir` (a temporary folder by default).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from configs import base  # noqa: E402
from flash_jax import models, sharding  # noqa: E402
from flash_jax.train import checkpoint, step  # noqa: E402 - no data stack: runs where JAX runs


def measure(size: str, repeats: int, directory: str) -> dict:
    config = base.get_config()
    config.model.update(models.preset("flash", size), vocab_size=32000, max_len=512)
    mesh = sharding.make_mesh((1, 1, 1), tuple(config.mesh.axis_names), jax.devices()[:1])
    with jax.set_mesh(mesh):
        fns = step.build(config, mesh)
        state = jax.block_until_ready(fns.init_state())
        nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
        checkpoint.inspect_arrays(state)  # compile
        checks, blocking, total = [], [], []
        ckpts = checkpoint.Checkpoints(os.path.join(directory, size), keep=repeats)
        for i in range(repeats):
            t0 = time.perf_counter()
            checkpoint.inspect_arrays(state)
            checks.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ckpts.save(i + 1, state, {"step": i + 1})
            blocking.append(time.perf_counter() - t0)
            ckpts.finish()
            total.append(time.perf_counter() - t0)
        ckpts.close()
    return {
        "size": size,
        "params": fns.num_params,
        "state_mb": nbytes / 2**20,
        "checksums_s": statistics.median(checks),
        "save_blocking_s": statistics.median(blocking),
        "save_total_s": statistics.median(total),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="")
    args = parser.parse_args()
    directory = args.dir or tempfile.mkdtemp(prefix="bench_checkpoint_")
    print(f"device: {jax.devices()[0].device_kind}; files under {directory}")
    print("| size | parameters | train state | checksums | save, blocking | save, committed |")
    print("|---|---:|---:|---:|---:|---:|")
    for size in args.sizes.split(","):
        r = measure(size, args.repeats, directory)
        print(
            f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['state_mb']:,.0f} MiB | "
            f"{r['checksums_s'] * 1e3:,.0f} ms | {r['save_blocking_s'] * 1e3:,.0f} ms | "
            f"{r['save_total_s'] * 1e3:,.0f} ms |",
            flush=True,
        )


if __name__ == "__main__":
    main()
