"""Training configuration: one dataclass whose defaults run the embedded default (a tiny Llama on the
built-in synthetic ranked tasks, on CPU, in minutes). A YAML file and ``--key value`` flags map onto its
fields one to one (``--lora-r 8`` sets ``lora_r``). ``configs/`` holds the paper's settings for real runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import yaml

from .data import FORMATS
from .model import ADAPTER_MODES, ATTN_IMPLEMENTATIONS, DTYPES, WEIGHT_DTYPE
from .options import GroupOptions, LossOptions, at_least, check_options, option
from .sharding import SHARDINGS


OPTIMIZERS = ("adamw", "paged_adamw_8bit")
#: lr_schedule -> the transformers scheduler it names; each starts with a linear warm-up from 0
LR_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
MIXED_PRECISIONS = ("no", "bf16", "fp16")


#: the defaults of LoRA on a model (TrainConfig.__post_init__): peft's usual rate, a warm-up of a tenth of the run
REAL_LORA_LEARNING_RATE = 2e-4
REAL_LORA_WARMUP_FRACTION = 0.1
#: the default token budget of one forward on a model (max_batch_tokens): SmolLM2-135M with LoRA in fp32 on a CPU
#: peaks at 9.4 GB RSS for 16 groups in pieces of <= 2048 padded tokens, and above 15 GB in one forward of 5424
REAL_MODEL_BATCH_TOKENS = 2048


@dataclass
class TrainConfig(GroupOptions, LossOptions):
    """``tuna train``: the loss (:class:`.options.LossOptions`), the groups' tokens (:class:`.options.GroupOptions`),
    and the fields below; the defaults run the embedded default."""

    # data
    data: Optional[str] = option(None, "training records: a JSON lines, JSON, Parquet or CSV file, a saved dataset "
                                       "directory, or a hub name; none = the built-in tasks")
    data_format: str = option(FORMATS[0], "record format; auto detects it from the first record", FORMATS)
    eval_data: Optional[str] = option(None, "held-out records; none = eval_fraction of the training data")
    eval_fraction: float = option(0.1, "fraction of the training data held out when eval_data is not given "
                                       "(0: nothing held out, nothing evaluated)")
    skip_bad_records: bool = option(False, "skip and count malformed records instead of stopping at the first")
    include_judge_response: bool = option(False, "keep the judge's own reference response (the ###Response K the "
                                                 "method's judge writes; the rule judge's: the task's answer) as a "
                                                 "ranked candidate where the judge ranks it")
    truncation_warning: float = option(0.05, "warn when more than this fraction of the training groups seen so far "
                                             "had their prompt or a response cut by max_length")
    synthetic_examples: int = option(4000, "built-in tasks: number of groups (when data is not given)",
                                     type=at_least(int, 1))
    synthetic_seed: int = option(1234, "built-in tasks: the seed that draws them")

    # model
    model: Optional[str] = option(None, "a local Hugging Face model directory, or a LoRA adapter directory (loaded "
                                        "on its base); none = a tiny Llama built from a config")
    adapter: str = option(ADAPTER_MODES[0], "when model is a LoRA adapter: attach it (with lora: continue training it) or "
                                    "merge it into the base first", ADAPTER_MODES)
    tokenizer: Optional[str] = option(None, "tokenizer directory; none = the model's (or the adapter's base's)")
    torch_dtype: str = option(WEIGHT_DTYPE, "weights of a model that is not quantised", tuple(DTYPES))
    load_in_4bit: bool = option(False, "QLoRA: the base model's weights in 4-bit NF4 (bitsandbytes); needs lora")
    bnb_compute_dtype: str = option("bfloat16", "load_in_4bit: the dtype 4-bit layers compute in", tuple(DTYPES))
    bnb_double_quant: bool = option(True, "load_in_4bit: quantise the quantisation constants too")
    lora: bool = option(False, "train LoRA adapters (peft) instead of every weight")
    lora_r: int = option(16, "LoRA rank", type=at_least(int, 1))
    lora_alpha: int = option(32, "LoRA scaling numerator (scale = lora_alpha / lora_r)")
    lora_dropout: float = option(0.05, "dropout on the LoRA input")
    lora_target_modules: str = option("all-linear", "modules that get adapters: all-linear, or names separated by "
                                                    "commas (q_proj,v_proj)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward (less memory, more time)")
    attn_implementation: str = option(ATTN_IMPLEMENTATIONS[0], "attention implementation; flash_attention_2 needs "
                                              "packing per_candidate", ATTN_IMPLEMENTATIONS)
    trust_remote_code: bool = option(False, "allow a model directory's own Python code")
    tiny_hidden_size: int = option(128, "the built-in tiny Llama: hidden size")
    tiny_layers: int = option(2, "the built-in tiny Llama: layers")
    tiny_heads: int = option(4, "the built-in tiny Llama: attention heads")

    # optimisation
    optimizer: str = option("adamw", "optimizer (paged_adamw_8bit: bitsandbytes, for QLoRA)", OPTIMIZERS)
    learning_rate: Optional[float] = option(None, "peak learning rate; none = 2e-4 for LoRA on a model (a real "
                                                  "checkpoint's adapters), else 3e-3 (the embedded tiny Llama's)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    lr_schedule: str = option("cosine", "learning-rate schedule after the warm-up (transformers' get_scheduler; "
                                        "constant is its constant_with_warmup)", LR_SCHEDULES)
    warmup_steps: Optional[int] = option(None, "linear warm-up steps; none = 10% of the run's steps for LoRA on a "
                                               "model, else 20. A warm-up as long as the run (the peak learning rate "
                                               "never reached) is warned about", type=at_least(int, 0))
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    batch_groups: int = option(16, "instructions (groups of candidates) per micro-batch and process",
                               type=at_least(int, 1))
    max_batch_tokens: Optional[int] = option(None, "token budget of one forward: a micro-batch whose packed tokens "
                                                   "(padding included, as packing lays them out) pass it runs in "
                                                   "pieces of whole groups, their gradients accumulated (the same "
                                                   "groups per step, less peak memory); 0 = no budget; none = 2048 "
                                                   "for a model, no budget for the embedded tiny Llama",
                                     type=at_least(int, 0))
    grad_accum: int = option(1, "micro-batches per optimizer step", type=at_least(int, 1))
    num_epochs: float = option(2.0, "passes over the training data")
    max_steps: int = option(0, "optimizer steps; > 0 overrides num_epochs")
    mixed_precision: str = option("no", "autocast dtype of the forward (the fused loss follows it)",
                                  MIXED_PRECISIONS)
    seed: int = option(42, "seed of the data order, the split and the initialisation")
    cpu: bool = option(False, "run on the CPU even when a GPU is present")
    sharding: str = option("none", "none (one process, or DDP over several) | fsdp (FSDP2 full shard) | "
                                   "deepspeed_zero3 (needs a DeepSpeed launch)", SHARDINGS)
    fsdp_cpu_offload: bool = option(False, "fsdp: keep shards and their gradients in CPU memory between uses (GPU)")

    # run
    output_dir: str = option("runs/tuna", "where config.json, metrics.jsonl, summary.json, checkpoints/ and final/ go")
    log_every: int = option(10, "log training metrics every this many steps", type=at_least(int, 1))
    eval_every: int = option(100, "evaluate every this many steps (0: before training and at the end only)")
    eval_groups: int = option(256, "at most this many held-out groups per evaluation", type=at_least(int, 1))
    eval_controls: bool = option(True, "also evaluate with shuffled prompts and a prompt-free scorer")
    save_every: int = option(100, "write a checkpoint every this many steps", type=at_least(int, 1))
    keep_checkpoints: int = option(2, "checkpoints kept (the newest)", type=at_least(int, 1))
    resume: str = option("auto", "auto (the latest checkpoint in output_dir) | never | a checkpoint directory")
    overwrite: bool = option(False, "delete an earlier run's checkpoints, metrics and results in output_dir and "
                                    "start afresh")
    resume_with_new_settings: bool = option(False, "resume although data, model, loss or optimizer settings changed")
    skip_nonfinite: bool = option(False, "skip (and count) steps whose loss is NaN or infinite instead of stopping")
    tensorboard: bool = option(True, "write TensorBoard events (output_dir/tensorboard)")
    trackers: str = option("", "more experiment trackers through accelerate, separated by commas (wandb, mlflow, "
                               "comet_ml, aim, clearml, dvclive; each needs its package)")
    progress: bool = option(True, "show a progress bar (on a terminal; TUNA_PROGRESS=1 forces one in a pipe)")

    def __post_init__(self) -> None:
        # the defaults that depend on what is trained, resolved once (config.json holds the values used): a real
        # checkpoint's LoRA adapters want a far lower rate than the tiny Llama trained from scratch, and a real
        # model's groups are long enough that 16 of them padded to the longest overflow memory
        lora_on_a_model = self.lora and self.model is not None
        if self.learning_rate is None:
            self.learning_rate = REAL_LORA_LEARNING_RATE if lora_on_a_model else 3e-3
        if self.warmup_steps is None and not lora_on_a_model:  # LoRA on a model: a share of the steps (build.py)
            self.warmup_steps = 20
        if self.max_batch_tokens is None:
            self.max_batch_tokens = 0 if self.model is None else REAL_MODEL_BATCH_TOKENS

    def validate(self) -> "TrainConfig":
        check_options(self)
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
        if self.reference == "adapter" and not self.lora:
            raise ValueError("config field 'reference' 'adapter' needs 'lora': the reference is the model with its "
                             "adapters off")
        if self.load_in_4bit and self.model is None:
            raise ValueError("config field 'load_in_4bit' needs 'model' (a local model directory to quantise)")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def config_fields(config_class: type = None) -> Dict[str, dataclasses.Field]:
    """The fields of a config dataclass (TrainConfig by default), by name."""
    return {f.name: f for f in dataclasses.fields(config_class or TrainConfig)}


def field_kind(field_: dataclasses.Field) -> type:
    """The type of a config field's values: its default's, or for a default of None the annotation's
    (``Optional[float]``: float), else str."""
    default = field_.default if field_.default is not dataclasses.MISSING else field_.default_factory()
    if default is not None:
        return type(default)
    annotation = field_.type if isinstance(field_.type, str) else getattr(field_.type, "__name__", "")
    return {"Optional[float]": float, "Optional[int]": int}.get(annotation, str)


def _coerce(field_: dataclasses.Field, value: Any, where: str) -> Any:
    """A YAML or command-line value converted to the field's type, with an error naming the field."""
    name = field_.name
    kind = field_kind(field_)
    if value is None:
        return None
    try:
        if kind is dict:  # a mapping of another config's fields (the pipeline's stages): YAML or a YAML string
            value = yaml.safe_load(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError
            return value
        if kind is list:  # a YAML list; on the command line a YAML list or comma-separated names
            value = yaml.safe_load(value) if isinstance(value, str) else value
            if isinstance(value, str):
                value = [name.strip() for name in value.split(",") if name.strip()]
            if not isinstance(value, list):
                raise ValueError
            return value
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


def load_config(path: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None, config_class: type = None):
    """Defaults, then the YAML file (if any), then overrides (e.g. parsed flags): each key a field of
    ``config_class`` (TrainConfig by default; the pipeline's PipelineConfig too)."""
    values: Dict[str, Any] = {}
    known = config_fields(config_class)
    if path is not None:
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
            values[key] = _coerce(known[key], value, path)
    for key, value in (overrides or {}).items():
        if key not in known:
            raise ValueError(f"unknown config field '{key}'")
        values[key] = _coerce(known[key], value, "command line")
    try:
        return (config_class or TrainConfig)(**values).validate()
    except ValueError as error:
        raise ValueError(f"{path}: {error}" if path is not None else str(error)) from None
