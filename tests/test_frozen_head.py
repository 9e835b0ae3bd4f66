"""Frozen lm_head in two passes: when only ``hidden`` needs a gradient, the forward accumulates the expected
output embedding E_n and the backward is g_n * scale * (c_y W[y_n] - E_n), with no recompute. Checked
against the float64 reference for Triton (interpreter) and chunked, with bias, logit scale and softcap."""

import pytest
import torch

from helpers import TOLERANCE, make_problem, rel_err
from tuna_kernels import sequence_logprobs, token_logprobs
from tuna_kernels.chunked import ChunkedBackend
from tuna_kernels.kernels.launch import TritonBackend

# (N, D, V, bias, logit_scale, softcap, ignored fraction)
SHAPES = [
    (37, 64, 301, True, 0.7, None, 0.2),
    (45, 96, 130, True, 1.3, 4.0, 0.3),
    (16, 64, 517, False, 1.0, 2.5, 0.0),
]


def frozen_head_grad(impl, shape, dtype, seed, **options):
    num_tokens, hidden_dim, vocab_size, with_bias, logit_scale, softcap, ignored = shape
    hidden, weight, bias, labels, grad_token = make_problem(num_tokens, hidden_dim, vocab_size, with_bias, ignored,
                                                            dtype, seed)
    h = hidden.clone().requires_grad_()
    token_lp = token_logprobs(h, weight, labels, bias=bias, logit_scale=logit_scale, softcap=softcap, impl=impl,
                              **options)
    (token_lp * grad_token).sum().backward()
    h64 = hidden.double().requires_grad_()
    want_lp = token_logprobs(h64, weight.double(), labels, bias=None if bias is None else bias.double(),
                             logit_scale=logit_scale, softcap=softcap, impl="reference")
    (want_lp * grad_token.double()).sum().backward()
    return token_lp, h.grad, want_lp, h64.grad


def no_recompute(monkeypatch):
    """Make any call of a backend's recomputing backward fail: the frozen path must not need it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the frozen-head backward recomputed the logits")

    monkeypatch.setattr(ChunkedBackend, "backward", refuse)
    monkeypatch.setattr(TritonBackend, "backward", refuse)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl,dtype", [("chunked", torch.float32), ("chunked", torch.bfloat16),
                                        ("triton", torch.float32), ("triton", torch.float16)])
def test_frozen_head_gradient_matches_reference_without_recompute(monkeypatch, impl, dtype, shape):
    no_recompute(monkeypatch)
    options = dict(chunk_tokens=16, chunk_vocab=64) if impl == "chunked" else {}
    token_lp, grad_hidden, want_lp, want_grad = frozen_head_grad(impl, shape, dtype, SHAPES.index(shape), **options)
    assert grad_hidden.dtype == dtype
    assert rel_err(token_lp, want_lp) <= TOLERANCE[dtype]
    assert rel_err(grad_hidden, want_grad) <= TOLERANCE[dtype], f"{impl} {dtype} {shape}"


def test_frozen_head_through_sequence_logprobs_and_trainable_head_still_recomputes(monkeypatch):
    """sequence_logprobs takes the same path; a trainable head (or bias) keeps the recomputing backward."""
    hidden, weight, bias, labels, _ = make_problem(40, 64, 200, True, 0.1, torch.float32, seed=3)
    seq_index = torch.arange(40) // 10
    calls = []
    original = ChunkedBackend.backward
    monkeypatch.setattr(ChunkedBackend, "backward", lambda self, *a: calls.append(1) or original(self, *a))
    for trainable in ("none", "bias", "weight"):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(trainable == "weight")
        b = bias.clone().requires_grad_(trainable == "bias")
        sums, _ = sequence_logprobs(h, w, labels, seq_index, 4, bias=b, impl="chunked", chunk_tokens=16, chunk_vocab=64)
        sums.sum().backward()
        h64 = hidden.double().requires_grad_()
        want, _ = sequence_logprobs(h64, weight.double(), labels, seq_index, 4, bias=bias.double(), impl="reference")
        want.sum().backward()
        assert rel_err(h.grad, h64.grad) <= 1e-5, trainable
        assert len(calls) == (0 if trainable == "none" else 1 + ["bias", "weight"].index(trainable)), trainable
