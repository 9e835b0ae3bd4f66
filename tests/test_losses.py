"""Each ranking loss against an independent naive implementation (loops over pairs, float64)."""

import pytest
import torch

import naive_tuna as naive
from tuna_kernels import (LOSSES, RankingOptions, lipo_lambda_loss, listmle_loss, ordered_pairs, pairwise_accuracy,
                          pairwise_logistic_loss, plackett_luce_loss, rrhf_loss, tuna_margin_loss)


def random_batch(seed, num_groups=7, num_candidates=5, with_ties=True):
    """Scores [G, K] float64; valid [G, K] with ragged groups (1..K candidates, one with a hole);
    target scores with ties; reference scores."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(num_groups, num_candidates, generator=generator, dtype=torch.float64)
    sizes = torch.randint(1, num_candidates + 1, (num_groups,), generator=generator)
    sizes[0], sizes[1] = 1, num_candidates  # a single-candidate group and a full one, always
    valid = torch.arange(num_candidates)[None, :] < sizes[:, None]
    valid[1, 2] = False  # a dropped duplicate in the middle of a group
    target = torch.randint(0, 3, (num_groups, num_candidates), generator=generator).double()
    if not with_ties:
        target = torch.randn(num_groups, num_candidates, generator=generator, dtype=torch.float64)
    target = target.sort(dim=1, descending=True).values  # best first
    ref = torch.randn(num_groups, num_candidates, generator=generator, dtype=torch.float64)
    scores = torch.where(valid, scores, torch.full_like(scores, 1e6))  # garbage where invalid
    return scores, valid, target, ref


def as_lists(*tensors):
    return [t.tolist() for t in tensors]


def close(got, want):
    assert abs(float(got) - want) <= 1e-6 * max(1.0, abs(want)), (float(got), want)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("skip_ties", [False, True])
def test_losses_match_naive(seed, skip_ties):
    scores, valid, target, ref = random_batch(seed)
    s, v, t, r = as_lists(scores, valid, target, ref)

    def options(**values):
        return RankingOptions(skip_ties=skip_ties, **values)

    close(tuna_margin_loss(scores, valid, options(margin=0.1), target_scores=target),
          naive.tuna_margin(s, v, 0.1, t, skip_ties))
    close(tuna_margin_loss(scores, valid, options(margin=0.7), target_scores=target),
          naive.tuna_margin(s, v, 0.7, t, skip_ties))
    close(listmle_loss(scores, valid, options(temperature=1.0), target_scores=target),
          naive.listmle(s, v, 1.0, t, skip_ties))
    close(listmle_loss(scores, valid, options(temperature=0.5), target_scores=target),
          naive.listmle(s, v, 0.5, t, skip_ties))
    close(rrhf_loss(scores, valid, options(), target_scores=target), naive.rrhf(s, v, t, skip_ties))
    close(pairwise_logistic_loss(scores, valid, options(beta=0.1), target_scores=target),
          naive.pairwise_logistic(s, v, 0.1, None, 0.0, t, skip_ties))
    close(pairwise_logistic_loss(scores, valid, options(beta=2.0, gamma=0.5), target_scores=target),
          naive.pairwise_logistic(s, v, 2.0, None, 0.5, t, skip_ties))
    close(pairwise_logistic_loss(scores, valid, options(beta=0.3), target_scores=target, ref_scores=ref),
          naive.pairwise_logistic(s, v, 0.3, r, 0.0, t, skip_ties))
    for beta, reference in ((0.5, None), (1.7, ref)):
        ref_lists = None if reference is None else r
        close(plackett_luce_loss(scores, valid, options(beta=beta), target_scores=target, ref_scores=reference),
              naive.plackett_luce(s, v, beta, ref_lists, t, skip_ties))
        # LiPO's weights keep ties as ties (weight 0) whatever skip_ties says; labels from the ranks without targets
        close(lipo_lambda_loss(scores, valid, options(beta=beta), target_scores=target, ref_scores=reference),
              naive.lipo_lambda(s, v, beta, ref_lists, t))
        close(lipo_lambda_loss(scores, valid, options(beta=beta), ref_scores=reference),
              naive.lipo_lambda(s, v, beta, ref_lists, None))


@pytest.mark.parametrize("seed", range(4))
def test_plackett_luce_with_two_candidates_is_dpo(seed):
    """K = 2: -log sigmoid(beta * [(s_0 - ref_0) - (s_1 - ref_1)]), DPO's sigmoid loss, written out here."""
    generator = torch.Generator().manual_seed(seed)
    scores, ref = (torch.randn(6, 2, generator=generator, dtype=torch.float64) * 3 for _ in range(2))
    valid = torch.ones(6, 2, dtype=torch.bool)
    beta = 0.1 + seed
    margin = beta * ((scores[:, 0] - ref[:, 0]) - (scores[:, 1] - ref[:, 1]))
    dpo = torch.log1p(torch.exp(-margin)).mean()
    got = plackett_luce_loss(scores, valid, RankingOptions(beta=beta), ref_scores=ref)
    assert abs(float(got) - float(dpo)) <= 1e-12 * max(1.0, float(dpo))


def test_lipo_lambda_weights_follow_the_model_ranking_and_carry_no_gradient_through_it():
    """A group the model already orders as the labels still has weights (|1/D| differs by rank), its gradient
    is that of the weighted logistic terms with the weights held fixed (float64 autograd of the naive form)."""
    scores = torch.tensor([[3.0, 1.0, -1.0], [0.0, 2.0, 1.0]], dtype=torch.float64, requires_grad=True)
    valid = torch.ones(2, 3, dtype=torch.bool)
    target = torch.tensor([[2.0, 1.0, 0.0], [2.0, 2.0, 0.0]], dtype=torch.float64)
    loss = lipo_lambda_loss(scores, valid, RankingOptions(beta=1.0), target_scores=target)
    (grad,) = torch.autograd.grad(loss, scores)
    close(loss.detach(), naive.lipo_lambda(scores.tolist(), valid.tolist(), 1.0, None, target.tolist()))
    eps = 1e-6  # central differences: the ranks do not change within eps here, so the weights stay fixed
    for g in range(2):
        for k in range(3):
            bumped = [scores.detach().clone() for _ in range(2)]
            bumped[0][g, k] += eps
            bumped[1][g, k] -= eps
            up, down = (naive.lipo_lambda(b.tolist(), valid.tolist(), 1.0, None, target.tolist()) for b in bumped)
            assert abs(float(grad[g, k]) - (up - down) / (2 * eps)) <= 1e-6


def test_every_registered_loss_has_the_one_signature():
    scores, valid, target, ref = random_batch(0)
    for name, loss in LOSSES.items():
        value = loss(scores, valid, RankingOptions(skip_ties=True), target_scores=target, ref_scores=ref)
        assert value.dim() == 0 and torch.isfinite(value), name


def test_single_candidate_groups_give_zero_ranking_loss():
    scores = torch.randn(3, 1, dtype=torch.float64, requires_grad=True)
    valid = torch.ones(3, 1, dtype=torch.bool)
    for loss in (tuna_margin_loss(scores, valid), listmle_loss(scores, valid), rrhf_loss(scores, valid),
                 pairwise_logistic_loss(scores, valid)):
        assert float(loss.detach()) == 0.0
        loss.backward()  # still part of the graph


def test_dpo_special_case_for_two_candidates():
    """K = 2 with a reference model: -log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))), mean over groups."""
    policy = torch.tensor([[-3.0, -5.0], [-2.0, -1.5]], dtype=torch.float64)
    reference = torch.tensor([[-3.5, -4.0], [-2.0, -2.0]], dtype=torch.float64)
    valid = torch.ones(2, 2, dtype=torch.bool)
    logits = 0.1 * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    expected = -torch.nn.functional.logsigmoid(logits).mean()
    close(pairwise_logistic_loss(policy, valid, RankingOptions(beta=0.1), ref_scores=reference), float(expected))


def test_tuna_margin_is_margin_ranking_loss_summed_over_gaps():
    """Full groups: the reference code's MarginRankingLoss(margin * i) summed over gaps i."""
    scores = torch.randn(5, 4, dtype=torch.float64)
    valid = torch.ones(5, 4, dtype=torch.bool)
    expected = sum(torch.nn.MarginRankingLoss(0.1 * i)(scores[:, :-i], scores[:, i:], torch.ones_like(scores[:, i:]))
                   for i in range(1, 4))
    close(tuna_margin_loss(scores, valid, RankingOptions(margin=0.1)), float(expected))


def test_pairwise_accuracy_and_pairs():
    scores = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 0.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    assert ordered_pairs(valid).sum() == 4
    assert float(pairwise_accuracy(scores, valid)) == pytest.approx(3 / 4)
    tied = torch.tensor([[2.0, 2.0, 1.0], [1.0, 0.0, 0.0]])
    assert float(pairwise_accuracy(scores, valid, tied)) == pytest.approx(2 / 3)  # (0, 1) of group 0 is tied


def test_skip_ties_needs_target_scores():
    with pytest.raises(ValueError, match="target_scores"):
        tuna_margin_loss(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), RankingOptions(skip_ties=True))
