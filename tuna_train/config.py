"""Training configuration: one dataclass whose defaults run the embedded default (a tiny Llama on the
built-in synthetic ranked tasks, on CPU, in minutes). A YAML file and ``--key value`` flags map onto its
fields one to one (``--lora-r 8`` sets ``lora_r``). ``configs/`` holds the paper's settings for real runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from .sharding import SHARDINGS


@dataclass
class TrainConfig:
    # data
    data: Optional[str] = None  # JSON / JSON lines / Parquet file; None = the built-in synthetic tasks
    data_format: str = "auto"  # auto | native | tuna_formatted | tuna_probabilistic | tuna_contextual
    eval_data: Optional[str] = None  # held-out file; None = eval_fraction of the training data
    eval_fraction: float = 0.1
    skip_bad_records: bool = False
    include_judge_response: bool = False  # contextual records: keep the judge's own response as a candidate
    template: str = "alpaca"  # alpaca | chat | none
    max_length: int = 512  # tokens per candidate (prompt + response + EOS); see FIELD_HELP for what is cut
    truncation_warning: float = 0.05  # warn above this fraction of truncated training groups
    max_candidates: int = 16
    packing: str = "shared"  # shared (prompt once per group) | per_candidate (one row per candidate)
    synthetic_examples: int = 4000
    synthetic_seed: int = 1234

    # model
    model: Optional[str] = None  # local Hugging Face model or LoRA adapter directory; None = a tiny Llama
    adapter: str = "attach"  # model is a LoRA adapter: attach (with lora: continue training it) | merge (into the base)
    tokenizer: Optional[str] = None  # defaults to the model directory
    torch_dtype: str = "float32"  # weights of a non-quantised model: float32 | bfloat16 | float16
    load_in_4bit: bool = False  # QLoRA: bitsandbytes NF4 base weights
    bnb_compute_dtype: str = "bfloat16"
    bnb_double_quant: bool = True
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str = "all-linear"
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    trust_remote_code: bool = False
    tiny_hidden_size: int = 128
    tiny_layers: int = 2
    tiny_heads: int = 4

    # loss (tuna_kernels.TunaLoss)
    loss: str = "tuna_margin"  # tuna_margin | listmle | rrhf | pairwise_logistic
    margin: float = 0.1
    alpha: float = 1.0
    mle_weight: float = 1.0
    mle_on: str = "all"  # all | best
    skip_ties: bool = False
    beta: float = 0.1
    gamma: float = 0.0
    impl: str = "auto"  # auto | triton | chunked
    kernel_autotune: bool = False  # Triton: time the candidate kernel configs once per shape (or TUNA_AUTOTUNE=1)

    # optimisation
    optimizer: str = "adamw"  # adamw | paged_adamw_8bit
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    batch_groups: int = 16  # instructions (groups of candidates) per micro-batch and process
    grad_accum: int = 1
    num_epochs: float = 2.0
    max_steps: int = 0  # > 0 overrides num_epochs
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 42
    cpu: bool = False  # force CPU even when a GPU is present
    sharding: str = "none"  # none (one process, or DDP) | fsdp (FSDP2 full shard) | deepspeed_zero3 (accelerate launch)
    fsdp_cpu_offload: bool = False  # fsdp: keep shards and their gradients in CPU memory between uses (GPU runs)

    # run
    output_dir: str = "runs/tuna"
    log_every: int = 10
    eval_every: int = 100  # 0 = evaluate before training and at the end only
    eval_groups: int = 256  # at most this many held-out groups per evaluation
    eval_controls: bool = True  # also evaluate with shuffled prompts and a prompt-free scorer (tuna_train.controls)
    save_every: int = 100
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (latest checkpoint in output_dir) | never | a checkpoint directory
    overwrite: bool = False  # delete an earlier run's checkpoints, metrics and results in output_dir; start afresh
    resume_with_new_settings: bool = False  # resume although data/model/loss/optimizer settings changed
    skip_nonfinite: bool = False
    tensorboard: bool = True
    progress: bool = True

    def validate(self) -> "TrainConfig":
        choices = {
            "data_format": ("auto", "native", "tuna_formatted", "tuna_probabilistic", "tuna_contextual"),
            "template": ("alpaca", "chat", "none"), "packing": ("shared", "per_candidate"),
            "torch_dtype": ("float32", "bfloat16", "float16"), "bnb_compute_dtype": ("float32", "bfloat16", "float16"),
            "attn_implementation": ("sdpa", "eager", "flash_attention_2"), "adapter": ("attach", "merge"),
            "loss": ("tuna_margin", "listmle", "rrhf", "pairwise_logistic"), "mle_on": ("all", "best"),
            "impl": ("auto", "triton", "chunked"), "optimizer": ("adamw", "paged_adamw_8bit"),
            "lr_schedule": ("cosine", "linear", "constant"), "mixed_precision": ("no", "bf16", "fp16"),
            "sharding": SHARDINGS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"config field '{name}' must be one of {allowed}, got {getattr(self, name)!r}")
        positive = ("max_length", "max_candidates", "batch_groups", "grad_accum", "log_every", "save_every",
                    "keep_checkpoints", "eval_groups", "lora_r", "synthetic_examples")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"config field '{name}' must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"config field 'eval_fraction' must be in [0, 1), got {self.eval_fraction}")
        if self.load_in_4bit and not self.lora:
            raise ValueError("config field 'load_in_4bit' needs 'lora': a 4-bit base trains through adapters (QLoRA)")
        if self.attn_implementation == "flash_attention_2" and self.packing == "shared":
            raise ValueError("attn_implementation 'flash_attention_2' cannot take packing 'shared' (its 4D mask; "
                             "flash-attention reads [rows, length] padding masks only): use --packing per_candidate "
                             "with flash_attention_2, or --attn-implementation sdpa with shared packing")
        if self.overwrite and (self.resume_with_new_settings or self.resume not in ("auto", "never")):
            raise ValueError("config field 'overwrite' starts afresh: it cannot go with 'resume_with_new_settings' "
                             f"or a checkpoint to resume (resume: {self.resume!r})")
        if self.load_in_4bit and self.model is None:
            raise ValueError("config field 'load_in_4bit' needs 'model' (a local model directory to quantise)")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# help text of the flags that need more than their type and default
FIELD_HELP = {
    "max_length": "tokens per candidate: prompt (BOS included) + response + EOS. A response longer than what its "
                  "prompt leaves is cut on the right (its end and EOS are lost); a prompt of max_length tokens or "
                  "more keeps only its last max_length - 1 tokens (cut on the left: the template's preamble and the "
                  "start of the instruction are lost) and every response then keeps one token. Counted as "
                  "prompts_truncated / responses_truncated in the progress bar, metrics.jsonl and summary.json.",
    "truncation_warning": "warn when more than this fraction of the training groups seen so far had their prompt "
                          "or a response cut by max_length",
}


def config_fields() -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, value: Any, where: str) -> Any:
    """A YAML or command-line value converted to the field's type, with an error naming the field."""
    field_ = config_fields()[name]
    default = field_.default
    kind = type(default) if default is not None else str
    if value is None:
        return None
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if isinstance(value, str) and kind is not str and value.strip().lower() in ("none", "null"):
            return None
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: field '{name}' expects {kind.__name__}, got {value!r}") from None


def load_config(path: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """Defaults, then the YAML file (if any), then overrides (e.g. parsed flags): each key a field."""
    values: Dict[str, Any] = {}
    known = config_fields()
    if path is not None:
        import yaml

        text = Path(path).read_text(encoding="utf-8")
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({error})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of config fields, got {type(loaded).__name__}")
        for key, value in loaded.items():
            if key not in known:
                raise ValueError(f"{path}: unknown config field '{key}'")
            values[key] = _coerce(key, value, path)
    for key, value in (overrides or {}).items():
        if key not in known:
            raise ValueError(f"unknown config field '{key}'")
        values[key] = _coerce(key, value, "command line")
    try:
        return TrainConfig(**values).validate()
    except ValueError as error:
        raise ValueError(f"{path}: {error}" if path is not None else str(error)) from None
