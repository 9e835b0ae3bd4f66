"""The configuration of each ``tuna`` command besides ``train`` (:class:`.config.TrainConfig`) and ``pipeline``
(:class:`.pipeline.workflow.PipelineConfig`): one dataclass a command, made of the option groups of
:mod:`.options` and the command's own fields. The command line is built from them (:mod:`.cli`: one flag a
field, with its help, choices and bound), and code can run a command's configuration without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from .config import TrainConfig
from .model import PLACEMENT_DTYPES
from .options import (EndpointOptions, JudgeOptions, PlacementOptions, SamplingOptions, ScoringOptions, TextOptions,
                      check_options, field_of, option)

#: what ``tuna eval`` measures
EVAL_KINDS = ("ranking", "generation", "judge", "verifiable")
#: what ``tuna models`` does
MODEL_ACTIONS = ("prepare", "list")


class Checked:
    """A command's configuration: ``validate()`` checks every field's choices and bound and every group's rules."""

    def validate(self):
        check_options(self)
        return self


@dataclass
class RetryOptions:
    """The commands that cache failed records (score at an endpoint, rank) ask them again only when told."""

    retry_failed: bool = option(False, "ask again for records cached as failed")


@dataclass
class ScoreConfig(ScoringOptions, EndpointOptions, RetryOptions, PlacementOptions, Checked):
    """``tuna score``: probabilistic ranking, each record's responses scored by a teacher's log-likelihoods."""

    teacher: str = option(None, "local model directory, or openai:MODEL with base_url", required=True)
    data: str = option(None, "JSON lines of instructions with their responses", required=True)
    out: str = option(None, "JSON lines written: each record with its scores and ranking", required=True)


@dataclass
class GenerateConfig(SamplingOptions, PlacementOptions, Checked):
    """``tuna generate``: K diverse responses sampled per instruction (resumable)."""

    model: str = option(None, "local model (or LoRA adapter) directory that samples", required=True)
    data: str = option(None, "JSON lines of instructions", required=True)
    out: str = option(None, "JSON lines written, one record per instruction (resumable)", required=True)
    template: str = field_of(TextOptions, "template")
    seed: int = option(0, "sampling seed: with each record's id (or text) it seeds that record's draws, so a resumed "
                          "run writes what an uninterrupted one does")


@dataclass
class RankConfig(JudgeOptions, RetryOptions, PlacementOptions, Checked):
    """``tuna rank``: contextual ranking of each record's responses by a judge (cached, resumable)."""

    judge: str = option(None, "openai:MODEL (at base_url) | local:PATH | rule | verifiable (the IFEval checkers of "
                              "each record's 'constraints': candidates ranked by the fraction followed)",
                        required=True)
    data: str = field_of(ScoreConfig, "data")
    out: str = option(None, "JSON lines of ranked records (failures in OUT.failures.jsonl)", required=True)
    include_judge_response: bool = field_of(TrainConfig, "include_judge_response")


@dataclass
class EvalConfig(ScoringOptions, JudgeOptions, PlacementOptions, Checked):
    """``tuna eval``: one model's report of a kind, or ``--compare`` of reports."""

    kind: Optional[str] = option(None, "ranking: pairwise accuracy and Kendall tau of held-out ranked records; "
                                       "generation: ROUGE-L of greedy answers; judge: win rate against a baseline's "
                                       "answers; verifiable: IFEval's prompt- and instruction-level accuracy, strict "
                                       "and loose, of greedy answers to records with 'constraints'", EVAL_KINDS,
                                 positional=True, nargs="?")
    model: Optional[str] = option(None, "local model directory")
    adapter: Optional[str] = option(None, "a LoRA adapter directory to load on the model")
    data: Optional[str] = option(None, "ranked records (ranking), tasks with references (generation), questions "
                                       "(judge) or records with 'constraints' (verifiable)")
    out: str = option("runs/eval", "directory for report-<kind>.json and .md (kinds do not overwrite each other)")
    name: Optional[str] = option(None, "the column name of this run in comparisons")
    max_new_tokens: int = field_of(SamplingOptions, "max_new_tokens", 128)
    batch_size: int = field_of(SamplingOptions, "batch_size", 16)
    baseline_answers: Optional[str] = option(None, "judge: JSONL of the baseline's answers")
    judge: Optional[str] = option(None, "judge: openai:MODEL | local:PATH")
    compare: list = option([], "print these reports side by side", nargs="+", metavar="RUN")
    png: Optional[str] = option(None, "with compare: also write a bar chart here")


@dataclass
class MergeConfig(Checked):
    """``tuna merge``: a LoRA adapter merged into its base model, saved whole (safetensors, config, tokenizer)."""

    adapter: str = option(None, "the LoRA adapter directory (e.g. runs/tuna_p/final of a --lora run)", required=True,
                          positional=True)
    out: str = option(None, "directory for the merged model", required=True)
    dtype: str = option("float32", "dtype of the base while merging and of the saved weights",
                        PLACEMENT_DTYPES[1:])
    trust_remote_code: bool = field_of(TrainConfig, "trust_remote_code")


@dataclass
class ModelsConfig(Checked):
    """``tuna models``: the real pretrained models shipped by registry packages."""

    action: str = option(None, "prepare: make the directory; list: show the models, whether installed and where "
                               "prepared", MODEL_ACTIONS, required=True, positional=True)
    names: List[str] = option([], "models to prepare or list, or all (default: all)", positional=True, nargs="*",
                              metavar="NAME")
    force: bool = option(False, "prepare again even when the directory exists")
