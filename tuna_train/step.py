"""One optimizer step: gradient accumulation over micro-batches, the non-finite check, clipping, the update."""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import torch

from tuna_hf import PackedBatch

from .config import TrainConfig
from .run_state import RunState
from .sharding import clip_grad_norm

logger = logging.getLogger(__name__)

#: the per-micro-batch metrics of the fused model that a step averages (the loss is averaged apart)
STEP_METRICS = ("rank_loss", "mle_loss", "pair_accuracy")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and its last checkpoint is intact."""


class OptimizerStep:
    """Runs optimizer steps of ``model`` (the fused causal LM, wrapped by accelerate or FSDP) on packed batches.

    Each micro-batch runs forward under accelerate's autocast (the dtype policy of training) and backward with
    its loss divided by ``grad_accum``; gradients are synchronised once, after the last micro-batch (DDP's
    ``no_sync``, FSDP's ``set_requires_gradient_sync``). A NaN or infinite loss on any process stops the run
    (:class:`NonFiniteLossError`) or, with ``skip_nonfinite``, skips the update on every process alike.
    """

    def __init__(self, accelerator, model, optimizer, scheduler, config: TrainConfig, sharded: bool,
                 output_dir: Path) -> None:
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.config = config
        self.sharded = sharded
        self.output_dir = output_dir
        self.world_size = accelerator.num_processes

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every process (each must take the same branch)."""
        finite = torch.tensor([float(torch.isfinite(loss.detach()).all())], device=self.accelerator.device)
        if self.world_size > 1:
            finite = self.accelerator.reduce(finite, reduction="sum")
        return bool(finite.item() == self.world_size)

    def __call__(self, step: int, batches: Iterable[PackedBatch], state: RunState,
                 weights: Optional[Sequence[float]] = None) -> Dict[str, float]:
        """Optimizer step ``step`` (0-based) over ``batches`` (``grad_accum`` micro-batches, made lazily);
        counts go into ``state``; returns the step's metrics, means over micro-batches and processes.

        ``weights``: one per batch, when micro-batches ran in pieces (``max_batch_tokens``): each piece's loss
        and metrics count for its share of the step's groups (its groups / the micro-batch's / grad_accum)."""
        accum = self.config.grad_accum
        count = accum if weights is None else len(weights)
        sums = dict.fromkeys(("loss",) + STEP_METRICS, 0.0)
        tokens = 0
        skip = False
        for micro, batch in enumerate(batches):
            last = micro == count - 1
            # without pieces, a division by accum exactly as ever (the embedded default's figures)
            share = (lambda value: value / accum) if weights is None else (lambda value, w=weights[micro]: value * w)
            if self.sharded:  # reduce-scatter the gradients once, after the last micro-batch
                self.model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext() if last or self.sharded else self.accelerator.no_sync(self.model)
            with sync:
                with self.accelerator.autocast():
                    loss, metrics = self.model(batch)
                if not self.all_finite(loss):
                    if not self.config.skip_nonfinite:
                        raise NonFiniteLossError(
                            f"step {step + 1}: the loss is {float(loss.detach())}; the run stopped without saving "
                            f"(the last checkpoint in {self.output_dir / 'checkpoints'} is intact). Lower the "
                            "learning rate, check the data, or pass --skip-nonfinite to skip such steps.")
                    skip = True
                    break
                self.accelerator.backward(share(loss))
            for key in STEP_METRICS:
                value = float(metrics[key])
                sums[key] += share(0.0 if math.isnan(value) else value)
            sums["loss"] += share(float(loss.detach()))
            tokens += batch.stats["tokens"]
            state.count_batch(batch.stats, self.world_size)
        if self.world_size > 1:  # log the mean over processes: the same numbers as one process would give
            keys = sorted(sums)
            vector = self.accelerator.reduce(torch.tensor([sums[k] for k in keys], device=self.accelerator.device),
                                             reduction="mean")
            sums = dict(zip(keys, vector.tolist()))
        grad_norm = float("nan")
        if skip:
            state.skipped_nonfinite += 1
            logger.warning("step %d: non-finite loss, step skipped (%d so far)", step + 1, state.skipped_nonfinite)
        else:
            if self.config.max_grad_norm > 0:
                grad_norm = clip_grad_norm(self.model.parameters(), self.config.max_grad_norm) if self.sharded else \
                    float(self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm))
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return dict(sums, lr=self.scheduler.get_last_lr()[0], grad_norm=grad_norm, tokens_in_step=tokens,
                    skipped_nonfinite=state.skipped_nonfinite, **state.truncation())
