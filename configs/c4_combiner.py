"""Combiner on C4, masked LM.

Argument: the context length, e.g. --config=configs/c4_combiner.py:8192
"""

from configs import paper


def get_config(arg=None):
    return paper.paper_config("combiner", "c4", arg)
