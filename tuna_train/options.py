"""Every option declared once: :func:`option` (a dataclass field with its default, help, choices and bounds), the
option groups that several configurations share, and the one check every configuration runs.

A group is a dataclass whose fields all have defaults. A configuration takes the groups it needs as base classes,
so its fields stay flat (one YAML key and one ``--flag`` per field) while each is written in one place:

- :class:`ScoreOptions`: how token log-probabilities become a candidate's score (alpha);
- :class:`LossOptions`: the Tuna loss (``TrainConfig`` and ``TunaTrainingArguments``); :meth:`~LossOptions.tuna_loss`
  builds the ``TunaLoss`` in one call;
- :class:`TextOptions`: how a record becomes a prompt (template) and how long a candidate may be (max_length);
- :class:`ScoringOptions`: how a model that only runs scores ranked groups (alpha, template, max_length, token_budget);
- :class:`GroupOptions`: how a ranked group becomes tokens for training (template, max_length, max_candidates,
  packing);
- :class:`PlacementOptions`: where a model that only runs (a teacher, a sampler, a judge, an evaluated model) loads;
- :class:`EndpointOptions` and :class:`JudgeOptions`: an OpenAI-compatible endpoint, and a judge asked through one;
- :class:`SamplingOptions`: how candidates are sampled (``tuna generate`` and the pipeline's generate stage).

A configuration that takes one field of a group, or wants another default for it, names it with :func:`field_of`
(the help, choices and bound stay the group's). Bounds are argparse types (:func:`at_least`, :func:`above`): the
command line refuses a bad value with argparse's usage error, and :func:`check_options` refuses it in YAML and in code.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, Mapping, Optional

from tuna_hf import REFERENCES, reference_model_path
from tuna_kernels import IMPLS, LOSSES, MLE_ON, REFERENCE_LOSSES, TunaLoss

from .collate import LAYOUTS
from .model import PLACEMENT_DEVICES, PLACEMENT_DTYPES, Placement
from .templates import TEMPLATES

#: the implementations a run may choose (the reference materialises the logits: for tests)
TRAIN_IMPLS = tuple(impl for impl in IMPLS if impl != "reference")


def option(default: Any, help: str, choices: Optional[Collection[Any]] = None, *,
           type: Optional[Callable[[str], Any]] = None, **argparse_options) -> Any:
    """A config field with its help text, allowed values and bound (the CLI, YAML loading and validate() read them).

    A registry (a dict such as ``tuna_kernels.LOSSES``) is kept live, so a name registered after this module is
    imported (``tuna_kernels.register_loss``) is a valid choice; a sequence is frozen to a tuple (a tuple is kept as
    it is: a subclass may hold more than it lists, as ``tuna_hf.REFERENCES`` holds every model:PATH). ``type``: a
    bound (:func:`at_least`, :func:`above`). ``argparse_options``: how the command line takes the field
    (``aliases``, ``required``, ``nargs``; ``positional=True`` for an argument without a flag)."""
    if choices is not None and not isinstance(choices, (Mapping, tuple)):
        choices = tuple(choices)
    metadata = {"help": help, "choices": choices, **argparse_options}
    if type is not None:
        metadata["type"] = type
    if isinstance(default, (dict, list)):  # a mutable default: each config gets its own copy
        return field(default_factory=lambda: _copy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _copy(value):
    return type(value)(value)


def field_of(group: type, name: str, default: Any = dataclasses.MISSING) -> Any:
    """``group``'s field ``name`` for a configuration that takes it alone, with its own ``default`` if given (the
    help, choices and bound stay as ``group`` declares them)."""
    declared = group.__dataclass_fields__[name]
    if default is dataclasses.MISSING:
        default = declared.default if declared.default is not dataclasses.MISSING else declared.default_factory()
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: _copy(default), metadata=declared.metadata)
    return field(default=default, metadata=declared.metadata)


def _bound(kind: type, minimum: float, inclusive: bool) -> Callable[[str], Any]:
    """An argparse type: a finite ``kind`` >= ``minimum`` (> when not ``inclusive``), so that a value that would
    fail every request (a zero deadline, no parse attempt) is refused before anything is read or sent."""
    text_bound = f"{'>=' if inclusive else '>'} {minimum:g}"

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'} {text_bound}, "
                                             f"got {text!r}") from None
        if not within(value):
            raise argparse.ArgumentTypeError(f"must be {text_bound}, got {text!r}")
        return value

    def within(value) -> bool:
        return math.isfinite(value) and (value >= minimum if inclusive else value > minimum)

    convert.__name__ = kind.__name__  # argparse names the type in its messages
    convert.within, convert.bound = within, text_bound
    return convert


def at_least(kind: type, minimum: float) -> Callable[[str], Any]:
    """A bound: ``kind`` values >= ``minimum``."""
    return _bound(kind, minimum, inclusive=True)


def above(kind: type, minimum: float) -> Callable[[str], Any]:
    """A bound: ``kind`` values > ``minimum``."""
    return _bound(kind, minimum, inclusive=False)


def ordered_fields(config_class: type) -> Dict[str, dataclasses.Field]:
    """The fields of a configuration dataclass, its own first (in their order), then its option groups': the
    order of its flags and of its example YAML file."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    own = [name for name in config_class.__dict__.get("__annotations__", {}) if name in fields]
    return {name: fields[name] for name in own + [name for name in fields if name not in own]}


def choices_of(field_: dataclasses.Field) -> Optional[tuple]:
    """The allowed values of a config field now (None: any value of its type)."""
    allowed = field_.metadata.get("choices")
    if allowed is None or isinstance(allowed, tuple):
        return allowed
    return tuple(allowed)


def check_options(config: Any, *groups: type) -> None:
    """Raise naming the first field of a config dataclass whose value is not one of its choices or out of its
    bound, then run every option group's own checks (its ``check_<group name>`` method). ``groups``: only the
    fields of these (a class that mixes them into another's fields, as ``TunaTrainingArguments``); none: all."""
    names = {f.name for group in groups for f in dataclasses.fields(group)} if groups else None
    for field_ in dataclasses.fields(config):
        if names is not None and field_.name not in names:
            continue
        value = getattr(config, field_.name)
        if value is None and field_.metadata.get("required"):
            raise ValueError(f"config field '{field_.name}' is required (--{field_.name.replace('_', '-')})")
        allowed = choices_of(field_)
        if allowed is not None and value is not None:
            if isinstance(value, list):  # a list field (the pipeline's controls): its choices, each at most once
                if any(v not in allowed for v in value) or len(set(value)) < len(value):
                    raise ValueError(f"config field '{field_.name}' must be a list of distinct values of {allowed}, "
                                     f"got {value!r}")
            elif value not in allowed:
                raise ValueError(f"config field '{field_.name}' must be one of {allowed}, got {value!r}")
        bound = field_.metadata.get("type")
        if bound is not None and value is not None and not (isinstance(value, (int, float)) and bound.within(value)):
            raise ValueError(f"config field '{field_.name}' must be {bound.bound}, got {value!r}")
    for group in type(config).__mro__:
        if groups and not any(issubclass(chosen, group) for chosen in groups):
            continue
        check = group.__dict__.get(f"check_{group.__name__}")
        if check is not None:
            check(config)


@dataclass
class ScoreOptions:
    """How a candidate's token log-probabilities become its score (training, tuna score, tuna eval ranking)."""

    alpha: float = option(1.0, "score = sum of token log-probs / tokens ** alpha (1: the mean, 0: the sum)",
                          type=at_least(float, 0))


@dataclass
class LossOptions(ScoreOptions):
    """The Tuna loss: the ranking loss on the candidates' scores, the MLE term, the reference, the kernels."""

    loss: str = option("tuna_margin", "ranking loss on the candidates' scores (tuna_margin: the paper's)", LOSSES)
    margin: float = option(0.1, "tuna_margin: margin per rank gap", type=at_least(float, 0))
    mle_weight: float = option(1.0, "weight of the token cross-entropy term", type=at_least(float, 0))
    mle_on: str = option("all", "the cross-entropy term covers every candidate's tokens, or the best one's", MLE_ON)
    skip_ties: bool = option(False, "drop pairs tied in the ranking's own scores")
    beta: float = option(0.1, "pairwise_logistic, plackett_luce, lipo_lambda: the reward scale (r = beta * "
                              "(score - reference score))")
    gamma: float = option(0.0, "pairwise_logistic: target reward margin")
    temperature: float = option(1.0, "listmle: the scores are divided by it", type=above(float, 0))
    reference: str = option("none", "reference scores of plackett_luce, lipo_lambda, pairwise_logistic: none; "
                                    "adapter (the model with its LoRA adapters off, computed in the same step; "
                                    "needs LoRA); field (each record's ref_scores); model:PATH (a separate frozen "
                                    "model with the same tokenizer, on the training device, placed as tuna "
                                    "score's teacher: reference_dtype, reference_load_in_4bit)", REFERENCES)
    reference_dtype: str = option("auto", "reference model:PATH: its dtype (auto: bfloat16 on GPUs that support it, "
                                          "float16 on older GPUs, float32 on the CPU)", PLACEMENT_DTYPES)
    reference_load_in_4bit: bool = option(False, "reference model:PATH: its weights in 4-bit NF4 (bitsandbytes), "
                                                 "computing in reference_dtype")
    impl: str = option("auto", "fused kernels: triton on CUDA, chunked torch elsewhere (auto)", TRAIN_IMPLS)
    kernel_autotune: bool = option(False, "Triton: time the candidate kernel configurations once per shape "
                                          "(or TUNA_AUTOTUNE=1)")
    grad_filter_eps: float = option(0.0, "gradient filtering: the backward skips logit tiles whose largest "
                                         "|onehot - p| is at most this (bf16's unit roundoff: 0.00390625; 0: off)")

    def check_LossOptions(self) -> None:
        if not 0.0 <= self.grad_filter_eps < 1.0:
            raise ValueError(f"config field 'grad_filter_eps' must be in [0, 1), got {self.grad_filter_eps}")
        if self.reference != "none" and self.loss not in REFERENCE_LOSSES:
            raise ValueError(f"config field 'reference' {self.reference!r} needs a loss that reads reference scores "
                             f"({', '.join(sorted(REFERENCE_LOSSES))}), got loss={self.loss!r}")
        if reference_model_path(self.reference) is None:
            for name in ("reference_dtype", "reference_load_in_4bit"):
                if getattr(self, name) != LossOptions.__dataclass_fields__[name].default:
                    raise ValueError(f"config field '{name}' places a reference model: it needs 'reference' "
                                     f"model:PATH, got reference={self.reference!r}")

    @property
    def autotune(self) -> Optional[bool]:
        """The kernels' autotune setting: on, or None (the ``TUNA_AUTOTUNE`` environment variable decides)."""
        return self.kernel_autotune or None

    def tuna_loss(self) -> TunaLoss:
        """The fused loss these options describe."""
        return TunaLoss(loss=self.loss, margin=self.margin, alpha=self.alpha, mle_weight=self.mle_weight,
                        mle_on=self.mle_on, skip_ties=self.skip_ties, beta=self.beta, gamma=self.gamma,
                        temperature=self.temperature, impl=self.impl, autotune=self.autotune,
                        grad_filter_eps=self.grad_filter_eps)

    def reference_placement(self, device) -> Placement:
        """Where a reference model:PATH loads: on the training ``device``, in reference_dtype (4-bit if asked)."""
        return Placement(device=str(device), dtype=self.reference_dtype, load_in_4bit=self.reference_load_in_4bit)


@dataclass
class TextOptions:
    """How a record becomes a prompt and how long a candidate may be, in every command that tokenises one."""

    template: str = option("auto", "prompt template: auto (the tokenizer's chat template where it has one, else "
                                   "Alpaca; an endpoint teacher: Alpaca; tuna pipeline's own start model, a tiny "
                                   "Llama from scratch: none, since it learns the built-in tasks far sooner when the "
                                   "instruction's last words sit next to its answer), alpaca (the paper's), chat (the "
                                   "tokenizer's chat template) or none (the instruction as it is)", TEMPLATES)
    max_length: int = option(512, "tokens per candidate: prompt (BOS included) + response + EOS. A response longer "
                                  "than what its prompt leaves is cut on the right (its end and EOS are lost); a "
                                  "prompt of max_length tokens or more keeps only its last max_length - 1 tokens "
                                  "(cut on the left) and every response then keeps one token", type=at_least(int, 1))


@dataclass
class ScoringOptions(ScoreOptions, TextOptions):
    """How a model that only runs scores ranked groups (``tuna score``'s local teacher, ``tuna eval ranking``): each
    candidate's summed log-likelihood by the fused kernels, in batches of whole groups."""

    token_budget: int = option(16384, "tokens per scoring batch (whole groups; a group's prompt counts once)",
                               type=at_least(int, 1))


@dataclass
class GroupOptions(TextOptions):
    """A ranked group as the training step packs it."""

    max_candidates: int = option(16, "candidates kept per group (best first)", type=at_least(int, 1))
    packing: str = option("shared", "shared: the prompt once per group, then every response (4D mask); "
                                    "per_candidate: one row per candidate", LAYOUTS)


@dataclass
class PlacementOptions:
    """Where a model that only runs (no training) is loaded: the same options for every stage that runs one."""

    device: str = option("auto", "where the model runs: auto (the first GPU if there is one, else the CPU), cpu, "
                                 "cuda or cuda:N", metavar="DEVICE")
    dtype: str = option("auto", "weight and compute dtype: auto = bfloat16 on GPUs that support it, float16 on "
                                "older GPUs, float32 on the CPU", PLACEMENT_DTYPES)
    load_in_4bit: bool = option(False, "load the weights in 4-bit NF4 (bitsandbytes), computing in dtype; on CUDA "
                                       "the model is placed with device_map on device")

    def check_PlacementOptions(self) -> None:
        if self.device not in PLACEMENT_DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"config field 'device' must be one of {PLACEMENT_DEVICES} or cuda:N, got {self.device!r}")

    @property
    def placement(self) -> Placement:
        return Placement(self.device, self.dtype, self.load_in_4bit)


@dataclass
class EndpointOptions:
    """An OpenAI-compatible endpoint (an openai:MODEL teacher or judge): where, the key's variable, deadlines and
    how many requests at once."""

    base_url: Optional[str] = option(None, "the endpoint's base URL (e.g. http://localhost:8000/v1)")
    api_key_env: str = option("OPENAI_API_KEY", "environment variable holding the API key (never written anywhere)")
    concurrency: int = option(4, "requests in flight at once", type=at_least(int, 1))
    timeout: float = option(60.0, "deadline in seconds for one whole HTTP attempt (connect, send, receive the full "
                                  "answer), not per socket read", type=above(float, 0))
    max_retries: int = option(5, "retries of a request after 429, 5xx, a time-out or a malformed answer",
                              type=at_least(int, 0))
    max_backoff: float = option(30.0, "longest wait in seconds between retries, also when the server's Retry-After "
                                      "asks for more. One request ends within (max_retries + 1) x timeout + "
                                      "max_retries x max_backoff seconds (6 x 60 + 5 x 30 = 510 s by default)",
                                type=at_least(float, 0))


@dataclass
class JudgeOptions(EndpointOptions):
    """A judge (openai:MODEL at base_url, or local:PATH): the endpoint, and how its answers are asked for."""

    parse_attempts: int = option(3, "times a record is asked when the judge's answer cannot be parsed (no valid "
                                    "ranking or verdict); a local judge samples the answers asked again",
                                 type=at_least(int, 1))
    judge_max_tokens: int = option(2048, "longest answer in tokens an openai:MODEL judge is asked for (max_tokens); "
                                         "bounds each request's time on a slow endpoint", type=at_least(int, 1))


@dataclass
class SamplingOptions:
    """How K diverse candidates are sampled per instruction (the method's diversity rule: resample a set with two
    near-identical responses at a higher temperature)."""

    num_candidates: int = option(4, "responses sampled per instruction", type=at_least(int, 1), aliases=["-k"])
    max_new_tokens: int = option(512, "tokens per generated response (a sampled candidate, or a greedy evaluation "
                                      "answer)", type=at_least(int, 1))
    temperature: float = option(1.0, "sampling temperature of the first draw", type=at_least(float, 0))
    top_p: float = option(1.0, "nucleus sampling mass", type=above(float, 0))
    rouge_threshold: float = option(0.8, "resample a set in which two responses have ROUGE-L F at or above this")
    temperature_step: float = option(0.1, "temperature added at each resampling")
    max_tries: int = option(3, "samplings per instruction at most; the most diverse set is kept",
                            type=at_least(int, 1))
    batch_size: int = option(8, "instructions run together (sampled, or answered in an evaluation)",
                             type=at_least(int, 1))


def options_of(config: Any, group: type) -> Dict[str, Any]:
    """The values of ``group``'s fields in ``config`` (a configuration that mixes ``group`` in), by name: the
    keyword arguments of the function that takes that group's options."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(group)}
