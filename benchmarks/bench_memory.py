"""Peak memory of one call, measured the same way for every implementation.

- CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated before the call.
- CPU: the allocator's own allocation events, recorded by the PyTorch profiler (``profile_memory=True``):
  a running sum of allocated minus freed bytes gives the peak above the inputs, and the largest single
  allocation the largest tensor. Unlike a ``TorchDispatchMode`` tracker this also sees the buffers of
  ``torch.compile``-generated code (Cut Cross-Entropy's CPU path), so every row is measured alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class MemoryResult:
    peak_bytes: int
    largest_bytes: int


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def _profiled(fn: Callable[[], object], activities) -> MemoryResult:
    from torch._C._profiler import _ExtraFields_Allocation
    from torch.profiler import profile

    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = sorted((node.start_time_ns, node.extra_fields.alloc_size)
                    for node in _walk(prof.profiler.kineto_results.experimental_event_tree())
                    if isinstance(node.extra_fields, _ExtraFields_Allocation))
    live = peak = largest = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
        largest = max(largest, size)
    return MemoryResult(peak, largest)


def measure(fn: Callable[[], object], device: torch.device) -> MemoryResult:
    """Peak extra bytes and the largest single allocation during ``fn()`` (inputs made beforehand)."""
    from torch.profiler import ProfilerActivity

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        largest = _profiled(fn, [ProfilerActivity.CPU, ProfilerActivity.CUDA]).largest_bytes
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return MemoryResult(torch.cuda.max_memory_allocated(device) - before, largest)
    return _profiled(fn, [ProfilerActivity.CPU])
