"""Backward kernel, deterministic mode, grad_hidden: each program owns a token tile of one vocabulary split,
no atomics."""

import triton
import triton.language as tl

from .common import dot_operand, grad_logit_tile, logit_tile, tile_needed


@triton.jit
def grad_hidden_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, lse_ptr, grad_token_ptr, grad_hidden_ptr,
    num_tokens, vocab_size, hidden_dim, vocab_per_split,
    stride_hn, stride_hd, stride_wv, stride_wd,
    logit_scale, softcap, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (token tiles, vocabulary splits). Walks the split's vocabulary tiles in order into
    grad_hidden[split, n] (fp32 [num_splits, N, D]), read, added to and written back by its one owner; a
    torch sum over the splits (a fixed order) follows. So the result is bit-reproducible, and a small N still has
    token tiles x splits programs to fill the GPU (``vocab_per_split`` is a multiple of BLOCK_V).
    """
    pid_n = tl.program_id(0)
    pid_split = tl.program_id(1)
    vocab_start = pid_split * vocab_per_split
    vocab_end = tl.minimum(vocab_start + vocab_per_split, vocab_size)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < num_tokens
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    grad_token = tl.load(grad_token_ptr + offs_n, mask=mask_n, other=0.0)
    offs_d = tl.arange(0, BLOCK_D)
    out_rows = grad_hidden_ptr + (pid_split.to(tl.int64) * num_tokens + offs_n)[:, None] * hidden_dim
    for v0 in range(vocab_start, vocab_end, BLOCK_V):
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
