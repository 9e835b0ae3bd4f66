"""The output directory of a training run: one run at a time, and resume only with the same settings.

- :class:`RunLock`: an exclusive ``fcntl.flock`` on ``<output_dir>/run.lock``, held for the whole run by the
  main process (the other processes of a multi-process run write nothing but their own checkpoint files,
  under the main process's barriers). A second run on the same directory fails at once, naming the
  directory and the pid of the run that holds it. The kernel drops the lock when its process ends, so a
  killed run never leaves a stale lock behind.
- :func:`changed_settings`: the fields of a saved ``config.json`` that differ from the new configuration,
  ignoring those that do not change what is trained (:data:`RESULT_NEUTRAL_FIELDS`).
- :func:`clear_run`: remove an earlier run's checkpoints, metrics and results (``--overwrite``).
- :func:`prepare_output_dir`: the policy, applied by the main process under the lock before anything
  is loaded (so a refused run fails at once); :func:`claim_output_dir` takes the lock and applies it. First
  of all, what a killed run left half-written is removed (a full disk gets its space back before this run
  writes anything); then:

  * ``overwrite``: the earlier run's files are deleted and the run starts afresh;
  * a checkpoint to resume: the settings it was written with (its own ``config.json``; for a checkpoint
    from before checkpoints carried them, its run's) are compared with the new configuration; any difference
    is refused, naming each field (old -> new), unless ``resume_with_new_settings``. A checkpoint copied
    elsewhere (``--resume DIR/step-NNNNNNN``) is checked the same way;
  * nothing to resume: a directory that holds a finished run's results, or checkpoints that
    ``resume: never`` would mix with a new run, is refused; the metrics of a run that died before its
    first checkpoint are dropped;
  * in every accepted case ``config.json`` is rewritten with the settings this run uses.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .checkpoint import SETTINGS, find_checkpoint, remove_partial_checkpoints
from .config import config_fields
from .files import read_json, write_atomic

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"

# fields that change how a run is watched or where it is written, not what it trains or reports
RESULT_NEUTRAL_FIELDS = frozenset({
    "output_dir", "resume", "overwrite", "resume_with_new_settings", "progress", "tensorboard", "trackers", "log_every",
    "eval_every", "save_every", "keep_checkpoints", "kernel_autotune",
})

# what an earlier run leaves in its output directory (the lock file stays: it is ours now)
RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "config.json", "tensorboard", "final")


RESUME_HELP = ("Runs: one run per --output-dir at a time (a lock; a second run fails at once). A directory with a "
               "checkpoint is resumed (--resume auto) only with the same data, model, loss and optimizer "
               "settings: a change is refused, naming each field, unless --overwrite (delete the earlier "
               "run's checkpoints, metrics and results and start afresh) or --resume-with-new-settings "
               "(continue from its checkpoint with the new settings).")


class RunDirectoryError(ValueError):
    """The output directory is busy, or holds a run that this configuration must not continue."""


class RunLock:
    """An exclusive lock on ``directory`` for this process; :meth:`release` (or process exit) frees it."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self._handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.seek(0)
            holder = self._handle.read().strip() or "unknown"
            self._handle.close()
            raise RunDirectoryError(
                f"output directory {Path(directory)} is in use by another run (pid {holder}, lock {self.path}); "
                "wait for it to finish or choose another --output-dir") from None
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(str(os.getpid()))
        self._handle.flush()

    def release(self) -> None:
        if not self._handle.closed:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()


def saved_config(directory: Path) -> Optional[Dict[str, Any]]:
    """The ``config.json`` of the run (or checkpoint) in ``directory`` (None if there is none)."""
    path = Path(directory) / SETTINGS
    if not path.exists():
        return None
    return read_json(path, dict, RunDirectoryError, "; pass --overwrite to start afresh")


def settings_of(checkpoint: Path, directory: Path) -> Optional[Dict[str, Any]]:
    """The settings ``checkpoint`` was written with: its own ``config.json``, else (a checkpoint from an older
    version) that of its run directory, else that of the output directory; None if none is found."""
    run_of_checkpoint = checkpoint.resolve().parent.parent
    for place in (checkpoint, run_of_checkpoint, directory):
        saved = saved_config(place)
        if saved is not None:
            return saved
    logger.warning("%s: no settings found (no %s in it or its run directory): the resume is not checked "
                   "against the settings it was written with", checkpoint, SETTINGS)
    return None


def changed_settings(saved: Dict[str, Any], new: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """(field, old, new) for every result-changing field whose value differs; a field that a saved config
    lacks (written by an older version) counts as changed only if the new value is not its default."""
    defaults = {name: f.default for name, f in config_fields().items()}
    changes = []
    for name in sorted(new):
        if name in RESULT_NEUTRAL_FIELDS:
            continue
        old = saved.get(name, defaults.get(name))
        if old != new[name]:
            changes.append((name, old, new[name]))
    return changes


def describe(changes: List[Tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{name}: {old!r} -> {new!r}" for name, old, new in changes)


def clear_run(directory: Path) -> List[str]:
    """Delete an earlier run's files from ``directory``; return the names removed."""
    removed = []
    for name in RUN_FILES:
        path = Path(directory) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def prepare_output_dir(directory: Path, config) -> Optional[Path]:
    """Apply the policy of the module docstring for ``config`` (a TrainConfig); return the checkpoint the
    run will resume from (None: a fresh start). Main process only, holding :class:`RunLock`."""
    directory = Path(directory)
    new = config.to_dict()
    checkpoint = None
    removed = remove_partial_checkpoints(directory)
    if removed:
        logger.warning("removed what a killed run left half-written: %s", ", ".join(removed))
    if config.overwrite:
        removed = clear_run(directory)
        if removed:
            logger.warning("--overwrite: deleted the earlier run's %s in %s", ", ".join(removed), directory)
    else:
        checkpoint = find_checkpoint(directory, config.resume)
        if checkpoint is not None:
            saved = settings_of(checkpoint, directory)
            changes = changed_settings(saved, new) if saved is not None else []
            if changes and not config.resume_with_new_settings:
                raise RunDirectoryError(
                    f"{directory}: the run to resume ({checkpoint}) has other settings: {describe(changes)}. "
                    "Pass --overwrite to start afresh (deletes that run's checkpoints and metrics), or "
                    "--resume-with-new-settings to continue from its checkpoint with the new settings")
            if changes:
                logger.warning("resuming %s with new settings: %s", checkpoint, describe(changes))
        else:
            finished = [name for name in ("summary.json", "final") if (directory / name).exists()]
            steps = sorted(p.name for p in (directory / "checkpoints").glob("step-*"))
            if finished or steps:
                what = ", ".join(finished + steps[-1:])
                raise RunDirectoryError(
                    f"{directory} holds an earlier run ({what}) that this run would not resume "
                    f"(resume: {config.resume}); pass --overwrite to start afresh (deletes it), or choose "
                    "another --output-dir")
            if (directory / "metrics.jsonl").exists():  # a run killed before its first checkpoint
                (directory / "metrics.jsonl").unlink()
    write_atomic(directory / SETTINGS, json.dumps(new, indent=1))
    return checkpoint


def claim_output_dir(directory: Path, config) -> RunLock:
    """Lock ``directory`` and apply :func:`prepare_output_dir`; the lock is released if that refuses."""
    lock = RunLock(directory)
    try:
        prepare_output_dir(directory, config)
    except BaseException:
        lock.release()
        raise
    return lock
