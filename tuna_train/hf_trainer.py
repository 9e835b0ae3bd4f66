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

from tuna_hf import apply_fused_losses, reference_model_path

from .collate import pack, pad_id_of, tokenize_group
from .data import RankedExample, examples_from_records
from .model import load_reference_model
from .options import GroupOptions, LossOptions, check_options

LOGGED_METRICS = ("rank_loss", "mle_loss", "pair_accuracy", "score_gap")


@dataclass
class TunaTrainingArguments(GroupOptions, LossOptions, TrainingArguments):
    """``TrainingArguments`` plus the Tuna loss (:class:`.options.LossOptions`) and the packing of groups
    (:class:`.options.GroupOptions`): the same fields, defaults, help and choices as ``tuna train``'s."""

    # the collator reads whole records: the Trainer must not drop their columns
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep every record field (needed)"})

    def __post_init__(self) -> None:
        # the choices are read now, not at import: a loss registered in between is accepted
        check_options(self, LossOptions, GroupOptions)
        super().__post_init__()


class GroupCollator:
    """Records (or RankedExamples) of a batch -> ``{"tuna_batch": PackedBatch}``, every group whole."""

    def __init__(self, tokenizer, options: GroupOptions = GroupOptions()) -> None:
        """``options``: the template, max_length, max_candidates and packing (checked)."""
        check_options(options, GroupOptions)
        self.tokenizer, self.options, self.pad_id = tokenizer, options, pad_id_of(tokenizer)

    def __call__(self, features: Sequence[Any]) -> Dict[str, Any]:
        examples = [f for f in features if isinstance(f, RankedExample)]
        records = [f for f in features if not isinstance(f, RankedExample)]
        examples += examples_from_records(records, data_format="auto", source="dataset")
        options = self.options
        groups = [tokenize_group(e, self.tokenizer, options.template, options.max_length, options.max_candidates)
                  for e in examples]
        return {"tuna_batch": pack(groups, options.packing, self.pad_id)}


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
        self.tuna_loss_fn = args.tuna_loss()
        path = reference_model_path(args.reference)
        if path is not None and reference_model is None:
            if processing_class is None:
                raise ValueError("TunaTrainer: reference model:PATH is checked against the tokenizer: pass "
                                 "processing_class")
            reference_model = load_reference_model(path, args.reference_placement(args.device), processing_class)
        self.reference_model = reference_model
        apply_fused_losses(model, self.tuna_loss_fn, reference=args.reference, reference_model=reference_model,
                           impl=args.impl, autotune=args.autotune)
        if data_collator is None:
            data_collator = GroupCollator(processing_class, args)
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
