"""TensorBoard through the quiet console (`make tensorboard`): TensorFlow's and CUDA's startup
lines and TensorBoard's note on its data loading stay off stderr; `--verbose` shows them.

    python scripts/run_tensorboard.py --logdir=runs       # any of TensorBoard's own flags
"""

import sys

from flash_jax.cli import console

if __name__ == "__main__":
    console.quiet(sys.argv)  # before TensorFlow loads
    from tensorboard import main as tensorboard_main

    sys.argv = [arg for arg in sys.argv if not console.wants_verbose(["", arg])]
    sys.exit(tensorboard_main.run_main())
