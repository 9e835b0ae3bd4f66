"""Models: load a local Hugging Face causal LM or LoRA adapter (optionally 4-bit NF4 + LoRA), place a model
that only runs, merge an adapter, or build the tiny Llama of the embedded default.

What the fused loss needs of a loaded model (its body's hidden states of target positions, its lm_head
spec, the module that runs both in one forward) is in :mod:`tuna_hf.model`, the Hugging Face integration.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    ByT5Tokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from .real_models import resolve_model

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER_MODES = ("attach", "merge")  # the first is the default
#: the dtype of a model that is not quantised, unless asked otherwise
WEIGHT_DTYPE = "float32"
#: attention implementations a model loads with; the first, PyTorch's scaled-dot-product attention, is the default
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def synthetic_tokenizer():
    """A byte-level tokenizer that needs no files (ByT5: 256 bytes + specials, 384 ids, EOS = 1, PAD = 0)."""
    return ByT5Tokenizer()


def build_tiny_llama(vocab_size: int = 384, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                     intermediate_size: int = 192, max_positions: int = 1024, seed: int = 0,
                     attn_implementation: str = ATTN_IMPLEMENTATIONS[0]):
    """A small LlamaForCausalLM built from a config (no hub), seeded."""
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=1, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation)
    return model


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer of a local model directory, or of an adapter directory's base model when it has none."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path(resolve_model(path)), local_files_only=True,
                                              trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def stop_token_ids(model, tokenizer) -> List[int]:
    """The ids that end a response: the tokenizer's EOS, then every ``eos_token_id`` of the model's generation
    config (Gemma's chat turns end with ``<end_of_turn>``, which its generation config lists beside ``<eos>``)."""
    config = getattr(model, "generation_config", None)
    listed = getattr(config, "eos_token_id", None) if config is not None else None
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return ids + [i for i in dict.fromkeys(listed) if i not in ids]


def adapter_base_path(path: str) -> Optional[str]:
    """The base model directory of a peft adapter directory, or None when ``path`` holds no adapter.

    A relative base path is taken as the adapter was saved with it (relative to the working directory),
    else relative to the adapter directory itself.
    """
    config_file = Path(path) / "adapter_config.json"
    if not config_file.is_file():
        return None
    base = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_file}: 'base_model_name_or_path' is empty: the adapter does not say which model "
                         "it adapts; merge it with `tuna merge` from a known base, or set the field")
    for candidate in (Path(base), Path(path) / base):
        if candidate.is_dir():
            return str(candidate)
    raise ValueError(f"{config_file}: the base model '{base}' is not a local directory (no hub access here)")


def tokenizer_path(path: str) -> str:
    """Where the tokenizer of the model at ``path`` is: the directory itself, or an adapter's base model."""
    if (Path(path) / "tokenizer_config.json").is_file():
        return path
    return adapter_base_path(path) or path


def _load_base(path: str, *, load_in_4bit: bool, compute_dtype: str, double_quant: bool, torch_dtype: str,
               attn_implementation: str, trust_remote_code: bool, device_map):
    kwargs = dict(local_files_only=True, trust_remote_code=trust_remote_code,
                  attn_implementation=attn_implementation, dtype=DTYPES[torch_dtype])
    if attn_implementation == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise ValueError("attn_implementation='flash_attention_2' needs the flash-attn package "
                             "(pip install 'tuna[cuda]'); use 'sdpa'") from None
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=DTYPES[compute_dtype])
        kwargs["device_map"] = device_map or ("cpu" if not torch.cuda.is_available() else {"": 0})
    elif device_map is not None:
        kwargs["device_map"] = device_map
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def load_model(path: str, *, load_in_4bit: bool = False, compute_dtype: str = "bfloat16",
               double_quant: bool = True, torch_dtype: str = WEIGHT_DTYPE,
               attn_implementation: str = ATTN_IMPLEMENTATIONS[0], trust_remote_code: bool = False, device_map=None,
               adapter: str = ADAPTER_MODES[0], trainable: bool = False):
    """A local causal LM directory (no hub access), or a LoRA adapter directory on its local base model.

    With ``load_in_4bit``: bitsandbytes NF4 weights, double quantisation and ``compute_dtype`` (QLoRA); the
    lm_head stays unquantised. What happens to an adapter (``path`` holds ``adapter_config.json``):

    - ``"attach"``: the base model with the adapter on it (a peft model); ``trainable`` makes the adapter's
      weights trainable, so training continues it where it stopped (Tuna_p -> Tuna_c with LoRA);
    - ``"merge"``: the adapter merged into the base weights (a plain model; not with ``load_in_4bit``: merge
      into the float model with ``tuna merge`` first, then quantise the merged directory).
    """
    path = resolve_model(path)
    base_path = adapter_base_path(path)
    options = dict(load_in_4bit=load_in_4bit, compute_dtype=compute_dtype, double_quant=double_quant,
                   torch_dtype=torch_dtype, attn_implementation=attn_implementation,
                   trust_remote_code=trust_remote_code, device_map=device_map)
    if base_path is None:
        model = _load_base(path, **options)
        if load_in_4bit and trainable:
            keep_4bit_trainable(model)
        return model
    if adapter not in ADAPTER_MODES:
        raise ValueError(f"adapter must be one of {ADAPTER_MODES}, got {adapter!r}")
    if adapter == "merge" and load_in_4bit:
        raise ValueError(f"{path} is a LoRA adapter: merging it into 4-bit weights would quantise the merged "
                         f"weights again; run `tuna merge {path} --out DIR` and train from DIR with --load-in-4bit")
    model = _load_base(base_path, **options)
    if load_in_4bit and trainable:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_trainable(model)
    model = PeftModel.from_pretrained(model, path, is_trainable=trainable and adapter == "attach")
    if adapter == "merge":
        model = model.merge_and_unload()
    logger.info("loaded %s on its base %s (%s)", path, base_path, "merged" if adapter == "merge" else "adapter")
    return model


def keep_4bit_trainable(model) -> None:
    """Keep bitsandbytes' 4-bit layers on their trainable weight format.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight into an inference-only layout the first
    time the layer runs in eval mode on an input that needs no gradient (an evaluation before training).
    Its kernel there has no backward, so the gradients that flow through the frozen base to earlier LoRA
    adapters are wrong afterwards (60-80% off). A model that is trained never takes that path: packed
    weights are unpacked and the switch is turned off.
    """
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes, no 4-bit layers
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state)


@dataclass
class Placement:
    """Where and how a model is loaded to run (score, generate, judge, evaluate): one set of options.

    device: ``auto`` (the first GPU when there is one, else the CPU) | ``cpu`` | ``cuda`` | ``cuda:N``;
    dtype: ``auto`` (bfloat16 on a GPU that supports it, float16 on older GPUs, float32 on the CPU) or a
    name in :data:`DTYPES`; load_in_4bit: bitsandbytes NF4 weights (computing in ``dtype``), placed with
    ``device_map`` on the chosen device.
    """

    device: str = "auto"
    dtype: str = "auto"
    load_in_4bit: bool = False

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: no CUDA device is available here; use --device cpu")
        return device

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            if self.dtype not in DTYPES:
                raise ValueError(f"--dtype must be one of {('auto',) + tuple(DTYPES)}, got {self.dtype!r}")
            return self.dtype
        device = self.resolved_device()
        if device.type != "cuda":
            return "float32"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"

    def load(self, path: str, *, attn_implementation: str = ATTN_IMPLEMENTATIONS[0], trust_remote_code: bool = False):
        """The model at ``path`` (a model or an adapter directory) in eval mode on this placement."""
        device, dtype = self.resolved_device(), self.resolved_dtype()
        if self.load_in_4bit:
            device_map = {"": device.index or 0} if device.type == "cuda" else "cpu"
            model = load_model(path, load_in_4bit=True, compute_dtype=dtype, attn_implementation=attn_implementation,
                               trust_remote_code=trust_remote_code, device_map=device_map)
        else:
            model = load_model(path, torch_dtype=dtype, attn_implementation=attn_implementation,
                               trust_remote_code=trust_remote_code).to(device)
        return model.eval()


PLACEMENT_DEVICES = ("auto", "cpu", "cuda")
PLACEMENT_DTYPES = ("auto",) + tuple(DTYPES)


def load_reference_model(path: str, placement: Placement, tokenizer, *, attn_implementation: str = ATTN_IMPLEMENTATIONS[0],
                         trust_remote_code: bool = False):
    """The frozen reference model of ``reference="model:PATH"``: loaded as ``tuna score`` loads its teacher
    (:meth:`Placement.load`: device, dtype, 4-bit), eval mode, no parameter requiring a gradient.

    It scores the trained model's token ids, so its tokenizer must be the trained model's (``tokenizer``): a
    ValueError naming PATH otherwise, before any step."""
    if not Path(resolve_model(path)).is_dir():
        raise FileNotFoundError(f"reference model:{path}: no such model directory (a local model or LoRA adapter "
                                "directory, or a prepared real model's name)")
    theirs = load_tokenizer(path, trust_remote_code).get_vocab()
    ours = tokenizer.get_vocab()
    if theirs != ours:
        differing = sorted(set(theirs.items()) ^ set(ours.items()))
        raise ValueError(f"reference model:{path}: its tokenizer differs from the trained model's ({len(theirs)} vs "
                         f"{len(ours)} tokens, e.g. {differing[0]!r}): the reference scores the same token ids, "
                         "so it needs the same tokenizer")
    model = placement.load(path, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
    return model.requires_grad_(False)


def merge_adapter(adapter_dir: str, out_dir: str, dtype: str, trust_remote_code: bool = False) -> Path:
    """Merge a LoRA adapter into its base model's weights and save the result whole (safetensors, config,
    tokenizer) in ``out_dir``, loadable with ``from_pretrained`` and trainable from (``tuna train --model``).

    The base is loaded in ``dtype`` (not 4-bit: a QLoRA adapter is merged into the unquantised base)."""
    if adapter_base_path(adapter_dir) is None:
        raise ValueError(f"{adapter_dir}: no adapter_config.json: not a LoRA adapter directory")
    model = load_model(adapter_dir, torch_dtype=dtype, trust_remote_code=trust_remote_code, adapter="merge")
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    load_tokenizer(adapter_dir, trust_remote_code).save_pretrained(str(out))
    return out


def add_lora(model, r: int, alpha: int, dropout: float, target_modules: str, quantized: bool = False,
             gradient_checkpointing: bool = False):
    """Wrap ``model`` with peft LoRA adapters of rank ``r``, scale ``alpha / r`` and ``dropout`` on the
    ``target_modules`` ("all-linear", or names separated by commas); the base stays frozen (for 4-bit models,
    QLoRA). The defaults are ``tuna train``'s (``lora_r``, ``lora_alpha``, ...)."""
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [name.strip() for name in target_modules.split(",") if name.strip()]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


