"""GroupLayout: which sequence of a flat token stream is which candidate (rank) of which group.

A batch holds G groups (one per instruction); group g has k_g candidates (1 <= k_g <= K), ranked best
first (rank 0 = best). The S = sum_g k_g sequences are spread over a flat stream of N token positions:
``seq_index[t]`` names the sequence of position t. Scores live in a [G, K] matrix, best first, with a
[G, K] validity mask for groups of fewer than K candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class GroupLayout:
    """Layout of ranked candidates in a flat token stream.

    Attributes:
        seq_index: [N] int, the sequence of each token position (any value where the label is ignored).
        seq_group: [S] int, the group of each sequence, in [0, num_groups).
        seq_rank: [S] int, the rank of each sequence inside its group, in [0, num_candidates); 0 = best.
        num_groups: G.
        num_candidates: K, the largest number of candidates of a group (the width of score matrices).
        target_scores: optional [G, K] float, the ranking's own scores (teacher log-likelihoods, judge
            scores), higher is better; used to find ties. Entries of invalid positions are ignored.
        lengths: optional [S] int, the number of target tokens each sequence should have; when given,
            the tokens found in ``labels`` must agree.
    """

    seq_index: torch.Tensor
    seq_group: torch.Tensor
    seq_rank: torch.Tensor
    num_groups: int
    num_candidates: int
    target_scores: Optional[torch.Tensor] = None
    lengths: Optional[torch.Tensor] = None

    @classmethod
    def from_group_sizes(
        cls,
        seq_index: torch.Tensor,
        group_sizes: Sequence[int],
        num_candidates: Optional[int] = None,
        target_scores: Optional[torch.Tensor] = None,
        lengths: Optional[torch.Tensor] = None,
    ) -> "GroupLayout":
        """Sequences numbered group after group, best first: group g holds ``group_sizes[g]`` of them."""
        sizes = [int(size) for size in group_sizes]
        if any(size < 1 for size in sizes):
            raise ValueError(f"group_sizes must all be >= 1 (a group with no valid candidate), got {sizes}")
        device = seq_index.device
        seq_group = torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                            torch.tensor(sizes, device=device))
        seq_rank = torch.cat([torch.arange(size, device=device) for size in sizes]) if sizes else seq_group
        return cls(seq_index, seq_group, seq_rank, len(sizes), num_candidates or max(sizes, default=1),
                   target_scores, lengths)

    @property
    def num_seqs(self) -> int:
        return int(self.seq_group.shape[0])

    def valid(self) -> torch.Tensor:
        """[G, K] bool: True where a candidate exists."""
        mask = torch.zeros(self.num_groups, self.num_candidates, dtype=torch.bool, device=self.seq_group.device)
        mask[self.seq_group, self.seq_rank] = True
        return mask

    def to_matrix(self, per_seq: torch.Tensor) -> torch.Tensor:
        """[S] per-sequence values -> [G, K] matrix (zeros where invalid); differentiable."""
        flat = self.seq_group * self.num_candidates + self.seq_rank
        matrix = per_seq.new_zeros(self.num_groups * self.num_candidates)
        return matrix.index_put((flat,), per_seq).view(self.num_groups, self.num_candidates)

    def validate(self, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Check the layout against the labels; return [S] int64 target-token counts per sequence.

        Raises ValueError, naming what is wrong, for: shapes that disagree, a group or rank outside its
        range, two sequences at the same (group, rank), a group with no valid candidate, a sequence with
        no target token, counts that disagree with ``lengths``, non-finite ``target_scores``.
        """
        for name in ("seq_index", "seq_group", "seq_rank"):
            tensor = getattr(self, name)
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1 or tensor.is_floating_point():
                raise ValueError(f"GroupLayout.{name} must be a 1-D integer tensor")
        if self.seq_index.shape[0] != labels.shape[0]:
            raise ValueError(f"GroupLayout.seq_index has {self.seq_index.shape[0]} entries, labels {labels.shape[0]}")
        if self.seq_rank.shape != self.seq_group.shape:
            raise ValueError(f"GroupLayout.seq_rank has {self.seq_rank.shape[0]} entries, "
                             f"seq_group {self.seq_group.shape[0]}")
        if self.num_groups < 1 or self.num_candidates < 1:
            raise ValueError(f"GroupLayout needs num_groups >= 1 and num_candidates >= 1, "
                             f"got {self.num_groups} and {self.num_candidates}")
        self._check_range("seq_group", self.seq_group, self.num_groups)
        self._check_range("seq_rank", self.seq_rank, self.num_candidates)
        flat = self.seq_group * self.num_candidates + self.seq_rank
        per_slot = torch.bincount(flat, minlength=self.num_groups * self.num_candidates)
        if bool((per_slot > 1).any()):
            slot = int((per_slot > 1).nonzero()[0, 0])
            raise ValueError(f"GroupLayout: two sequences are rank {slot % self.num_candidates} "
                             f"of group {slot // self.num_candidates}")
        empty_groups = (per_slot.view(self.num_groups, self.num_candidates).sum(1) == 0).nonzero()
        if empty_groups.numel():
            raise ValueError(f"GroupLayout: group {int(empty_groups[0, 0])} has no valid candidate")
        is_target = labels != ignore_index
        targets_seq = self.seq_index[is_target]
        self._check_range("seq_index (at target positions)", targets_seq, self.num_seqs)
        counts = torch.bincount(targets_seq.long(), minlength=self.num_seqs)
        if bool((counts == 0).any()):
            seq = int((counts == 0).nonzero()[0, 0])
            raise ValueError(f"GroupLayout: sequence {seq} (group {int(self.seq_group[seq])}, rank "
                             f"{int(self.seq_rank[seq])}) has no target token in labels")
        if self.lengths is not None:
            if self.lengths.shape != counts.shape:
                raise ValueError(f"GroupLayout.lengths must be [S] = [{self.num_seqs}]")
            disagree = (self.lengths.to(counts.device) != counts).nonzero()
            if disagree.numel():
                seq = int(disagree[0, 0])
                raise ValueError(f"GroupLayout: sequence {seq} should have {int(self.lengths[seq])} target tokens "
                                 f"but labels give it {int(counts[seq])}")
        if self.target_scores is not None:
            if self.target_scores.shape != (self.num_groups, self.num_candidates):
                raise ValueError(f"GroupLayout.target_scores must be [G, K] = "
                                 f"[{self.num_groups}, {self.num_candidates}], got {tuple(self.target_scores.shape)}")
            bad = ~torch.isfinite(self.target_scores) & self.valid()
            if bool(bad.any()):
                group, rank = (int(i) for i in bad.nonzero()[0])
                raise ValueError(f"GroupLayout.target_scores[{group}, {rank}] is not finite "
                                 f"({float(self.target_scores[group, rank])})")
        return counts

    @staticmethod
    def _check_range(name: str, values: torch.Tensor, upper: int) -> None:
        bad = (values < 0) | (values >= upper)
        if bool(bad.any()):
            index = int(bad.nonzero()[0, 0])
            raise ValueError(f"GroupLayout.{name}[{index}] = {int(values[index])} is outside [0, {upper})")
