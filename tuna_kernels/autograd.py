"""The one autograd.Function of the fused log-likelihood, shared by the chunked and Triton backends.

It owns what both backends share: only rows with a target do vocabulary work in forward, only rows
with a target and a non-zero upstream gradient in backward; it saves hidden, weight, bias, labels and
the per-token log-sum-exp ([N]) and nothing of size N x V. A backend supplies two functions:

- ``forward(hidden [n, D], weight [V, D], bias [V] | None, labels [n], logit_scale, softcap)``
  -> ``(lse [n], target_logit [n])`` in fp32 (float64 for float64 inputs);
- ``backward(hidden, weight, bias, labels, lse, grad_token [n], logit_scale, softcap,
  need_hidden, need_weight, need_bias)`` -> ``(grad_hidden [n, D], grad_weight [V, D], grad_bias [V])``
  accumulated in fp32, each None when not needed.
"""

from __future__ import annotations

import torch

from .rows import active_rows, scatter_rows


class FusedTokenLogprobs(torch.autograd.Function):
    """[N] token log-probs = target_logit - lse, from hidden [N, D], weight [V, D], bias [V] | None."""

    @staticmethod
    def forward(ctx, backend, hidden, weight, bias, labels, logit_scale, softcap, ignore_index):
        num_tokens = hidden.shape[0]
        rows = active_rows(labels != ignore_index)
        lse, target_logit = backend.forward(hidden[rows], weight, bias, labels[rows], logit_scale, softcap)
        ctx.save_for_backward(hidden, weight, bias, labels, scatter_rows(lse, rows, num_tokens))
        ctx.options = (backend, logit_scale, softcap, ignore_index)
        return scatter_rows(target_logit - lse, rows, num_tokens)

    @staticmethod
    def backward(ctx, grad_token_lp):
        # the backend's matmuls run in the dtypes they are given, whatever autocast the caller has on
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return FusedTokenLogprobs._backward(ctx, grad_token_lp)

    @staticmethod
    def _backward(ctx, grad_token_lp):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        backend, logit_scale, softcap, ignore_index = ctx.options
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[1:4]
        rows = active_rows((labels != ignore_index) & (grad_token_lp != 0))
        grad_hidden, grad_weight, grad_bias = backend.backward(
            hidden[rows], weight, bias, labels[rows], lse[rows], grad_token_lp[rows].to(lse.dtype),
            logit_scale, softcap, need_hidden, need_weight, need_bias and bias is not None,
        )
        if grad_hidden is not None:
            grad_hidden = scatter_rows(grad_hidden, rows, hidden.shape[0]).to(hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return None, grad_hidden, grad_weight, grad_bias, None, None, None, None
