"""Test set-up: no GPU here, so Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit decides at decoration
time), hence here, at the top of the first file pytest loads.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are zero)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    denom = expected.norm()
    diff = (actual - expected).norm()
    return float(diff) if denom == 0 else float(diff / denom)


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
