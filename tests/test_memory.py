"""The memory claim of the chunked path, proven with an allocation tracker over every tensor created."""

import os

import pytest
import torch

from helpers import TOLERANCE, logprobs_and_grads, make_problem, rel_err
from tuna_kernels import sequence_logprobs, token_logprobs
from tuna_kernels.devtools.memory import AllocationTracker
from tuna_kernels.kernels import launch

N, V, D = 2048, 32000, 64
LOGITS_BYTES = N * V * 4


def forward_backward(impl, hidden, weight, labels, seq_index):
    with AllocationTracker() as tracker:
        sums, _ = sequence_logprobs(hidden, weight, labels, seq_index, 16, impl=impl)
        sums.sum().backward()
    return tracker, sums.detach(), hidden.grad, weight.grad


def test_tracker_counts_a_materialised_tensor():
    with AllocationTracker() as tracker:
        big = torch.empty(1000, 1000)
        view = big[:10]
        del big, view
        small = torch.ones(10)
    assert tracker.largest_bytes == 4_000_000 and tracker.largest_shape == (1000, 1000)
    assert tracker.peak_bytes >= 4_000_000
    assert tracker.live_bytes == small.untyped_storage().nbytes()


def test_chunked_never_materialises_logits():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=generator)
    weight = torch.randn(V, D, generator=generator) / 8
    labels = torch.randint(0, V, (N,), generator=generator)
    seq_index = torch.arange(N) // (N // 16)
    runs = {}
    for impl in ("reference", "chunked"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        runs[impl] = forward_backward(impl, h, w, labels, seq_index)
    reference, chunked = runs["reference"][0], runs["chunked"][0]
    assert reference.largest_bytes >= LOGITS_BYTES  # the tracker sees the naive path's logits
    assert chunked.largest_bytes <= LOGITS_BYTES / 8, (chunked.largest_bytes, chunked.largest_shape)
    assert chunked.peak_bytes <= reference.peak_bytes / 4, (chunked.peak_bytes, reference.peak_bytes)
    for got, want in zip(runs["chunked"][1:], runs["reference"][1:]):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_chunked_bf16_weight_gradient_has_no_full_fp32_buffer():
    """A bf16 head: grad_weight is written in bf16 vocabulary slice by vocabulary slice (fp32 accumulation
    per [chunk_vocab, D] slice), so no fp32 [V, D] tensor exists; the gradient still matches float64."""
    vocab, dim, tokens = 8000, 64, 256
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(tokens, dim, generator=generator).bfloat16()
    weight = (torch.randn(vocab, dim, generator=generator) / 8).bfloat16()
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with AllocationTracker(record_shapes=True) as tracker:
        token_lp = token_logprobs(h, w, labels, impl="chunked", chunk_tokens=128, chunk_vocab=1000)
        token_lp.sum().backward()
    assert w.grad.dtype == torch.bfloat16
    assert tracker.largest_bytes < vocab * dim * 4, (tracker.largest_bytes, tracker.largest_shape)
    w64 = weight.double().requires_grad_()
    token_logprobs(hidden.double(), w64, labels, impl="reference").sum().backward()
    assert rel_err(w.grad, w64.grad) <= 2e-2


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="the Triton kernels need a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_16_bit_weight_gradient_has_no_full_fp32_buffer(monkeypatch, deterministic):
    """The Triton backward sums a 16-bit head's gradient in fp32 one vocabulary slice at a time (ragged last
    slice, labels in every slice) and writes it in the weight's dtype: no fp32 [V, D] tensor exists, and the
    gradients match float64. (fp16: the interpreter has no bf16 arithmetic.)"""
    vocab, dim = 700, 64
    monkeypatch.setattr(launch, "WEIGHT_SLICE_BYTES", 256 * dim * 4)
    assert launch.vocab_slices(vocab, dim, torch.float16) == [(0, 256), (256, 512), (512, 700)]
    hidden, weight, bias, labels, grad_token = make_problem(37, dim, vocab, True, 0.2, torch.float16, seed=3)
    with AllocationTracker(record_shapes=True) as tracker:
        got = logprobs_and_grads("triton", hidden, weight, bias, labels, grad_token, deterministic=deterministic)
    assert got[2].dtype == torch.float16
    full_fp32 = [shape for shape, nbytes, _ in tracker.shapes if nbytes >= vocab * dim * 4]
    assert not full_fp32, full_fp32
    want = logprobs_and_grads("reference", hidden.double(), weight.double(), bias.double(), labels, grad_token)
    for name, actual, expected in zip(["logprobs", "grad_hidden", "grad_weight", "grad_bias"], got, want):
        assert rel_err(actual, expected) <= TOLERANCE[torch.float16], name
