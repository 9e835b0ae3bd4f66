"""tuna_hf: the fused Tuna loss and a fused causal-LM cross-entropy for Hugging Face models, without logits.

Needs torch, transformers and :mod:`tuna_kernels` only (not :mod:`tuna_train`).
"""

from .losses import TunaOutput, apply_fused_losses, causal_lm_loss, tuna_loss
from .model import (FusedCausalLM, LmHead, TargetHiddenStates, attention_implementation, base_model, decoder_of,
                    fused_batch_forward, lm_head_spec, model_attention_mask)

__all__ = ["TunaOutput", "apply_fused_losses", "causal_lm_loss", "fused_batch_forward", "tuna_loss", "FusedCausalLM", "LmHead", "TargetHiddenStates", "attention_implementation", "base_model", "decoder_of",
           "lm_head_spec", "model_attention_mask"]
