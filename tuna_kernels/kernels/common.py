"""Tile helpers shared by the kernels: one logit tile, its gradient, and the token rows a backward tile reads.

A logit tile is [BLOCK_N tokens, BLOCK_V vocabulary entries], accumulated in fp32 by walking the hidden
dimension in BLOCK_D slices, so no full [BLOCK_N, D] row is ever held in registers.
"""

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # 1 - 2 / (exp(2x) + 1): exact limits at +-inf, no libdevice needed (so the interpreter runs it)
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def grouped_tile(pid, num_token_tiles, num_vocab_tiles, GROUP_V: tl.constexpr):
    """(token tile, vocabulary tile) of program ``pid`` in grouped order: consecutive programs walk GROUP_V
    vocabulary tiles of one token tile, then the next token tile. Programs running at the same time then
    cover a GROUP_V x (programs / GROUP_V) block of tiles: each weight tile and each hidden tile is re-used
    from L2 by several of them, and their grad_weight / grad_hidden atomics spread over GROUP_V vocabulary
    tiles and several token tiles instead of piling onto one row of tiles."""
    programs_per_group = GROUP_V * num_token_tiles
    group = pid // programs_per_group
    first_v = group * GROUP_V
    group_width = tl.minimum(num_vocab_tiles - first_v, GROUP_V)
    within = pid % programs_per_group
    return within // group_width, first_v + within % group_width


@triton.jit
def logit_tile(
    hidden_ptr, weight_ptr, bias_ptr,
    offs_n, offs_v, num_tokens, vocab_size, hidden_dim,
    stride_hn, stride_hd, stride_wv, stride_wd,
    logit_scale, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """z = softcap(logit_scale * H[offs_n] @ W[offs_v].T + b[offs_v]): [BLOCK_N, BLOCK_V] fp32.

    Columns past the vocabulary are -inf, so they carry no softmax mass.
    """
    mask_n = offs_n < num_tokens
    mask_v = offs_v < vocab_size
    offs_d = tl.arange(0, BLOCK_D)
    hidden_rows = hidden_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
    weight_rows = weight_ptr + offs_v.to(tl.int64)[:, None] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, hidden_dim, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < hidden_dim
        # column offsets in 64 bits: a transposed weight view (stride_wd = V) passes 2^31 once V * D does
        h = tl.load(hidden_rows + cols.to(tl.int64)[None, :] * stride_hd, mask=mask_n[:, None] & mask_d[None, :],
                    other=0.0)
        w = tl.load(weight_rows + cols.to(tl.int64)[None, :] * stride_wd, mask=mask_v[:, None] & mask_d[None, :],
                    other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    z = acc * logit_scale
    if HAS_BIAS:
        z += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    return tl.where(mask_v[None, :], z, float("-inf"))


@triton.jit
def grad_logit_tile(z, lse, grad_token, labels, mask_n, offs_v, vocab_size, softcap, HAS_SOFTCAP: tl.constexpr):
    """dL/dz_raw = g * (onehot(y) - exp(z - lse)) (* (1 - tanh^2) with softcap): [BLOCK_N, BLOCK_V] fp32.

    ``z`` is the (softcapped) tile from :func:`logit_tile`; ``lse``, ``grad_token``, ``labels``, ``mask_n``:
    [BLOCK_N]. Rows past the tokens (``mask_n`` False) are exactly 0: their z is the bias alone and
    exp(bias - 0) overflows above 88.7, so they are selected away, never multiplied by a zero gradient
    (0 * inf = NaN). The derivative of the logit scale is left to the caller (not part of the bias gradient).
    """
    probs = tl.exp(z - lse[:, None])
    onehot = (offs_v[None, :] == labels[:, None]).to(tl.float32)
    dz = grad_token[:, None] * (onehot - probs)
    if HAS_SOFTCAP:
        ratio = z / softcap
        dz = dz * tl.where((offs_v < vocab_size)[None, :], 1.0 - ratio * ratio, 0.0)
    return tl.where(mask_n[:, None], dz, 0.0)


@triton.jit
def _max_keep_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def tile_needed(dz, grad_token, filter_eps, FILTER: tl.constexpr):
    """Whether a gradient tile must enter the products: always without filtering; with filtering (Cut
    Cross-Entropy's definition), when the largest |onehot - p| of the tile (|dz| / |g| per row, which
    also carries the softcap derivative) is above ``filter_eps``, or the tile holds a NaN (a NaN must reach
    the gradients, not be filtered to 0; ``tl.max`` alone would drop it). The threshold does not depend
    on the upstream gradient's scale."""
    if FILTER:
        g = tl.abs(grad_token)[:, None]
        ratio = tl.where(g > 0, tl.abs(dz) / g, tl.where(g == g, 0.0, g))  # 0 for rows without gradient
        largest = tl.reduce(tl.abs(dz) + ratio, None, _max_keep_nan)  # NaN of dz or g survives
        largest_ratio = tl.max(ratio)
        needed = (largest_ratio > filter_eps) | (largest != largest)
    else:
        needed = True
    return needed


@triton.jit
def dot_operand(dz, grad_token, dtype):
    """dz / s in the input dtype for the tensor-core products, and s (fp32 scalar).

    s is the power of two at or below the tile's largest |g|: fp16 has no exponent range for
    g * (onehot - p) when g is small (a mean over many tokens, no loss scaling), so dz is brought to
    O(1) before the cast and the product is multiplied by s afterwards (exact: a power of two).
    """
    largest = tl.max(tl.abs(grad_token))
    scale = tl.where(largest > 0, tl.exp2(tl.floor(tl.log2(largest))), 1.0)
    return (dz * (1.0 / scale)).to(dtype), scale


@triton.jit
def token_rows(labels_ptr, lse_ptr, grad_token_ptr, offs_n, num_tokens):
    """What a backward tile needs of its tokens: ``(mask_n, labels, lse, grad_token)``, [BLOCK_N] each; rows past
    ``num_tokens`` read label -1 (no vocabulary entry), lse 0 and gradient 0."""
    mask_n = offs_n < num_tokens
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    grad_token = tl.load(grad_token_ptr + offs_n, mask=mask_n, other=0.0)
    return mask_n, labels, lse, grad_token
