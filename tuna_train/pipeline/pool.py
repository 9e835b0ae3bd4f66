"""Cached jobs run with bounded concurrency that a Ctrl-C stops without losing what was received: the asking loop
of every endpoint stage (``tuna rank``, ``tuna score`` against an endpoint, ``tuna eval judge``).

Each stage works out the cache key of every item, runs a job only for the keys its :class:`~.store.JsonlStore`
lacks, then builds its outputs from the store alone; so a killed or interrupted run resumes by rerunning the same
command, and asks only what is missing.

Each job's entry goes to the cache from the worker thread that made it, as soon as it is made: so an answer
that arrives after a Ctrl-C (a request that was in flight) is kept too, and no job's entry waits on the main
thread. A first Ctrl-C cancels every queued job (no new request is sent) and waits for the ones in flight,
each bounded by its client's deadlines; a second Ctrl-C aborts those (``abort``, e.g. the judge's) and drops
their entries, since an aborted job has no answer to keep. Either way :class:`Interrupted` is raised, saying
how many jobs are cached and that rerunning the same command does only the others.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any, Callable, Dict, Optional

from ..progress import progress_bar
from .store import JsonlStore

logger = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C stopped the jobs; every entry received is in the cache. ``str()`` is the one-line message."""

    def __init__(self, done: int, total: int, cache: JsonlStore, unit: str) -> None:
        super().__init__(f"interrupted: {done} of the {total} {unit}s to do were done and cached in {cache.path}; "
                         f"run the same command again to do only the other {total - done}")
        self.done, self.total = done, total


def require_counts(**counts: Any) -> None:
    """ValueError naming the first of ``counts`` (concurrency, parse attempts) that is not an integer >= 1: for
    callers other than the command (whose flags are checked by argparse), before any cache is opened."""
    for name, value in counts.items():
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def run_cached(jobs: Dict[str, Callable[[], Dict[str, Any]]], cache: JsonlStore, concurrency: int, desc: str,
               unit: str = "record", abort: Optional[Callable[[], None]] = None,
               on_entry: Optional[Callable[[Dict[str, Any], Any], None]] = None) -> None:
    """Run ``jobs`` (cache key -> a callable returning the key's entry), at most ``concurrency`` at once; put
    each entry in ``cache`` when it is made. A job that raises gets the entry ``{"status": "failed",
    "reason": ...}`` (no job stops the others). ``on_entry(entry, bar)`` runs on the main thread per finished
    job (progress). Raises :class:`Interrupted` on Ctrl-C (see the module docstring); a fault of the cache
    itself (a full disk) cancels the queued jobs and is raised as it is."""
    aborted = threading.Event()
    cached = []  # keys cached by this run (list.append is atomic)

    def work(key: str, job: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
        try:
            entry = job()
        except Exception as error:  # never lose the other jobs over one
            entry = {"status": "failed", "reason": f"{type(error).__name__}: {error}"[:500]}
        if not aborted.is_set():  # an aborted job's entry would record the abort as its failure
            cache.put(key, entry)
            cached.append(key)
        return entry

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency)
    futures = [pool.submit(work, key, job) for key, job in jobs.items()]
    try:
        with progress_bar(len(futures), desc, unit) as bar:
            for future in concurrent.futures.as_completed(futures):
                entry = future.result()  # work() keeps a job's faults: only a cache fault is raised here
                bar.update(1)
                if on_entry is not None:
                    on_entry(entry, bar)
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)  # queued jobs never start: no new request is sent
        in_flight = [future for future in futures if not future.done()]
        if in_flight:
            logger.warning("%s: interrupted: no new requests; waiting for the %d in flight to keep their answers "
                           "(Ctrl-C again to drop them)", desc, len(in_flight))
            try:
                concurrent.futures.wait(in_flight)
            except KeyboardInterrupt:
                aborted.set()
                if abort is not None:
                    abort()  # the aborted jobs end at once; their threads are joined at exit
        raise Interrupted(len(cached), len(jobs), cache, unit) from None
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # a cache fault: send nothing more
        raise
    finally:
        pool.shutdown(wait=False)
