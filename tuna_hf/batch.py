"""The packed batch of ranked groups that :class:`tuna_hf.FusedCausalLM` runs: model inputs, the target stream
and its group layout. ``tuna_train.collate`` builds it from records; it lives here, beside the model code that
reads it, so that tuna_hf needs nothing from tuna_train."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from tuna_kernels import GroupLayout


@dataclass
class PackedBatch:
    """Model inputs and the target stream of a batch of groups.

    input_ids, position_ids: [R, L]; attention_mask: [R, L] (per_candidate) or [R, 1, L, L] bool (shared);
    target_positions: [N] flat indices into the [R * L] hidden states; labels: [N] target ids;
    layout: the GroupLayout over the N targets (its ``target_scores`` are the ranking's scores);
    ref_scores: [G, K] float64, the records' reference scores when every group has them, else None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    target_positions: torch.Tensor
    labels: torch.Tensor
    layout: GroupLayout
    stats: Dict[str, int] = field(default_factory=dict)
    ref_scores: Optional[torch.Tensor] = None

    def to(self, device) -> "PackedBatch":
        layout = self.layout
        moved = GroupLayout(layout.seq_index.to(device), layout.seq_group.to(device), layout.seq_rank.to(device),
                            layout.num_groups, layout.num_candidates,
                            None if layout.target_scores is None else layout.target_scores.to(device),
                            None if layout.lengths is None else layout.lengths.to(device))
        return PackedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                           self.target_positions.to(device), self.labels.to(device), moved, dict(self.stats),
                           None if self.ref_scores is None else self.ref_scores.to(device))
