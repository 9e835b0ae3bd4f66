"""One call from a Hugging Face causal LM to a fused loss, without logits.

- :func:`tuna_loss`: the Tuna ranking loss (+ MLE) of ranked candidate responses, one row per candidate (or
  several candidates per row, named by ``candidate_ids``), from ``input_ids`` / ``attention_mask`` / ``labels``
  (-100 = ignored) as a Hugging Face training loop has them; the label shift is done here.
- :func:`causal_lm_loss`: the standard causal-LM (SFT) loss, mean token cross-entropy with -100 ignored,
  exactly as ``model(..., labels=labels).loss`` computes it, without the [tokens x vocab] logits.
- :func:`apply_fused_losses`: one line that makes ``model(..., labels=labels)`` return that loss (and no
  logits), and ``model(tuna_batch=packed)`` the Tuna loss; without either the model runs as before.

All run the model body, keep the hidden states of positions that have a target, and hand them with the
lm_head spec (weight, bias, logit scale, softcap, LoRA on the lm_head; tied, peft-wrapped and 4-bit models alike) to
:mod:`tuna_kernels`, which follows autocast like ``nn.Linear`` and accumulates in fp32.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from tuna_kernels import GroupLayout, TunaLoss, linear_cross_entropy

from .head import base_model, lm_head_spec
from .model import decoder_of, fused_batch_forward, model_attention_mask
from .reference import batch_reference_scores, check_reference

IGNORE_INDEX = -100


def shifted_targets(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], labels: torch.Tensor,
                    position_ids: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the body of ``model``; return ``(hidden [N, D], targets [N], flat_positions [N])`` of the N positions
    that predict a label (position t predicts ``labels[:, t + 1]``; -100 labels are dropped)."""
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must be [B, T] like input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    mask = None if attention_mask is None else model_attention_mask(model, attention_mask)
    outputs = decoder_of(model)(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    hidden = outputs.last_hidden_state[:, :-1]
    next_labels = labels[:, 1:]
    positions = (next_labels != IGNORE_INDEX).reshape(-1).nonzero().squeeze(1)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    return flat_hidden, next_labels.reshape(-1).index_select(0, positions), positions


def tuna_loss(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], labels: torch.Tensor, *,
              group_sizes: Optional[Sequence[int]] = None, candidate_ids: Optional[torch.Tensor] = None,
              target_scores: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
              reference: str = "none", ref_scores: Optional[torch.Tensor] = None, reference_model=None,
              loss_fn: Optional[TunaLoss] = None, **loss_options) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The fused Tuna loss of ranked candidates: ``(loss, metrics)``, no logits.

    Args:
        model: a causal LM (transformers, peft-wrapped, 4-bit, tied, with softcap or logit scale).
        input_ids, attention_mask, labels: [B, T] as for ``model(..., labels=labels)``: labels are the input ids
            with -100 on prompt and padding positions (the shift is done here).
        group_sizes: candidates are numbered group after group, best first; group g has ``group_sizes[g]``
            of them. Default: one group holding every candidate.
        candidate_ids: [B, T] int, the candidate each label belongs to (several candidates in one row, each
            with its own prompt and a mask that separates them). Default: row b is candidate b.
        target_scores: [G, K] the ranking's own scores (for ``skip_ties``), optional.
        position_ids: [B, T], for rows that hold several sequences.
        reference: ``"adapter"``: the reference scores of ``plackett_luce``, ``lipo_lambda`` and
            ``pairwise_logistic`` are the same model's with its peft adapters off (computed here, no gradient);
            ``"model:PATH"``: those of ``reference_model`` (a frozen causal LM with the same tokenizer, loaded
            by the caller; computed here, no gradient); ``"none"`` (default): ``ref_scores`` as given.
        ref_scores: [G, K] reference scores computed elsewhere (e.g. precomputed by a frozen model), optional.
        reference_model: the loaded model of ``reference="model:PATH"``.
        loss_fn: a :class:`tuna_kernels.TunaLoss`; or ``**loss_options`` to build one (``loss``, ``margin``,
            ``alpha``, ``mle_weight``, ``impl``, ...).

    Returns:
        ``(loss, metrics)`` of :class:`tuna_kernels.TunaLoss` (``rank_loss``, ``mle_loss``, ``pair_accuracy``...).
    """
    if loss_fn is None:
        loss_fn = TunaLoss(**loss_options)
    elif loss_options:
        raise ValueError("pass either loss_fn or loss options, not both")
    hidden, targets, positions = shifted_targets(model, input_ids, attention_mask, labels, position_ids)
    if candidate_ids is None:
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand(-1, input_ids.shape[1] - 1)
        seq_index = rows.reshape(-1).index_select(0, positions)
        num_seqs = input_ids.shape[0]
    else:
        if candidate_ids.shape != input_ids.shape:
            raise ValueError(f"candidate_ids must be [B, T] like input_ids, got {tuple(candidate_ids.shape)}")
        seq_index = candidate_ids[:, 1:].reshape(-1).index_select(0, positions).long()
        num_seqs = int(seq_index.max()) + 1 if seq_index.numel() else 0
    sizes = [num_seqs] if group_sizes is None else list(group_sizes)
    if sum(sizes) != num_seqs:
        raise ValueError(f"group_sizes {sizes} add up to {sum(sizes)}, but the batch has {num_seqs} candidates")
    layout = GroupLayout.from_group_sizes(seq_index, sizes, target_scores=target_scores)
    check_reference(reference, reference_model)
    if reference == "field":
        raise ValueError("reference='field' reads the scores a packed batch carries; here pass them as ref_scores=")
    if reference != "none" and ref_scores is not None:
        raise ValueError(f"pass either reference={reference!r} or ref_scores, not both")
    computed = batch_reference_scores(
        reference, model, lambda body: shifted_targets(body, input_ids, attention_mask, labels, position_ids)[0],
        targets, layout, loss_fn, reference_model)
    ref_scores = computed if computed is not None else ref_scores
    hidden, weight, head_options = lm_head_spec(model).fused_inputs(hidden)
    return loss_fn(hidden, weight, targets, layout, ref_scores=ref_scores, **head_options)


def causal_lm_loss(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], labels: torch.Tensor, *,
                   position_ids: Optional[torch.Tensor] = None, num_items_in_batch=None,
                   **logprob_options) -> torch.Tensor:
    """Mean token cross-entropy of ``labels`` (-100 ignored, shifted here), as ``model(..., labels=labels).loss``,
    computed by the fused kernels: the largest tensor is a chunk, never the [tokens x vocab] logits.

    ``num_items_in_batch`` (as transformers' Trainer passes it under gradient accumulation) replaces the count
    of this batch's targets in the mean.
    """
    hidden, targets, _ = shifted_targets(model, input_ids, attention_mask, labels, position_ids)
    hidden, weight, head_options = lm_head_spec(model).fused_inputs(hidden)
    # a scalar loss: the chunked path forms its gradients in the forward (no recompute in the backward); a mean
    # over no target is NaN with zero gradients, as the model's own loss
    loss = linear_cross_entropy(hidden, weight, targets, reduction="mean" if num_items_in_batch is None else "sum",
                                **head_options, **logprob_options)
    if num_items_in_batch is None:
        return loss
    count = num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    return loss / count


@dataclass
class TunaOutput(ModelOutput):
    """What a model patched by :func:`apply_fused_losses` returns for ``tuna_batch``: the loss and its metrics."""

    loss: Optional[torch.Tensor] = None
    metrics: Optional[Dict[str, torch.Tensor]] = None


def apply_fused_losses(model, tuna_loss_fn: Optional[TunaLoss] = None, reference: str = "none", reference_model=None,
                       **logprob_options):
    """Make the model's own forward compute its losses with the fused kernels (one line; returns ``model``):

    - ``model(input_ids, attention_mask, labels=labels)``: :func:`causal_lm_loss` (the SFT loss), ``logits=None``;
    - ``model(tuna_batch=packed)`` (a :class:`tuna_hf.PackedBatch`): the Tuna loss of
      ``tuna_loss_fn`` (default ``TunaLoss()``) as a :class:`TunaOutput` with ``loss`` and ``metrics``; with
      ``reference="adapter"`` its reference scores are the model's own with the peft adapters off, with
      ``reference="model:PATH"`` those of ``reference_model`` (frozen here; kept out of the model's modules, so
      out of its parameters, ``state_dict`` and checkpoints);
    - without either, the model's own forward (generation, logits for evaluation).

    Because the loss is computed inside the model's forward, a DDP / FSDP wrapper around the model (as
    ``transformers.Trainer`` and accelerate build) sees it, and the lm_head is gathered for it. Works on the
    model under a peft wrapper.
    """
    check_reference(reference, reference_model)
    if reference_model is not None:
        reference_model.requires_grad_(False).eval()
    inner = base_model(model)
    original = inner.forward
    loss_fn = tuna_loss_fn if tuna_loss_fn is not None else TunaLoss()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, tuna_batch=None,
                **kwargs):
        if tuna_batch is not None:
            loss, metrics = fused_batch_forward(self, tuna_batch, loss_fn, reference=reference,
                                                reference_model=reference_model)
            return TunaOutput(loss=loss, metrics=metrics)
        if labels is None or input_ids is None:
            return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            labels=labels, **kwargs)
        loss = causal_lm_loss(self, input_ids, attention_mask, labels, position_ids=position_ids,
                              num_items_in_batch=kwargs.get("num_items_in_batch"), **logprob_options)
        return CausalLMOutputWithPast(loss=loss, logits=None)

    inner.forward = types.MethodType(forward, inner)
    return model
