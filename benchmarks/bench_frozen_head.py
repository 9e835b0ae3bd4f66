"""CPU timing, interleaved in one process: the token cross-entropy part of the task (forward + backward of
the mean token log-likelihood) with a trainable and with a frozen lm_head (LoRA / QLoRA: only the hidden
states need a gradient), for the naive materialised path, our chunked path (``token_logprobs(...).mean()``,
per-token outputs whose backward recomputes the logits, and ``linear_cross_entropy``, the scalar loss that
forms its gradients in the forward), and torch's own ``F.linear_cross_entropy`` as a peer
(``options=None``, its reference path; ``LinearCrossEntropyOptions()``, its chunked path, with the mean
reduction and with ``reduction="none"``, the per-token form). Every path's loss and gradients are checked
against the naive path before timing.

    python benchmarks/bench_frozen_head.py [--tokens 4096 --vocab 32000 --dim 256 --rounds 3]

Paths run one after the other inside each round, rounds repeat, and the median of each path is reported
with its ratio to the naive trainable-head time: the machines are shared, so only ratios measured in one
run are comparable. fp32; wall-clock of forward + backward.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from tuna_kernels import linear_cross_entropy, token_logprobs


def _naive(hidden, weight, labels):
    logits = hidden @ weight.T
    return -torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).mean()


def _chunked(hidden, weight, labels, **options):
    return -token_logprobs(hidden, weight, labels, impl="chunked", **options).mean()


def _chunked_scalar(hidden, weight, labels, **options):
    return linear_cross_entropy(hidden, weight, labels, impl="chunked", **options)


def _torch_lce(options, reduction="mean"):
    def loss(hidden, weight, labels):
        return F.linear_cross_entropy(hidden, weight, labels, options=options, reduction=reduction).mean()
    return loss


def paths(chunk_tokens: int, chunk_vocab: int) -> Dict[str, Callable]:
    found = {
        "naive": _naive,
        "chunked (ours) token_logprobs": lambda h, w, y: _chunked(h, w, y, chunk_tokens=chunk_tokens,
                                                                  chunk_vocab=chunk_vocab),
        "chunked (ours) linear_cross_entropy": lambda h, w, y: _chunked_scalar(h, w, y, chunk_tokens=chunk_tokens,
                                                                               chunk_vocab=chunk_vocab),
    }
    if hasattr(F, "linear_cross_entropy"):
        chunked_options = torch.nn.LinearCrossEntropyOptions()
        found["torch F.linear_cross_entropy options=None"] = _torch_lce(None)
        found["torch F.linear_cross_entropy LinearCrossEntropyOptions()"] = _torch_lce(chunked_options)
        # per-token losses, like token_logprobs: the backward must recompute (torch's chunked path does too)
        found["torch F.linear_cross_entropy LinearCrossEntropyOptions(), reduction='none'"] = _torch_lce(
            chunked_options, reduction="none")
    return found


def time_step(loss_fn, hidden, weight, labels, frozen: bool) -> float:
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_(not frozen)
    start = time.perf_counter()
    loss_fn(h, w, labels).backward()
    return time.perf_counter() - start


def check_against_naive(name, loss_fn, hidden, weight, labels, frozen: bool) -> None:
    """Raise when a path's loss or gradients differ from the naive path's (fp32, relative 1e-4)."""
    results = []
    for fn in (_naive, loss_fn):
        h = hidden.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_(not frozen)
        loss = fn(h, w, labels)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in (h, w) if t.grad is not None])
    if len(results[0]) != len(results[1]):
        raise AssertionError(f"{name}: gradients for {len(results[1]) - 1} inputs, naive {len(results[0]) - 1}")
    for expected, got in zip(*results):
        error = float((got - expected).norm() / expected.norm())
        if not error <= 1e-4:
            raise AssertionError(f"{name}: relative error {error:.2e} against the naive path")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--chunk-vocab", type=int, default=4096)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.dim, generator=generator)
    weight = torch.randn(args.vocab, args.dim, generator=generator) / args.dim ** 0.5
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=generator)
    cases = [(name, fn, frozen) for frozen in (False, True) for name, fn in paths(args.chunk_tokens, args.chunk_vocab).items()]
    for name, fn, frozen in cases:  # warm-up (allocator, first-call costs) and the correctness guard
        check_against_naive(name, fn, hidden[:256], weight, labels[:256], frozen)
    times = {(name, frozen): [] for name, _, frozen in cases}
    for _ in range(args.rounds):
        for name, fn, frozen in cases:
            times[(name, frozen)].append(time_step(fn, hidden, weight, labels, frozen))
    base = statistics.median(times[("naive", False)])
    print(f"N={args.tokens} V={args.vocab} D={args.dim} fp32 CPU, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds")
    print("| path | lm_head | seconds | / naive trainable | / same path trainable | / naive same head |")
    print("|---|---|---|---|---|---|")
    for name, _, frozen in cases:
        median = statistics.median(times[(name, frozen)])
        trainable = statistics.median(times[(name, False)])
        naive_same = statistics.median(times[("naive", frozen)])
        print(f"| {name} | {'frozen' if frozen else 'trainable'} | {median:.3f} | {median / base:.2f} | "
              f"{median / trainable:.2f} | {median / naive_same:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
