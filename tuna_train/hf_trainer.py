"""A ``transformers.Trainer`` for ranked groups: the fused Tuna loss with the Trainer's own loop, logging,
checkpoints, peft / QLoRA and multi-device launches.

Each dataset item is one *group* (an instruction and its ranked candidates, in any record format that
``tuna train`` reads, e.g. a ``datasets.Dataset`` of native records ``{"instruction", "responses", "scores"}``),
so the Trainer's sampler (shuffled, or split over devices by a distributed sampler) moves whole groups:
no group is ever split across batches or devices. :class:`GroupCollator` tokenises and packs the groups of a
batch (``packing="shared"`` or ``"per_candidate"``), and the loss runs inside the model's forward
(:func:`tuna_hf.apply_fused_losses`), where a DDP / FSDP wrapper sees it.

    args = TunaTrainingArguments(output_dir="runs/hf", learning_rate=3e-3, per_device_train_batch_size=16)
    trainer = TunaTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

import torch
from transformers import Trainer, TrainingArguments

from tuna_hf import REFERENCES, apply_fused_losses, reference_model_path
from tuna_kernels import LOSSES, REFERENCE_LOSSES, TunaLoss

from .collate import LAYOUTS, pack, pad_id_of, tokenize_group
from .data import RankedExample, examples_from_records
from .model import PLACEMENT_DTYPES, Placement, load_reference_model

LOGGED_METRICS = ("rank_loss", "mle_loss", "pair_accuracy", "score_gap")


@dataclass
class TunaTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the Tuna loss and the packing of groups (same meaning as in ``tuna train``)."""

    # the registry itself, not a copy: a loss registered after this import (register_loss) is a valid choice
    loss: str = field(default="tuna_margin", metadata={"help": "ranking loss, one of tuna_kernels.LOSSES",
                                                       "choices": LOSSES})
    margin: float = field(default=0.1, metadata={"help": "tuna_margin: margin per rank gap"})
    beta: float = field(default=0.1, metadata={"help": "pairwise_logistic, plackett_luce, lipo_lambda: reward scale"})
    gamma: float = field(default=0.0, metadata={"help": "pairwise_logistic: target reward margin"})
    temperature: float = field(default=1.0, metadata={"help": "listmle: temperature"})
    reference: str = field(default="none", metadata={"help": "reference scores: none; adapter (the model with "
                                                             "its peft adapters off); model:PATH (a separate "
                                                             "frozen model with the same tokenizer)",
                                                     "choices": REFERENCES})
    reference_dtype: str = field(default="auto", metadata={"help": "reference model:PATH: its dtype (auto: "
                                                                   "bfloat16 on GPUs that support it, float32 on "
                                                                   "the CPU)", "choices": PLACEMENT_DTYPES})
    reference_load_in_4bit: bool = field(default=False, metadata={"help": "reference model:PATH: 4-bit NF4 weights"})
    alpha: float = field(default=1.0, metadata={"help": "score = sum of log-probs / tokens ** alpha"})
    mle_weight: float = field(default=1.0, metadata={"help": "weight of the token cross-entropy term"})
    mle_on: str = field(default="all", metadata={"help": "all | best: whose tokens the MLE term covers"})
    skip_ties: bool = field(default=False, metadata={"help": "drop pairs tied in the ranking's scores"})
    impl: str = field(default="auto", metadata={"help": "auto | triton | chunked"})
    template: str = field(default="alpaca", metadata={"help": "alpaca | chat | none"})
    max_length: int = field(default=512, metadata={"help": "tokens per candidate (prompt + response + EOS)"})
    max_candidates: int = field(default=16, metadata={"help": "candidates kept per group (best first)"})
    packing: str = field(default="shared", metadata={"help": "shared (prompt once per group) | per_candidate"})
    # the collator reads whole records: the Trainer must not drop their columns
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep every record field (needed)"})

    def __post_init__(self) -> None:
        # the choices are read now, not at import: a loss registered in between is accepted
        for name in ("loss", "reference", "reference_dtype"):
            allowed = self.__dataclass_fields__[name].metadata["choices"]
            if getattr(self, name) not in allowed:
                raise ValueError(f"TunaTrainingArguments field '{name}' must be one of {tuple(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        if self.reference != "none" and self.loss not in REFERENCE_LOSSES:
            raise ValueError(f"TunaTrainingArguments field 'reference' {self.reference!r} needs a loss that reads "
                             f"reference scores ({', '.join(sorted(REFERENCE_LOSSES))}), got loss={self.loss!r}")
        super().__post_init__()


class GroupCollator:
    """Records (or RankedExamples) of a batch -> ``{"tuna_batch": PackedBatch}``, every group whole."""

    def __init__(self, tokenizer, template: str = "alpaca", max_length: int = 512, packing: str = "shared",
                 max_candidates: int = 16) -> None:
        if packing not in LAYOUTS:
            raise ValueError(f"packing must be one of {LAYOUTS}, got {packing!r}")
        self.tokenizer, self.template, self.max_length = tokenizer, template, max_length
        self.packing, self.max_candidates = packing, max_candidates
        self.pad_id = pad_id_of(tokenizer)

    def __call__(self, features: Sequence[Any]) -> Dict[str, Any]:
        examples = [f for f in features if isinstance(f, RankedExample)]
        records = [f for f in features if not isinstance(f, RankedExample)]
        examples += examples_from_records(records, data_format="auto", source="dataset")
        groups = [tokenize_group(e, self.tokenizer, self.template, self.max_length, self.max_candidates)
                  for e in examples]
        return {"tuna_batch": pack(groups, self.packing, self.pad_id)}


class TunaTrainer(Trainer):
    """``transformers.Trainer`` whose loss is the fused Tuna loss of each batch's ranked groups.

    Logs ``rank_loss``, ``mle_loss``, ``pair_accuracy`` and ``score_gap`` (``eval_`` ones on evaluation) next
    to the Trainer's own; checkpoints, peft adapters and launches are the Trainer's.
    """

    def __init__(self, model=None, args: TunaTrainingArguments = None, data_collator=None, processing_class=None,
                 reference_model=None, **kwargs) -> None:
        """``reference_model``: the loaded frozen model of ``args.reference="model:PATH"``; None loads it from PATH
        on ``args.device`` (as ``tuna train`` does: ``reference_dtype``, ``reference_load_in_4bit``), with
        ``processing_class``'s tokenizer, which it must share."""
        if not isinstance(args, TunaTrainingArguments):
            raise TypeError("TunaTrainer needs TunaTrainingArguments (TrainingArguments + the Tuna loss settings)")
        if processing_class is None and data_collator is None:
            raise ValueError("TunaTrainer needs processing_class (the tokenizer) or a data_collator")
        self.tuna_loss_fn = TunaLoss(loss=args.loss, margin=args.margin, alpha=args.alpha,
                                     mle_weight=args.mle_weight, mle_on=args.mle_on, skip_ties=args.skip_ties,
                                     beta=args.beta, gamma=args.gamma, temperature=args.temperature, impl=args.impl)
        path = reference_model_path(args.reference)
        if path is not None and reference_model is None:
            if processing_class is None:
                raise ValueError("TunaTrainer: reference model:PATH is checked against the tokenizer: pass "
                                 "processing_class")
            placement = Placement(device=str(args.device), dtype=args.reference_dtype,
                                  load_in_4bit=args.reference_load_in_4bit)
            reference_model = load_reference_model(path, placement, processing_class)
        self.reference_model = reference_model
        apply_fused_losses(model, self.tuna_loss_fn, reference=args.reference, reference_model=reference_model,
                           impl=args.impl)
        if data_collator is None:
            data_collator = GroupCollator(processing_class, args.template, args.max_length, args.packing,
                                          args.max_candidates)
        self._tuna_metrics: Dict[str, Dict[str, List[float]]] = {"train": defaultdict(list),
                                                                   "eval": defaultdict(list)}
        super().__init__(model=model, args=args, data_collator=data_collator, processing_class=processing_class,
                         **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = inputs["tuna_batch"].to(self.args.device)
        outputs = model(tuna_batch=batch)
        split = "train" if model.training else "eval"
        for key in LOGGED_METRICS:
            value = float(outputs.metrics[key])
            if value == value:  # a batch with no ordered pair has no accuracy (NaN): left out of the mean
                self._tuna_metrics[split][key].append(value)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        split = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        for key, values in self._tuna_metrics[split].items():
            if values:
                logs[prefix + key] = sum(values) / len(values)
        self._tuna_metrics[split].clear()
        super().log(logs, *args, **kwargs)
