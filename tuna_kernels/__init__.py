"""tuna_kernels: fused lm_head + log-softmax log-likelihoods and listwise ranking losses.

Public names only; see :mod:`tuna_kernels.api` for the math and the dispatch.
"""

from .api import IMPLS, sequence_logprobs, token_logprobs

__all__ = ["IMPLS", "sequence_logprobs", "token_logprobs"]
__version__ = "0.1.0"
