"""The dtype policy (issue 11, point 1): under autocast the fused loss casts hidden, weight and bias to the
autocast dtype at its entry, as nn.Linear does, so fp32 inputs (peft upcasts the lm_head and the final norm)
take exactly the path of inputs already in that dtype; gradients reach fp32 leaves in fp32."""

import pytest
import torch

from helpers import make_problem
from tuna_kernels import GroupLayout, TunaLoss, linear_cross_entropy, sequence_logprobs, token_logprobs

# bf16 tl.dot is wrong under the Triton interpreter, so the Triton path is checked with fp16 autocast.
CASES = [("chunked", torch.bfloat16), ("chunked", torch.float16), ("triton", torch.float16)]


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def run(fn, hidden, weight, bias, autocast_dtype=None):
    """fn(h, w, b) -> output; returns (output, grads of the leaves) under autocast_dtype (None: off)."""
    h, w, b = leaves(hidden, weight, bias)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = fn(h, w, b)
    loss = out if out.dim() == 0 else (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
    grads = torch.autograd.grad(loss, [t for t in (h, w, b) if t is not None])
    return out, grads


def assert_same_path(fn, impl, dtype, with_bias=True, weight_dtype=torch.float32):
    hidden, weight, bias, labels, _ = make_problem(37, 64, 301, with_bias, 0.2, torch.float32, seed=31)
    weight = weight.to(weight_dtype)
    lowered = run(lambda h, w, b: fn(h, w, b, labels), hidden.to(dtype), weight.to(dtype),
                  None if bias is None else bias.to(dtype))
    autocast = run(lambda h, w, b: fn(h, w, b, labels), hidden, weight, bias, autocast_dtype=dtype)
    assert autocast[0].dtype == torch.float32 and torch.equal(autocast[0], lowered[0]), f"{impl} {dtype}"
    for leaf, got, want in zip((hidden, weight, bias), autocast[1], lowered[1]):
        assert got.dtype == leaf.dtype  # fp32 leaves get fp32 gradients
        assert torch.equal(got, want.to(got.dtype)), f"{impl} {dtype}: gradients differ"


@pytest.mark.parametrize("impl,dtype", CASES)
def test_token_logprobs_under_autocast_equal_lowered_inputs(impl, dtype):
    assert_same_path(lambda h, w, b, labels: token_logprobs(h, w, labels, bias=b, impl=impl,
                                                            chunk_tokens=16, chunk_vocab=64), impl, dtype)


@pytest.mark.parametrize("impl,dtype", CASES)
def test_sequence_logprobs_under_autocast_equal_lowered_inputs(impl, dtype):
    seq_index = torch.arange(37) // 10

    def fn(h, w, b, labels):
        return sequence_logprobs(h, w, labels, seq_index, 4, bias=b, impl=impl, chunk_tokens=16, chunk_vocab=64)[0]

    assert_same_path(fn, impl, dtype)


@pytest.mark.parametrize("impl,dtype", CASES)
def test_linear_cross_entropy_under_autocast_equals_lowered_inputs(impl, dtype):
    """The SFT loss of the Hugging Face drop-in, as a bf16-autocast user runs it (a 16-bit head: the
    recompute path)."""
    assert_same_path(lambda h, w, b, labels: linear_cross_entropy(h, w, labels, bias=b, impl=impl,
                                                                  chunk_tokens=16, chunk_vocab=64), impl, dtype)


@pytest.mark.parametrize("impl,dtype", CASES)
def test_tuna_loss_under_autocast_equals_lowered_inputs(impl, dtype):
    seq_index = torch.arange(37) // 8  # 5 sequences: groups of 3 and 2 candidates
    layout = GroupLayout.from_group_sizes(seq_index, [3, 2])
    module = TunaLoss(impl=impl, chunk_tokens=16, chunk_vocab=64)

    def fn(h, w, b, labels):
        return module(h, w, labels.masked_fill(labels < 0, 0), layout, bias=b)[0]

    assert_same_path(fn, impl, dtype)


def test_mixed_input_dtypes_are_accepted_under_autocast_only():
    """peft's upcasting gives fp32 hidden states with a bf16 head (or the reverse): under autocast both are
    cast; without autocast the mismatch is still an error naming both dtypes."""
    assert_same_path(lambda h, w, b, labels: token_logprobs(h, w, labels, bias=b, impl="chunked"),
                     "chunked", torch.bfloat16, weight_dtype=torch.bfloat16)
    hidden, weight, _, labels, _ = make_problem(8, 64, 50, False, 0.0, torch.float32, seed=1)
    with pytest.raises(TypeError, match="bfloat16"):
        token_logprobs(hidden, weight.bfloat16(), labels, impl="chunked")


def test_fp32_dot_precision_follows_torch_matmul_setting(monkeypatch):
    """fp32 on a GPU uses TF32 exactly when torch's own fp32 matmuls do; fp16/bf16 always use tensor cores."""
    from tuna_kernels.kernels.launch import _dot_precision

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert _dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert _dot_precision(torch.float32) == "tf32"
        assert _dot_precision(torch.bfloat16) == "tf32" and _dot_precision(torch.float16) == "tf32"
    finally:
        torch.set_float32_matmul_precision(previous)
