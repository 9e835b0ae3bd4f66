"""The one autograd.Function of the fused log-likelihood, shared by the chunked and Triton backends.

It owns what both backends share: only rows with a target do vocabulary work in forward, only rows
with a target and a non-zero upstream gradient in backward; it saves hidden, weight, bias, labels and
the per-token log-sum-exp ([N]) and nothing of size N x V. A backend implements
:class:`tuna_kernels.backend.LogprobBackend` (``forward`` and ``backward``, shapes there).

Frozen lm_head (LoRA, QLoRA: only ``hidden`` needs a gradient): the gradient of token n is linear in its
upstream gradient g_n,

    dL/dh_n = g_n * logit_scale * (c_ny * W[y_n] - E_n),   E_n = sum_v p_nv * c_nv * W_v,

with c = dz/dz_raw = 1 - (z / softcap)^2 under softcap (1 without). The forward accumulates E_n in its
online log-sum-exp loop (``with_expected``), so the backward is O(N * D) and recomputes no logit:
two passes over N * V * D in all (against three: forward, recompute, grad_hidden).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .backend import LogprobBackend
from .rows import active_rows, scatter_rows


def frozen_head_grad_hidden(weight, labels, target_logit, expected, grad_token, logit_scale, softcap):
    """grad_hidden [n, D] fp32 of target rows from the forward's expected embedding ``expected`` [n, D]."""
    target_embedding = weight[labels].to(expected.dtype)  # [n, D]
    if softcap is not None:
        ratio = target_logit / softcap
        target_embedding = target_embedding * (1.0 - ratio * ratio)[:, None]
    return (target_embedding - expected) * (grad_token * logit_scale)[:, None]


class FusedTokenLogprobs(torch.autograd.Function):
    """[N] token log-probs = target_logit - lse, from hidden [N, D], weight [V, D], bias [V] | None."""

    @staticmethod
    def forward(ctx, backend: LogprobBackend, hidden, weight, bias, labels, logit_scale, softcap, ignore_index):
        num_tokens = hidden.shape[0]
        rows = active_rows(labels != ignore_index)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[1:4]
        frozen_head = need_hidden and not need_weight and not (need_bias and bias is not None)
        lse, target_logit, expected = backend.forward(hidden[rows], weight, bias, labels[rows], logit_scale, softcap,
                                                      frozen_head)
        lse_all = scatter_rows(lse, rows, num_tokens)
        if frozen_head:
            ctx.save_for_backward(weight, labels, scatter_rows(target_logit, rows, num_tokens),
                                  scatter_rows(expected, rows, num_tokens))
        else:
            ctx.save_for_backward(hidden, weight, bias, labels, lse_all)
        ctx.frozen_head = frozen_head
        ctx.hidden_dtype = hidden.dtype
        ctx.options = (backend, logit_scale, softcap, ignore_index)
        return scatter_rows(target_logit - lse, rows, num_tokens)

    @staticmethod
    @once_differentiable  # the backward's own matmuls are not differentiated: no second derivative
    def backward(ctx, grad_token_lp):
        # the backend's matmuls run in the dtypes they are given, whatever autocast the caller has on
        with torch.autocast(grad_token_lp.device.type, enabled=False):
            if ctx.frozen_head:
                return FusedTokenLogprobs._frozen_head_backward(ctx, grad_token_lp)
            return FusedTokenLogprobs._backward(ctx, grad_token_lp)

    @staticmethod
    def _frozen_head_backward(ctx, grad_token_lp):
        weight, labels, target_logit, expected = ctx.saved_tensors
        _, logit_scale, softcap, ignore_index = ctx.options
        rows = active_rows(labels != ignore_index)
        grad_rows = frozen_head_grad_hidden(weight, labels[rows], target_logit[rows], expected[rows],
                                            grad_token_lp[rows].to(expected.dtype), logit_scale, softcap)
        grad_hidden = scatter_rows(grad_rows, rows, labels.shape[0]).to(ctx.hidden_dtype)
        return None, grad_hidden, None, None, None, None, None, None

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


class FusedLinearNll(torch.autograd.Function):
    """[] ``sum_t -logp_t`` over the target tokens, from hidden [N, D], weight [V, D], bias [V] | None,
    with the gradients formed in the forward.

    A scalar loss gives every token the same upstream gradient, known at the forward up to the one number the
    backward receives, so the backend computes the gradients of the sum while it has each logit tile (three
    products in all, no recompute, like torch's chunked ``F.linear_cross_entropy``) and the backward only
    scales them. The gradients ([N, D], [V, D], [V]) are held from the forward to the backward.
    """

    @staticmethod
    def forward(ctx, backend, hidden, weight, bias, labels, logit_scale, softcap, ignore_index):
        rows = active_rows(labels != ignore_index)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[1:4]  # called with grad mode on only
        total, grad_hidden, grad_weight, grad_bias = backend.nll_with_grads(
            hidden[rows], weight, bias, labels[rows], logit_scale, softcap,
            need_hidden, need_weight, need_bias and bias is not None,
        )
        if grad_hidden is not None:
            grad_hidden = scatter_rows(grad_hidden, rows, hidden.shape[0])
        # saved, not kept as attributes: autograd frees them after the backward (unless the graph is retained);
        # hidden and weight are saved only for autograd's version check (an in-place change of either between
        # forward and backward is an error, not stale gradients)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, hidden, weight)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        # grad_loss: [] in the compute dtype, as the loss. Out of place: a graph kept with retain_graph=True must
        # give the same gradients on a second backward
        grad_hidden, grad_weight, grad_bias = (None if grad is None else (grad * grad_loss).to(dtype)
                                               for grad, dtype in zip(ctx.saved_tensors[:3], ctx.dtypes))
        return None, grad_hidden, grad_weight, grad_bias, None, None, None, None
