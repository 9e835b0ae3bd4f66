"""Ask for what a cache lacks: bounded concurrency, each answer stored the moment it arrives, one item's fault
its own, and Ctrl-C keeping every answer received.

The pattern of the endpoint stages (``tuna score`` against an endpoint, and what ``tuna rank`` and ``tuna eval
judge`` do): work out the key of every item, ask only for the keys the :class:`~.store.JsonlStore` does not
hold, then build the outputs from the store alone. So a killed or interrupted run resumes by rerunning the same
command, and asks only what is missing.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Dict

from ..progress import progress_bar
from .store import JsonlStore


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped the asking; the message says what was kept and how to resume."""


def fill_cache(cache: JsonlStore, pending: Dict[str, Any], work: Callable[[Any], Dict[str, Any]],
               concurrency: int = 4, desc: str = "ask") -> None:
    """``cache.put(key, work(item))`` for every ``key, item`` of ``pending``, ``concurrency`` at a time, each
    entry stored by its worker as soon as it is done (not after the others).

    ``work`` returns an entry with a ``status`` ("ok", or "failed" with a ``reason``); a ``work`` that raises
    stores a failed entry naming the exception instead, so one item never stops the others.

    Ctrl-C (KeyboardInterrupt in the calling thread): the queued items are cancelled, so nothing more is sent;
    the ones in flight finish and are stored by their workers (each within the client's own deadline: the
    interpreter joins them before it exits); :class:`Interrupted` then says so.
    """
    def run(key: str, item: Any) -> None:
        try:
            entry = work(item)
        except Exception as error:  # never lose the other items over one
            entry = {"status": "failed", "reason": f"{type(error).__name__}: {error}"}
        cache.put(key, entry)

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, concurrency))
    done = 0
    try:
        with progress_bar(len(pending), desc) as bar:
            futures = [pool.submit(run, key, item) for key, item in pending.items()]
            for future in concurrent.futures.as_completed(futures):
                future.result()  # run() catches the work's faults: only a store fault (disk full) gets here
                done += 1
                bar.update(1)
    except BaseException as error:  # Ctrl-C, or a store fault: send nothing more
        pool.shutdown(wait=False, cancel_futures=True)
        if isinstance(error, KeyboardInterrupt) and not isinstance(error, Interrupted):
            raise Interrupted(f"{done} of {len(pending)} asked and stored in {cache.path} (those in flight are "
                              "finished and stored too); run the same command again to ask only the rest") from None
        raise
    pool.shutdown(wait=True)
