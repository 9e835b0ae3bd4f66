"""Progress bars for the long commands (train, score, generate, rank, eval, pipeline): counts, rate and ETA on a
terminal, nothing in logs (tqdm turns itself off when stderr is not a terminal; TUNA_PROGRESS=1 forces it on,
TUNA_PROGRESS=0 off)."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, unit: str = "record", initial: int = 0):
    """A tqdm bar of ``total`` units, ``initial`` of them done; use as a context manager and call ``update(n)``."""
    setting = os.environ.get("TUNA_PROGRESS")
    disable = None if setting is None else setting == "0"
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, disable=disable)
