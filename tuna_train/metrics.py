"""Ranking metrics that add up across batches and processes, and the metrics log (JSON lines +
TensorBoard)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional

import torch

from tuna_kernels import ordered_pairs

COUNT_KEYS = ("correct_pairs", "pairs", "gap_sum", "gap_groups", "nll_sum", "tokens", "groups")


def ranking_counts(scores: torch.Tensor, valid: torch.Tensor, target_scores: Optional[torch.Tensor],
                   sums: torch.Tensor, counts: torch.Tensor) -> Dict[str, float]:
    """Additive counts of one batch.

    scores, valid, target_scores: [G, K] (best first); sums, counts: [S] per-sequence log-likelihood sums and
    target-token counts. Pairs tied in ``target_scores`` have no right order and are not counted.
    """
    pairs = ordered_pairs(valid, target_scores, skip_ties=target_scores is not None)
    agree = (scores[:, :, None] > scores[:, None, :]) & pairs
    positions = torch.arange(valid.shape[1], device=valid.device)
    worst = torch.where(valid, positions, torch.zeros_like(positions)).amax(dim=1)
    has_pair = worst > 0
    gaps = scores[:, 0] - scores.gather(1, worst[:, None]).squeeze(1)
    return {
        "correct_pairs": float(agree.sum()), "pairs": float(pairs.sum()),
        "gap_sum": float((gaps * has_pair).sum()), "gap_groups": float(has_pair.sum()),
        "nll_sum": float(-sums.sum()), "tokens": float(counts.sum()), "groups": float(valid.shape[0]),
    }


def summarise(totals: Dict[str, float]) -> Dict[str, float]:
    """Pairwise ranking accuracy, mean best-minus-worst score gap and MLE loss from summed counts."""
    nan = float("nan")
    return {
        "pair_accuracy": totals["correct_pairs"] / totals["pairs"] if totals["pairs"] else nan,
        "score_gap": totals["gap_sum"] / totals["gap_groups"] if totals["gap_groups"] else nan,
        "mle_loss": totals["nll_sum"] / totals["tokens"] if totals["tokens"] else nan,
        "pairs": totals["pairs"], "groups": totals["groups"],
    }


class MetricsLog:
    """Appends one JSON object per record to ``metrics.jsonl`` and sends the scalars to the accelerator's
    experiment trackers (TensorBoard, W&B, MLflow, ... as configured), if any."""

    def __init__(self, output_dir: Path, accelerator=None, enabled: bool = True) -> None:
        self.path = output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.accelerator = accelerator

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written by a run that died after its last checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        from .checkpoint import write_atomic

        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short when the process was killed
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        write_atomic(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, split: str, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split}
        record.update({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()})
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.accelerator is not None:
            self.accelerator.log({f"{split}/{key}": value for key, value in values.items()
                                  if isinstance(value, (int, float)) and not (isinstance(value, float) and
                                                                             math.isnan(value))}, step=step)

    def close(self) -> None:
        if self.accelerator is not None:
            self.accelerator.end_training()
