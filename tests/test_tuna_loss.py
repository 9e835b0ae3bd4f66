"""TunaLoss, fused (chunked, and Triton under the interpreter), against the naive materialised pipeline."""

import pytest
import torch

import naive_tuna as naive
from helpers import rel_err
from tuna_kernels import GroupLayout, TunaLoss, listmle_loss, pairwise_logistic_loss, rrhf_loss
from tuna_kernels.devtools.memory import AllocationTracker


def ragged_batch(group_sizes=(2, 3, 4), hidden_dim=64, vocab_size=150, seed=0, dtype=torch.float32):
    """Flat target stream of candidates with different lengths; some ignored positions inside."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [int(torch.randint(3, 10, (1,), generator=generator)) for _ in range(sum(group_sizes))]
    seq_index = torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)])
    num_tokens = seq_index.shape[0]
    labels = torch.randint(0, vocab_size, (num_tokens,), generator=generator)
    labels[[0, num_tokens - 1]] = -100  # positions kept with an ignored label
    hidden = torch.randn(num_tokens, hidden_dim, generator=generator).to(dtype)
    weight = (torch.randn(vocab_size, hidden_dim, generator=generator) / 4).to(dtype)
    layout = GroupLayout.from_group_sizes(seq_index, group_sizes)
    return hidden, weight, labels, layout


def group_rank_map(layout):
    return {s: (int(g), int(r)) for s, (g, r) in enumerate(zip(layout.seq_group, layout.seq_rank))}


def naive_loss_and_grads(hidden, weight, labels, layout, **options):
    h = hidden.double().detach().requires_grad_()
    w = weight.double().detach().requires_grad_()
    loss = naive.tuna_objective_from_logits(h @ w.T, labels, layout.seq_index, group_rank_map(layout), **options)
    return (loss,) + torch.autograd.grad(loss, (h, w))


def fused_loss_and_grads(module, hidden, weight, labels, layout):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss, metrics = module(h, w, labels, layout)
    return (loss,) + torch.autograd.grad(loss, (h, w)), metrics


@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("mle_on", ["all", "best"])
def test_fused_tuna_loss_matches_naive_pipeline(impl, mle_on):
    hidden, weight, labels, layout = ragged_batch()
    options = dict(margin=0.1, alpha=1.0, mle_weight=1.0, mle_on=mle_on)
    (loss, grad_h, grad_w), metrics = fused_loss_and_grads(
        TunaLoss(impl=impl, chunk_tokens=8, chunk_vocab=64, **options), hidden, weight, labels, layout)
    want = naive_loss_and_grads(hidden, weight, labels, layout, **options)
    assert rel_err(loss, want[0]) <= 1e-5
    assert rel_err(grad_h, want[1]) <= 1e-5
    assert rel_err(grad_w, want[2]) <= 1e-5
    assert metrics["score_per_rank"].shape == (4,)
    assert 0.0 <= float(metrics["pair_accuracy"]) <= 1.0
    assert int(metrics["num_pairs"]) == 1 + 3 + 6


def test_reference_code_layout_gives_the_reference_formula():
    """B groups x 4 candidates, one padded row per candidate (right padding, prompt ignored) as the
    reference code lays them out; loss = sum_i MarginRankingLoss(0.1 i) + token cross-entropy mean."""
    generator = torch.Generator().manual_seed(7)
    groups, candidates, seq_len, hidden_dim, vocab_size = 3, 4, 12, 32, 90
    rows = groups * candidates
    hidden = torch.randn(rows, seq_len, hidden_dim, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab_size, hidden_dim, generator=generator, dtype=torch.float64) / 3
    labels = torch.randint(0, vocab_size, (rows, seq_len), generator=generator)
    for row in range(rows):
        prompt = int(torch.randint(2, 5, (1,), generator=generator))
        end = int(torch.randint(prompt + 2, seq_len + 1, (1,), generator=generator))
        labels[row, :prompt] = -100  # prompt tokens
        labels[row, end:] = -100  # right padding

    # the reference formula, on materialised logits
    logits = hidden[:, :-1] @ weight.T
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    token_lp = torch.log_softmax(logits, -1).gather(2, shift_labels.clamp(min=0)[..., None]).squeeze(2)
    scores = ((token_lp * mask).sum(1) / mask.sum(1)).view(groups, candidates)
    rank_loss = sum(torch.nn.MarginRankingLoss(0.1 * i)(scores[:, :-i], scores[:, i:], torch.ones_like(scores[:, i:]))
                    for i in range(1, candidates))
    mle = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), shift_labels.reshape(-1), ignore_index=-100)
    expected = rank_loss + mle

    # ours: only target positions go through the lm_head
    target_hidden = hidden[:, :-1][mask]
    seq_index = torch.arange(rows)[:, None].expand(rows, seq_len - 1)[mask]
    layout = GroupLayout.from_group_sizes(seq_index, [candidates] * groups)
    for impl in ("chunked", "reference"):
        loss, _ = TunaLoss(margin=0.1, alpha=1.0, mle_weight=1.0, impl=impl)(
            target_hidden, weight, shift_labels[mask], layout)
        assert rel_err(loss, expected) <= 1e-10
    loss32, _ = TunaLoss(impl="triton")(target_hidden.float(), weight.float(), shift_labels[mask], layout)
    assert rel_err(loss32, expected) <= 1e-5


@pytest.mark.parametrize("name, fn, options", [
    ("listmle", listmle_loss, {}),
    ("rrhf", rrhf_loss, {}),
    ("pairwise_logistic", pairwise_logistic_loss, {}),
])
def test_other_losses_through_the_module(name, fn, options):
    hidden, weight, labels, layout = ragged_batch(seed=3)
    loss, metrics = TunaLoss(loss=name, mle_weight=0.0, impl="chunked")(hidden, weight, labels, layout)
    token_lp = torch.log_softmax(hidden.double() @ weight.double().T, -1)
    is_target = labels != -100
    picked = token_lp[is_target].gather(1, labels[is_target][:, None]).squeeze(1)
    sums = torch.zeros(layout.num_seqs, dtype=torch.float64).index_add(0, layout.seq_index[is_target], picked)
    counts = torch.bincount(layout.seq_index[is_target], minlength=layout.num_seqs)
    scores = layout.to_matrix(sums / counts)
    assert rel_err(loss, fn(scores, layout.valid())) <= 1e-5
    assert rel_err(metrics["rank_loss"], loss) <= 1e-6


def test_single_candidate_group_counts_for_mle_only():
    hidden, weight, labels, layout = ragged_batch(group_sizes=(1,), seed=4)
    loss, metrics = TunaLoss(impl="chunked")(hidden, weight, labels, layout)
    assert float(metrics["rank_loss"]) == 0.0
    want = naive_loss_and_grads(hidden, weight, labels, layout)[0]
    assert rel_err(loss, want) <= 1e-5 and float(loss) > 0


@pytest.mark.parametrize("breakage, words", [
    (lambda lay: setattr(lay, "seq_rank", lay.seq_rank + 2), "seq_rank"),
    (lambda lay: setattr(lay, "num_groups", 4), "group 3 has no valid candidate"),
    (lambda lay: setattr(lay, "lengths", torch.ones(lay.num_seqs, dtype=torch.long)), "should have 1 target tokens"),
    (lambda lay: setattr(lay, "target_scores", torch.full((3, 4), float("nan"))), "target_scores[0, 0] is not finite"),
    (lambda lay: setattr(lay, "seq_index", torch.zeros_like(lay.seq_index)), "has no target token"),
    (lambda lay: setattr(lay, "seq_rank", torch.zeros_like(lay.seq_rank)), "two sequences are rank 0"),
])
def test_invalid_layout_raises_before_any_kernel(monkeypatch, breakage, words):
    import tuna_kernels.module as module

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran before the layout was checked")

    monkeypatch.setattr(module, "sequence_logprobs", no_kernel)
    hidden, weight, labels, layout = ragged_batch()
    breakage(layout)
    with pytest.raises(ValueError) as info:
        TunaLoss(impl="chunked")(hidden, weight, labels, layout)
    assert words in str(info.value)


def test_group_sizes_must_be_positive():
    with pytest.raises(ValueError, match="no valid candidate"):
        GroupLayout.from_group_sizes(torch.zeros(3, dtype=torch.long), [2, 0])


def test_tuna_loss_memory_bound():
    """The allocation-tracker bounds of the fused log-likelihood hold for TunaLoss forward + backward."""
    num_tokens, vocab_size, hidden_dim = 2048, 32000, 64
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(num_tokens, hidden_dim, generator=generator)
    weight = torch.randn(vocab_size, hidden_dim, generator=generator) / 8
    labels = torch.randint(0, vocab_size, (num_tokens,), generator=generator)
    layout = GroupLayout.from_group_sizes(torch.arange(num_tokens) // 64, [4] * 8)
    peaks, largest = {}, {}
    for impl in ("reference", "chunked"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with AllocationTracker() as tracker:
            loss, _ = TunaLoss(impl=impl)(h, w, labels, layout)
            loss.backward()
        peaks[impl], largest[impl] = tracker.peak_bytes, tracker.largest_bytes
    logits_bytes = num_tokens * vocab_size * 4
    assert largest["reference"] >= logits_bytes
    assert largest["chunked"] <= logits_bytes / 8
    assert peaks["chunked"] <= peaks["reference"] / 4


def test_mle_on_best_without_rank_zero_uses_the_best_present_candidate():
    """A valid layout with no rank-0 sequence (each group lost its best candidate, e.g. to truncation) used to
    give 0/0 = NaN; each group's best present candidate (here rank 1) now carries the MLE term."""
    hidden, weight, labels, _ = ragged_batch(group_sizes=(2, 3))
    sizes = torch.bincount(ragged_batch(group_sizes=(2, 3))[3].seq_index)
    seq_index = torch.repeat_interleave(torch.arange(5), sizes)
    layout = GroupLayout(seq_index, seq_group=torch.tensor([0, 0, 1, 1, 1]),
                         seq_rank=torch.tensor([1, 2, 1, 2, 3]), num_groups=2, num_candidates=4)
    for impl in ("chunked", "triton"):
        loss, metrics = TunaLoss(impl=impl, mle_on="best", mle_weight=1.0)(hidden, weight, labels, layout)
        assert torch.isfinite(loss) and torch.isfinite(metrics["mle_loss"])
        token_lp = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1)
        is_target = labels != -100
        picked = token_lp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
        best_tokens = is_target & ((seq_index == 0) | (seq_index == 2))  # rank 1 of each group
        want = -picked[best_tokens].sum() / best_tokens.sum()
        assert rel_err(metrics["mle_loss"], want) <= 1e-5


def test_num_pairs_counts_the_pairs_pair_accuracy_counts_ties_left_out():
    """A pair tied in the ranking has no right order: neither pair_accuracy nor num_pairs counts it."""
    torch.manual_seed(0)
    seq_index = torch.arange(4).repeat_interleave(3)                     # 4 candidates, 3 tokens each
    layout = GroupLayout.from_group_sizes(seq_index, [4], target_scores=torch.tensor([[3.0, 2.0, 2.0, 1.0]]))
    hidden, weight = torch.randn(12, 16), torch.randn(50, 16)
    _, metrics = TunaLoss(impl="chunked")(hidden, weight, torch.randint(0, 50, (12,)), layout)
    assert int(metrics["num_pairs"]) == 6 - 1
