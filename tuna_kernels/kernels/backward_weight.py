"""Backward kernel, deterministic mode, grad_weight and grad_bias: each program owns a vocabulary tile."""

import triton
import triton.language as tl

from .common import dot_operand, recompute_grad_tile, tile_needed


@triton.jit
def grad_weight_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, lse_ptr, grad_token_ptr, grad_weight_ptr, grad_bias_ptr,
    num_tokens, vocab_size, hidden_dim,
    stride_hn, stride_hd, stride_wv, stride_wd,
    logit_scale, softcap, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    NEED_GRAD_WEIGHT: tl.constexpr, NEED_GRAD_BIAS: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (vocabulary tiles,). Walks every token tile in order; grad_weight[v] (fp32 [V, D]) is
    read, added to and written back by its one owner; grad_bias[v] (fp32 [V]) is summed in registers.
    """
    pid_v = tl.program_id(0)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < vocab_size
    offs_d = tl.arange(0, BLOCK_D)
    out_rows = grad_weight_ptr + offs_v.to(tl.int64)[:, None] * hidden_dim
    bias_sum = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, num_tokens, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < num_tokens
        dz, grad_token = recompute_grad_tile(
            hidden_ptr, weight_ptr, bias_ptr, labels_ptr, lse_ptr, grad_token_ptr, offs_n, offs_v,
            num_tokens, vocab_size, hidden_dim, stride_hn, stride_hd, stride_wv, stride_wd, logit_scale, softcap,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION,
        )
        if NEED_GRAD_BIAS:
            bias_sum += tl.sum(dz, axis=0)
        if NEED_GRAD_WEIGHT:
            if tile_needed(dz, grad_token, filter_eps, FILTER):
                dz_dot, dz_scale = dot_operand(dz, grad_token, hidden_ptr.dtype.element_ty)
                dz_dot = tl.trans(dz_dot)
                out_scale = dz_scale * logit_scale
                for d0 in range(0, hidden_dim, BLOCK_D):
                    cols = d0 + offs_d
                    cols64 = cols.to(tl.int64)
                    mask_d = cols < hidden_dim
                    mask_vd = mask_v[:, None] & mask_d[None, :]
                    h = tl.load(hidden_ptr + offs_n.to(tl.int64)[:, None] * stride_hn + cols64[None, :] * stride_hd,
                                mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                    partial = tl.load(out_rows + cols64[None, :], mask=mask_vd, other=0.0)
                    partial += tl.dot(dz_dot, h, input_precision=DOT_PRECISION) * out_scale
                    tl.store(out_rows + cols64[None, :], partial, mask=mask_vd)
    if NEED_GRAD_BIAS:
        tl.store(grad_bias_ptr + offs_v, bias_sum, mask=mask_v)
