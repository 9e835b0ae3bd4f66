"""Launchers: allocate outputs, pick grids and configurations, call the kernels.

``TritonBackend`` is the Triton backend of :class:`tuna_kernels.autograd.FusedTokenLogprobs`. Each launch
is a closure of its configuration, so that autotuning can time the same launch in every candidate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import triton

from ..filtering import filter_threshold
from .autotune import TUNER, token_bucket
from .backward_atomic import logprob_backward_atomic_kernel
from .backward_ordered import logprob_backward_ordered_kernel
from .configs import KernelConfig, candidate_configs, config_overridden, dtype_name, launch_config
from .forward import lse_forward_kernel

# Vocabulary tiles per group in the atomic backward's grouped program order (common.grouped_tile).
GROUP_V = 8
# Forward programs wanted per streaming multiprocessor: enough to hide latency when N is small.
_PROGRAMS_PER_SM = 4
# The backward adds grad_weight up in fp32. For a 16-bit weight it does so one slice of the vocabulary at a
# time, in an fp32 buffer of at most this many bytes, copied into the gradient in the weight's dtype: the loss
# then holds O(V * D) in the parameter's dtype plus this buffer, not an fp32 [V, D] and a copy of it (3.5 GB
# at V = 256000, D = 2304). Each slice's grid still has thousands of programs at that size.
WEIGHT_SLICE_BYTES = 256 * 2 ** 20
_SLICE_ROW_MULTIPLE = 256  # a whole number of vocabulary tiles of every configuration
# Kernels that split the vocabulary across programs (the forward; grad_hidden in deterministic mode) sum the
# splits' fp32 [num_splits, N, D] partial rows afterwards (torch, a fixed order): at most this many bytes of them.
SPLIT_ROWS_BYTES = 256 * 2 ** 20


def _capability(device: torch.device):
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return torch.cuda.get_device_capability(device)
    return None


def _num_sms(device: torch.device) -> int:
    if _capability(device) is None:
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot``: fp16/bf16 run on tensor cores; fp32 follows torch's own fp32
    matmul setting (``torch.backends.cuda.matmul.allow_tf32`` or ``torch.set_float32_matmul_precision``
    "high"/"medium" -> TF32; the default "highest" -> IEEE), as ``nn.Linear`` does. The interpreter
    always runs IEEE (it has no TF32)."""
    if dtype != torch.float32:
        return "tf32"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "ieee"
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() in ("high", "medium")
    return "tf32" if tf32 else "ieee"


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


def _unit_stride(vector: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The kernels read labels [n] and bias [V] with stride 1: a strided view (a column of a [N, 2]
    tensor) is copied, which costs O(n) or O(V) against the O(n * V * D) of the kernels."""
    return None if vector is None else vector.contiguous()


def vocab_slices(vocab_size: int, hidden_dim: int, weight_dtype: torch.dtype) -> List[Tuple[int, int]]:
    """[start, end) row ranges of the vocabulary whose fp32 grad_weight is accumulated at once: the whole
    vocabulary for an fp32 weight (the buffer is the gradient), else slices of WEIGHT_SLICE_BYTES."""
    if weight_dtype == torch.float32:
        return [(0, vocab_size)]
    rows = WEIGHT_SLICE_BYTES // (4 * hidden_dim) // _SLICE_ROW_MULTIPLE * _SLICE_ROW_MULTIPLE
    rows = max(rows, _SLICE_ROW_MULTIPLE)
    return [(start, min(start + rows, vocab_size)) for start in range(0, vocab_size, rows)]


def vocab_splits(num_tokens: int, vocab_size: int, row_bytes: int, config: KernelConfig,
                 device: torch.device) -> Tuple[int, int]:
    """(num_splits, vocab_per_split) of a kernel whose grid is (token tiles, vocabulary splits): enough
    programs for _PROGRAMS_PER_SM per SM when N is small, each split a whole number of BLOCK_V tiles, and
    the splits' partial rows (``row_bytes`` per split and token) within SPLIT_ROWS_BYTES."""
    wanted = max(2, _PROGRAMS_PER_SM * _num_sms(device))
    token_tiles = triton.cdiv(num_tokens, config.block_n)
    vocab_tiles = triton.cdiv(vocab_size, config.block_v)
    num_splits = max(1, min(vocab_tiles, triton.cdiv(wanted, token_tiles)))
    if row_bytes:
        num_splits = max(1, min(num_splits, SPLIT_ROWS_BYTES // (row_bytes * num_tokens)))
    vocab_per_split = triton.cdiv(vocab_tiles, num_splits) * config.block_v
    return triton.cdiv(vocab_size, vocab_per_split), vocab_per_split


def _zero(*outputs) -> None:
    for output in outputs:
        if output is not None:
            output.zero_()


@dataclass(frozen=True)
class TritonBackend:
    """Fused Triton kernels; ``deterministic`` avoids float atomics in backward (token tiles take turns);
    ``autotune`` times the candidate configurations once per shape bucket (see :mod:`.autotune`)."""

    deterministic: bool = False
    grad_filter_eps: Optional[float] = None
    autotune: bool = False

    def _config(self, kernel: str, hidden, weight, flags: tuple, trial: Callable[[KernelConfig], None]) -> KernelConfig:
        """The launch configuration: the architecture's default, or the tuned choice among candidates."""
        capability = _capability(hidden.device)
        if not self.autotune or config_overridden():
            return launch_config(kernel, capability, dtype_name(hidden.dtype))
        arch = None if capability is None else capability[0] * 10 + capability[1]
        key = (kernel, arch, str(hidden.dtype), token_bucket(hidden.shape[0]), weight.shape[0], hidden.shape[1]) + flags
        return TUNER.choose(key, candidate_configs(kernel, arch, dtype_name(hidden.dtype)), trial)

    def forward(self, hidden, weight, bias, labels, logit_scale, softcap, with_expected=False):
        """lse [n], target_logit [n] (fp32) for hidden [n, D] whose rows all have a target, and with
        ``with_expected`` the expected output embedding [n, D] fp32 (frozen lm_head, see autograd.py)."""
        num_tokens, hidden_dim = hidden.shape
        vocab_size = weight.shape[0]
        labels, bias = _unit_stride(labels), _unit_stride(bias)
        lse = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
        target_logit = torch.zeros_like(lse)
        expected = torch.zeros(num_tokens, hidden_dim, dtype=torch.float32, device=hidden.device) if with_expected else None
        if num_tokens == 0:
            return lse, target_logit, expected
        bias_arg = hidden if bias is None else bias
        common = _common_args(hidden, weight, bias, logit_scale, softcap)

        def run(config: KernelConfig) -> None:
            # Overwrites lse, every target_logit (each label lies in exactly one split) and expected:
            # trials leave no trace.
            token_tiles = triton.cdiv(num_tokens, config.block_n)
            num_splits, vocab_per_split = vocab_splits(num_tokens, vocab_size, 4 * hidden_dim if with_expected else 4,
                                                       config, hidden.device)
            partial_lse = torch.empty(num_splits, num_tokens, dtype=torch.float32, device=hidden.device)
            partial_expected = (torch.zeros(num_splits, num_tokens, hidden_dim, dtype=torch.float32,
                                            device=hidden.device) if with_expected else lse)
            lse_forward_kernel[(token_tiles, num_splits)](
                hidden, weight, bias_arg, labels, partial_lse, target_logit, partial_expected,
                num_tokens, vocab_size, hidden_dim, vocab_per_split, **common, WITH_EXPECTED=with_expected,
                **_tiles(config),
            )
            torch.logsumexp(partial_lse, dim=0, out=lse)
            if with_expected:
                split_weights = (partial_lse - lse).exp_()  # [num_splits, n]: each split's share of the mass
                expected.copy_(torch.einsum("sn,snd->nd", split_weights, partial_expected))

        flags = (bias is not None, softcap is not None, with_expected)
        run(self._config("lse_forward", hidden, weight, flags, run))
        return lse, target_logit, expected

    def backward(self, hidden, weight, bias, labels, lse, grad_token, logit_scale, softcap,
                 need_hidden, need_weight, need_bias):
        """fp32 grad_hidden [n, D], grad_weight [V, D] in the weight's dtype, fp32 grad_bias [V] (None where
        not needed). grad_weight is summed in fp32, a vocabulary slice at a time (:func:`vocab_slices`)."""
        num_tokens, hidden_dim = hidden.shape
        vocab_size = weight.shape[0]
        device = hidden.device
        labels, bias = _unit_stride(labels), _unit_stride(bias)
        slices = vocab_slices(vocab_size, hidden_dim, weight.dtype)
        # Every kernel accumulates into its outputs, so each run (a tuning trial or the real one) zeroes them.
        grad_hidden = torch.empty(num_tokens, hidden_dim, dtype=torch.float32, device=device) if need_hidden else None
        grad_weight = torch.empty(vocab_size, hidden_dim, dtype=weight.dtype, device=device) if need_weight else None
        grad_bias = torch.empty(vocab_size, dtype=torch.float32, device=device) if need_bias else None
        if num_tokens == 0 or not (need_hidden or need_weight or need_bias):
            _zero(grad_hidden, grad_weight, grad_bias)
            return grad_hidden, grad_weight, grad_bias
        # the fp32 sums of one slice's grad_weight (the gradient itself when the weight is fp32)
        slice_rows = max(end - start for start, end in slices)
        weight_sums = None if grad_weight is None else grad_weight if weight.dtype == torch.float32 else \
            torch.empty(slice_rows, hidden_dim, dtype=torch.float32, device=device)
        lse = lse.contiguous()
        grad_token = grad_token.float().contiguous()
        filter_eps = filter_threshold(self.grad_filter_eps, hidden.dtype)
        use_filter = self.grad_filter_eps is not None
        common = _common_args(hidden, weight, bias, logit_scale, softcap)
        flags = (bias is not None, softcap is not None, need_hidden, need_weight, need_bias, use_filter)
        unused = lse  # a valid pointer for outputs the kernel does not write

        def slice_args(start: int, end: int):
            """Inputs restricted to vocabulary rows [start, end): a weight / bias view and the labels shifted
            (a label outside the slice matches no row of it; lse is the whole vocabulary's)."""
            sliced_bias = hidden if bias is None else bias[start:end]
            shifted = labels if start == 0 else labels - start
            return (hidden, weight[start:end], sliced_bias, shifted, lse, grad_token)

        def weight_outputs(start: int, end: int):
            """(fp32 grad_weight sums, fp32 grad_bias) of rows [start, end), zeroed, or ``unused``."""
            sums = unused
            if weight_sums is not None:
                sums = weight_sums[:end - start]
                sums.zero_()
            return sums, unused if grad_bias is None else grad_bias[start:end]

        def store_weight(start: int, end: int) -> None:
            if grad_weight is not None and weight_sums is not grad_weight:
                grad_weight[start:end].copy_(weight_sums[:end - start])

        if not self.deterministic:
            def run_atomic(config: KernelConfig) -> None:
                _zero(grad_hidden, grad_bias)
                for start, end in slices:
                    sums, bias_sums = weight_outputs(start, end)
                    grid = (triton.cdiv(num_tokens, config.block_n) * triton.cdiv(end - start, config.block_v),)
                    logprob_backward_atomic_kernel[grid](
                        *slice_args(start, end), unused if grad_hidden is None else grad_hidden, sums, bias_sums,
                        num_tokens=num_tokens, vocab_size=end - start, hidden_dim=hidden_dim,
                        filter_eps=filter_eps, FILTER=use_filter, **common,
                        NEED_GRAD_HIDDEN=need_hidden, NEED_GRAD_WEIGHT=need_weight, NEED_GRAD_BIAS=need_bias,
                        GROUP_V=GROUP_V,
                        **_tiles(config),
                    )
                    store_weight(start, end)

            run_atomic(self._config("backward_atomic", hidden, weight, flags, run_atomic))
            return grad_hidden, grad_weight, grad_bias

        def run_ordered(config: KernelConfig) -> None:
            # splits of the vocabulary fill the GPU when N is small; their fp32 grad_hidden rows are summed in
            # order afterwards. Every slice launch adds into the same partial rows (launches are ordered).
            row_bytes = 4 * hidden_dim if need_hidden else 0
            plans = [(start, end) + vocab_splits(num_tokens, end - start, row_bytes, config, device)
                     for start, end in slices]
            num_splits = max(splits for _, _, splits, _ in plans)
            partial = unused
            if need_hidden:
                partial = grad_hidden if num_splits == 1 else \
                    torch.empty(num_splits, num_tokens, hidden_dim, dtype=torch.float32, device=device)
                partial.zero_()
            _zero(grad_bias)
            for start, end, splits, vocab_per_split in plans:
                sums, bias_sums = weight_outputs(start, end)
                tickets = torch.zeros(1 + triton.cdiv(end - start, config.block_v), dtype=torch.int32, device=device)
                logprob_backward_ordered_kernel[(triton.cdiv(num_tokens, config.block_n) * splits,)](
                    *slice_args(start, end), partial, sums, bias_sums, tickets,
                    num_tokens=num_tokens, vocab_size=end - start, hidden_dim=hidden_dim,
                    vocab_per_split=vocab_per_split, filter_eps=filter_eps, FILTER=use_filter, **common,
                    NEED_GRAD_HIDDEN=need_hidden, NEED_GRAD_WEIGHT=need_weight, NEED_GRAD_BIAS=need_bias,
                    **_tiles(config),
                )
                store_weight(start, end)
            if need_hidden and num_splits > 1:
                torch.sum(partial, dim=0, out=grad_hidden)

        run_ordered(self._config("backward_ordered", hidden, weight, flags, run_ordered))
        return grad_hidden, grad_weight, grad_bias
