"""The README's model example runs as written."""

import os
import re

import numpy as np

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_model_example_runs():
    with open(README) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.DOTALL)
    example = next(b for b in blocks if "models.create" in b)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    logits = namespace["logits"]
    assert logits.shape == (2, 128, namespace["config"].model.vocab_size)
    assert logits.dtype == np.float32
