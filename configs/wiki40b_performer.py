"""Performer on Wiki-40B, autoregressive LM.

Argument: the context length, e.g. --config=configs/wiki40b_performer.py:8192
"""

from configs import paper


def get_config(arg=None):
    return paper.paper_config("performer", "wiki40b", arg)
