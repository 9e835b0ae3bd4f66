"""Ranking metrics that add up across batches and processes, and the metrics log (JSON lines +
TensorBoard)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional

import torch

from tuna_kernels import ranking_counts, ranking_summary
from tuna_kernels.metrics import RANKING_COUNT_KEYS

from .files import write_atomic

COUNT_KEYS = RANKING_COUNT_KEYS + ("nll_sum", "tokens", "groups")


def batch_counts(scores: torch.Tensor, valid: torch.Tensor, target_scores: Optional[torch.Tensor],
                 sums: torch.Tensor, counts: torch.Tensor) -> Dict[str, float]:
    """Additive counts of one batch: the ranking metrics' (:func:`tuna_kernels.ranking_counts`, where they are
    defined) and the MLE loss's.

    scores, valid, target_scores: [G, K] (best first); sums, counts: [S] per-sequence log-likelihood sums and
    target-token counts.
    """
    ranking = {name: float(value) for name, value in ranking_counts(scores, valid, target_scores).items()}
    return dict(ranking, nll_sum=float(-sums.sum()), tokens=float(counts.sum()), groups=float(valid.shape[0]))


def summarise(totals: Dict[str, float]) -> Dict[str, float]:
    """Pairwise ranking accuracy, mean best-minus-worst score gap and MLE loss from summed counts."""
    return dict(ranking_summary(totals), mle_loss=totals["nll_sum"] / totals["tokens"] if totals["tokens"] else
                float("nan"), pairs=totals["pairs"], groups=totals["groups"])


class MetricsLog:
    """Appends one JSON object per record to ``metrics.jsonl`` and sends the scalars to the accelerator's
    experiment trackers (TensorBoard, W&B, MLflow, ... as configured), if any."""

    def __init__(self, output_dir: Path, accelerator=None, enabled: bool = True) -> None:
        self.path = output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.accelerator = accelerator
        #: records in the file: a checkpoint saves it, and a resume keeps that many (:meth:`keep_rows`)
        self.rows = len(self._records()) if enabled else 0

    def _records(self) -> list:
        """The file's complete lines (one cut short when the process was killed is left out)."""
        if not self.path.exists():
            return []
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                json.loads(line)
            except json.JSONDecodeError:
                continue
            kept.append(line)
        return kept

    def _keep(self, lines: list) -> None:
        write_atomic(self.path, "".join(line + "\n" for line in lines))
        self.rows = len(lines)

    def keep_rows(self, rows: int) -> None:
        """Keep the first ``rows`` records: those written before the checkpoint a run resumes from (an evaluation
        logged after it at the same step, e.g. the final one before a kill, goes too)."""
        if self.enabled and self.path.exists():
            self._keep(self._records()[:rows])

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a checkpoint from before checkpoints counted the rows)."""
        if self.enabled and self.path.exists():
            self._keep([line for line in self._records() if json.loads(line).get("step", 0) <= step])

    def log(self, step: int, split: str, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split}
        record.update({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()})
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self.rows += 1
        if self.accelerator is not None:
            self.accelerator.log({f"{split}/{key}": value for key, value in values.items()
                                  if isinstance(value, (int, float)) and not (isinstance(value, float) and
                                                                             math.isnan(value))}, step=step)

    def close(self) -> None:
        """Flush and close the trackers. Not ``accelerator.end_training()``: that also destroys the default
        process group, and the run still synchronises its processes after this (and a pipeline trains
        again in the same processes), so a multi-process run with trackers ended in "Default process group
        has not been initialized" after writing ``final/``."""
        if self.accelerator is not None:
            for tracker in self.accelerator.trackers:  # the main process's only: others hold none
                tracker.finish()
