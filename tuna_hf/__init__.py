"""tuna_hf: the fused Tuna loss and a fused causal-LM cross-entropy for Hugging Face models, without logits.

Needs torch, transformers and :mod:`tuna_kernels` only (not :mod:`tuna_train`).
"""

from .batch import PackedBatch
from .losses import TunaOutput, apply_fused_losses, causal_lm_loss, tuna_loss
from .head import LmHead, LoraTerm, UnsupportedHead, base_model, lm_head_spec
from .reference import REFERENCES, adapters_disabled, reference_model_path
from .model import (FusedCausalLM, TargetHiddenStates, attention_implementation, decoder_of, fused_batch_forward,
                    model_attention_mask)

__all__ = ["PackedBatch", "REFERENCES", "adapters_disabled", "reference_model_path", "TunaOutput", "apply_fused_losses", "causal_lm_loss", "fused_batch_forward", "tuna_loss", "FusedCausalLM",
           "LmHead", "LoraTerm", "TargetHiddenStates", "UnsupportedHead", "attention_implementation", "base_model",
           "decoder_of", "lm_head_spec", "model_attention_mask"]
