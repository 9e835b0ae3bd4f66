"""Ranked examples kept compactly in Arrow record batches and rebuilt as :class:`RankedExample` on access.

A Python ``RankedExample`` costs several times its text (object headers, a dict, boxed floats, one string
object per response, the ``source`` string); 400k of them took 5x the file's size. Here the examples of a file
live as columns (strings, lists of strings, float64 lists, the record and line numbers), written a batch at a
time to an Arrow file in the temporary directory and memory-mapped, and an example is made only when it is
indexed: resident memory holds only the pages read, which the kernel can drop again. The source
(``'<path>: record N (line L)'``) is rebuilt from the path and the numbers; fields of ``RankedExample`` other than the
columns (``meta`` and any a later version adds) are kept as one JSON string per example.

:class:`RankedExamples` is a read-only sequence: ``len``, indexing, iteration, slicing (a view) and
``select(indices)`` (a view) work as on a list of examples; ``list(examples)`` makes the Python objects.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import tempfile
import weakref
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import pyarrow as pa

from .records import record_where

SCHEMA = pa.schema([
    ("instruction", pa.string()),
    ("input", pa.string()),
    ("responses", pa.list_(pa.string())),
    ("scores", pa.list_(pa.float64())),
    ("prompt_is_formatted", pa.bool_()),
    ("record", pa.int32()),
    ("line", pa.int32()),
    ("extra", pa.string()),  # JSON of the remaining RankedExample fields (meta...), null when all are empty
])
COLUMN_FIELDS = ("instruction", "input", "responses", "scores", "prompt_is_formatted")
BATCH_EXAMPLES = 4096


class RankedExamples(Sequence):
    """Examples of one file, stored in Arrow batches; ``examples[i]`` is a fresh RankedExample.

    ``positions`` (a view's rows, in order) is None for all rows."""

    def __init__(self, path: str, batches: List[pa.RecordBatch], example_type: type,
                 positions: Optional[Sequence[int]] = None):
        self.path, self.batches, self.example_type = path, batches, example_type
        self.starts = [0]
        for batch in batches:
            self.starts.append(self.starts[-1] + batch.num_rows)
        self.positions = positions

    def __len__(self) -> int:
        return self.starts[-1] if self.positions is None else len(self.positions)

    def __getitem__(self, index: Union[int, slice]):
        if isinstance(index, slice):
            return self.select(range(len(self))[index])
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        return self._row(index if self.positions is None else self.positions[index])

    def __iter__(self) -> Iterator[Any]:
        if self.positions is None:  # whole batches at a time: one conversion per column
            for batch in self.batches:
                for row in batch.to_pylist():
                    yield self._example(row)
        else:
            for position in self.positions:
                yield self._row(position)

    def select(self, indices: Sequence[int]) -> "RankedExamples":
        """A view of the examples at ``indices`` (of this sequence), in that order; nothing is copied."""
        if self.positions is not None:
            indices = [self.positions[i] for i in indices]
        return RankedExamples(self.path, self.batches, self.example_type, indices)

    def nbytes(self) -> int:
        """Bytes held by the Arrow buffers."""
        return sum(batch.nbytes for batch in self.batches)

    def _row(self, position: int):
        batch_index = bisect.bisect_right(self.starts, position) - 1
        row = self.batches[batch_index].slice(position - self.starts[batch_index], 1).to_pylist()[0]
        return self._example(row)

    def _example(self, row: Dict[str, Any]):
        extra = json.loads(row["extra"]) if row["extra"] is not None else {}
        return self.example_type(**{name: row[name] for name in COLUMN_FIELDS},
                                 source=record_where(self.path, row["record"], row["line"]), **extra)

    def __repr__(self) -> str:
        return f"RankedExamples({self.path!r}, {len(self)} examples, {self.nbytes() / 2**20:.1f} MiB of Arrow)"


class ExampleStoreBuilder:
    """Collects examples a batch at a time into an Arrow IPC file in the temporary directory (``TMPDIR``);
    ``finish()`` memory-maps it -> RankedExamples. The file is unlinked as soon as it is mapped (POSIX), so
    it is gone when the process ends, however it ends; where unlinking an open file fails it is removed
    when the examples are garbage-collected."""

    def __init__(self, path: str, example_type: type):
        self.path, self.example_type = path, example_type
        # other fields with their defaults: a value equal to its default is not stored
        self.extra_fields = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING
                                      else f.default)
                             for f in dataclasses.fields(example_type)
                             if f.name not in COLUMN_FIELDS and f.name != "source"}
        self.pending: Dict[str, list] = {name: [] for name in SCHEMA.names}
        handle, self.file = tempfile.mkstemp(prefix="tuna-examples-", suffix=".arrow")
        os.close(handle)
        self.sink = pa.OSFile(self.file, "wb")
        self.writer = pa.ipc.new_file(self.sink, SCHEMA)

    def add(self, example, number: int, line_no: Optional[int]) -> None:
        for name in COLUMN_FIELDS:
            self.pending[name].append(getattr(example, name))
        extra = {name: getattr(example, name) for name, default in self.extra_fields.items()
                 if getattr(example, name) != default}
        self.pending["extra"].append(json.dumps(extra, default=str) if extra else None)  # e.g. a Parquet date id
        self.pending["record"].append(number)
        self.pending["line"].append(line_no)
        if len(self.pending["record"]) >= BATCH_EXAMPLES:
            self._flush()

    def _flush(self) -> None:
        if self.pending["record"]:
            self.writer.write_batch(pa.RecordBatch.from_pydict(self.pending, schema=SCHEMA))
            self.pending = {name: [] for name in SCHEMA.names}

    def finish(self) -> RankedExamples:
        try:
            self._flush()
            self.writer.close()
            self.sink.close()
            reader = pa.ipc.open_file(pa.memory_map(self.file, "r"))
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        except BaseException:
            self.abandon()
            raise
        examples = RankedExamples(self.path, batches, self.example_type)
        try:
            os.unlink(self.file)  # the mapping stays valid; the disk space is freed when it is unmapped
        except OSError:
            weakref.finalize(examples, _remove, self.file)
        return examples

    def abandon(self) -> None:
        """Drop what was written (loading failed)."""
        try:
            self.writer.close()
            self.sink.close()
        except Exception:  # already closed, or closing a broken writer: the file goes anyway
            pass
        finally:
            _remove(self.file)


def _remove(file: str) -> None:
    try:
        os.unlink(file)
    except OSError:
        pass
