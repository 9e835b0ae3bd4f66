"""Bad input raises a ValueError / TypeError that names the argument, before any kernel runs."""

import pytest
import torch

from tuna_kernels import sequence_logprobs, token_logprobs

N, D, V = 8, 16, 32


def args(**changes):
    base = dict(hidden=torch.randn(N, D), weight=torch.randn(V, D), labels=torch.randint(0, V, (N,)))
    base.update(changes)
    return base


@pytest.mark.parametrize("changes, error, words", [
    (dict(hidden=torch.randn(N, D, 1)), ValueError, "hidden must be [N, D]"),
    (dict(weight=torch.randn(V)), ValueError, "weight must be [V, D]"),
    (dict(weight=torch.randn(V, D + 1)), ValueError, "D differs"),
    (dict(labels=torch.randint(0, V, (N + 1,))), ValueError, "labels has 9 entries"),
    (dict(labels=torch.randint(0, V, (N, 1))), ValueError, "labels must be [N]"),
    (dict(labels=torch.rand(N)), TypeError, "labels must be int64 or int32"),
    (dict(hidden=torch.randint(0, 3, (N, D))), TypeError, "hidden must be a floating tensor"),
    (dict(weight=torch.randn(V, D, dtype=torch.float64)), TypeError, "weight dtype"),
    (dict(labels=torch.tensor([0, 1, 2, V, 3, 4, 5, 6])), ValueError, "labels[3] = 32 is outside [0, V=32)"),
    (dict(labels=torch.tensor([0, -1, 2, 3, 3, 4, 5, 6])), ValueError, "labels[1] = -1"),
    (dict(hidden="not a tensor"), TypeError, "hidden must be a torch.Tensor"),
    (dict(weight=torch.randn(V, D, device="meta")), ValueError, "one device"),
])
def test_token_logprobs_rejects(changes, error, words):
    with pytest.raises(error) as info:
        token_logprobs(**args(**changes), impl="chunked")
    assert words in str(info.value)


@pytest.mark.parametrize("options, error, words", [
    (dict(bias=torch.randn(V + 1)), ValueError, "bias must be [V]"),
    (dict(bias=torch.randn(V, dtype=torch.float16)), TypeError, "bias dtype"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(logit_scale=float("nan")), ValueError, "logit_scale"),
    (dict(impl="cuda"), ValueError, "impl must be one of"),
    (dict(chunk_tokens=0), ValueError, "chunk_tokens"),
])
def test_token_logprobs_rejects_options(options, error, words):
    with pytest.raises(error) as info:
        token_logprobs(**args(), **options)
    assert words in str(info.value)


def test_ignore_index_is_not_out_of_range():
    labels = torch.tensor([0, -100, 2, 3, 3, 4, 5, -100])
    token_lp = token_logprobs(**args(labels=labels), impl="chunked")
    assert token_lp[1] == 0 and token_lp[7] == 0


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        token_logprobs(**args(), impl="triton")


def test_triton_refuses_float64():
    with pytest.raises(TypeError, match="not float64"):
        token_logprobs(**args(hidden=torch.randn(N, D).double(), weight=torch.randn(V, D).double()), impl="triton")


@pytest.mark.parametrize("seq_index, num_seqs, error, words", [
    (torch.zeros(N + 1, dtype=torch.long), 2, ValueError, "seq_index has 9 entries"),
    (torch.zeros(N), 2, TypeError, "seq_index must be int64 or int32"),
    (torch.full((N,), 2), 2, ValueError, "seq_index[0] = 2 is outside [0, num_seqs=2)"),
    (torch.zeros(N, dtype=torch.long), -1, ValueError, "num_seqs"),
])
def test_sequence_logprobs_rejects(seq_index, num_seqs, error, words):
    with pytest.raises(error) as info:
        sequence_logprobs(**args(), seq_index=seq_index, num_seqs=num_seqs, impl="chunked")
    assert words in str(info.value)
