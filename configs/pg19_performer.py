"""Performer on PG-19, autoregressive LM.

Argument: the context length, e.g. --config=configs/pg19_performer.py:8192
"""

from configs import paper


def get_config(arg=None):
    return paper.paper_config("performer", "pg19", arg)
