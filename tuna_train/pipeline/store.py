"""Append-only JSON-lines stores: what a stage has finished survives a kill, and a rerun skips it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Dict, Iterable, List

from ..data import read_records
from ..files import write_atomic

logger = logging.getLogger(__name__)


def record_key(record: Dict[str, Any]) -> str:
    """A stable key: the record's id, or a hash of its instruction, input and responses."""
    if record.get("id") is not None:
        return f"id:{record['id']}"
    text = json.dumps([record.get("instruction"), record.get("input"), record.get("responses")], sort_keys=True)
    return "sha:" + hashlib.sha256(text.encode()).hexdigest()[:24]


class JsonlStore:
    """key -> entry, persisted one line per entry (flushed and fsynced).

    A last line cut short by a kill (no final newline) is cut off the file, with a warning naming it,
    before anything is appended: every complete entry stays readable. A complete line that is not a
    JSON entry with a ``key`` is skipped with a warning.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: Dict[str, Dict[str, Any]] = {}
        self._lock = threading.Lock()
        if self.path.exists():
            self._repair_torn_tail()
            with open(self.path, "rb") as handle:
                for number, raw in enumerate(handle, start=1):
                    try:
                        entry = json.loads(raw.decode("utf-8"))
                        self.entries[entry["key"]] = entry
                    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
                        logger.warning("%s:%d: skipped an unreadable entry (%s)", self.path, number,
                                       type(error).__name__)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _repair_torn_tail(self) -> None:
        """Truncate the file after its last newline if the bytes after it are an entry cut short."""
        with open(self.path, "rb+") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size == 0:
                return
            handle.seek(size - 1)
            if handle.read(1) == b"\n":
                return
            keep = size
            while keep > 0:  # find the last newline, reading backwards in blocks
                start = max(0, keep - 65536)
                handle.seek(start)
                block = handle.read(keep - start)
                newline = block.rfind(b"\n")
                if newline >= 0:
                    keep = start + newline + 1
                    break
                keep = start
            logger.warning("%s: the last entry was cut short (%d bytes, a killed run); removed it so the next "
                           "entries stay readable", self.path, size - keep)
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def put(self, key: str, entry: Dict[str, Any]) -> None:
        entry = dict(entry, key=key)
        with self._lock:
            if self.path.exists():
                self._repair_torn_tail()
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            self.entries[key] = entry


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    return [record for _, _, record in read_records(path)]


def write_jsonl(path: Path, records: Iterable[Dict[str, Any]]) -> None:
    """All records, replacing ``path`` atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(path), "".join(json.dumps(r) + "\n" for r in records))
