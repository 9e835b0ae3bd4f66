"""Pure-PyTorch fused log-likelihood: token x vocabulary chunks, any device, no [N, V] tensor.

Forward walks each token chunk across the vocabulary in chunks, keeping an online log-sum-exp (running
max and sum) and the target logit in fp32; it saves only the per-token log-sum-exp ([N]). For a frozen
lm_head it also accumulates the expected output embedding E [N, D] (see autograd.py) and no backward
recompute follows. Backward recomputes every logit tile
and forms, with g the upstream gradient of each token's log-probability::

    dz        = g * (onehot(y) - softmax(z))          # [chunk_tokens, chunk_vocab]
    dz_raw    = dz * (1 - tanh^2)                       # only with softcap
    grad_h   += logit_scale * dz_raw @ W_chunk
    grad_W   += logit_scale * dz_raw.T @ H_chunk
    grad_b   += dz_raw.sum(0)

The largest temporary is a couple of [chunk_tokens, chunk_vocab] fp32 tiles (16 MiB each by default); the
gradients-in-forward sweep below holds a [rows, V] chunk of max(two tiles, D / 4 rows) instead.

For a scalar loss (``linear_cross_entropy``) the upstream gradient of every token is known at the forward, so
``nll_with_grads`` sweeps chunks of whole vocabulary rows once and forms the gradients from each tile: three
products instead of four (see :func:`_nll_rows_with_grads`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .filtering import drop_small_blocks
from .rows import accumulate_dtype

DEFAULT_CHUNK_TOKENS = 1024
DEFAULT_CHUNK_VOCAB = 4096
# the gradients-in-forward sweep's [rows, V] chunk holds this many [chunk_tokens, chunk_vocab] tiles ...
NLL_TILES = 2
# ... or, when that is fewer rows, D // NLL_ROWS_PER_D rows: a quarter of the [V, D] weight gradient it holds anyway
NLL_ROWS_PER_D = 4


def _logit_tile(
    hidden_chunk: torch.Tensor,
    weight_chunk: torch.Tensor,
    bias_chunk: Optional[torch.Tensor],
    logit_scale: float,
    softcap: Optional[float],
    compute_dtype: torch.dtype,
    scratch: torch.Tensor,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Logits of one tile, [n, v] in ``compute_dtype``, and tanh(z_raw / softcap) when softcapping.

    The tile is written into ``scratch`` (a flat buffer of at least n * v elements, reused by every tile of a
    sweep): a fresh multi-MB tensor per tile costs the CPU a page-faulting allocation each time.
    """
    hidden_chunk = hidden_chunk.to(compute_dtype)
    weight_chunk = weight_chunk.to(compute_dtype)
    rows, cols = hidden_chunk.shape[0], weight_chunk.shape[0]
    logits = scratch[: rows * cols].view(rows, cols)
    if bias_chunk is not None:
        torch.addmm(bias_chunk.to(compute_dtype), hidden_chunk, weight_chunk.T, alpha=logit_scale, out=logits)
    else:
        torch.mm(hidden_chunk, weight_chunk.T, out=logits)
        if logit_scale != 1.0:
            logits.mul_(logit_scale)
    if softcap is None:
        return logits, None
    tanh = logits.div_(softcap).tanh_()
    return tanh * softcap, tanh


def _scratch(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The flat tile buffer of one sweep (see :func:`_logit_tile`)."""
    return torch.empty(max(rows * cols, 1), dtype=dtype, device=device)


def _target_in_tile(labels_chunk: torch.Tensor, vocab_start: int, vocab_width: int):
    """Column of each row's target inside the tile, and whether it lies there."""
    local = labels_chunk - vocab_start
    inside = (local >= 0) & (local < vocab_width)
    return local.clamp(0, vocab_width - 1), inside


def _forward_lse(hidden, weight, bias, labels, logit_scale, softcap, chunk_tokens, chunk_vocab, with_expected):
    """Per-token (log-sum-exp, target logit), both [n] in the compute dtype, for target rows only, and with
    ``with_expected`` the expected output embedding E [n, D] = sum_v p_v * c_v * W_v (c = dz/dz_raw).

    Online over vocabulary chunks: running max m, sum s = sum exp(z - m) and E (unnormalised) are rescaled
    by exp(m_old - m_new) when the max grows; E is divided by s at the end.
    """
    compute_dtype = accumulate_dtype(hidden.dtype)
    num_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    device = hidden.device
    lse = torch.empty(num_tokens, dtype=compute_dtype, device=device)
    target_logit = torch.empty_like(lse)
    expected = torch.empty(num_tokens, hidden.shape[1], dtype=compute_dtype, device=device) if with_expected else None
    scratch = _scratch(min(chunk_tokens, num_tokens), min(chunk_vocab, vocab_size), compute_dtype, device)
    for t0 in range(0, num_tokens, chunk_tokens):
        t1 = min(t0 + chunk_tokens, num_tokens)
        labels_chunk = labels[t0:t1]
        hidden_chunk = hidden[t0:t1].to(compute_dtype)
        running_max = torch.full((t1 - t0,), float("-inf"), dtype=compute_dtype, device=device)
        running_sum = torch.zeros_like(running_max)
        running_target = torch.zeros_like(running_max)
        if expected is not None:
            expected[t0:t1] = 0
        for v0 in range(0, vocab_size, chunk_vocab):
            v1 = min(v0 + chunk_vocab, vocab_size)
            weight_chunk = weight[v0:v1].to(compute_dtype)
            logits, tanh = _logit_tile(
                hidden_chunk, weight_chunk, None if bias is None else bias[v0:v1],
                logit_scale, softcap, compute_dtype, scratch,
            )
            local, inside = _target_in_tile(labels_chunk, v0, v1 - v0)
            picked = logits.gather(1, local[:, None]).squeeze(1)
            running_target = torch.where(inside, picked, running_target)
            new_max = torch.maximum(running_max, logits.amax(dim=1))
            rescale = (running_max - new_max).exp_()
            probs = logits.sub_(new_max[:, None]).exp_()  # in place: the logits are not needed any more
            running_sum.mul_(rescale).add_(probs.sum(dim=1))
            running_max = new_max
            if expected is not None:
                if tanh is not None:
                    probs.mul_(tanh.mul_(tanh).neg_().add_(1.0))  # tanh is spent: 1 - tanh^2 in place
                expected[t0:t1].mul_(rescale[:, None]).addmm_(probs, weight_chunk)
        lse[t0:t1] = running_max + running_sum.log()
        target_logit[t0:t1] = running_target
        if expected is not None:
            expected[t0:t1].div_(running_sum[:, None])
    return lse, target_logit, expected


def _backward_tiles(hidden, weight, bias, labels, lse, grad_token, logit_scale, softcap,
                    chunk_tokens, chunk_vocab, need_hidden, need_weight, need_bias, filter_eps=None):
    """Gradients for the given rows (all with non-zero upstream gradient), accumulated in fp32.

    hidden: [n, D], labels/lse/grad_token: [n]. Returns grad_hidden [n, D] and grad_bias [V] in the compute
    dtype, and grad_weight [V, D] in the weight's dtype (each None when not needed). The vocabulary is the
    outer loop: each vocabulary chunk's weight gradient is complete after one sweep over the tokens, so it
    is accumulated in an fp32 [chunk_vocab, D] buffer and written once into its slice of grad_weight. For a
    bf16 / fp16 head this avoids a full fp32 [V, D] buffer next to the copy in the parameter's dtype.
    With ``filter_eps`` the two products skip the blocks the Triton backward would skip (filtering.py).
    """
    compute_dtype = lse.dtype
    num_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    device = hidden.device
    grad_hidden = torch.zeros(num_tokens, hidden.shape[1], dtype=compute_dtype, device=device) if need_hidden else None
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=device) if need_weight else None
    grad_bias = torch.zeros(vocab_size, dtype=compute_dtype, device=device) if need_bias else None
    scratch = _scratch(min(chunk_tokens, num_tokens), min(chunk_vocab, vocab_size), compute_dtype, device)
    for v0 in range(0, vocab_size, chunk_vocab):
        v1 = min(v0 + chunk_vocab, vocab_size)
        weight_chunk = weight[v0:v1].to(compute_dtype)
        grad_weight_chunk = torch.zeros_like(weight_chunk) if need_weight else None
        for t0 in range(0, num_tokens, chunk_tokens):
            t1 = min(t0 + chunk_tokens, num_tokens)
            hidden_chunk = hidden[t0:t1].to(compute_dtype)
            g_chunk = grad_token[t0:t1].to(compute_dtype)
            logits, tanh = _logit_tile(
                hidden_chunk, weight_chunk, None if bias is None else bias[v0:v1],
                logit_scale, softcap, compute_dtype, scratch,
            )
            # dz = g * (onehot - p), built in place in the logits tile
            grad_logits = logits.sub_(lse[t0:t1, None]).exp_().mul_(-g_chunk[:, None])
            local, inside = _target_in_tile(labels[t0:t1], v0, v1 - v0)
            rows = inside.nonzero().squeeze(1)
            grad_logits[rows, local[rows]] += g_chunk[rows]
            if tanh is not None:
                grad_logits.mul_(tanh.mul_(tanh).neg_().add_(1.0))  # tanh is spent: 1 - tanh^2 in place
            if grad_bias is not None:  # never filtered
                grad_bias[v0:v1] += grad_logits.sum(dim=0)
            if filter_eps is not None:
                drop_small_blocks(grad_logits, g_chunk, filter_eps)
            if grad_hidden is not None:
                grad_hidden[t0:t1].addmm_(grad_logits, weight_chunk, alpha=logit_scale)
            if grad_weight_chunk is not None:
                grad_weight_chunk.addmm_(grad_logits.T, hidden_chunk, alpha=logit_scale)
        if grad_weight is not None:
            grad_weight[v0:v1] = grad_weight_chunk
    return grad_hidden, grad_weight, grad_bias


def _nll_rows_with_grads(hidden, weight, bias, labels, logit_scale, softcap, rows_per_chunk, slice_vocab,
                         need_hidden, need_weight, need_bias):
    """The summed negative log-likelihood of the given rows (all with a target) and its gradients in one
    sweep: three N x V x D products (logits, grad_hidden, grad_weight), no recompute.

    hidden: [n, D], weight: [V, D], labels: [n]. Each chunk of ``rows_per_chunk`` tokens takes whole
    vocabulary rows ([rows, V] fp32), so its log-sum-exp is exact before any gradient is formed::

        d(-logp)/dz = softmax(z) - onehot(y) = e / s - onehot(y),   e = exp(z - max), s = sum_v e

    The row scale 1 / s is applied to the small operands (the [rows, D] product and hidden rows) instead
    of the [rows, V] tile, and the one-hot part is one scatter into the tile (e_y - s): the tile sees one
    matmul, one max, one exp, one sum and one scatter besides the two gradient matmuls. Returns (loss [] , grad_hidden [n, D],
    grad_weight [V, D], grad_bias [V]) in the compute dtype, each gradient None when not needed.
    """
    compute_dtype = accumulate_dtype(hidden.dtype)
    num_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    device = hidden.device
    weight_c = weight.to(compute_dtype)
    bias_c = None if bias is None else bias.to(compute_dtype)
    total = torch.zeros((), dtype=compute_dtype, device=device)
    grad_hidden = torch.empty(num_tokens, hidden.shape[1], dtype=compute_dtype, device=device) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=compute_dtype, device=device) if need_weight else None
    grad_bias = torch.zeros(vocab_size, dtype=compute_dtype, device=device) if need_bias else None
    scratch = _scratch(min(rows_per_chunk, num_tokens), vocab_size, compute_dtype, device)
    for t0 in range(0, num_tokens, rows_per_chunk):
        t1 = min(t0 + rows_per_chunk, num_tokens)
        hidden_chunk = hidden[t0:t1].to(compute_dtype)
        labels_chunk = labels[t0:t1]
        logits, tanh = _logit_tile(hidden_chunk, weight_c, bias_c, logit_scale, softcap, compute_dtype, scratch)
        target_logit = logits.gather(1, labels_chunk[:, None]).squeeze(1)
        row_max = logits.amax(dim=1)
        exps = logits.sub_(row_max[:, None]).exp_()  # in place: the logits are not needed any more
        row_sum = exps.sum(dim=1)
        total += (row_max + row_sum.log() - target_logit).sum()
        if not (need_hidden or need_weight or need_bias):
            continue
        inv_sum = row_sum.reciprocal()
        # the one-hot enters the tile before any product (e_y - s, so the row is s * (p - onehot)): the product
        # of e alone less the target row afterwards cancels to a small difference of two rows when p_y is near 1
        exps.scatter_add_(1, labels_chunk[:, None], -row_sum[:, None])
        if tanh is not None:  # dz/dz_raw = 1 - tanh^2, at the target too
            exps.mul_(tanh.mul_(tanh).neg_().add_(1.0))  # tanh is spent: 1 - tanh^2 in place
        if grad_hidden is not None:
            # summed over vocabulary slices, each product apart: on CPU, a product over all V (262k) or addmm_
            # into the sum lost 1e-4 of the rows beyond a multiple of 4 in a chunk (seen on Gemma 3's head)
            grad_rows = grad_hidden[t0:t1].zero_()
            slice_product = torch.empty_like(grad_rows)
            for v0 in range(0, vocab_size, slice_vocab):
                grad_rows += torch.mm(exps[:, v0:v0 + slice_vocab], weight_c[v0:v0 + slice_vocab], out=slice_product)
            grad_rows.mul_(inv_sum[:, None] * logit_scale)
        if grad_weight is not None:
            grad_weight.addmm_(exps.T, hidden_chunk * inv_sum[:, None], alpha=logit_scale)
        if grad_bias is not None:
            grad_bias.addmv_(exps.T, inv_sum)
    return total, grad_hidden, grad_weight, grad_bias


@dataclass(frozen=True)
class ChunkedBackend:
    """The pure-PyTorch backend of :class:`tuna_kernels.autograd.FusedTokenLogprobs`."""

    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    chunk_vocab: int = DEFAULT_CHUNK_VOCAB
    # gradient filtering's threshold on |onehot - p| (filtering.py), None: off
    grad_filter_eps: Optional[float] = None

    def __post_init__(self):
        if self.chunk_tokens < 1 or self.chunk_vocab < 1:
            raise ValueError(
                f"chunk_tokens and chunk_vocab must be >= 1, got {self.chunk_tokens} and {self.chunk_vocab}"
            )

    def forward(self, hidden, weight, bias, labels, logit_scale, softcap, with_expected=False):
        return _forward_lse(hidden, weight, bias, labels, logit_scale, softcap, self.chunk_tokens, self.chunk_vocab,
                            with_expected)

    def nll_with_grads_fits(self, weight: torch.Tensor, weight_trains: bool) -> bool:
        """Whether :meth:`nll_with_grads` beats the recompute path for this head: the weight trains and is
        fp32/fp64 (and gradient filtering, a recompute-path feature, is off).

        A frozen head already costs two products on the recompute path (its forward accumulates the expected
        embedding) with better-shaped tiles; a 16-bit head's gradient would need a full fp32 [V, D] buffer
        here, where the recompute path sums it one vocabulary slice at a time. At any vocabulary size the
        chunk keeps enough rows for efficient products (see :meth:`nll_rows`).
        """
        return weight_trains and weight.dtype in (torch.float32, torch.float64) and self.grad_filter_eps is None

    def nll_rows(self, vocab_size: int, hidden_dim: int) -> int:
        """Tokens per chunk of :meth:`nll_with_grads`: whole [rows, V] vocabulary rows within the budget of two
        [chunk_tokens, chunk_vocab] tiles (32 MiB of fp32 by default; the recompute path's sweeps hold one tile
        at a time), but never fewer than D / 4 rows, a chunk a quarter of the size of the fp32 [V, D] weight
        gradient this path holds anyway. Few rows re-read the whole weight for a handful of tokens: at Gemma 3's
        head (N = 2048, V = 262144, D = 640) on CPU, the budget's 32 rows took 1.13-1.16x the time of the naive
        linear + cross-entropy, 128 rows 0.74-0.80x and 512 rows 0.70x; at V = 32000, 262 rows took 0.86x the
        time of 131 rows."""
        budget_rows = NLL_TILES * self.chunk_tokens * self.chunk_vocab // vocab_size
        return max(1, budget_rows, hidden_dim // NLL_ROWS_PER_D)

    def nll_with_grads(self, hidden, weight, bias, labels, logit_scale, softcap, need_hidden, need_weight, need_bias):
        """(summed -logp [], grad_hidden [n, D], grad_weight [V, D], grad_bias [V]) in one sweep; see
        :func:`_nll_rows_with_grads`."""
        return _nll_rows_with_grads(hidden, weight, bias, labels, logit_scale, softcap, self.nll_rows(*weight.shape),
                                    self.chunk_vocab, need_hidden, need_weight, need_bias)

    def backward(self, hidden, weight, bias, labels, lse, grad_token, logit_scale, softcap,
                 need_hidden, need_weight, need_bias):
        return _backward_tiles(
            hidden, weight, bias, labels, lse, grad_token, logit_scale, softcap,
            self.chunk_tokens, self.chunk_vocab, need_hidden, need_weight, need_bias, self.grad_filter_eps,
        )
