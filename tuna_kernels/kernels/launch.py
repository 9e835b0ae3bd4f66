"""Launchers: allocate outputs, pick grids and configurations, call the kernels.

``TritonBackend`` is the Triton backend of :class:`tuna_kernels.autograd.FusedTokenLogprobs`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from .backward_atomic import logprob_backward_atomic_kernel
from .backward_hidden import grad_hidden_kernel
from .backward_weight import grad_weight_kernel
from .configs import launch_config
from .forward import lse_forward_kernel

# Forward programs wanted per streaming multiprocessor: enough to hide latency when N is small.
_PROGRAMS_PER_SM = 4


def _capability(device: torch.device):
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return torch.cuda.get_device_capability(device)
    return None


def _num_sms(device: torch.device) -> int:
    if _capability(device) is None:
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own matmul setting (TF32 off by default); fp16/bf16 use tensor cores.
    if dtype == torch.float32 and not (torch.backends.cuda.matmul.allow_tf32 and os.environ.get("TRITON_INTERPRET") != "1"):
        return "ieee"
    return "tf32"


def _common_args(hidden, weight, bias, logit_scale, softcap):
    """Strides and flags shared by every kernel, in their argument order."""
    return dict(
        stride_hn=hidden.stride(0), stride_hd=hidden.stride(1),
        stride_wv=weight.stride(0), stride_wd=weight.stride(1),
        logit_scale=logit_scale, softcap=1.0 if softcap is None else softcap,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        DOT_PRECISION=_dot_precision(hidden.dtype),
    )


def _tiles(config):
    return dict(BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_D=config.block_d,
                num_warps=config.num_warps, num_stages=config.num_stages)


@dataclass(frozen=True)
class TritonBackend:
    """Fused Triton kernels; ``deterministic`` avoids float atomics in backward (one more recompute)."""

    deterministic: bool = False
    grad_filter_eps: Optional[float] = None

    def forward(self, hidden, weight, bias, labels, logit_scale, softcap):
        """lse [n], target_logit [n] (fp32) for hidden [n, D] whose rows all have a target."""
        num_tokens, hidden_dim = hidden.shape
        vocab_size = weight.shape[0]
        lse = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
        target_logit = torch.zeros_like(lse)
        if num_tokens == 0:
            return lse, target_logit
        config = launch_config("lse_forward", _capability(hidden.device))
        token_tiles = triton.cdiv(num_tokens, config.block_n)
        vocab_tiles = triton.cdiv(vocab_size, config.block_v)
        wanted = max(2, _PROGRAMS_PER_SM * _num_sms(hidden.device))
        num_splits = max(1, min(vocab_tiles, triton.cdiv(wanted, token_tiles)))
        vocab_per_split = triton.cdiv(vocab_tiles, num_splits) * config.block_v
        num_splits = triton.cdiv(vocab_size, vocab_per_split)
        partial_lse = torch.empty(num_splits, num_tokens, dtype=torch.float32, device=hidden.device)
        bias_arg = hidden if bias is None else bias
        lse_forward_kernel[(token_tiles, num_splits)](
            hidden, weight, bias_arg, labels, partial_lse, target_logit,
            num_tokens, vocab_size, hidden_dim, vocab_per_split,
            **_common_args(hidden, weight, bias, logit_scale, softcap), **_tiles(config),
        )
        torch.logsumexp(partial_lse, dim=0, out=lse)
        return lse, target_logit

    def backward(self, hidden, weight, bias, labels, lse, grad_token, logit_scale, softcap,
                 need_hidden, need_weight, need_bias):
        """fp32 grad_hidden [n, D], grad_weight [V, D], grad_bias [V] (None where not needed)."""
        num_tokens, hidden_dim = hidden.shape
        vocab_size = weight.shape[0]
        device = hidden.device
        grad_hidden = torch.zeros(num_tokens, hidden_dim, dtype=torch.float32, device=device) if need_hidden else None
        grad_weight = torch.zeros(vocab_size, hidden_dim, dtype=torch.float32, device=device) if need_weight else None
        grad_bias = torch.zeros(vocab_size, dtype=torch.float32, device=device) if need_bias else None
        if num_tokens == 0 or not (need_hidden or need_weight or need_bias):
            return grad_hidden, grad_weight, grad_bias
        lse = lse.contiguous()
        grad_token = grad_token.float().contiguous()
        filter_eps = 0.0 if self.grad_filter_eps is None else float(self.grad_filter_eps)
        args = (hidden, weight, hidden if bias is None else bias, labels, lse, grad_token)
        sizes = dict(num_tokens=num_tokens, vocab_size=vocab_size, hidden_dim=hidden_dim)
        common = _common_args(hidden, weight, bias, logit_scale, softcap)
        capability = _capability(device)
        unused = lse  # a valid pointer for outputs the kernel does not write
        if not self.deterministic:
            config = launch_config("backward_atomic", capability)
            grid = (triton.cdiv(num_tokens, config.block_n), triton.cdiv(vocab_size, config.block_v))
            logprob_backward_atomic_kernel[grid](
                *args, unused if grad_hidden is None else grad_hidden,
                unused if grad_weight is None else grad_weight, unused if grad_bias is None else grad_bias,
                **sizes, filter_eps=filter_eps, **common,
                NEED_GRAD_HIDDEN=need_hidden, NEED_GRAD_WEIGHT=need_weight, NEED_GRAD_BIAS=need_bias,
                **_tiles(config),
            )
            return grad_hidden, grad_weight, grad_bias
        if need_hidden:
            config = launch_config("grad_hidden", capability)
            grad_hidden_kernel[(triton.cdiv(num_tokens, config.block_n),)](
                *args, grad_hidden, **sizes, filter_eps=filter_eps, **common, **_tiles(config),
            )
        if need_weight or need_bias:
            config = launch_config("grad_weight", capability)
            grad_weight_kernel[(triton.cdiv(vocab_size, config.block_v),)](
                *args, unused if grad_weight is None else grad_weight, unused if grad_bias is None else grad_bias,
                **sizes, filter_eps=filter_eps, **common,
                NEED_GRAD_WEIGHT=need_weight, NEED_GRAD_BIAS=need_bias, **_tiles(config),
            )
        return grad_hidden, grad_weight, grad_bias
