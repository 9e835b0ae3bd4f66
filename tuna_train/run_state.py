"""What a training run carries from step to step, and saves in every checkpoint's ``state.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

#: truncation counters, cumulative over the training groups seen (counted in collate.pack)
TRUNCATION_KEYS = ("prompts_truncated", "responses_truncated", "groups_truncated", "groups_seen")
#: run-state counter -> the PackedBatch.stats key it sums
_BATCH_COUNTS = {"tokens": "tokens", "targets": "targets", "tokens_saved": "tokens_saved",
                 "prompts_truncated": "prompts_truncated", "responses_truncated": "responses_truncated",
                 "groups_truncated": "groups_truncated", "groups_seen": "groups"}


@dataclass
class RunState:
    """Counters and evaluations of a run; everything but the weights, optimizer, scheduler and RNGs."""

    initial_eval: Optional[Dict[str, float]] = None  # before the first step
    best_eval: Optional[Dict[str, float]] = None  # highest held-out pair accuracy so far, with its step
    skipped_nonfinite: int = 0  # steps skipped for a NaN / inf loss (skip_nonfinite)
    tokens: int = 0  # input tokens trained on, over every process
    targets: int = 0  # positions whose log-probability entered the loss
    tokens_saved: int = 0  # tokens the shared-prompt packing did not compute
    prompts_truncated: int = 0
    responses_truncated: int = 0
    groups_truncated: int = 0
    groups_seen: int = 0

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any], source: str = "state") -> "RunState":
        """The state of a checkpoint's ``state.json`` (without its ``step`` and ``world_size``)."""
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(saved) - set(fields))
        if unknown:
            raise ValueError(f"{source}: unknown run-state fields {unknown} (known: {sorted(fields)})")
        for name, value in saved.items():
            # a counter (default 0) is a whole number >= 0; an evaluation (default None) an object or null
            counter = fields[name].default == 0
            fits = (isinstance(value, int) and not isinstance(value, bool) and value >= 0) if counter else \
                (value is None or isinstance(value, dict))
            if not fits:
                wanted = "a whole number >= 0" if counter else "an object or null"
                raise ValueError(f"{source}: {name!r} must be {wanted}, found {value!r}")
        return cls(**saved)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def count_batch(self, stats: Mapping[str, int], world_size: int) -> None:
        """Adds one micro-batch's counts (``PackedBatch.stats``), as if every process saw as many."""
        for field, key in _BATCH_COUNTS.items():
            setattr(self, field, getattr(self, field) + stats[key] * world_size)

    def truncation(self) -> Dict[str, float]:
        """Cumulative truncation counts of the training groups seen, and the truncated share of them."""
        counts: Dict[str, float] = {key: getattr(self, key) for key in TRUNCATION_KEYS}
        counts["truncated_fraction"] = self.groups_truncated / self.groups_seen if self.groups_seen else 0.0
        return counts

    def track_eval(self, step: int, result: Dict[str, float]) -> None:
        """Keeps ``result`` as the best evaluation when its pair accuracy is the highest so far."""
        best = self.best_eval
        if best is None or (result["pair_accuracy"] or 0) > (best.get("pair_accuracy") or 0):
            self.best_eval = dict(result, step=step)
