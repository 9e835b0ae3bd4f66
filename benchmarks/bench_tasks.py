"""The benchmarked task and its implementations.

Task: per-sequence log-likelihoods of K candidates per group, then the Tuna loss (margin ranking over mean
token log-probs + MLE over all tokens), forward + backward, from ``hidden [N, D]`` and ``weight [V, D]``.
A second task, ``dpo`` (K = 2, summed log-probs, -log sigmoid(beta * (s_chosen - s_rejected)), no
reference model, no MLE), is the part of it Liger-Kernel's fused preference loss can express.

Every implementation returns the scalar loss; peers are optional and report why they are skipped.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from tuna_kernels import GroupLayout, RankingOptions, TunaLoss, pairwise_logistic_loss, tuna_margin_loss

DPO_BETA = 0.1


@dataclass(frozen=True)
class Shape:
    task: str  # "tuna" | "dpo"
    num_tokens: int
    vocab_size: int
    hidden_dim: int
    num_candidates: int
    seq_len: int = 128

    @property
    def label(self) -> str:
        return f"{self.task} N={self.num_tokens} V={self.vocab_size} D={self.hidden_dim} K={self.num_candidates}"

    @property
    def num_groups(self) -> int:
        return self.num_tokens // (self.num_candidates * self.seq_len)


@dataclass
class Problem:
    shape: Shape
    hidden: torch.Tensor  # [N, D]
    weight: torch.Tensor  # [V, D]
    labels: torch.Tensor  # [N]
    layout: GroupLayout


def make_problem(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Problem:
    """Candidates of equal length (seq_len tokens), sequences numbered group after group, best first."""
    generator = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(shape.num_tokens, shape.hidden_dim, generator=generator) * 0.5).to(device, dtype)
    weight = (torch.randn(shape.vocab_size, shape.hidden_dim, generator=generator)
              / shape.hidden_dim ** 0.5).to(device, dtype)
    labels = torch.randint(0, shape.vocab_size, (shape.num_tokens,), generator=generator).to(device)
    seq_index = (torch.arange(shape.num_tokens) // shape.seq_len).to(device)
    layout = GroupLayout.from_group_sizes(seq_index, [shape.num_candidates] * shape.num_groups)
    return Problem(shape, hidden, weight, labels, layout)


def _loss_from_sums(problem: Problem, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    layout = problem.layout
    if problem.shape.task == "dpo":
        return pairwise_logistic_loss(layout.to_matrix(sums), layout.valid(), RankingOptions(beta=DPO_BETA))
    scores = layout.to_matrix(sums / counts)
    return tuna_margin_loss(scores, layout.valid(), RankingOptions(margin=0.1)) - sums.sum() / counts.sum()


def naive(problem: Problem, hidden, weight) -> torch.Tensor:
    """As Hugging Face code does it: materialised logits, upcast to fp32, log_softmax, gather."""
    logits = (hidden @ weight.T).float()
    token_lp = torch.log_softmax(logits, dim=-1).gather(1, problem.labels[:, None]).squeeze(1)
    num_seqs = problem.layout.num_seqs
    sums = token_lp.new_zeros(num_seqs).index_add(0, problem.layout.seq_index, token_lp)
    counts = torch.bincount(problem.layout.seq_index, minlength=num_seqs)
    return _loss_from_sums(problem, sums, counts)


def _tuna(impl: str) -> Callable:
    def run(problem: Problem, hidden, weight) -> torch.Tensor:
        if problem.shape.task == "dpo":
            module = TunaLoss(loss="pairwise_logistic", alpha=0.0, mle_weight=0.0, beta=DPO_BETA, impl=impl)
        else:
            module = TunaLoss(loss="tuna_margin", margin=0.1, alpha=1.0, mle_weight=1.0, impl=impl)
        return module(hidden, weight, problem.labels, problem.layout)[0]
    return run


def cut_cross_entropy(problem: Problem, hidden, weight) -> torch.Tensor:
    """Cut Cross-Entropy's per-token loss (its Triton kernel on CUDA, torch.compile on CPU) feeding our loss."""
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if hidden.is_cuda else "torch_compile"
    token_lp = -linear_cross_entropy(hidden, weight, problem.labels, impl=impl, reduction="none").float()
    num_seqs = problem.layout.num_seqs
    sums = token_lp.new_zeros(num_seqs).index_add(0, problem.layout.seq_index, token_lp)
    counts = torch.bincount(problem.layout.seq_index, minlength=num_seqs)
    return _loss_from_sums(problem, sums, counts)


def liger_dpo(problem: Problem, hidden, weight) -> torch.Tensor:
    """Liger-Kernel's chunked fused-linear DPO loss (no reference model): chosen rows, then rejected rows."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    shape = problem.shape
    groups, length = shape.num_groups, shape.seq_len
    pairs = hidden.view(groups, 2, length, shape.hidden_dim)
    inputs = torch.cat([pairs[:, 0], pairs[:, 1]])  # [2B, T, D]
    targets = problem.labels.view(groups, 2, length)
    targets = torch.cat([targets[:, 0], targets[:, 1]])
    loss_fn = LigerFusedLinearDPOLoss(beta=DPO_BETA, use_ref_model=False, compiled=hidden.is_cuda)
    return loss_fn(weight, inputs, targets)[0]


@dataclass
class Implementation:
    name: str
    run: Callable
    tasks: tuple
    requires: Optional[str] = None  # the module a peer needs
    cuda_only: bool = False

    def skip_reason(self, shape: Shape, device: torch.device) -> Optional[str]:
        if shape.task not in self.tasks:
            return f"{self.name} cannot express the '{shape.task}' task (it handles: {', '.join(self.tasks)})"
        if self.cuda_only and device.type != "cuda":
            return f"{self.name} runs on CUDA only (no GPU here; its kernels are covered by the static report)"
        if self.requires and importlib.util.find_spec(self.requires) is None:
            return f"{self.name} is not installed (pip install --no-deps {self.requires.replace('_', '-')})"
        return None


IMPLEMENTATIONS: Dict[str, Implementation] = {
    impl.name: impl for impl in [
        Implementation("naive", naive, ("tuna", "dpo")),
        Implementation("tuna-chunked", _tuna("chunked"), ("tuna", "dpo")),
        Implementation("tuna-triton", _tuna("triton"), ("tuna", "dpo"), cuda_only=True),
        Implementation("cut-cross-entropy", cut_cross_entropy, ("tuna", "dpo"), requires="cut_cross_entropy"),
        Implementation("liger-dpo", liger_dpo, ("dpo",), requires="liger_kernel"),
    ]
}
