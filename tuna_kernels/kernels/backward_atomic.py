"""Backward kernel, fast mode: one program per (token tile, vocabulary tile), fp32 atomic adds."""

import triton
import triton.language as tl

from .common import dot_operand, grad_logit_tile, grouped_tile, logit_tile, tile_needed, token_rows


@triton.jit
def logprob_backward_atomic_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, lse_ptr, grad_token_ptr,
    grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr,
    num_tokens, vocab_size, hidden_dim,
    stride_hn, stride_hd, stride_wv, stride_wd,
    logit_scale, softcap, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    NEED_GRAD_HIDDEN: tl.constexpr, NEED_GRAD_WEIGHT: tl.constexpr, NEED_GRAD_BIAS: tl.constexpr,
    FILTER: tl.constexpr, GROUP_V: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (token tiles * vocabulary tiles,), in grouped order (:func:`common.grouped_tile`).

    Recomputes the tile's logits, forms dz = g * (onehot - p) and adds, with fp32 atomics,
    grad_hidden[n] += scale * dz @ W[v] (fp32 [N, D]), grad_weight[v] += scale * dz.T @ H[n]
    (fp32 [V, D]) and grad_bias[v] += sum_n dz. With FILTER, tiles whose largest |onehot - p| is not
    above filter_eps (and hold no NaN) skip both products; the bias sum is never filtered.
    The atomics are relaxed: the adds need no ordering against other memory (nothing reads the sums
    before the kernel ends), so each compiles to a plain reduction (RED), not a fenced ATOMG.
    """
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(num_tokens, BLOCK_N), tl.cdiv(vocab_size, BLOCK_V), GROUP_V)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < vocab_size
    mask_n, labels, lse, grad_token = token_rows(labels_ptr, lse_ptr, grad_token_ptr, offs_n, num_tokens)
    z = logit_tile(
        hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, num_tokens, vocab_size, hidden_dim,
        stride_hn, stride_hd, stride_wv, stride_wd, logit_scale, softcap,
        HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION,
    )
    dz = grad_logit_tile(z, lse, grad_token, labels, mask_n, offs_v, vocab_size, softcap, HAS_SOFTCAP)
    if NEED_GRAD_BIAS:
        tl.atomic_add(grad_bias_ptr + offs_v, tl.sum(dz, axis=0), mask=mask_v, sem="relaxed")
    if tile_needed(dz, grad_token, filter_eps, FILTER):
        dz_dot, dz_scale = dot_operand(dz, grad_token, hidden_ptr.dtype.element_ty)
        out_scale = dz_scale * logit_scale
        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(0, hidden_dim, BLOCK_D):
            cols = d0 + offs_d
            mask_d = cols < hidden_dim
            cols64 = cols.to(tl.int64)
            if NEED_GRAD_HIDDEN:
                w = tl.load(weight_ptr + offs_v.to(tl.int64)[:, None] * stride_wv + cols64[None, :] * stride_wd,
                            mask=mask_v[:, None] & mask_d[None, :], other=0.0)
                grad_h = tl.dot(dz_dot, w, input_precision=DOT_PRECISION) * out_scale
                tl.atomic_add(grad_hidden_ptr + offs_n.to(tl.int64)[:, None] * hidden_dim + cols64[None, :], grad_h,
                              mask=mask_n[:, None] & mask_d[None, :], sem="relaxed")
            if NEED_GRAD_WEIGHT:
                h = tl.load(hidden_ptr + offs_n.to(tl.int64)[:, None] * stride_hn + cols64[None, :] * stride_hd,
                            mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                grad_w = tl.dot(tl.trans(dz_dot), h, input_precision=DOT_PRECISION) * out_scale
                tl.atomic_add(grad_weight_ptr + offs_v.to(tl.int64)[:, None] * hidden_dim + cols64[None, :], grad_w,
                              mask=mask_v[:, None] & mask_d[None, :], sem="relaxed")
