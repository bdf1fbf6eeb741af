"""Combiner on PG-19, autoregressive LM.

Argument: the context length, e.g. --config=configs/pg19_combiner.py:8192
"""

from configs import paper


def get_config(arg=None):
    return paper.paper_config("combiner", "pg19", arg)
