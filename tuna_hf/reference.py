"""Reference-model scores for the losses that compare with one (``plackett_luce``, ``lipo_lambda``,
``pairwise_logistic`` as DPO): ``r_k = beta * (s_k - s_ref_k)``.

``reference="field"``: the scores a batch carries (``batch.ref_scores`` [G, K], e.g. from the records'
``ref_scores`` field, precomputed by a frozen model with the same length normalisation).

``reference="adapter"``: under LoRA / QLoRA the reference is the same model with its adapters switched off
(what the adapters started from), so no second model is held in memory.

``reference="model:PATH"``: a separate frozen model (loaded by the caller: ``tuna_train`` places it like
``tuna score``'s teacher), passed as ``reference_model``; it must share the policy's tokenizer.

Either way the scores come from the same packed batch, the same fused pass and the same length normalisation
as the policy's, under ``torch.no_grad()``: they cost one forward without activations kept for a backward,
and carry no gradient.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch

from .head import lm_head_spec, peft_types

MODEL_PREFIX = "model:"


def reference_model_path(reference) -> Optional[str]:
    """The PATH of a ``"model:PATH"`` reference (non-empty), else None."""
    if isinstance(reference, str) and reference.startswith(MODEL_PREFIX) and len(reference) > len(MODEL_PREFIX):
        return reference[len(MODEL_PREFIX):]
    return None


class ReferenceChoices(tuple):
    """The values ``reference`` takes, as a tuple (what argparse lists and the config's errors show) whose ``in``
    also holds every ``model:PATH``: one set of choices serves the CLI flag, TrainConfig and the drop-in."""

    def __contains__(self, value) -> bool:
        return super().__contains__(value) or reference_model_path(value) is not None


#: the values of ``reference``: none, the model with its adapters off, scores the batch carries, a frozen model
REFERENCES = ReferenceChoices(("none", "adapter", "field", MODEL_PREFIX + "PATH"))


def check_reference(reference: str, reference_model=None) -> None:
    """Raise a ValueError naming ``reference`` unless it is one of :data:`REFERENCES`, and unless a loaded
    ``reference_model`` goes with ``model:PATH`` (and only with it)."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    is_model = reference_model_path(reference) is not None
    if is_model and reference_model is None:
        raise ValueError(f"reference={reference!r} needs the loaded model as reference_model= (tuna train and "
                         "TunaTrainer load it from PATH)")
    if reference_model is not None and not is_model:
        raise ValueError(f"reference_model= goes with reference='model:PATH', got reference={reference!r}")


def _adapter_layers(model) -> list:
    """Every peft layer of ``model`` that can switch its adapters off (LoRA layers, modules_to_save copies)."""
    peft = peft_types()
    if peft is None:
        return []
    tuner_layer, _, _, auxiliary_wrapper = peft
    return [module for module in model.modules() if isinstance(module, (tuner_layer, auxiliary_wrapper))]


@contextlib.contextmanager
def adapters_disabled(model) -> Iterator[None]:
    """Within the block, ``model``'s peft adapters are off (the base model's outputs); each layer's own state
    (and the adapters' ``requires_grad``, which peft turns off with them) comes back after it.

    Raises a ValueError when the model has no adapter: its "reference" would be the policy itself.
    """
    layers = _adapter_layers(model)
    if not layers:
        raise ValueError("reference='adapter' needs a model with peft adapters (LoRA / QLoRA: tuna train --lora); "
                         "without them the reference would be the trained model itself")
    enabled = [(layer, not layer.disable_adapters) for layer in layers]
    trainable = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    try:
        for layer, _ in enabled:
            layer.enable_adapters(False)
        yield
    finally:
        for layer, was_enabled in enabled:
            layer.enable_adapters(was_enabled)
        for parameter, requires_grad in trainable:  # enable_adapters(True) re-enables only the active adapters
            parameter.requires_grad_(requires_grad)


HiddenOf = Callable[[torch.nn.Module], torch.Tensor]


def reference_scores(causal_lm, hidden_of: HiddenOf, labels: torch.Tensor, layout, loss_fn) -> torch.Tensor:
    """[G, K] the scores ``loss_fn`` (a :class:`tuna_kernels.TunaLoss`) gives the candidates under ``causal_lm``:
    ``hidden_of(causal_lm)`` runs that model's body on the batch ([N, D] hidden states of the targets ``labels``
    [N], laid out by ``layout``), then the same fused pass (``loss_fn``'s implementation and options) and length
    normalisation as the policy's scores, all under ``torch.no_grad()`` (no gradient, no activations kept)."""
    with torch.no_grad():
        hidden = hidden_of(causal_lm)
        sums, counts = lm_head_spec(causal_lm).sequence_logprobs(hidden, labels, layout.seq_index, layout.num_seqs,
                                                                 impl=loss_fn.impl, **loss_fn.logprob_options)
    return layout.to_matrix(loss_fn.sequence_scores(sums, counts))


def adapter_reference_scores(causal_lm, hidden_of: HiddenOf, labels: torch.Tensor, layout, loss_fn) -> torch.Tensor:
    """:func:`reference_scores` of ``causal_lm`` with its peft adapters off."""
    with adapters_disabled(causal_lm):
        return reference_scores(causal_lm, hidden_of, labels, layout, loss_fn)


def batch_reference_scores(reference: str, causal_lm, hidden_of: HiddenOf, labels: torch.Tensor, layout, loss_fn,
                           reference_model=None) -> Optional[torch.Tensor]:
    """[G, K] the reference scores ``reference`` names for a batch, computed here: the adapters-off pass of
    ``causal_lm`` (``"adapter"``), the frozen ``reference_model``'s (``"model:PATH"``); None otherwise (``"none"``,
    and ``"field"``, whose scores the caller reads from its batch)."""
    check_reference(reference, reference_model)
    if reference == "adapter":
        return adapter_reference_scores(causal_lm, hidden_of, labels, layout, loss_fn)
    if reference_model is not None:
        return reference_scores(reference_model, hidden_of, labels, layout, loss_fn)
    return None
