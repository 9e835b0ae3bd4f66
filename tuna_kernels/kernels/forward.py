"""Forward kernel: per-token partial log-sum-exp over one vocabulary split, the target logit, and for a
frozen lm_head the split's expected output embedding."""

import triton
import triton.language as tl

from .common import logit_tile


@triton.jit
def lse_forward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, partial_lse_ptr, target_logit_ptr, partial_expected_ptr,
    num_tokens, vocab_size, hidden_dim, vocab_per_split,
    stride_hn, stride_hd, stride_wv, stride_wd,
    logit_scale, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_EXPECTED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (token tiles, vocabulary splits).

    hidden: [N, D], weight: [V, D], bias: [V], labels: [N] (every row has a target).
    Writes partial_lse[split, n] = logsumexp over the split's columns (an online log-sum-exp across
    BLOCK_V tiles), and target_logit[n] from the one split that holds labels[n]. The splits are merged by
    a logsumexp over [num_splits, N] on the host side: no atomics, deterministic.

    WITH_EXPECTED (frozen lm_head): also partial_expected[split, n, :] (fp32 [num_splits, N, D]) =
    sum_v softmax_split(z)_nv * c_nv * W_v with c = dz/dz_raw, accumulated online like the sum (rescaled by
    exp(m_old - m_new)) in the program's own rows, and normalised at the end; the host weighs the splits
    by exp(partial_lse - lse).
    """
    pid_n = tl.program_id(0)
    pid_split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < num_tokens
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1)
    vocab_start = pid_split * vocab_per_split
    vocab_end = tl.minimum(vocab_start + vocab_per_split, vocab_size)
    offs_d = tl.arange(0, BLOCK_D)
    expected_rows = partial_expected_ptr + (pid_split.to(tl.int64) * num_tokens + offs_n)[:, None] * hidden_dim

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
        rescale = tl.exp(running_max - new_max)
        probs = tl.exp(z - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(probs, axis=1)
        running_max = new_max
        target += tl.sum(tl.where(offs_v[None, :] == labels[:, None], z, 0.0), axis=1)
        if WITH_EXPECTED:
            mask_v = offs_v < vocab_end
            if HAS_SOFTCAP:
                ratio = z / softcap
                probs = probs * tl.where(mask_v[None, :], 1.0 - ratio * ratio, 0.0)
            probs_dot = probs.to(weight_ptr.dtype.element_ty)
            for d0 in range(0, hidden_dim, BLOCK_D):
                cols = (d0 + offs_d).to(tl.int64)
                mask_d = cols < hidden_dim
                w = tl.load(weight_ptr + offs_v.to(tl.int64)[:, None] * stride_wv + cols[None, :] * stride_wd,
                            mask=mask_v[:, None] & mask_d[None, :], other=0.0)
                mask_nd = mask_n[:, None] & mask_d[None, :]
                partial = tl.load(expected_rows + cols[None, :], mask=mask_nd, other=0.0)
                partial = partial * rescale[:, None] + tl.dot(probs_dot, w, input_precision=DOT_PRECISION)
                tl.store(expected_rows + cols[None, :], partial, mask=mask_nd)

    tl.store(partial_lse_ptr + pid_split.to(tl.int64) * num_tokens + offs_n, running_max + tl.log(running_sum),
             mask=mask_n)
    holds_target = mask_n & (labels >= vocab_start) & (labels < vocab_end)
    tl.store(target_logit_ptr + offs_n, target, mask=holds_target)
    if WITH_EXPECTED:
        inverse_sum = 1.0 / running_sum
        for d0 in range(0, hidden_dim, BLOCK_D):
            cols = (d0 + offs_d).to(tl.int64)
            mask_nd = mask_n[:, None] & (cols < hidden_dim)[None, :]
            partial = tl.load(expected_rows + cols[None, :], mask=mask_nd, other=0.0)
            tl.store(expected_rows + cols[None, :], partial * inverse_sum[:, None], mask=mask_nd)
