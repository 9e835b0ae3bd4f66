"""Append-only JSON-lines stores: what a stage has finished survives a kill, and a rerun skips it."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Dict, Iterable, List


def record_key(record: Dict[str, Any]) -> str:
    """A stable key: the record's id, or a hash of its instruction, input and responses."""
    if record.get("id") is not None:
        return f"id:{record['id']}"
    text = json.dumps([record.get("instruction"), record.get("input"), record.get("responses")], sort_keys=True)
    return "sha:" + hashlib.sha256(text.encode()).hexdigest()[:24]


class JsonlStore:
    """key -> entry, persisted one line per entry (flushed and fsynced); a torn last line is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: Dict[str, Dict[str, Any]] = {}
        self._lock = threading.Lock()
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # cut short by a kill
                self.entries[entry["key"]] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def put(self, key: str, entry: Dict[str, Any]) -> None:
        entry = dict(entry, key=key)
        with self._lock:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            self.entries[key] = entry


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    from ..data import read_records

    return [record for _, _, record in read_records(path)]


def write_jsonl(path: Path, records: Iterable[Dict[str, Any]]) -> None:
    """All records, replacing ``path`` atomically."""
    from ..checkpoint import write_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(path), "".join(json.dumps(r) + "\n" for r in records))
