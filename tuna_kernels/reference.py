"""Materialised reference: builds the full [N, V] logits. For tests only (float64-capable)."""

from __future__ import annotations

from typing import Optional

import torch


def reference_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             bias: Optional[torch.Tensor], logit_scale: float, softcap: Optional[float],
                             ignore_index: int) -> torch.Tensor:
    """log_softmax(softcap(logit_scale * hidden @ weight.T + bias))[t, labels[t]], 0 where ignored.

    hidden: [N, D], weight: [V, D], labels: [N]. Computes in float64 for float64 inputs, else float32.
    Returns [N]; plain autograd supplies the gradients.
    """
    compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).T * logit_scale  # [N, V]
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logprobs = torch.log_softmax(logits, dim=-1)
    is_target = labels != ignore_index
    safe_labels = torch.where(is_target, labels, torch.zeros_like(labels)).long()
    picked = logprobs.gather(1, safe_labels[:, None]).squeeze(1)
    return torch.where(is_target, picked, torch.zeros_like(picked))
