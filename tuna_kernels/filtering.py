"""Gradient filtering (Cut Cross-Entropy's definition), shared by the Triton and chunked backends.

The backward may skip the two products of a [block_n, block_v] gradient tile whose largest |onehot - p|
(times the softcap derivative: |dz| / |g| per row) is at most eps and that holds no NaN. The threshold does
not depend on the upstream gradient's scale. The bias gradient is never filtered.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

# "auto" threshold per input dtype: the unit roundoff, below which |onehot - p| times any upstream gradient
# is lost when the product's result is rounded to the parameter's dtype anyway.
FILTER_EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24,
              torch.float64: 2.0 ** -53}
# The chunked path filters blocks of the Triton kernels' default 16-bit backward tile (64 tokens x 128
# vocabulary entries on every architecture, kernels/configs.py), so both paths drop the same gradient terms
# in that configuration when the chunk sizes are multiples of it (the defaults are); fp32 and autotuned
# Triton configurations have other tiles.
FILTER_BLOCK = (64, 128)


def check_filter_eps(grad_filter_eps) -> None:
    """Raise a ValueError naming ``grad_filter_eps`` unless it is None, "auto" or a number in [0, 1) (at 1 or
    above every tile would be dropped: |onehot - p| <= 1 always)."""
    if grad_filter_eps is None or grad_filter_eps == "auto":
        return
    if isinstance(grad_filter_eps, bool) or not isinstance(grad_filter_eps, (int, float)) \
            or not 0.0 <= grad_filter_eps < 1.0:
        raise ValueError(f"grad_filter_eps must be None, 'auto' or a number in [0, 1), got {grad_filter_eps!r}")


def filter_threshold(grad_filter_eps, dtype: torch.dtype) -> float:
    """The threshold on |onehot - p| for ``grad_filter_eps`` (None: filtering off, 0 returned but unused)."""
    if grad_filter_eps is None:
        return 0.0
    if grad_filter_eps == "auto":
        return FILTER_EPS[dtype]
    return float(grad_filter_eps)


def drop_small_blocks(grad_logits: torch.Tensor, grad_rows: torch.Tensor, eps: float,
                      block: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Zero, in place, the blocks of ``grad_logits`` [n, v] (dz of one chunk, rows with g != 0) that the Triton
    backward would skip: largest |dz| / |g| at most ``eps`` and no NaN. ``grad_rows``: g [n]."""
    block_n, block_v = block or FILTER_BLOCK
    num_rows, num_cols = grad_logits.shape
    ratio = grad_logits.abs().div_(grad_rows.abs()[:, None])
    pad_rows, pad_cols = -num_rows % block_n, -num_cols % block_v
    if pad_rows or pad_cols:
        ratio = F.pad(ratio, (0, pad_cols, 0, pad_rows))  # zeros raise no block's maximum
    blocks = ratio.view(ratio.shape[0] // block_n, block_n, ratio.shape[1] // block_v, block_v)
    keep = ~(blocks.amax(dim=(1, 3)) <= eps)  # NaN compares False: its block is kept
    mask = keep.repeat_interleave(block_n, 0).repeat_interleave(block_v, 1)[:num_rows, :num_cols]
    return grad_logits.mul_(mask)
