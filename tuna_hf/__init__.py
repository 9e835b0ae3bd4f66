"""tuna_hf: the fused Tuna loss and a fused causal-LM cross-entropy for Hugging Face models, without logits.

Needs torch, transformers and :mod:`tuna_kernels` only (not :mod:`tuna_train`).
"""

from .losses import apply_fused_causal_lm_loss, causal_lm_loss, tuna_loss
from .model import (FusedCausalLM, LmHead, TargetHiddenStates, attention_implementation, base_model, decoder_of,
                    lm_head_spec, model_attention_mask)

__all__ = ["apply_fused_causal_lm_loss", "causal_lm_loss", "tuna_loss", "FusedCausalLM", "LmHead", "TargetHiddenStates", "attention_implementation", "base_model", "decoder_of",
           "lm_head_spec", "model_attention_mask"]
