"""Backward kernel, deterministic mode: one program per (token tile, vocabulary split), one recompute of each
logit tile, no float atomics; the token tiles add to each grad_weight tile in a fixed order (a ticket)."""

import triton
import triton.language as tl

from .common import dot_operand, grad_logit_tile, logit_tile, tile_needed, token_rows


@triton.jit
def add_product(sum_rows, mask_rows, lhs, operand_rows, stride_operand_d, mask_operand, hidden_dim, out_scale,
                SUM_CACHE: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """sums[r, :] += out_scale * lhs @ operand[:, :] over the hidden dimension, BLOCK_D columns at a time, with
    plain loads and stores: the rows are this program's alone, or its turn's (the ticket).

    ``sum_rows``: [R, 1] pointers to fp32 rows of ``hidden_dim`` contiguous sums, ``mask_rows`` [R];
    ``lhs``: [R, K] in the input dtype; ``operand_rows``: [K, 1] pointers to the operand's rows, whose columns
    are ``stride_operand_d`` apart, ``mask_operand`` [K]; ``SUM_CACHE``: the load's cache modifier for the sums.
    """
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, hidden_dim, BLOCK_D):
        cols = d0 + offs_d
        cols64 = cols.to(tl.int64)
        mask_d = cols < hidden_dim
        operand = tl.load(operand_rows + cols64[None, :] * stride_operand_d,
                          mask=mask_operand[:, None] & mask_d[None, :], other=0.0)
        mask_sums = mask_rows[:, None] & mask_d[None, :]
        sums = tl.load(sum_rows + cols64[None, :], mask=mask_sums, other=0.0, cache_modifier=SUM_CACHE)
        sums += tl.dot(lhs, operand, input_precision=DOT_PRECISION) * out_scale
        tl.store(sum_rows + cols64[None, :], sums, mask=mask_sums)


@triton.jit
def logprob_backward_ordered_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, lse_ptr, grad_token_ptr,
    grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr, tickets_ptr,
    num_tokens, vocab_size, hidden_dim, vocab_per_split,
    stride_hn, stride_hd, stride_wv, stride_wd,
    logit_scale, softcap, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    NEED_GRAD_HIDDEN: tl.constexpr, NEED_GRAD_WEIGHT: tl.constexpr, NEED_GRAD_BIAS: tl.constexpr,
    FILTER: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (token tiles * vocabulary splits,); ``vocab_per_split`` is a multiple of BLOCK_V.

    Each program walks its split's vocabulary tiles in order, recomputes the tile's logits once and forms
    dz = g * (onehot - p), then:

    - grad_hidden[split, n] (fp32 [num_splits, N, D]) += scale * dz @ W[v]: rows it alone owns, read, added
      to and written back; a torch sum over the splits (a fixed order) follows;
    - grad_weight[v] (fp32 [V, D]) += scale * dz.T @ H[n] and grad_bias[v] (fp32 [V]) += sum_n dz: shared by
      the token tiles, so they take turns in token-tile order. ``tickets`` (int32 [1 + vocabulary tiles],
      zeroed): ``tickets[1 + j]`` holds the number of token tiles done with vocabulary tile j; a program polls
      it (volatile loads) until it equals its own token tile, acquires once, adds with plain loads and
      stores, and hands over (barrier, then a release exchange of its token tile + 1).

    So every sum is formed in a fixed order (bit-reproducible for a given configuration) from one recompute of
    each tile, as the atomic kernel does. The turns cannot deadlock: ``tickets[0]`` hands out the programs'
    (token tile, split) in the order they start, token tiles fastest, so the program a turn waits for (the
    previous token tile of the same split) has started before it, and is resident or finished, whatever
    order the GPU dispatches blocks in. The fences are one acquire and one release per vocabulary tile.
    """
    # the order programs start in, not their launch index: see the docstring
    program = tl.atomic_add(tickets_ptr, 1, sem="relaxed")
    num_token_tiles = tl.cdiv(num_tokens, BLOCK_N)
    pid_n = program % num_token_tiles
    pid_split = program // num_token_tiles
    vocab_start = pid_split * vocab_per_split
    vocab_end = tl.minimum(vocab_start + vocab_per_split, vocab_size)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n, labels, lse, grad_token = token_rows(labels_ptr, lse_ptr, grad_token_ptr, offs_n, num_tokens)
    hidden_rows = grad_hidden_ptr + (pid_split.to(tl.int64) * num_tokens + offs_n)[:, None] * hidden_dim
    for v0 in range(vocab_start, vocab_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < vocab_size
        z = logit_tile(
            hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, num_tokens, vocab_size, hidden_dim,
            stride_hn, stride_hd, stride_wv, stride_wd, logit_scale, softcap,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION,
        )
        dz = grad_logit_tile(z, lse, grad_token, labels, mask_n, offs_v, vocab_size, softcap, HAS_SOFTCAP)
        needed = tile_needed(dz, grad_token, filter_eps, FILTER)
        dz_dot, dz_scale = dot_operand(dz, grad_token, hidden_ptr.dtype.element_ty)
        out_scale = dz_scale * logit_scale
        if NEED_GRAD_HIDDEN:
            if needed:
                add_product(hidden_rows, mask_n, dz_dot, weight_ptr + offs_v.to(tl.int64)[:, None] * stride_wv,
                            stride_wd, mask_v, hidden_dim, out_scale, "", BLOCK_D, DOT_PRECISION)
        if NEED_GRAD_WEIGHT or NEED_GRAD_BIAS:
            ticket = tickets_ptr + 1 + v0 // BLOCK_V
            while tl.load(ticket, volatile=True) != pid_n:  # polls without fences or L1 invalidation
                pass
            tl.atomic_add(ticket, 0, sem="acquire")  # once: the previous turn's stores are visible from here
            if NEED_GRAD_BIAS:
                bias_sums = tl.load(grad_bias_ptr + offs_v, mask=mask_v, other=0.0, cache_modifier=".cg")
                tl.store(grad_bias_ptr + offs_v, bias_sums + tl.sum(dz, axis=0), mask=mask_v)
            if NEED_GRAD_WEIGHT:
                if needed:
                    # ".cg": read the sums at L2, where the previous turn's stores are (the acquire invalidated L1 too)
                    add_product(grad_weight_ptr + offs_v.to(tl.int64)[:, None] * hidden_dim, mask_v, tl.trans(dz_dot),
                                hidden_ptr + offs_n.to(tl.int64)[:, None] * stride_hn, stride_hd, mask_n, hidden_dim,
                                out_scale, ".cg", BLOCK_D, DOT_PRECISION)
            tl.debug_barrier()  # every thread's stores are issued before the hand-over
            tl.atomic_xchg(ticket, pid_n + 1, sem="release")
