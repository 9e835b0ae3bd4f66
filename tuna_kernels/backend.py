"""The interface a backend of :class:`tuna_kernels.autograd.FusedTokenLogprobs` implements: the chunked
PyTorch backend (:class:`tuna_kernels.chunked.ChunkedBackend`) and the Triton one
(:class:`tuna_kernels.kernels.launch.TritonBackend`). The autograd function owns the row selection (only
rows with a target, and in backward a non-zero upstream gradient, reach a backend) and what is saved; a
backend only computes, accumulating in fp32 (float64 for float64 inputs).
"""

from __future__ import annotations

from typing import Optional, Protocol, Tuple, runtime_checkable

import torch

Tensor = torch.Tensor


@runtime_checkable
class LogprobBackend(Protocol):
    def forward(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, logit_scale: float,
                softcap: Optional[float], with_expected: bool = False
                ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """``hidden`` [n, D], ``weight`` [V, D], ``bias`` [V] | None, ``labels`` [n] (every row has a target)
        -> ``(lse [n], target_logit [n], expected [n, D] | None)``: the log-sum-exp and target logit of each
        row, and with ``with_expected`` (a frozen head) ``E_n = sum_v p_nv * c_nv * W_v``."""

    def backward(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, lse: Tensor,
                 grad_token: Tensor, logit_scale: float, softcap: Optional[float],
                 need_hidden: bool, need_weight: bool, need_bias: bool
                 ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """``lse`` [n] from :meth:`forward`, ``grad_token`` [n] the upstream gradient of each row's log-prob
        -> ``(grad_hidden [n, D], grad_weight [V, D], grad_bias [V])``, each None when not needed;
        ``grad_weight`` may come in the weight's dtype (summed in fp32 a vocabulary slice at a time)."""
