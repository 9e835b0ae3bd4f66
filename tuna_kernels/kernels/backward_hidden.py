"""Backward kernel, deterministic mode, grad_hidden: each program owns a token tile, no atomics."""

import triton
import triton.language as tl

from .common import dot_operand, grad_logit_tile, logit_tile, tile_needed


@triton.jit
def grad_hidden_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, lse_ptr, grad_token_ptr, grad_hidden_ptr,
    num_tokens, vocab_size, hidden_dim,
    stride_hn, stride_hd, stride_wv, stride_wd,
    logit_scale, softcap, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (token tiles,). Walks every vocabulary tile in order; grad_hidden[n] (fp32 [N, D]) is read,
    added to and written back by its one owner, so the sum order is fixed and the result bit-reproducible.
    """
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < num_tokens
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    grad_token = tl.load(grad_token_ptr + offs_n, mask=mask_n, other=0.0)
    offs_d = tl.arange(0, BLOCK_D)
    out_rows = grad_hidden_ptr + offs_n.to(tl.int64)[:, None] * hidden_dim
    for v0 in range(0, vocab_size, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < vocab_size
        z = logit_tile(
            hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, num_tokens, vocab_size, hidden_dim,
            stride_hn, stride_hd, stride_wv, stride_wd, logit_scale, softcap,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION,
        )
        dz = grad_logit_tile(z, lse, grad_token, labels, mask_n, offs_v, vocab_size, softcap, HAS_SOFTCAP)
        if tile_needed(dz, grad_token, filter_eps, FILTER):
            dz_dot, dz_scale = dot_operand(dz, grad_token, hidden_ptr.dtype.element_ty)
            out_scale = dz_scale * logit_scale
            for d0 in range(0, hidden_dim, BLOCK_D):
                cols = d0 + offs_d
                cols64 = cols.to(tl.int64)
                mask_nd = mask_n[:, None] & (cols < hidden_dim)[None, :]
                w = tl.load(weight_ptr + offs_v.to(tl.int64)[:, None] * stride_wv + cols64[None, :] * stride_wd,
                            mask=mask_v[:, None] & (cols < hidden_dim)[None, :], other=0.0)
                partial = tl.load(out_rows + cols64[None, :], mask=mask_nd, other=0.0)
                partial += tl.dot(dz_dot, w, input_precision=DOT_PRECISION) * out_scale
                tl.store(out_rows + cols64[None, :], partial, mask=mask_nd)
