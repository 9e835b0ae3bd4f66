"""What a training run is made of, built from its :class:`TrainConfig`: data, model, optimizer, schedule."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from accelerate.state import AcceleratorState, PartialState
from transformers import get_scheduler

from .config import LR_SCHEDULES, REAL_LORA_WARMUP_FRACTION, TrainConfig
from .data import DataError, RankedExample, examples_from_records, load_ranked, select_examples
from tuna_hf import reference_model_path

from .model import (adapter_base_path, add_lora, build_tiny_llama, load_model, load_reference_model,
                    load_tokenizer, synthetic_tokenizer)
from .synthetic import make_records
from .templates import check_template

logger = logging.getLogger(__name__)


@dataclass
class Datasets:
    train: Sequence[RankedExample]
    eval: Sequence[RankedExample]
    skipped: int = 0


def load_datasets(config: TrainConfig) -> Datasets:
    """Training and held-out examples: the built-in synthetic tasks, or files."""
    skipped = 0
    if config.data is None:  # held-out instructions (words) are disjoint from training ones, by construction

        examples = examples_from_records(make_records(config.synthetic_examples, config.synthetic_seed),
                                         source="synthetic")
        if config.eval_data is None:
            num_eval = int(round(config.synthetic_examples * config.eval_fraction))
            held_out = make_records(num_eval, config.synthetic_seed + 1, split="heldout") if num_eval else []
            return Datasets(examples, examples_from_records(held_out, source="synthetic held-out"))
    else:
        examples, report = load_ranked(config.data, config.data_format, config.skip_bad_records,
                                       config.include_judge_response)
        skipped = report.skipped
        if report.skipped:
            logger.warning("%s: skipped %d bad records; first: %s", config.data, report.skipped, report.first_errors[0])
    if config.eval_data is not None:
        eval_examples, report = load_ranked(config.eval_data, config.data_format, config.skip_bad_records,
                                            config.include_judge_response)
        return Datasets(examples, eval_examples, skipped + report.skipped)
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    num_eval = int(round(len(examples) * config.eval_fraction))
    return Datasets(select_examples(examples, order[num_eval:]), select_examples(examples, order[:num_eval]), skipped)


def check_ref_scores(examples: Sequence[RankedExample]) -> None:
    """Raise a DataError naming the first example without reference scores (``reference="field"`` needs them
    in every training record), before any model is loaded."""
    for example in examples:
        if example.ref_scores is None:
            raise DataError(f"{example.source}: field 'ref_scores' is missing (reference 'field' reads one reference "
                            "score per response from every training record)")


def build_model(config: TrainConfig):
    """(model, tokenizer) as configured: a local model (4-bit, LoRA) or the tiny Llama of the default.

    A ``config.model`` directory that holds a LoRA adapter (a Tuna_p trained with ``--lora``) is loaded on
    its base: with ``lora`` and ``adapter="attach"`` training continues that adapter; with
    ``adapter="merge"`` it is merged into the base first (and ``lora`` then trains a new adapter on top).
    """
    if config.model is None:
        tokenizer = synthetic_tokenizer()
        model = build_tiny_llama(vocab_size=len(tokenizer), hidden_size=config.tiny_hidden_size,
                                 num_layers=config.tiny_layers, num_heads=config.tiny_heads,
                                 intermediate_size=3 * config.tiny_hidden_size, seed=config.seed,
                                 attn_implementation=config.attn_implementation)
    else:
        is_adapter = adapter_base_path(config.model) is not None
        if is_adapter and not config.lora and config.adapter == "attach":
            raise ValueError(f"{config.model} is a LoRA adapter: train it further with --lora (adapter 'attach'), "
                             "or merge it into its base with --adapter merge (full fine-tuning of the merged model)")
        tokenizer = load_tokenizer(config.tokenizer or config.model, config.trust_remote_code)
        # refused on the tokenizer alone, before the model loads (minutes for a real checkpoint)
        check_template(config.template, tokenizer, config.tokenizer or config.model)
        model = load_model(config.model, load_in_4bit=config.load_in_4bit, compute_dtype=config.bnb_compute_dtype,
                           double_quant=config.bnb_double_quant, torch_dtype=config.torch_dtype,
                           attn_implementation=config.attn_implementation, trust_remote_code=config.trust_remote_code,
                           adapter=config.adapter, trainable=True)
        if is_adapter and config.adapter == "attach":  # the adapter is trained as it is: no second one
            if config.gradient_checkpointing:
                model.get_base_model().gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
            return model, tokenizer
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.lora:
            model.enable_input_require_grads()
    if config.lora:
        model = add_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules,
                         quantized=config.load_in_4bit, gradient_checkpointing=config.gradient_checkpointing)
    return model, tokenizer


def build_reference_model(config: TrainConfig, device: torch.device, tokenizer):
    """The frozen model of ``reference="model:PATH"`` on the training ``device`` (None for other references), in
    ``reference_dtype`` / ``reference_load_in_4bit``; it is loaded afresh from PATH by every run and resume."""
    path = reference_model_path(config.reference)
    if path is None:
        return None
    return load_reference_model(path, config.reference_placement(device), tokenizer,
                                attn_implementation=config.attn_implementation,
                                trust_remote_code=config.trust_remote_code)


def build_optimizer(config: TrainConfig, params):
    if config.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                        weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                             weight_decay=config.weight_decay)


def warmup_steps(config: TrainConfig, total_steps: int) -> int:
    """The run's warm-up: ``warmup_steps``, or (none: LoRA on a model) a tenth of ``total_steps``; a warm-up as
    long as the run is warned about (its learning rate never reaches the peak it names)."""
    steps = config.warmup_steps
    if steps is None:
        steps = int(REAL_LORA_WARMUP_FRACTION * total_steps)
    elif steps >= total_steps > 0:
        logger.warning("warmup_steps %d is not shorter than the run's %d steps: the learning rate never reaches its "
                       "peak %g; lower --warmup-steps (or leave it unset with --lora on a model: a tenth of the "
                       "steps) or train longer", steps, total_steps, config.learning_rate)
    return steps


def build_scheduler(config: TrainConfig, optimizer, total_steps: int, warmup: Optional[int] = None):
    """transformers' ``get_scheduler`` for ``lr_schedule``: cosine and linear as ``transformers.Trainer`` builds them
    (linear warm-up from 0 over ``warmup`` steps, by default :func:`warmup_steps`, then the decay to 0 at
    ``total_steps``); constant keeps the warm-up (transformers' constant_with_warmup)."""
    warmup = warmup_steps(config, total_steps) if warmup is None else warmup
    return get_scheduler(LR_SCHEDULES[config.lr_schedule], optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps)


def release_single_process_state(mixed_precision: str) -> None:
    """Lets a second Trainer in the same single process use another mixed precision.

    accelerate keeps one process-wide AcceleratorState and refuses a new Accelerator whose mixed precision
    differs (a notebook that trains fp32 then bf16, or a test suite). Nothing outlives a Trainer in that state
    when there is one process, so it is cleared; a distributed launch keeps it (its processes agree on it).
    """
    shared = AcceleratorState._shared_state
    if shared and PartialState().num_processes == 1 and shared.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
