"""Listwise ranking losses on a [G, K] score matrix, candidates ordered best first, and their registry.

Every loss has one signature, ``loss(scores, valid, options, *, target_scores=None, ref_scores=None)``:
``scores: [G, K]`` (model scores, e.g. length-normalised log-likelihoods; any value where invalid),
``valid: [G, K]`` bool (which candidates exist), ``options`` a :class:`RankingOptions` (each loss reads the
fields it needs), and returns a scalar. Adding a loss is one such function under ``@register_loss("name")``:
:class:`tuna_kernels.TunaLoss`, ``tuna train --loss`` and the config's choices read :data:`LOSSES`. A pair (j, l) with
j < l means "candidate j is ranked above candidate l". Groups may have 1 to K candidates; pairs with a
missing candidate do not exist, and a batch with no pair gives a ranking loss of 0 (still differentiable).

Ties: with ``skip_ties=True`` and the ranking's own scores in ``target_scores`` ([G, K], higher is
better), pairs whose target scores are equal are dropped. The default (False) keeps them, as the Tuna
reference code does: it sorts and applies the hinge regardless of ties.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Set

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RankingOptions:
    """The hyper-parameters of the ranking losses, travelling as one object; each loss reads its own.

    margin: ``tuna_margin``'s margin per rank gap; temperature: ``listmle``'s; beta, gamma:
    ``pairwise_logistic``'s scale and target margin; skip_ties: drop pairs tied in ``target_scores``.
    """

    margin: float = 0.1
    temperature: float = 1.0
    beta: float = 0.1
    gamma: float = 0.0
    skip_ties: bool = False

    def __post_init__(self) -> None:
        if self.margin < 0 or not self.temperature > 0:
            raise ValueError(f"margin must be >= 0 and temperature > 0, got {self.margin}, {self.temperature}")


RankingLoss = Callable[..., torch.Tensor]
#: name -> ranking loss, filled by :func:`register_loss` (insertion order = the order choices are listed in)
LOSSES: Dict[str, RankingLoss] = {}
#: the names in LOSSES whose loss reads ``ref_scores`` (a reference model's scores)
REFERENCE_LOSSES: Set[str] = set()


def register_loss(name: str, *, uses_reference: bool = False) -> Callable[[RankingLoss], RankingLoss]:
    """Decorator: make ``fn`` selectable as ``TunaLoss(loss=name)`` and ``tuna train --loss name``;
    ``uses_reference``: it reads ``ref_scores`` (so ``--reference`` may be set with it)."""
    def register(fn: RankingLoss) -> RankingLoss:
        previous = LOSSES.get(name)
        redefined = previous is not None and (previous.__module__, previous.__qualname__) == (fn.__module__,
                                                                                              fn.__qualname__)
        if previous is not None and previous is not fn and not redefined:  # a re-run cell may redefine its own
            raise ValueError(f"a ranking loss named {name!r} is registered already ({LOSSES[name].__name__})")
        LOSSES[name] = fn
        if uses_reference:
            REFERENCE_LOSSES.add(name)
        else:
            REFERENCE_LOSSES.discard(name)
        return fn
    return register


DEFAULT_OPTIONS = RankingOptions()


def ordered_pairs(valid: torch.Tensor, target_scores: Optional[torch.Tensor] = None,
                  skip_ties: bool = False) -> torch.Tensor:
    """[G, K, K] bool: pairs[g, j, l] is True when j < l, both exist and (skip_ties) are not tied."""
    if skip_ties and target_scores is None:
        raise ValueError("skip_ties=True needs target_scores (the ranking's own scores) to find ties")
    num_candidates = valid.shape[1]
    positions = torch.arange(num_candidates, device=valid.device)
    pairs = (positions[:, None] < positions[None, :]) & valid[:, :, None] & valid[:, None, :]
    if skip_ties:
        pairs = pairs & (target_scores[:, :, None] != target_scores[:, None, :])
    return pairs


def _check(scores: torch.Tensor, valid: torch.Tensor) -> None:
    if scores.dim() != 2 or valid.shape != scores.shape or valid.dtype != torch.bool:
        raise ValueError(f"scores must be [G, K] and valid a bool [G, K], got {tuple(scores.shape)} "
                         f"and {tuple(valid.shape)} {valid.dtype}")


@register_loss("tuna_margin")
def tuna_margin_loss(scores: torch.Tensor, valid: torch.Tensor, options: RankingOptions = DEFAULT_OPTIONS, *,
                     target_scores: Optional[torch.Tensor] = None,
                     ref_scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tuna / BRIO margin ranking loss (Li et al. 2023, Tuna, eq. 2; Liu et al. 2022, BRIO).

        L = sum_{i=1}^{K-1}  mean_{(g, j): j + i < K, pair exists}  max(0, s[g, j+i] - s[g, j] + margin * i)

    For every rank gap i, the hinge is averaged over the pairs i apart that exist in the batch, then the
    gaps are summed: ``MarginRankingLoss(margin * i, reduction="mean")`` summed over i, as in the
    reference code. A gap with no pair adds 0. Reads ``options.margin`` (m) and ``options.skip_ties``.
    """
    _check(scores, valid)
    margin = options.margin
    pairs = ordered_pairs(valid, target_scores, options.skip_ties)
    num_candidates = scores.shape[1]
    positions = torch.arange(num_candidates, device=scores.device)
    gap = positions[None, :] - positions[:, None]  # [K, K]: l - j
    worse_minus_better = scores[:, None, :] - scores[:, :, None]  # [G, j, l] = s_l - s_j
    hinge = torch.where(pairs, F.relu(worse_minus_better + margin * gap.to(scores.dtype)),
                        torch.zeros_like(worse_minus_better))
    gap_index = gap.clamp(min=0).expand_as(hinge)
    hinge_per_gap = scores.new_zeros(num_candidates).index_add(0, gap_index[pairs], hinge[pairs])
    pairs_per_gap = torch.bincount(gap_index[pairs], minlength=num_candidates)
    return (hinge_per_gap / pairs_per_gap.clamp(min=1)).sum()


@register_loss("listmle")
def listmle_loss(scores: torch.Tensor, valid: torch.Tensor, options: RankingOptions = DEFAULT_OPTIONS, *,
                 target_scores: Optional[torch.Tensor] = None,
                 ref_scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ListMLE: negative Plackett-Luce log-likelihood of the given order (Xia et al., ICML 2008).

        L_g = - sum_{j valid} [ s_j / T - logsumexp_{l >= j, l valid} s_l / T ],   L = mean over groups with >= 2

    With ``skip_ties``, a candidate tied with j (and placed after it) is left out of j's denominator,
    so only strict preferences are learned. Groups with a single candidate have no order to learn.
    Reads ``options.temperature`` (T) and ``options.skip_ties``.
    """
    _check(scores, valid)
    return _plackett_luce_nll(scores / options.temperature, valid, target_scores, options.skip_ties)


def _plackett_luce_nll(utilities: torch.Tensor, valid: torch.Tensor, target_scores: Optional[torch.Tensor],
                       skip_ties: bool) -> torch.Tensor:
    """Mean over groups with >= 2 candidates of the negative Plackett-Luce log-likelihood of the given order:
    ``-sum_j [u_j - logsumexp_{l >= j} u_l]``, from utilities: [G, K]; with ``skip_ties``, a candidate tied with
    j (placed after it) is left out of j's denominator."""
    num_candidates = utilities.shape[1]
    positions = torch.arange(num_candidates, device=utilities.device)
    competes = (positions[None, :] >= positions[:, None]) & valid[:, None, :] & valid[:, :, None]
    if skip_ties:
        if target_scores is None:
            raise ValueError("skip_ties=True needs target_scores (the ranking's own scores) to find ties")
        pairs = ordered_pairs(valid, target_scores, skip_ties=False)
        tied = pairs & (target_scores[:, :, None] == target_scores[:, None, :])
        competes = competes & ~tied
    log_denominator = torch.logsumexp(
        torch.where(competes, utilities[:, None, :],
                    torch.full_like(competes, float("-inf"), dtype=utilities.dtype)), dim=2)
    terms = torch.where(valid, utilities - torch.where(valid, log_denominator, torch.zeros_like(utilities)),
                        torch.zeros_like(utilities))
    has_order = valid.sum(dim=1) >= 2
    per_group = -terms.sum(dim=1)
    return torch.where(has_order, per_group, torch.zeros_like(per_group)).sum() / has_order.sum().clamp(min=1)


def implicit_rewards(scores: torch.Tensor, ref_scores: Optional[torch.Tensor], beta: float) -> torch.Tensor:
    """[G, K] ``r = beta * (s - s_ref)`` (DPO's implicit reward; ``beta * s`` without a reference)."""
    return beta * (scores if ref_scores is None else scores - ref_scores.to(scores.dtype))


@register_loss("rrhf")
def rrhf_loss(scores: torch.Tensor, valid: torch.Tensor, options: RankingOptions = DEFAULT_OPTIONS, *,
              target_scores: Optional[torch.Tensor] = None, ref_scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RRHF ranking loss (Yuan et al. 2023, RRHF, eq. 2): a hinge without margin over all ordered pairs.

        L_g = sum_{j < l, pair exists} max(0, s_l - s_j),   L = mean over groups with at least one pair

    RRHF itself only uses pairs with strictly different rewards: pass ``skip_ties=True`` with the
    rewards as ``target_scores`` to match it exactly.
    """
    _check(scores, valid)
    pairs = ordered_pairs(valid, target_scores, options.skip_ties)
    worse_minus_better = scores[:, None, :] - scores[:, :, None]
    hinge = torch.where(pairs, F.relu(worse_minus_better), torch.zeros_like(worse_minus_better))
    has_pair = pairs.flatten(1).any(dim=1)
    return hinge.sum(dim=(1, 2)).sum() / has_pair.sum().clamp(min=1)


@register_loss("pairwise_logistic", uses_reference=True)
def pairwise_logistic_loss(scores: torch.Tensor, valid: torch.Tensor, options: RankingOptions = DEFAULT_OPTIONS, *,
                           target_scores: Optional[torch.Tensor] = None,
                           ref_scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bradley-Terry logistic loss over all ordered pairs, averaged over the pairs of the batch.

        L = mean_{j < l} -log sigmoid( beta * [(s_j - ref_j) - (s_l - ref_l)] - gamma )

    With ``ref_scores`` (a frozen reference model's sequence log-likelihoods, [G, K]) and K = 2 this is
    DPO (Rafailov et al. 2023; use summed log-likelihoods, alpha = 0). Without a reference and with
    length-normalised scores (alpha = 1) and a target margin ``gamma`` it is SimPO (Meng et al. 2024).
    For K > 2 every ordered pair counts once. Reads ``options.beta``, ``options.gamma`` and ``skip_ties``.
    """
    _check(scores, valid)
    beta, gamma = options.beta, options.gamma
    pairs = ordered_pairs(valid, target_scores, options.skip_ties)
    margins = scores if ref_scores is None else scores - ref_scores
    better_minus_worse = margins[:, :, None] - margins[:, None, :]  # [G, j, l] = m_j - m_l
    losses = -F.logsigmoid(beta * better_minus_worse - gamma)
    losses = torch.where(pairs, losses, torch.zeros_like(losses))
    return losses.sum() / pairs.sum().clamp(min=1)


@register_loss("plackett_luce", uses_reference=True)
def plackett_luce_loss(scores: torch.Tensor, valid: torch.Tensor, options: RankingOptions = DEFAULT_OPTIONS, *,
                       target_scores: Optional[torch.Tensor] = None,
                       ref_scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DPO under the Plackett-Luce model of the whole ranking (Rafailov et al. 2023, DPO, appendix A.3).

        r_k = beta * (s_k - ref_k)
        L_g = - sum_k log( exp(r_k) / sum_{j >= k, j valid} exp(r_j) ),   L = mean over groups with >= 2

    With K = 2 this is DPO's sigmoid loss ``-log sigmoid(r_0 - r_1)`` exactly; without ``ref_scores`` it is
    ListMLE at temperature 1 / beta. Ties as in ``listmle`` (``skip_ties``). Reads ``options.beta``.
    """
    _check(scores, valid)
    return _plackett_luce_nll(implicit_rewards(scores, ref_scores, options.beta), valid, target_scores,
                              options.skip_ties)


def _rank_discounts(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[G, K] ``1 / log2(1 + rank)``, rank (from 1) of each valid candidate among its group's valid ones when
    sorted by ``rewards`` descending (ties by position); 0 where invalid. No gradient flows through the sort."""
    rewards = rewards.detach()
    num_candidates = rewards.shape[1]
    positions = torch.arange(num_candidates, device=rewards.device)
    # ahead[g, k, j]: candidate j sorts before candidate k
    ahead = (rewards[:, None, :] > rewards[:, :, None]) | (
        (rewards[:, None, :] == rewards[:, :, None]) & (positions[None, :] < positions[:, None]))
    rank = 1 + (ahead & valid[:, None, :]).sum(dim=2)
    return torch.where(valid, 1.0 / torch.log2(1.0 + rank.to(rewards.dtype)), torch.zeros_like(rewards))


@register_loss("lipo_lambda", uses_reference=True)
def lipo_lambda_loss(scores: torch.Tensor, valid: torch.Tensor, options: RankingOptions = DEFAULT_OPTIONS, *,
                     target_scores: Optional[torch.Tensor] = None,
                     ref_scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LiPO-lambda (Liu et al. 2024, LiPO, eq. 8; the LambdaLoss weights of Wang et al. 2018).

        r_k = beta * (s_k - ref_k)
        w_jl = |G_j - G_l| * |1 / D(tau_j) - 1 / D(tau_l)|,   G = 2 ** psi - 1,   D(tau) = log2(1 + tau)
        L_g = sum_{j < l, pair exists} w_jl * -log sigmoid(r_j - r_l),   L = mean over groups with a pair

    psi are the labels: ``target_scores`` (the ranking's own scores) when given, else the ranks themselves
    (``n - 1 - position`` for a group of n candidates, best highest); tau_k is the rank of candidate k when its
    group is sorted by the model's current rewards (no gradient through it). Pairs with equal labels weigh 0,
    so ties are kept as ties whatever ``skip_ties`` says. Reads ``options.beta``.
    """
    _check(scores, valid)
    rewards = implicit_rewards(scores, ref_scores, options.beta)
    pairs = ordered_pairs(valid)
    if target_scores is None:
        # n - 1 - (index among the group's valid candidates)
        labels = (valid.sum(dim=1, keepdim=True) - valid.long().cumsum(dim=1)).to(scores.dtype)
    else:
        labels = target_scores.to(scores.dtype)
    gains = torch.where(valid, torch.exp2(labels) - 1.0, torch.zeros_like(labels))
    discounts = _rank_discounts(rewards, valid)
    weights = (gains[:, :, None] - gains[:, None, :]).abs() * (discounts[:, :, None] - discounts[:, None, :]).abs()
    losses = -F.logsigmoid(rewards[:, :, None] - rewards[:, None, :])  # [G, j, l]: j above l
    per_pair = torch.where(pairs, weights * losses, torch.zeros_like(losses))
    has_pair = pairs.flatten(1).any(dim=1)
    return per_pair.sum(dim=(1, 2)).sum() / has_pair.sum().clamp(min=1)
