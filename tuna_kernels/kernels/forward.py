"""Forward kernel: per-token partial log-sum-exp over one vocabulary split, and the target logit."""

import triton
import triton.language as tl

from .common import logit_tile


@triton.jit
def lse_forward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, partial_lse_ptr, target_logit_ptr,
    num_tokens, vocab_size, hidden_dim, vocab_per_split,
    stride_hn, stride_hd, stride_wv, stride_wd,
    logit_scale, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (token tiles, vocabulary splits).

    hidden: [N, D], weight: [V, D], bias: [V], labels: [N] (every row has a target).
    Writes partial_lse[split, n] = logsumexp over the split's columns (an online log-sum-exp across
    BLOCK_V tiles), and target_logit[n] from the one split that holds labels[n]. The splits are merged by
    a logsumexp over [num_splits, N] on the host side: no atomics, deterministic.
    """
    pid_n = tl.program_id(0)
    pid_split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < num_tokens
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1)
    vocab_start = pid_split * vocab_per_split
    vocab_end = tl.minimum(vocab_start + vocab_per_split, vocab_size)

    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(vocab_start, vocab_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        z = logit_tile(
            hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, num_tokens, vocab_end, hidden_dim,
            stride_hn, stride_hd, stride_wv, stride_wd, logit_scale, softcap,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION,
        )
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        running_max = new_max
        target += tl.sum(tl.where(offs_v[None, :] == labels[:, None], z, 0.0), axis=1)

    tl.store(partial_lse_ptr + pid_split.to(tl.int64) * num_tokens + offs_n, running_max + tl.log(running_sum), mask=mask_n)
    holds_target = mask_n & (labels >= vocab_start) & (labels < vocab_end)
    tl.store(target_logit_ptr + offs_n, target, mask=holds_target)
