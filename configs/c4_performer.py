"""Performer on C4, masked LM.

Argument: the context length, e.g. --config=configs/c4_performer.py:8192
"""

from configs import paper


def get_config(arg=None):
    return paper.paper_config("performer", "c4", arg)
