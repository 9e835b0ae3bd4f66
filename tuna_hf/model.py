"""What the fused loss needs of a Hugging Face causal LM, for any model (plain, tied, peft-wrapped, 4-bit,
with softcap or logit scale): its body, its lm_head as a spec, and the two modules that run them.

- :func:`decoder_of`: the decoder stack under any wrapper (the lm_head is read by :mod:`tuna_hf.head`);
- :func:`model_attention_mask`: a prefix-shared 4D mask in the form the model's attention reads;
- :class:`TargetHiddenStates`: the body's hidden states of target positions only ([N, D]);
- :class:`FusedCausalLM`: body + fused head pass (+ loss) in one ``forward``, the module to wrap with DDP/FSDP.
"""

from __future__ import annotations

import torch

from .head import base_model, lm_head_spec
from .reference import batch_reference_scores, check_reference


def decoder_of(model):
    """The decoder stack (e.g. LlamaModel) that returns the last hidden states."""
    base = base_model(model)
    if hasattr(base, "get_decoder"):
        decoder = base.get_decoder()
        if decoder is not None:
            return decoder
    return getattr(base, base.base_model_prefix)


def target_hidden_states(model, batch) -> torch.Tensor:
    """Run the model body on a PackedBatch; return the hidden states [N, D] of its target positions."""
    return TargetHiddenStates(model)(batch.input_ids, batch.attention_mask, batch.position_ids,
                                     batch.target_positions)


def attention_implementation(model) -> str:
    """The attention implementation a (possibly peft-wrapped) transformers model runs: sdpa, eager, ..."""
    config = base_model(model).config
    return getattr(config, "_attn_implementation", None) or "eager"


def model_attention_mask(model, attention_mask: torch.Tensor) -> torch.Tensor:
    """The attention mask in the form ``model``'s attention implementation reads it.

    A 2D padding mask goes as it is. The prefix-shared layout's 4D mask ([R, 1, L, L], True = may attend)
    is what ``sdpa`` takes; ``eager`` *adds* a 4D mask to the attention scores, so it gets the additive
    form (0 where allowed, the dtype's minimum elsewhere), in the model's dtype. ``flash_attention_2``
    reads only [R, L] padding masks: it cannot express the layout, so it is refused.
    """
    if attention_mask.dim() != 4:
        return attention_mask
    implementation = attention_implementation(model)
    if implementation.startswith("flash_attention"):
        raise ValueError(f"attn_implementation={implementation!r} cannot take the prefix-shared layout's 4D mask "
                         "(it reads [rows, length] padding masks only): use packing='per_candidate' with it, or "
                         "attn_implementation='sdpa' with packing='shared'")
    if implementation == "sdpa" or attention_mask.dtype != torch.bool:
        return attention_mask
    dtype = base_model(model).get_input_embeddings().weight.dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    additive = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    return additive.masked_fill_(~attention_mask, torch.finfo(dtype).min)


class TargetHiddenStates(torch.nn.Module):
    """nn.Module around a causal LM whose forward returns the hidden states of target positions [N, D].

    Training calls this module (not the decoder directly) so that a DDP / FSDP wrapper around it sees
    the forward; the lm_head weight stays a parameter of the wrapped model and gets its gradient from the
    fused loss. The attention mask is adapted to the model's attention implementation here, so every
    caller (training, evaluation, scoring) runs the same attention.
    """

    def __init__(self, causal_lm) -> None:
        super().__init__()
        self.causal_lm = causal_lm

    def forward(self, input_ids, attention_mask, position_ids, target_positions):
        outputs = decoder_of(self.causal_lm)(input_ids=input_ids,
                                             attention_mask=model_attention_mask(self.causal_lm, attention_mask),
                                             position_ids=position_ids, use_cache=False)
        hidden = outputs.last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_positions)


class FusedCausalLM(torch.nn.Module):
    """A causal LM and the fused lm_head pass in one ``forward``: the module training, evaluation and scoring
    call, and the one a DDP / FSDP / ZeRO-3 wrapper wraps.

    Reading the lm_head weight inside this forward is what sharding needs: FSDP gathers the root module's
    parameters (the lm_head among them) for the forward, keeps what the fused backward saved, and
    reduce-scatters the lm_head's gradient like any other; outside a wrapped forward each rank would see
    only its shard of the vocabulary. No [N, V] logits are built.

    ``forward(batch)`` takes a :class:`tuna_hf.PackedBatch` and returns ``(loss, metrics)`` of
    ``loss_fn`` (a :class:`tuna_kernels.TunaLoss`); ``forward(batch, scores_only=True)`` returns the
    per-sequence ``(sums [S], counts [S])`` of the target log-probabilities (evaluation, scoring).

    ``reference_model`` (with ``reference="model:PATH"``) is held but not registered as a submodule: its weights
    are not this module's parameters, so no optimizer, DDP / FSDP wrapper, ``state_dict`` or checkpoint sees
    them; it is frozen (no gradient, eval mode) here and stays where its caller placed it.
    """

    def __init__(self, causal_lm, loss_fn=None, reference: str = "none", reference_model=None,
                 **logprob_options) -> None:
        super().__init__()
        check_reference(reference, reference_model)
        self.causal_lm = causal_lm
        self.loss_fn = loss_fn
        self.reference = reference
        if reference_model is not None:
            reference_model.requires_grad_(False).eval()
        object.__setattr__(self, "reference_model", reference_model)  # not a submodule: see the docstring
        self.logprob_options = logprob_options

    def forward(self, batch, scores_only: bool = False):
        return fused_batch_forward(self.causal_lm, batch, self.loss_fn, scores_only, reference=self.reference,
                                   reference_model=self.reference_model, **self.logprob_options)


def fused_batch_forward(causal_lm, batch, loss_fn=None, scores_only: bool = False, reference: str = "none",
                        reference_model=None, **logprob_options):
    """What :class:`FusedCausalLM` computes, as a function: ``(loss, metrics)`` of ``loss_fn`` on a packed batch
    (``input_ids``, ``attention_mask``, ``position_ids``, ``target_positions``, ``labels``, ``layout``), or
    ``(sums [S], counts [S])`` with ``scores_only``. ``reference="adapter"`` gives the loss the scores of the
    same model with its adapters off as ``ref_scores``, ``reference="model:PATH"`` those of ``reference_model``
    (:func:`tuna_hf.reference.batch_reference_scores`: the same batch, fused pass and normalisation, no
    gradient); ``reference="field"`` the batch's own ``ref_scores`` ([G, K]; a ValueError when it has none)."""
    head = lm_head_spec(causal_lm)
    if scores_only:
        hidden = target_hidden_states(causal_lm, batch)
        return head.sequence_logprobs(hidden, batch.labels, batch.layout.seq_index, batch.layout.num_seqs,
                                      **logprob_options)
    if loss_fn is None:
        raise ValueError("no loss_fn was given: only scores_only=True is available")
    # the reference pass (no_grad; adapters off, or the frozen model) restores the adapters and their
    # requires_grad before it returns, so the policy's pass below runs on the model as the caller left it
    ref_scores = batch_reference_scores(reference, causal_lm, lambda model: target_hidden_states(model, batch),
                                        batch.labels, batch.layout, loss_fn, reference_model)
    if reference == "field":
        ref_scores = getattr(batch, "ref_scores", None)
        if ref_scores is None:
            raise ValueError("reference='field' needs reference scores in the batch: a 'ref_scores' field (one "
                             "number per response) in every record")
    hidden, weight, head_options = head.fused_inputs(target_hidden_states(causal_lm, batch))
    return loss_fn(hidden, weight, batch.labels, batch.layout, ref_scores=ref_scores, **head_options)
