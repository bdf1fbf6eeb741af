"""What checkpoint checksums cost: the checksum pass against the save it protects.

    python scripts/bench/bench_checkpoint.py --sizes=tiny,small,base --repeats=3

For FLASH at each size preset (32k vocabulary, AdamW state), on the default device: the time of
`checkpoint_format.inspect_arrays` over the whole train state (the per-array checksums and
finiteness check every save and restore runs, `flash_jax/train/checkpoint_format.py`), and of
`Checkpoints.save`: its blocking part (what training waits for; it includes one checksum pass)
and the whole save until committed. Medians of `--repeats`; writes under `--dir` (a temporary
folder by default).
"""

import os
import statistics
import tempfile
import time

import jax
from absl import flags

from flash_jax import cli, sharding
from flash_jax.tools import benchmarks
from flash_jax.train import checkpoint, checkpoint_format, step  # no data stack: JAX only

FLAGS = flags.FlagValues()
flags.DEFINE_list("sizes", ["tiny", "small"], "Size presets of FLASH.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 3, "Saves per size (the median is kept).", flag_values=FLAGS)
flags.DEFINE_string(
    "dir", "", "Where the checkpoints go (default: a temporary folder).", flag_values=FLAGS
)


def measure(size: str, repeats: int, directory: str) -> dict:
    config = benchmarks.bench_config("flash", 512, size=size, vocab_size=32000, chunk_size=128)
    mesh = sharding.make_mesh((1, 1, 1), config.mesh.axis_names, jax.devices()[:1])
    with jax.set_mesh(mesh):
        fns = step.build(config, mesh)
        state = jax.block_until_ready(fns.init_state())
        nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
        checkpoint_format.inspect_arrays(state)  # compile
        checks, blocking, total = [], [], []
        ckpts = checkpoint.Checkpoints(os.path.join(directory, size), keep=repeats)
        for i in range(repeats):
            t0 = time.perf_counter()
            checkpoint_format.inspect_arrays(state)
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


def main(argv=()):
    args = cli.parse_script_flags(FLAGS, argv, "bench_checkpoint.py")
    cli.quiet_library_logs("bench_checkpoint.py")  # not Orbax's per-save lines
    directory = args.dir or tempfile.mkdtemp(prefix="bench_checkpoint_")
    print(f"device: {jax.devices()[0].device_kind}; files under {directory}")
    print("| size | parameters | train state | checksums | save, blocking | save, committed |")
    print("|---|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        r = measure(size, args.repeats, directory)
        print(
            f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['state_mb']:,.0f} MiB | "
            f"{r['checksums_s'] * 1e3:,.0f} ms | {r['save_blocking_s'] * 1e3:,.0f} ms | "
            f"{r['save_total_s'] * 1e3:,.0f} ms |",
            flush=True,
        )


if __name__ == "__main__":
    cli.run_script(main, FLAGS)
