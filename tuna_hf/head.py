"""The lm_head of a Hugging Face causal LM as the fused kernels take it: :func:`lm_head_spec` -> :class:`LmHead`.

The fused loss never calls the lm_head module: it reads its weight and hands it to the kernels with the
hidden states. Whatever the module adds to ``hidden @ weight.T`` must therefore be read here too, or the loss
is silently that of another model. What is honoured:

- a plain ``nn.Linear`` head, tied to the input embedding or not, with or without bias; the config's final
  ``logit_scale`` and ``final_logit_softcapping``;
- peft **LoRA on the lm_head** (``target_modules=[..., "lm_head"]``, tied adapters included): the model's logits
  are ``h W^T + sum_a s_a * dropout_a(h) A_a^T B_a^T``, which is one product of concatenated operands,
  ``[h, s_a dropout_a(h) A_a^T] @ [W, B_a]^T`` (a ``[N, D + r]`` by ``[V, D + r]`` product): exact, dropout
  included, and the adapters get their gradients through the concatenation;
- peft ``modules_to_save=["lm_head"]``: the active trained copy.

Everything else that peft can put on an lm_head (DoRA and the other LoRA variants, trainable tokens, IA3,
LoHa, ...) or a quantised head is refused with :class:`UnsupportedHead`, naming what was found, instead of
being replaced by the base weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from tuna_kernels import sequence_logprobs


class UnsupportedHead(ValueError):
    """The lm_head computes something the fused loss cannot reproduce from its weight."""


@dataclass
class LoraTerm:
    """One active LoRA adapter of the lm_head: logits += ``scaling * lora_B(lora_A(dropout(h)))``.

    ``lora_A``: nn.Linear with weight [r, D]; ``lora_B``: nn.Linear with weight [V, r] (bias [V] under
    peft's ``lora_bias``); ``dropout``: the adapter's dropout module (identity when p = 0 or in eval mode).
    """

    lora_A: torch.nn.Module
    lora_B: torch.nn.Module
    dropout: torch.nn.Module
    scaling: float


@dataclass
class LmHead:
    """What the fused loss needs of the lm_head: weight [V, D], bias [V] or None, scale, softcap, LoRA terms."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    logit_scale: float
    softcap: Optional[float]
    adapters: Tuple[LoraTerm, ...] = ()

    def fused_inputs(self, hidden: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, object]]:
        """``(hidden' [N, D'], weight' [V, D'], options)`` whose fused product is this head's logits of ``hidden``
        [N, D]; ``options`` (bias, logit_scale, softcap) go to the fused functions as keywords.

        Without adapters D' = D and the operands are the head's own (in ``hidden``'s dtype); each LoRA adapter
        appends its r columns: ``scaling * dropout(hidden) @ A^T`` to the hidden states and ``B`` to the weight.
        """
        dtype = hidden.dtype
        weight = self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.adapters:
            hidden_parts, weight_parts = [hidden], [weight]
            for term in self.adapters:
                hidden_parts.append(F.linear(term.dropout(hidden), term.lora_A.weight.to(dtype)) * term.scaling)
                weight_parts.append(term.lora_B.weight.to(dtype))
                if term.lora_B.bias is not None:
                    extra = term.lora_B.bias.to(dtype) * term.scaling
                    bias = extra if bias is None else bias + extra
            hidden, weight = torch.cat(hidden_parts, dim=1), torch.cat(weight_parts, dim=1)
        return hidden, weight, dict(bias=bias, logit_scale=self.logit_scale, softcap=self.softcap)

    def parameters(self) -> Tuple[torch.Tensor, ...]:
        """Every tensor the fused head pass reads (weight, bias, adapter weights): what ZeRO-3 must gather."""
        tensors = [self.weight] + ([] if self.bias is None else [self.bias])
        for term in self.adapters:
            tensors.extend(term.lora_A.parameters())
            tensors.extend(term.lora_B.parameters())
        return tuple(tensors)

    def sequence_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor, seq_index: torch.Tensor, num_seqs: int,
                          **options):
        """:func:`tuna_kernels.sequence_logprobs` of ``hidden`` [N, D] under this head: (sums [S], counts [S])."""
        hidden, weight, head_options = self.fused_inputs(hidden)
        return sequence_logprobs(hidden, weight, labels, seq_index, num_seqs, **head_options, **options)


def base_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_head_spec(model) -> LmHead:
    """The lm_head of ``model`` (plain, tied, peft-wrapped, 4-bit base) as an :class:`LmHead`.

    Raises :class:`UnsupportedHead` when the head computes more than its weight, bias and LoRA terms say.
    """
    base = base_model(model)
    config = base.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    module, adapters = _resolve_head(base.get_output_embeddings())
    weight = module.weight
    if not isinstance(module, torch.nn.Linear) or weight.dim() != 2 or not weight.is_floating_point():
        raise UnsupportedHead(f"the lm_head is a {type(module).__name__} with a {weight.dtype} weight of shape "
                              f"{tuple(weight.shape)}: the fused loss needs a float [vocab, hidden] linear head "
                              "(keep the lm_head unquantised, as transformers' 4-bit loading does by default)")
    return LmHead(weight=weight, bias=module.bias, logit_scale=float(getattr(text_config, "logit_scale", None) or 1.0),
                  softcap=float(softcap) if softcap else None, adapters=adapters)


def _resolve_head(head) -> Tuple[torch.nn.Module, Tuple[LoraTerm, ...]]:
    """(the linear module whose weight the head multiplies by, its active LoRA terms), as peft's forward runs."""
    peft = peft_types()
    if peft is None:  # no peft, no adapters
        return head, ()
    tuner_layer, lora_linear, modules_to_save, auxiliary_wrapper = peft
    if isinstance(head, modules_to_save):  # a trained copy of the head, unless adapters are off
        if head.disable_adapters or not head.active_adapters or \
                any(name not in head.modules_to_save for name in head.active_adapters):
            return _resolve_head(head.original_module)
        return _resolve_head(head.modules_to_save[head.active_adapters[0]])
    if isinstance(head, auxiliary_wrapper) or (isinstance(head, tuner_layer) and not isinstance(head, lora_linear)):
        raise UnsupportedHead(f"the lm_head is a peft {type(head).__module__}.{type(head).__name__}, which the fused "
                              "loss cannot reproduce from the head's weight: leave 'lm_head' out of target_modules "
                              "(and trainable_token_indices), or put plain LoRA or modules_to_save=['lm_head'] on it")
    if not isinstance(head, lora_linear):
        return head, ()
    base_layer = head.get_base_layer()
    if head.disable_adapters or head.merged:  # peft's forward then runs the base layer alone
        return _resolve_head(base_layer)
    terms = []
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        if name in head.lora_variant:
            raise UnsupportedHead(f"the lm_head's LoRA adapter {name!r} is a {type(head.lora_variant[name]).__name__} "
                                  "(DoRA or another LoRA variant), which the fused loss cannot reproduce: use plain "
                                  "LoRA on the lm_head, or leave 'lm_head' out of target_modules")
        terms.append(LoraTerm(lora_A=head.lora_A[name], lora_B=head.lora_B[name], dropout=head.lora_dropout[name],
                              scaling=float(head.scaling[name])))
    module, inner = _resolve_head(base_layer)
    return module, inner + tuple(terms)


def peft_types():
    """peft's (tuner layer, LoRA Linear, ModulesToSaveWrapper, auxiliary wrapper) classes, or None without peft."""
    try:
        from peft.tuners.lora.layer import Linear
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
    except ImportError:
        return None
    return BaseTunerLayer, Linear, ModulesToSaveWrapper, AuxiliaryTrainingWrapper
