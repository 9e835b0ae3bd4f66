"""TunaLoss: the whole Tuna objective from hidden states, fused, with no [N, V] tensor.

    scores[g, k] = sum_t log p(y_t) / T_k ** alpha            (one fused pass: sequence_logprobs)
    loss         = ranking_loss(scores, valid) + mle_weight * MLE

MLE is the token-level cross-entropy averaged over the target tokens of all candidates (``mle_on="all"``,
the reference code's choice) or of the best candidate of each group only (``mle_on="best"``: the lowest
rank present in the group, which is rank 0 unless the layout lacks it). It reuses
the sums and counts of the same fused pass: no second computation of log-probabilities.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .api import IMPLS, sequence_logprobs
from .layout import GroupLayout
from .losses import LOSSES, RankingOptions
from .metrics import ranking_counts, ranking_summary


#: what the MLE term covers: every candidate's tokens, or the best candidate's
MLE_ON = ("all", "best")


def length_normalised(sums, counts, alpha: float):
    """The score of a sequence: ``sums / max(counts, 1) ** alpha`` (alpha 1: the mean token log-prob, 0: the
    sum). ``sums``, ``counts``: [S] tensors, or one Python number each (scoring and evaluation records). The one
    definition training, ``tuna score`` and ``tuna eval`` use; a sequence without targets scores its sum (0)."""
    if isinstance(counts, torch.Tensor):
        return sums / counts.to(sums.dtype).clamp(min=1) ** alpha
    return sums / max(counts, 1) ** alpha


class TunaLoss(nn.Module):
    """Fused listwise ranking loss + MLE over groups of ranked candidates.

    Args:
        loss: a name in :data:`tuna_kernels.LOSSES`: ``tuna_margin`` (default, the paper's), ``listmle``,
            ``rrhf``, ``pairwise_logistic``, or one added with :func:`tuna_kernels.register_loss`.
        margin: the Tuna margin m (per rank gap i the hinge margin is m * i).
        alpha: length normalisation: scores are sums / counts ** alpha (1 = mean token log-prob, 0 = sum).
        mle_weight: lambda, the weight of the MLE term.
        mle_on: ``"all"`` (every candidate's tokens, the reference code) or ``"best"`` (the best candidate
            present in each group: rank 0, or the lowest rank a group has when its rank 0 is missing).
        skip_ties: drop pairs tied in ``layout.target_scores`` (default False, as the reference code).
        beta, gamma: of ``pairwise_logistic``; temperature: of ``listmle``. margin, temperature, beta, gamma
            and skip_ties travel to the loss as one :class:`tuna_kernels.RankingOptions` (``self.options``).
        impl: passed to :func:`tuna_kernels.sequence_logprobs`; ignore_index: of the labels.
        **logprob_options: other options of :func:`tuna_kernels.token_logprobs` (chunk sizes,
            ``deterministic``, ``grad_filter_eps``).
    """

    def __init__(self, loss: str = "tuna_margin", margin: float = 0.1, alpha: float = 1.0,
                 mle_weight: float = 1.0, mle_on: str = "all", skip_ties: bool = False,
                 beta: float = 0.1, gamma: float = 0.0, temperature: float = 1.0,
                 impl: str = "auto", ignore_index: int = -100, **logprob_options) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {loss!r}")
        if mle_on not in MLE_ON:
            raise ValueError(f"mle_on must be one of {MLE_ON}, got {mle_on!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if alpha < 0 or mle_weight < 0:
            raise ValueError(f"alpha and mle_weight must be >= 0, got {alpha}, {mle_weight}")
        self.options = RankingOptions(margin=margin, temperature=temperature, beta=beta, gamma=gamma,
                                      skip_ties=skip_ties)
        self.loss, self.alpha, self.mle_weight, self.mle_on = loss, alpha, mle_weight, mle_on
        self.impl, self.ignore_index, self.logprob_options = impl, ignore_index, logprob_options

    def extra_repr(self) -> str:
        return (f"loss={self.loss!r}, alpha={self.alpha}, mle_weight={self.mle_weight}, mle_on={self.mle_on!r}, "
                f"impl={self.impl!r}, {self.options}")

    def ranking_loss(self, scores: torch.Tensor, valid: torch.Tensor,
                     target_scores: Optional[torch.Tensor] = None,
                     ref_scores: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The configured ranking loss on a [G, K] score matrix."""
        return LOSSES[self.loss](scores, valid, self.options, target_scores=target_scores, ref_scores=ref_scores)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, layout: GroupLayout, *,
                bias: Optional[torch.Tensor] = None, logit_scale: float = 1.0, softcap: Optional[float] = None,
                ref_scores: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Loss and detached metrics for one batch.

        Args:
            hidden: [N, D] hidden states of the positions that predict ``labels`` (prompt and padding
                positions may be dropped beforehand, or kept with ignore_index labels).
            weight: [V, D] lm_head weight; labels: [N]; layout: the :class:`GroupLayout` of the batch.
            bias, logit_scale, softcap: the lm_head's, as in :func:`tuna_kernels.token_logprobs`.
            ref_scores: [G, K] reference-model scores, as :meth:`sequence_scores` gives them (``plackett_luce``,
                ``lipo_lambda``, ``pairwise_logistic`` as DPO), no gradient needed.

        Returns:
            (loss, metrics) with metrics: ``rank_loss``, ``mle_loss``, ``pair_accuracy`` (fraction of
            ordered pairs the model orders as the ranking does), ``score_per_rank`` ([K] mean score of
            each rank), ``score_gap`` (mean best-minus-worst score of the groups), ``num_pairs`` (the ordered
            pairs ``pair_accuracy`` counts, as :func:`tuna_kernels.ranking_counts` defines them: ties left out).
        """
        counts = layout.validate(labels, self.ignore_index)  # raises before any kernel runs
        sums, _ = sequence_logprobs(hidden, weight, labels, layout.seq_index, layout.num_seqs, bias=bias,
                                    logit_scale=logit_scale, softcap=softcap, ignore_index=self.ignore_index,
                                    impl=self.impl, **self.logprob_options)
        scores = layout.to_matrix(self.sequence_scores(sums, counts))
        valid = layout.valid()
        rank_loss = self.ranking_loss(scores, valid, layout.target_scores, ref_scores)
        if self.mle_on == "all":
            mle_loss = -sums.sum() / counts.sum()
        else:
            best = self.best_sequences(layout)
            mle_loss = -sums[best].sum() / counts[best].sum()
        loss = rank_loss + self.mle_weight * mle_loss
        return loss, self._metrics(scores.detach(), valid, layout, rank_loss, mle_loss)

    def sequence_scores(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """[S] :func:`length_normalised` scores of the sequences' log-likelihood sums [S] and target counts [S]."""
        return length_normalised(sums, counts, self.alpha)

    @staticmethod
    def best_sequences(layout: GroupLayout) -> torch.Tensor:
        """[S] bool: the best candidate present in each group (the lowest rank it has; rank 0 unless the
        group lost its best candidate, e.g. to truncation). Every group has one, and every sequence has a
        target token (``layout.validate``), so ``mle_on="best"`` never divides by zero."""
        lowest = torch.full((layout.num_groups,), layout.num_candidates, dtype=layout.seq_rank.dtype,
                            device=layout.seq_rank.device)
        lowest = lowest.scatter_reduce(0, layout.seq_group.long(), layout.seq_rank, reduce="amin")
        return layout.seq_rank == lowest[layout.seq_group.long()]

    @staticmethod
    def _metrics(scores, valid, layout, rank_loss, mle_loss) -> Dict[str, torch.Tensor]:
        per_rank_count = valid.sum(dim=0)
        score_per_rank = torch.where(valid, scores, torch.zeros_like(scores)).sum(0) / per_rank_count.clamp(min=1)
        counts = ranking_counts(scores, valid, layout.target_scores)
        return {
            "rank_loss": rank_loss.detach(),
            "mle_loss": mle_loss.detach(),
            **ranking_summary(counts),
            "score_per_rank": score_per_rank,
            "num_pairs": counts["pairs"],  # the pairs pair_accuracy counts: tied in the ranking, not counted
        }
