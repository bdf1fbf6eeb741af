"""Peak memory of whole-document scoring (eval.py --whole_documents) against the document's
length: scores the first `--tokens` tokens of a split's documents joined into one stream, FLASH's
state carried window to window, and prints one JSON line with this process's peak resident
memory (ru_maxrss) and XLA's memory analysis of the compiled window step. Run it once per length
(a fresh process each, so that the peaks do not mix):

    python scripts/bench/whole_document_memory.py --workdir=runs/long/flash --tokens=16384
    python scripts/bench/whole_document_memory.py --workdir=runs/long/flash --tokens=131072
"""

from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np
from absl import flags

from flash_jax import cli
from flash_jax.cli import console

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "A FLASH run (its latest checkpoint).", flag_values=FLAGS)
flags.DEFINE_integer("tokens", 16384, "Length of the document scored.", flag_values=FLAGS)
flags.DEFINE_string("split", "test", "Split whose documents make the stream.", flag_values=FLAGS)


def main(argv=()) -> dict:
    args = cli.parse_script_flags(FLAGS, argv, "whole_document_memory.py")
    if not args.workdir or args.tokens < 1:
        cli.fail("whole_document_memory.py", "--workdir and --tokens >= 1 are required", 2)
    import jax

    from flash_jax import long_context
    from flash_jax.train import checkpoint_reader

    run = checkpoint_reader.restore(args.workdir)
    window = run.config.data.seq_len
    stream = np.concatenate(list(long_context.documents(run.config.data, args.split)))
    if len(stream) < args.tokens:
        cli.fail("whole_document_memory.py", f"the {args.split} split has {len(stream)} tokens", 1)
    t0 = time.time()
    with jax.set_mesh(run.fns.mesh):
        nll = long_context.score_document(run.model(), stream[: args.tokens], window)
        compiled = long_context.whole_document_window.lower(
            run.fns.graphdef,
            run.params,
            run.rest,
            np.zeros((1, window), np.int32),
            np.zeros((1, window), np.int32),
            np.zeros((1, window), np.int32),
            long_context.init_window_state(run.model_config, 1, -(-args.tokens // window) * window),
        ).compile()
    analysis = compiled.memory_analysis()
    report = {
        "tokens": args.tokens,
        "window": window,
        "loss": float(nll.mean()),
        "seconds": round(time.time() - t0, 1),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "window_step_temp_mib": analysis.temp_size_in_bytes / 2**20,
        "window_step_argument_mib": analysis.argument_size_in_bytes / 2**20,
    }
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    console.quiet(sys.argv)
    cli.run_script(main, FLAGS)
