"""Files that survive a crash: every small file the project writes (metrics, manifests, reports, stores,
checkpoints) goes through here, so a run killed at any moment leaves the old file or the new one.

A write that fails (a full disk, a quota, a read-only file system) raises :class:`WriteFailed`, one line naming
the path and the errno (``ENOSPC``), never a writer's own words for it (torch.save says ``unexpected pos 576 vs
534`` or ``basic_ios::clear: iostream error``); the half-written temporary file is removed, not left holding the
space.
"""

from __future__ import annotations

import errno
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional, Type


class WriteFailed(OSError):
    """A file could not be written; ``errno`` is the system's code (``errno.ENOSPC`` for a full disk)."""

    def __init__(self, path: Path, code: int, note: str = "") -> None:
        name = errno.errorcode.get(code, f"errno {code}")
        self.message = f"{path}: cannot write: {os.strerror(code)} ({name}){note}"
        super().__init__(code, os.strerror(code), str(path))

    def __str__(self) -> str:
        return self.message


# how a Rust writer (safetensors) reports an io::Error: "... No space left on device (os error 28)"
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def error_code(error: BaseException) -> Optional[int]:
    """The errno behind a failed write: an OSError's own, or the one a Rust io::Error's text carries."""
    if isinstance(error, OSError) and error.errno:
        return error.errno
    found = _OS_ERROR.search(str(error))
    return int(found.group(1)) if found else None


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turns a failure to write ``path`` that carries an errno into :class:`WriteFailed` naming ``path`` (also
    one raised for a temporary file behind it); other errors pass."""
    try:
        yield
    except Exception as error:
        code = error_code(error)
        if code is None:
            raise
        raise WriteFailed(path, code) from None


class _Recorder:
    """A binary file that keeps the OSError its ``write`` raised: torch.save reports it as a RuntimeError
    (``unexpected pos ...``) that has lost the errno."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def write_stream(path: Path, write_to: Callable[[Any], None]) -> None:
    """``write_to(handle)`` writes ``path`` (binary), which is then fsynced; a failed write is
    :class:`WriteFailed` and removes the partial file."""
    handle = open(path, "wb")
    recorder = _Recorder(handle)
    try:
        write_to(recorder)
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
    except BaseException as error:
        # the errno of the write that failed: torch.save's RuntimeError has lost it, the recorder has not
        code = error_code(recorder.error) if recorder.error is not None else error_code(error)
        try:
            handle.close()  # flushes what is buffered: on a full disk that fails again (the file is closed anyway)
        except OSError:
            pass
        path.unlink(missing_ok=True)
        if code is None or not isinstance(error, Exception):
            raise
        raise WriteFailed(path, code) from None


def fsync_file(path: Path) -> None:
    with writing(path), open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (the directory entry is data too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with writing(path):
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_tmp(path: Path) -> Path:
    """The temporary file :func:`write_atomic` writes ``path`` through (a kill can leave it behind)."""
    return path.with_name(f".{path.name}.tmp")


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` by writing a temporary file, fsyncing it, and renaming it."""
    tmp = atomic_tmp(path)
    with writing(path):
        write_stream(tmp, lambda handle: handle.write(text.encode("utf-8")))
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    fsync_dir(path.parent)


def read_json(path: Path, kind: Type = dict, error: Type[Exception] = ValueError, hint: str = "") -> Any:
    """The JSON value of ``path``, which must be a ``kind``; a file that is not UTF-8 JSON of that type raises
    ``error`` in one line naming the file (and ``hint``: what to do about it)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as failure:
        raise error(f"{path}: not valid JSON ({failure}){hint}") from None
    if not isinstance(value, kind):
        raise error(f"{path}: expected a JSON {_JSON_NAMES.get(kind, kind.__name__)}, found "
                    f"{_JSON_NAMES.get(type(value), type(value).__name__)}{hint}")
    return value


_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean",
               type(None): "null"}
