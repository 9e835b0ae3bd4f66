"""tuna_kernels: fused lm_head + log-softmax log-likelihoods and listwise ranking losses.

Public names only; see :mod:`tuna_kernels.api` for the math and the dispatch.
"""

from .api import IMPLS, sequence_logprobs, token_logprobs
from .layout import GroupLayout
from .losses import (
    LOSSES,
    listmle_loss,
    ordered_pairs,
    pairwise_accuracy,
    pairwise_logistic_loss,
    rrhf_loss,
    tuna_margin_loss,
)
from .memory import AllocationTracker
from .module import TunaLoss

__all__ = [
    "IMPLS", "LOSSES", "AllocationTracker", "GroupLayout", "TunaLoss",
    "listmle_loss", "ordered_pairs", "pairwise_accuracy", "pairwise_logistic_loss", "rrhf_loss",
    "sequence_logprobs", "token_logprobs", "tuna_margin_loss",
]
__version__ = "0.1.0"
