"""Cases of the entry points beyond dense attention."""
from __future__ import annotations


def ROWS(Entry):
    return []
