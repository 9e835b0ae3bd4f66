"""Models: load a local Hugging Face causal LM (optionally 4-bit NF4 + LoRA), or build the tiny Llama of
the embedded default; run the model body to the hidden states of target positions only.

The training forward never builds logits: :func:`target_hidden_states` runs the decoder, keeps the
hidden states of the positions that predict a target ([N, D]), and :func:`lm_head_spec` hands the
lm_head weight (and bias, logit scale, softcap the model defines) to the fused loss.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LmHead:
    """What the fused loss needs of the lm_head: weight [V, D], bias [V] or None, scale and softcap."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    logit_scale: float
    softcap: Optional[float]

    def cast(self, dtype: torch.dtype) -> "LmHead":
        """The same head with weight and bias in ``dtype`` (the fused kernels take the hidden states' dtype)."""
        return dataclasses.replace(self, weight=self.weight.to(dtype),
                                   bias=None if self.bias is None else self.bias.to(dtype))

    def sequence_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor, seq_index: torch.Tensor, num_seqs: int,
                          **options):
        """:func:`tuna_kernels.sequence_logprobs` of ``hidden`` [N, D] under this head: (sums [S], counts [S])."""
        from tuna_kernels import sequence_logprobs

        head = self.cast(hidden.dtype)
        return sequence_logprobs(hidden, head.weight, labels, seq_index, num_seqs, bias=head.bias,
                                 logit_scale=head.logit_scale, softcap=head.softcap, **options)


def synthetic_tokenizer():
    """A byte-level tokenizer that needs no files (ByT5: 256 bytes + specials, 384 ids, EOS = 1, PAD = 0)."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


def build_tiny_llama(vocab_size: int = 384, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                     intermediate_size: int = 192, max_positions: int = 1024, seed: int = 0,
                     attn_implementation: str = "sdpa"):
    """A small LlamaForCausalLM built from a config (no hub), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=1, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation)
    return model


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, *, load_in_4bit: bool = False, compute_dtype: str = "bfloat16",
               double_quant: bool = True, torch_dtype: str = "float32", attn_implementation: str = "sdpa",
               trust_remote_code: bool = False, device_map=None):
    """A local causal LM directory (no hub access). With ``load_in_4bit``: bitsandbytes NF4 weights,
    double quantisation and ``compute_dtype`` (QLoRA); the lm_head stays unquantised."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(local_files_only=True, trust_remote_code=trust_remote_code,
                  attn_implementation=attn_implementation, dtype=DTYPES[torch_dtype])
    if attn_implementation == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise ValueError("attn_implementation='flash_attention_2' needs the flash-attn package "
                             "(pip install 'tuna[cuda]'); use 'sdpa'") from None
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=DTYPES[compute_dtype])
        kwargs["device_map"] = device_map or ("cpu" if not torch.cuda.is_available() else {"": 0})
    elif device_map is not None:
        kwargs["device_map"] = device_map
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def add_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules="all-linear",
             quantized: bool = False, gradient_checkpointing: bool = False):
    """Wrap ``model`` with peft LoRA adapters (the base stays frozen; for 4-bit models, QLoRA)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [name.strip() for name in target_modules.split(",") if name.strip()]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def base_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_of(model):
    """The decoder stack (e.g. LlamaModel) that returns the last hidden states."""
    base = base_model(model)
    if hasattr(base, "get_decoder"):
        decoder = base.get_decoder()
        if decoder is not None:
            return decoder
    return getattr(base, base.base_model_prefix)


def lm_head_spec(model) -> LmHead:
    """The lm_head weight [V, D] (tied or not), its bias, and any final logit scale or softcap."""
    base = base_model(model)
    head = base.get_output_embeddings()
    config = base.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return LmHead(weight=head.weight, bias=getattr(head, "bias", None),
                  logit_scale=float(getattr(text_config, "logit_scale", None) or 1.0),
                  softcap=float(softcap) if softcap else None)


def target_hidden_states(model, batch) -> torch.Tensor:
    """Run the model body on a PackedBatch; return the hidden states [N, D] of its target positions."""
    return TargetHiddenStates(model)(batch.input_ids, batch.attention_mask, batch.position_ids,
                                     batch.target_positions)


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]


class TargetHiddenStates(torch.nn.Module):
    """nn.Module around a causal LM whose forward returns the hidden states of target positions [N, D].

    Training calls this module (not the decoder directly) so that a DDP / FSDP wrapper around it sees
    the forward; the lm_head weight stays a parameter of the wrapped model and gets its gradient from the
    fused loss.
    """

    def __init__(self, causal_lm) -> None:
        super().__init__()
        self.causal_lm = causal_lm

    def forward(self, input_ids, attention_mask, position_ids, target_positions):
        outputs = decoder_of(self.causal_lm)(input_ids=input_ids, attention_mask=attention_mask,
                                             position_ids=position_ids, use_cache=False)
        hidden = outputs.last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_positions)
