"""Raw records from a data file, one at a time: JSON (a list), JSON lines, Parquet, CSV, a dataset directory
saved with ``datasets``' ``save_to_disk``, or a dataset name on the Hugging Face Hub.

Nothing here holds the whole file in Python objects; memory stays flat however large the file is:

- **JSON lines** are read line by line in binary and decoded here, not by ``datasets``: its JSON reader infers
  one Arrow schema for the file and fails or coerces on records of different shapes (a score written as a
  string, a missing field), and cannot name the line at fault. A UTF-8 byte-order mark is accepted; a line
  that is not UTF-8 or not JSON (cut short, a number too long to parse, brackets nested deeper than Python's
  recursion limit) is a *bad record* naming file, record and line, which ``skip_bad_records`` skips.
- **JSON lists** are decoded element by element from a window over the text (``json.JSONDecoder.raw_decode``),
  so a large list is never parsed in one piece. Bytes that are not UTF-8 become lone surrogates
  (``surrogateescape``) and are rejected with the record and field by the text check of ``tuna_train.data``;
  a malformed element whose brackets still balance is a bad record; a list broken beyond that (cut short)
  stops with the line.
- **Saved datasets and Hub names** go through ``datasets``: a saved dataset is memory-mapped
  (``load_from_disk``) and read in Arrow slices of 1024 rows; a Hub dataset is streamed
  (``load_dataset(..., streaming=True)``) with a temporary cache directory, removed when the records have
  been read, so nothing is left under ``~/.cache``. **Parquet** and **CSV** are read without ``datasets``:
  its streaming readers kept +340 MB (Parquet) and +260 MB (CSV) resident for a 400k-row file and took
  7-36 s; ``pyarrow.parquet`` reads 1024 rows at a time (+68 MB: one row group decoded, 2.3 s), the standard
  ``csv`` module one row at a time, keeping every cell text and naming lines. Columns are filled with nulls
  where a record lacks a field; such nulls are dropped so a record reads as it would in JSON.
- **CSV** has a header line, then one record per row; its cells are all read as text. The list- and
  object-valued fields of the four formats (:data:`CSV_JSON_FIELDS`: ``responses``, ``scores``,
  ``ranking``, ``output``, ``orig``...) are written in their cells as JSON (``"[""a"", ""b""]"``) and
  decoded here; an empty cell is a missing field; errors name the row's first line.
- A **Hub name** (``owner/name``, optionally ``owner/name:split``, split ``train`` by default) is tried only
  when no file or directory of that name exists, ``owner`` is not a local directory and the Hub is not
  offline (``HF_HUB_OFFLINE=1``); otherwise the error names the path at once.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import datasets
import pyarrow as pa
import pyarrow.parquet as pq


class DataError(ValueError):
    """A record that cannot be used; the message names the file, the record and the field."""


#: (record number from 1, line number or None, the decoded record or the DataError that makes it unusable)
RawRecord = Tuple[int, Optional[int], Union[Any, DataError]]

DATA_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet", ".csv", ".arrow", ".txt", ".gz")
CSV_JSON_FIELDS = frozenset({"responses", "scores", "ranking", "output", "score", "orig", "text",
                             "avg_token_prob", "length", "logprob", "generation", "rank", "ranks"})
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
_BOM = codecs.BOM_UTF8
_WINDOW_CHARS = 1 << 20


def read_records(path: str) -> Iterator[Tuple[int, Optional[int], Any]]:
    """(record number from 1, line number or None, record) for every record of ``path``; the first bad
    record raises its DataError."""
    for number, line_no, record in iter_records(path):
        if isinstance(record, DataError):
            raise record
        yield number, line_no, record


def iter_records(path: str) -> Iterator[RawRecord]:
    """Every record of ``path`` in order; a record that cannot be decoded is yielded as its DataError (so the
    caller may skip it); a file that cannot be read at all raises DataError."""
    file = Path(path)
    try:
        if file.is_dir():
            yield from _saved_dataset_records(path)
        elif file.is_file():
            suffix = file.suffix.lower()
            if suffix == ".parquet":
                yield from _parquet_records(path)
            elif suffix == ".csv":
                yield from _csv_records(path)
            elif _first_byte(file) == b"[":
                yield from _json_list_records(path)
            else:
                yield from _json_lines_records(path)
        elif _is_hub_name(path):
            yield from _hub_records(path)
        else:
            raise DataError(f"{path}: no such file")
    except OSError as error:  # no read permission, an I/O error: the file named, not a traceback
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None


def record_where(path: str, number: int, line_no: Optional[int]) -> str:
    """How an error names a record: ``'<path>: record 3 (line 4)'`` (a line for JSON lines and CSV)."""
    return f"{path}: record {number}" + (f" (line {line_no})" if line_no else "")


def _first_byte(file: Path) -> bytes:
    """The first byte that is not whitespace or a byte-order mark (b'' for an empty file)."""
    with open(file, "rb") as handle:
        if handle.read(len(_BOM)) != _BOM:
            handle.seek(0)
        while True:
            block = handle.read(4096)
            if not block:
                return b""
            stripped = block.lstrip()
            if stripped:
                return stripped[:1]


def _json_error(error: BaseException) -> str:
    if isinstance(error, RecursionError):
        return "not valid JSON (brackets nested too deeply)"
    if isinstance(error, json.JSONDecodeError):
        return f"not valid JSON ({error.msg})"
    return f"not valid JSON ({error})"  # e.g. an integer longer than Python's int-to-str limit


def _json_lines_records(path: str) -> Iterator[RawRecord]:
    number = 0
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if line_no == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if not raw.strip():
                continue
            number += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield number, line_no, DataError(f"{record_where(path, number, line_no)}: not valid UTF-8 "
                                                 f"(byte 0x{raw[error.start]:02x} at byte {error.start + 1})")
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as error:
                yield number, line_no, DataError(f"{record_where(path, number, line_no)}: {_json_error(error)}")
                continue
            yield number, line_no, record


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]|[^"\[\]{}]+', re.DOTALL)
_SCALAR = re.compile(r'[^,\]\s]*(?=[,\]\s])')


def _value_end(text: str, start: int) -> Optional[int]:
    """Where the JSON value starting at ``text[start]`` ends, found from its strings and brackets alone (so
    also for a value that does not decode); None when it does not end within ``text``."""
    if text[start] == '"':
        match = _STRING.match(text, start)
        return match.end() if match else None
    if text[start] not in "[{":
        match = _SCALAR.match(text, start)  # a number or a literal ends at a delimiter
        return match.end() if match else None
    depth, pos = 0, start
    while True:
        match = _TOKEN.match(text, pos)
        if match is None:  # a string that does not end within the text
            return None
        token, pos = match.group(), match.end()
        if token in ("[", "{"):
            depth += 1
        elif token in ("]", "}"):
            depth -= 1
            if depth == 0:
                return pos


class _JsonListReader:
    """Elements of a JSON list decoded one by one from a sliding window over the file's text."""

    def __init__(self, path: str, handle):
        self.path, self.handle = path, handle
        self.text, self.pos, self.line_no, self.eof = "", 0, 1, False
        self.decoder = json.JSONDecoder()

    def more(self) -> bool:
        """Append the next chunk to the window (dropping what was consumed); False at the end of the file."""
        chunk = self.handle.read(max(_WINDOW_CHARS, len(self.text) - self.pos))  # doubles for a long element
        if not chunk:
            self.eof = True
            return False
        self.text, self.pos = self.text[self.pos:] + chunk, 0
        return True

    def next_char(self) -> str:
        """The next character that is not whitespace, counting lines ('' at the end of the file)."""
        while True:
            start = self.pos
            while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n":
                self.pos += 1
            self.line_no += self.text.count("\n", start, self.pos)
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                return ""

    def broken(self, message: str) -> DataError:
        return DataError(f"{self.path}: line {self.line_no}: {message}")

    def decode(self) -> Tuple[Any, Optional[BaseException], Optional[int]]:
        """(value, error, end) of the element at ``pos``, reading on until it is complete; end is None when a
        bad element does not end before the end of the file (the list is cut short)."""
        while True:
            try:
                value, end = self.decoder.raw_decode(self.text, self.pos)
            except (ValueError, RecursionError) as error:
                end = _value_end(self.text, self.pos)
                if end is not None:  # the whole element is in the window: it is bad, not cut by the window
                    return None, error, end
                if self.eof or not self.more():
                    return None, error, None
                continue
            if end < len(self.text) or self.eof:  # a number at the window's edge may go on
                return value, None, end
            self.more()

    def records(self) -> Iterator[RawRecord]:
        if self.next_char() != "[":
            raise self.broken("not valid JSON (expected '[')")
        self.pos += 1
        if self.next_char() == "]":
            return
        number = 0
        while True:
            number += 1
            value, error, end = self.decode()
            if error is not None and end is None:
                raise self.broken(_json_error(error)) from None
            if error is not None:
                yield number, None, DataError(f"{record_where(self.path, number, self.line_no)}: {_json_error(error)}")
            else:
                yield number, None, value
            self.line_no += self.text.count("\n", self.pos, end)
            self.pos = end
            separator = self.next_char()
            if separator == "]":
                self.pos += 1
                if self.next_char() != "":
                    raise self.broken("not valid JSON (extra data after the list)")
                return
            if separator != ",":
                raise self.broken("not valid JSON (expected ',' or ']' after an element)")
            self.pos += 1
            self.next_char()


def _json_list_records(path: str) -> Iterator[RawRecord]:
    with open(path, "r", encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        yield from _JsonListReader(path, handle).records()


def _drop_nulls(value: Any) -> Any:
    """A columnar row with the nulls of absent fields removed (recursively), so it reads like JSON."""
    if isinstance(value, dict):
        return {key: _drop_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_drop_nulls(item) for item in value]
    return value


def _csv_record(row: Dict[str, Any], where: str) -> Union[Dict[str, Any], DataError]:
    record = {}
    for name, cell in row.items():
        if cell is None or cell == "":
            continue
        if name in CSV_JSON_FIELDS:
            try:
                cell = json.loads(cell)
            except (ValueError, RecursionError) as error:
                return DataError(f"{where}: field '{name}' must hold JSON in its CSV cell: {_json_error(error)}")
        record[name] = cell
    return record


def _csv_records(path: str) -> Iterator[RawRecord]:
    """Rows of a CSV file with a header line, read by the standard library (cells stay text; errors can
    name the line; memory holds one row)."""
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # a response may exceed the 128 KiB default
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        reader = csv.reader(handle)
        try:
            columns = next(reader, [])
            number, line_no = 0, reader.line_num + 1
            for cells in reader:
                if cells:
                    number += 1
                    where = record_where(path, number, line_no)
                    if len(cells) > len(columns):
                        yield number, line_no, DataError(f"{where}: {len(cells)} cells for {len(columns)} columns")
                    else:
                        yield number, line_no, _csv_record(dict(zip(columns, cells)), where)
                line_no = reader.line_num + 1
        except csv.Error as error:
            raise DataError(f"{path}: line {reader.line_num}: not valid CSV ({error})") from None


def _hub_dataset_records(path: str, name: str, split: str) -> Iterator[RawRecord]:
    """Rows of a Hub dataset, streamed by ``datasets`` with a temporary cache directory."""
    with tempfile.TemporaryDirectory(prefix="tuna-datasets-cache-") as cache_dir:
        try:
            iterator = iter(datasets.load_dataset(name, split=split, streaming=True, cache_dir=cache_dir))
        except Exception as error:  # datasets raises many kinds; all mean "cannot read this source"
            raise DataError(f"{path}: no such file or directory, and not readable from the Hugging Face Hub "
                            f"({type(error).__name__}: {error})") from None
        number = 0
        while True:
            try:
                row = next(iterator)
            except StopIteration:
                return
            except Exception as error:
                raise DataError(f"{path}: after record {number}: cannot be read from the Hugging Face Hub "
                                f"({type(error).__name__}: {error})") from None
            number += 1
            yield number, None, _drop_nulls(row)


def _parquet_records(path: str) -> Iterator[RawRecord]:
    """Rows of a Parquet file, 1024 at a time (memory: one row group decoded at most)."""
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield number, None, _drop_nulls(row)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: cannot be read as parquet ({type(error).__name__}: {error})") from None


def _saved_dataset_records(path: str) -> Iterator[RawRecord]:
    """Rows of a dataset saved with ``save_to_disk`` (memory-mapped Arrow); of a DatasetDict, its 'train'
    split or its only split."""
    try:
        saved = datasets.load_from_disk(path)
    except Exception as error:
        raise DataError(f"{path}: a directory, but not a dataset saved with save_to_disk "
                        f"({type(error).__name__}: {error})") from None
    if isinstance(saved, datasets.DatasetDict):
        if "train" in saved:
            saved = saved["train"]
        elif len(saved) == 1:
            saved = next(iter(saved.values()))
        else:
            raise DataError(f"{path}: a saved DatasetDict with splits {sorted(saved)} and none named 'train'")
    number = 0
    for batch in saved.with_format("arrow").iter(batch_size=1024):  # Arrow slices of the mapped file
        for row in batch.to_pylist():
            number += 1
            yield number, None, _drop_nulls(row)


def hub_offline() -> bool:
    """True when the Hugging Face Hub must not be contacted (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _is_hub_name(path: str) -> bool:
    """``owner/name[:split]`` that is no local path: no data-file suffix, and ``owner`` is no local directory
    (so a mistyped ``data/ranked`` fails at once instead of asking the Hub)."""
    return (bool(HUB_NAME.match(path)) and "/" in path and not path.lower().endswith(DATA_SUFFIXES)
            and not Path(path.split("/")[0]).is_dir())


def _hub_records(path: str) -> Iterator[RawRecord]:
    if hub_offline():
        raise DataError(f"{path}: no such file or directory (and the Hugging Face Hub is offline, "
                        "HF_HUB_OFFLINE=1, so it is not looked up as a dataset name)")
    name, _, split = path.partition(":")
    yield from _hub_dataset_records(path, name, split or "train")
