"""Row bookkeeping shared by the implementations: only tokens with a target (and, in backward, a
non-zero upstream gradient) do any vocabulary work."""

from __future__ import annotations

from typing import Union

import torch

Rows = Union[slice, torch.Tensor]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for every input dtype, except float64 which keeps float64 (tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def active_rows(mask: torch.Tensor) -> Rows:
    """Indices of the True rows of ``mask`` [N]; a full slice when all are True, so nothing is copied."""
    if bool(mask.all()):
        return slice(None)
    return mask.nonzero().squeeze(1)


def scatter_rows(values: torch.Tensor, rows: Rows, num_rows: int) -> torch.Tensor:
    """Put ``values`` [n, ...] back at ``rows`` of a zero tensor [num_rows, ...]."""
    if isinstance(rows, slice):
        return values
    out = values.new_zeros((num_rows,) + tuple(values.shape[1:]))
    out[rows] = values
    return out
