"""linear_cross_entropy: the scalar token cross-entropy whose chunked implementation forms its gradients in the
forward (whole-vocabulary row chunks: three products, no recompute). Checked against the float64 reference for
every head option, the upstream gradient, ignored tokens, and the cases that keep the recompute path."""

import pytest
import torch

from helpers import TOLERANCE, make_problem, rel_err
from tuna_kernels import linear_cross_entropy, token_logprobs
from tuna_kernels.chunked import ChunkedBackend

# (N, D, V, bias, logit_scale, softcap, ignored fraction)
SHAPES = [
    (70, 64, 301, True, 0.7, None, 0.2),
    (45, 96, 130, True, 1.3, 4.0, 0.3),
    (96, 32, 517, False, 1.0, 2.5, 0.0),
]


def reference_loss(hidden, weight, bias, labels, reduction, **head):
    """The float64 loss from the materialised logits, and its gradients (hidden, weight[, bias])."""
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight) + (() if bias is None else (bias,))]
    token_lp = token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2] if bias is not None else None,
                              impl="reference", **head)
    loss = -token_lp.sum()
    if reduction == "mean":
        loss = loss / (labels != -100).sum()
    return (loss,) + torch.autograd.grad(loss * 3.0, leaves)


def fused_loss(hidden, weight, bias, labels, reduction, **options):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + (() if bias is None else (bias,))]
    loss = linear_cross_entropy(leaves[0], leaves[1], labels, bias=leaves[2] if bias is not None else None,
                                reduction=reduction, **options)
    return (loss,) + torch.autograd.grad(loss * 3.0, leaves)  # an upstream gradient other than 1


@pytest.fixture
def sweeps(monkeypatch):
    """Count the calls of the gradients-in-forward sweep and of the recompute backward."""
    calls = {"nll_with_grads": 0, "backward": 0}
    for name in calls:
        original = getattr(ChunkedBackend, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(ChunkedBackend, name, counted)
    return calls


def chunk_options(vocab_size):
    """Chunk sizes that give the gradients-in-forward sweep 32 whole-vocabulary rows per chunk (two 16-token
    tiles of the whole vocabulary; more than D / 4 for every D below), so every problem below spans two or three
    chunks, the last one partial."""
    return dict(chunk_tokens=16, chunk_vocab=vocab_size)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_formed_in_forward_match_the_float64_reference(sweeps, shape, reduction, dtype):
    num_tokens, hidden_dim, vocab_size, with_bias, logit_scale, softcap, ignored = shape
    hidden, weight, bias, labels, _ = make_problem(num_tokens, hidden_dim, vocab_size, with_bias, ignored,
                                                   dtype, SHAPES.index(shape))
    head = dict(logit_scale=logit_scale, softcap=softcap)
    assert ChunkedBackend(**chunk_options(vocab_size)).nll_rows(vocab_size, hidden_dim) == 32 < num_tokens
    got = fused_loss(hidden, weight, bias, labels, reduction, impl="chunked", **chunk_options(vocab_size), **head)
    want = reference_loss(hidden, weight, bias, labels, reduction, **head)
    assert sweeps == {"nll_with_grads": 1, "backward": 0}
    tolerance = 1e-12 if dtype == torch.float64 else TOLERANCE[dtype]
    assert got[0].dtype == dtype and got[0].dim() == 0
    for name, actual, expected in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, want):
        assert rel_err(actual, expected) <= tolerance, f"{name} {shape} {reduction} {dtype}"
    assert [t.dtype for t in got[1:]] == [dtype] * (len(got) - 1)


@pytest.mark.parametrize("case", ["frozen head", "bf16 head", "filtered", "triton"])
def test_other_heads_reduce_the_token_logprobs_and_still_match(sweeps, case):
    """A frozen head (two products already), a 16-bit trainable head (its gradient would need a full fp32
    [V, D] buffer), gradient filtering (a recompute-path feature) and the Triton kernels take token_logprobs."""
    dtype = {"bf16 head": torch.bfloat16, "triton": torch.float16}.get(case, torch.float32)
    hidden, weight, bias, labels, _ = make_problem(50, 64, 301, True, 0.2, dtype, seed=7)
    options = dict(impl="triton") if case == "triton" else dict(impl="chunked", **chunk_options(301))
    if case == "filtered":
        options["grad_filter_eps"] = 1e-30  # filters nothing here, so the reference still holds
    want = reference_loss(hidden, weight, bias, labels, "mean", softcap=3.0)
    if case == "frozen head":
        h = hidden.clone().requires_grad_()
        loss = linear_cross_entropy(h, weight, labels, bias=bias, softcap=3.0, **options)
        got = (loss,) + torch.autograd.grad(loss * 3.0, [h])
    else:
        got = fused_loss(hidden, weight, bias, labels, "mean", softcap=3.0, **options)
    assert sweeps["nll_with_grads"] == 0
    assert sweeps["backward"] == (1 if case in ("bf16 head", "filtered") else 0)
    for actual, expected in zip(got, want):
        assert rel_err(actual, expected) <= TOLERANCE[dtype], case


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_large_vocabulary_keeps_the_sweep_with_at_least_a_quarter_of_d_rows(sweeps, dtype):
    """Where the tile budget holds few whole vocabulary rows (Gemma 3's V = 262144 leaves 32 of the default
    budget; here 2 * 8 * 64 // 509 = 2), the sweep still runs, on D / 4 rows a chunk, and matches the reference."""
    num_tokens, hidden_dim, vocab_size = 70, 96, 509
    options = dict(chunk_tokens=8, chunk_vocab=64)
    assert ChunkedBackend(**options).nll_rows(vocab_size, hidden_dim) == hidden_dim // 4 == 24  # 3 chunks of 70
    hidden, weight, bias, labels, _ = make_problem(num_tokens, hidden_dim, vocab_size, True, 0.2, dtype, seed=11)
    got = fused_loss(hidden, weight, bias, labels, "sum", impl="chunked", softcap=2.0, **options)
    want = reference_loss(hidden, weight, bias, labels, "sum", softcap=2.0)
    assert sweeps == {"nll_with_grads": 1, "backward": 0}
    tolerance = 1e-12 if dtype == torch.float64 else TOLERANCE[dtype]
    for name, actual, expected in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, want):
        assert rel_err(actual, expected) <= tolerance, name


def test_no_gradient_work_without_grad_mode_and_a_second_backward_agrees(monkeypatch):
    hidden, weight, bias, labels, _ = make_problem(70, 64, 301, True, 0.2, torch.float32, seed=8)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    needs = []
    original = ChunkedBackend.nll_with_grads

    def spy(self, *args):
        needs.append(args[-3:])
        return original(self, *args)

    monkeypatch.setattr(ChunkedBackend, "nll_with_grads", spy)
    with torch.no_grad():  # evaluation: the forward alone (one product on either path), no gradient held
        evaluated = linear_cross_entropy(*leaves[:2], labels, bias=leaves[2], impl="chunked", **chunk_options(301))
    assert needs == []
    loss = linear_cross_entropy(*leaves[:2], labels, bias=leaves[2], impl="chunked", **chunk_options(301))
    assert needs == [(True, True, True)] and rel_err(loss, evaluated) <= 1e-6
    first = [grad.clone() for grad in torch.autograd.grad(loss, leaves, retain_graph=True)]
    second = torch.autograd.grad(loss, leaves)  # the gradients held since the forward are not scaled in place
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(RuntimeError, match="freed"):
        torch.autograd.grad(loss, leaves)  # the held gradients were freed with the graph after the backward


def test_mean_of_no_target_is_nan_with_zero_gradients_and_a_bad_reduction_is_named(sweeps):
    """As F.cross_entropy: an all-ignored batch (padding, a rank with no target) gives a NaN mean but zero
    gradients, which cannot poison an all-reduce or an optimizer step."""
    hidden, weight, _, labels, _ = make_problem(40, 64, 301, False, 0.0, torch.float32, seed=9)
    labels[:] = -100
    for impl in ("chunked", "reference"):
        for reduction in ("mean", "sum"):
            leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
            loss = linear_cross_entropy(*leaves, labels, impl=impl, reduction=reduction, **chunk_options(301))
            assert torch.isnan(loss) if reduction == "mean" else float(loss.detach()) == 0.0
            assert all(bool((grad == 0).all()) for grad in torch.autograd.grad(loss, leaves)), (impl, reduction)
    assert sweeps["nll_with_grads"] == 2
    with pytest.raises(ValueError, match="reduction must be one of .*'none'"):
        linear_cross_entropy(hidden, weight, labels, reduction="none")
    for bad in (2.0, -1.0, float("nan"), "AUTO"):  # >= 1 would silently drop every gradient tile
        with pytest.raises(ValueError, match="grad_filter_eps must be None, 'auto' or a number in"):
            linear_cross_entropy(hidden, weight, labels, grad_filter_eps=bad)
    # the options are token_logprobs' by name: a misspelt one is refused, not ignored
    with pytest.raises(TypeError, match="linear_cross_entropy.*unexpected keyword argument 'soft_cap'"):
        linear_cross_entropy(hidden, weight, labels, soft_cap=30.0)
    non_default_ignore = torch.where(labels == -100, -1, labels)
    assert torch.isnan(linear_cross_entropy(hidden, weight, non_default_ignore, ignore_index=-1))


def test_an_input_changed_in_place_before_the_backward_is_an_error():
    """The gradients are formed in the forward: changing the weight in place before the backward must raise (as
    autograd does for a saved tensor), not give the gradients of the old weight."""
    hidden, weight, _, labels, _ = make_problem(70, 64, 301, False, 0.2, torch.float32, seed=10)
    hidden.requires_grad_()
    weight.requires_grad_()
    loss = linear_cross_entropy(hidden, weight, labels, impl="chunked", **chunk_options(301))
    with torch.no_grad():
        weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()



@pytest.mark.parametrize("off", [None, 0, 0.0])
def test_a_grad_filter_eps_of_zero_is_off_as_none_is(sweeps, off):
    """One meaning of off: 0 (tuna train's --grad-filter-eps default) takes the same path as None, the
    gradients-in-forward sweep that filtering would rule out."""
    hidden, weight, bias, labels, _ = make_problem(50, 64, 301, True, 0.2, torch.float32, seed=3)
    got = fused_loss(hidden, weight, bias, labels, "mean", impl="chunked", grad_filter_eps=off, **chunk_options(301))
    assert sweeps == {"nll_with_grads": 1, "backward": 0}
    for actual, expected in zip(got, reference_loss(hidden, weight, bias, labels, "mean")):
        assert rel_err(actual, expected) <= TOLERANCE[torch.float32]
