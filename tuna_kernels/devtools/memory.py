"""Allocation tracker: every tensor storage created under it, its bytes, and the peak of live bytes.

Works on any device (CPU included), which ``torch.cuda.max_memory_allocated`` does not: a
``TorchDispatchMode`` sees the outputs of every aten op, forward and backward, and a finaliser on each
new storage tells when it is freed. Used by the tests to prove the memory claims of the fused paths
and by the benchmarks to measure peak memory the same way for every implementation.

    with AllocationTracker() as tracker:
        loss = f(hidden, weight); loss.backward()
    tracker.peak_bytes, tracker.largest_bytes, tracker.largest_shape
"""

from __future__ import annotations

import weakref
from typing import Dict, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class AllocationTracker(TorchDispatchMode):
    """Tracks storages created inside the ``with`` block.

    Attributes:
        live_bytes: bytes of tracked storages still alive.
        peak_bytes: the largest value ``live_bytes`` reached (the peak of extra memory above what
            existed before the block: inputs are not counted).
        largest_bytes / largest_shape / largest_op: the single largest tensor created, and by which op.
        total_bytes: bytes of all storages created.
        shapes: with ``record_shapes=True``, (shape, bytes, op) of every storage created.
    """

    def __init__(self, record_shapes: bool = False) -> None:
        super().__init__()
        self.record_shapes = record_shapes
        self.shapes: list = []  # (shape, bytes, op) of every storage created, when record_shapes
        self.live_bytes = 0
        self.peak_bytes = 0
        self.total_bytes = 0
        self.largest_bytes = 0
        self.largest_shape: Tuple[int, ...] = ()
        self.largest_op: Optional[str] = None
        self._live: Dict[int, int] = {}

    def _release(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key, 0)

    def _record(self, tensor: torch.Tensor, op_name: str) -> None:
        if tensor.is_meta:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return  # a view, or an in-place result, of a storage already counted
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        weakref.finalize(storage, self._release, key)
        self.live_bytes += nbytes
        self.total_bytes += nbytes
        if self.record_shapes:
            self.shapes.append((tuple(tensor.shape), nbytes, op_name))
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        if nbytes > self.largest_bytes:
            self.largest_bytes, self.largest_shape, self.largest_op = nbytes, tuple(tensor.shape), op_name

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._record(leaf, str(func))
        return out
