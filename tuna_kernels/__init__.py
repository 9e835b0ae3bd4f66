"""tuna_kernels: fused lm_head + log-softmax log-likelihoods and listwise ranking losses.

Public names only; see :mod:`tuna_kernels.api` for the math and the dispatch. Developer tools (the static
compile report, the allocation tracker of the memory tests) live in :mod:`tuna_kernels.devtools`.
"""

from .api import IMPLS, linear_cross_entropy, sequence_logprobs, token_logprobs
from .layout import GroupLayout
from .losses import (
    LOSSES,
    REFERENCE_LOSSES,
    RankingOptions,
    lipo_lambda_loss,
    listmle_loss,
    ordered_pairs,
    pairwise_logistic_loss,
    plackett_luce_loss,
    register_loss,
    rrhf_loss,
    tuna_margin_loss,
)
from .metrics import pairwise_accuracy, ranking_counts, ranking_summary
from .module import MLE_ON, TunaLoss, length_normalised

__all__ = [
    "IMPLS", "LOSSES", "MLE_ON", "REFERENCE_LOSSES", "GroupLayout", "RankingOptions", "TunaLoss",
    "length_normalised", "linear_cross_entropy", "lipo_lambda_loss", "listmle_loss", "ordered_pairs", "pairwise_accuracy",
    "pairwise_logistic_loss", "plackett_luce_loss", "ranking_counts", "ranking_summary", "register_loss", "rrhf_loss", "sequence_logprobs", "token_logprobs",
    "tuna_margin_loss",
]
__version__ = "0.1.0"
