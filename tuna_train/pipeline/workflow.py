"""``tuna pipeline``: the whole method as a table of stages (:func:`stages`) in one run directory; the
orchestration of this package's stages with training and evaluation (only the CLI imports it).

    [score] -> [sft] -> train_p (Tuna_p) -> generate (with Tuna_p) -> rank (judge) -> train_c (Tuna_c from Tuna_p)
            -> [controls: the same data and budget, one ingredient taken away] -> eval_<model> for each model

``tuna_p: false`` leaves Tuna_p out: the start model samples its own candidates and Tuna_c starts from it.
``instructions: verifiable`` builds the verifiable task set (IFEval constraints, :mod:`tuna_train.verifiable`) in
the run directory and evaluates every model with IFEval's figures on its two held-out splits (in-kind and
unseen-kind) instead of the built-in tasks' ranking and generation figures
(``configs/smollm2_verifiable.yaml``).

``manifest.json`` records each stage's status, outputs, time and counts; :func:`run_pipeline` runs each stage of
the table once: a stage whose outputs are complete is skipped; a partial one resumes (training from its last
checkpoint, generation and ranking from their progress files). With no configuration it runs on the built-in tasks: a tiny Llama instruction-tuned first
(``sft``: MLE on the tasks' reference answers, as the paper starts from an Alpaca-tuned model), Tuna_p on the
tasks' ranked candidates, Tuna_c on its own samples ranked by the rule judge (the task's correctness), and
reports for the start model, Tuna_p and Tuna_c, on held-out instructions: ROUGE-L and exact match of greedy
answers and pairwise ranking accuracy.

Every field of :class:`PipelineConfig` is a flag of ``tuna pipeline`` and a key of its YAML file
(``configs/pipeline_example.yaml`` shows them all); ``train_p``, ``train_c`` and ``sft`` are mappings of
``tuna train`` fields.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ..build import build_model
from ..commands import EvalConfig
from ..config import TrainConfig, load_config
from ..data import load_ranked
from ..evaluation.generation import greedy_generations, save_generations
from ..evaluation.reports import compare, report_path, write_report
from ..evaluation.scoring import evaluate_ranking
from ..evaluation.text import generation_metrics
from ..files import read_json, write_atomic
from ..model import load_tokenizer
from ..options import (JudgeOptions, PlacementOptions, SamplingOptions, ScoringOptions, TextOptions, at_least,
                       check_options, field_of, option, options_of)
from ..synthetic import make_records, make_task_records
from ..trainer import Trainer
from ..verifiable.pipeline import HELDOUT_SPLITS, evaluate_model, write_pipeline_task_set
from ..verifiable.tasks import MAX_CONSTRAINTS
from .generate import generate_records
from .judge import make_judge
from .rank import rank_records
from .score import score_with_model
from .store import read_jsonl, write_jsonl
from .training_controls import TRAINING_CONTROLS, control_records

logger = logging.getLogger(__name__)

#: tuna train fields that Tuna_c takes from Tuna_p unless train_c sets them: Tuna_c starts from Tuna_p's output,
#: so with LoRA it must load that adapter the same way (4-bit base, compute dtype) and keep training adapters
INHERITED_BY_TUNA_C = ("lora", "lora_r", "lora_alpha", "lora_dropout", "load_in_4bit", "bnb_compute_dtype",
                       "mixed_precision", "max_length", "template")


#: the ``instructions`` value that builds the verifiable task set in the run directory
VERIFIABLE = "verifiable"


@dataclass
class PipelineConfig(SamplingOptions, JudgeOptions, PlacementOptions):
    """The stages of ``tuna pipeline``; the defaults run the whole method on the built-in tasks on a CPU. The
    generate stage samples as :class:`.options.SamplingOptions` say, the rank stage asks its judge as
    :class:`.options.JudgeOptions` say, and the stages that only run a model (score, generate, a local judge,
    evaluate) load it as :class:`.options.PlacementOptions` say."""

    output_dir: str = option("runs/pipeline", "run directory: every stage's output, manifest.json, summary.json")
    data: Optional[str] = option(None, "probabilistic-ranking records for Tuna_p (any format tuna train reads); "
                                       "none = the built-in tasks with rule scores")
    teacher: Optional[str] = option(None, "local model directory that (re)scores `data` before Tuna_p (the "
                                          "probabilistic ranking); none = the data's own scores")
    instructions: Optional[str] = option(None, "instructions Tuna_p samples candidates for (contextual ranking); "
                                               "none = built-in tasks; verifiable = the verifiable task set (IFEval "
                                               "constraints) built from seed, contextual_examples of them, and "
                                               "every model evaluated on its two held-out splits (eval_examples "
                                               "each) with IFEval's figures")
    eval_data: Optional[str] = option(None, "held-out ranked records for every evaluation; none = built-in held-out")
    generation_tasks: Optional[str] = option(None, "tasks with references for the generation evaluation (ROUGE-L, "
                                                   "exact match); none = the held-out instructions' references")
    judge: str = option("rule", "who ranks the samples: rule (the built-in tasks' grader), openai:MODEL (an "
                                "OpenAI-compatible endpoint at base_url) or local:PATH (a local chat model)")
    include_judge_response: bool = field_of(TrainConfig, "include_judge_response", True)
    max_new_tokens: int = field_of(SamplingOptions, "max_new_tokens", 16)
    template: str = field_of(TextOptions, "template")
    synthetic_examples: int = option(4000, "built-in tasks: groups for Tuna_p")
    contextual_examples: int = option(2000, "built-in tasks (or instructions: verifiable): instructions for "
                                            "contextual ranking")
    eval_examples: int = option(400, "built-in tasks: held-out groups; instructions: verifiable: records of each "
                                     "held-out split", type=at_least(int, 1))
    max_constraints: int = option(MAX_CONSTRAINTS, "instructions: verifiable: constraints per instruction, 1 to this many (more "
                                     "constraints give the judge's fractions more values, so fewer tied candidates)",
                                  type=at_least(int, 1))
    train_kinds: list = option([], "instructions: verifiable: the IFEval constraint kinds of the training and "
                                   "in-kind held-out instructions (ids such as keywords:frequency); empty = every "
                                   "usable kind but the unseen split's")
    seed: int = option(42, "seed of every stage (the built-in data use seed, seed+1, +2, +3: disjoint)")
    model: Optional[str] = option(None, "the start model (instruction-tuned; a directory); none = a tiny Llama "
                                        "tuned by the sft stage")
    sft_examples: int = option(3000, "built-in tasks for the supervised stage that makes the start model (0: none)")
    sft: dict = option({"num_epochs": 3.0, "learning_rate": 3e-3, "warmup_steps": 10, "eval_controls": False},
                       "tuna train fields of the supervised stage (a mapping; on the command line a YAML string)")
    tuna_p: bool = option(True, "train Tuna_p (probabilistic ranking on data) first and sample Tuna_c's candidates "
                                "with it; false = the start model samples its own and Tuna_c starts from it")
    controls: list = option([], "controls trained on Tuna_c's data with its fields and evaluated beside it: "
                                "random_judge (the judge's scores kept, the candidates shuffled among them, seeded "
                                "per record: ties kept), best_only (supervised training on each group's best "
                                "candidate alone: rejection-sampling fine-tuning)", TRAINING_CONTROLS)
    mix_sft_into_c: bool = option(True, "mix as many supervised examples into Tuna_c's data as it has ranked "
                                        "groups (the paper's regulariser; built-in start model only)")
    # The built-in defaults (measured over three seeds, see docs/pipeline.md): the MLE term on the best candidate only
    # (an option of the method), since Tuna_p's wrong candidates are other tasks' answers and Tuna_c's are its own
    # mistakes; tied candidates left out of the hinge (the built-in scores tie often, and a ranking orders ties at
    # random); Tuna_c at a lower learning rate than Tuna_p, as in the paper, with a heavier MLE term
    train_p: dict = option({"num_epochs": 1.0, "learning_rate": 1e-3, "mle_on": "best", "skip_ties": True},
                           "tuna train fields of Tuna_p (a mapping; on the command line a YAML string)")
    train_c: dict = option({"learning_rate": 3e-4, "mle_weight": 4.0, "num_epochs": 2.0, "warmup_steps": 5,
                            "batch_groups": 16, "mle_on": "best", "skip_ties": True},
                           "tuna train fields of Tuna_c; " + ", ".join(INHERITED_BY_TUNA_C) + " default to Tuna_p's")

    def validate(self) -> "PipelineConfig":
        check_options(self)
        if not self.tuna_p and self.model is None and self.sft_examples < 1:
            raise ValueError("config field 'tuna_p' is false, so the start model samples Tuna_c's candidates: set "
                             "'model' (or sft_examples > 0 for the built-in start model)")
        if self.instructions == VERIFIABLE and self.judge != VERIFIABLE:
            raise ValueError(f"config field 'judge' must be verifiable with instructions: verifiable (their "
                             f"constraints are the judge), got {self.judge!r}")
        return self

    @property
    def prompt_template(self) -> str:
        """The template every stage uses: ``template``; auto is none for the pipeline's own start model, else
        left to each stage, which resolves it on its model's tokenizer (:func:`.templates.resolve_template`)."""
        if self.template != "auto":
            return self.template
        return "none" if self.model is None else "auto"

    @property
    def scoring(self) -> ScoringOptions:
        """How the teacher scores Tuna_p's data and the evaluation scores each model's ranking: the pipeline's
        template, the scoring group's other defaults."""
        return ScoringOptions(template=self.prompt_template)


def load_pipeline_config(path: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None) -> PipelineConfig:
    """Defaults, then the YAML file, then flags: each key a :class:`PipelineConfig` field."""
    return load_config(path, overrides, config_class=PipelineConfig)


#: PipelineConfig fields that may change between a run and its resumption (where and how models are reached);
#: any other field decides what the finished stages contain
RESUMABLE_FIELDS = ("output_dir", "concurrency", "base_url", "api_key_env", "device", "dtype", "load_in_4bit")


_MANIFEST_HINT = "; repair it, delete it (every stage then runs again) or pass another --output-dir"


class Manifest:
    """``manifest.json``: each stage's status, outputs and counts, and the settings the stages were made with."""

    def __init__(self, path: Path) -> None:
        self.path = path
        saved = read_json(path, dict, ValueError, _MANIFEST_HINT) if path.exists() else {}
        self.stages: Dict[str, Dict[str, Any]] = saved.get("stages", {})
        self.settings: Optional[Dict[str, Any]] = saved.get("settings")
        # checked here, once: a damaged manifest is one line naming it, not a TypeError in a later stage
        if not isinstance(self.stages, dict) or not all(
                isinstance(entry, dict) and isinstance(entry.get("status"), str)
                and isinstance(entry.get("outputs", []), list) for entry in self.stages.values()):
            raise ValueError(f"{path}: 'stages' must map each stage to an object with its 'status' (and a list "
                             f"of 'outputs'){_MANIFEST_HINT}")
        if self.settings is not None and not isinstance(self.settings, dict):
            raise ValueError(f"{path}: 'settings' must be an object of pipeline fields{_MANIFEST_HINT}")

    def check_settings(self, config: PipelineConfig) -> None:
        """Records the settings of a new run; refuses to resume finished stages made with other settings
        (a stage is skipped when its output exists, so they would be mixed silently)."""
        settings = {key: value for key, value in dataclasses.asdict(config).items() if key not in RESUMABLE_FIELDS}
        if self.settings is not None and self.stages:
            changed = [f"{key}: {self.settings.get(key)!r} -> {settings.get(key)!r}"
                       for key in sorted(set(settings) | set(self.settings))
                       if self.settings.get(key) != settings.get(key)]
            if changed:
                raise ValueError(f"{self.path}: the finished stages of this run were made with other settings ("
                                 + "; ".join(changed) + "). Resume with the same settings, or pass another "
                                 "--output-dir for a new run.")
        self.settings = settings
        self._write()

    def done(self, stage: str) -> bool:
        entry = self.stages.get(stage)
        return bool(entry and entry["status"] == "done" and all(Path(p).exists() for p in entry.get("outputs", [])))

    def record(self, stage: str, status: str, **info) -> None:
        self.stages[stage] = dict(info, status=status, time=time.strftime("%Y-%m-%d %H:%M:%S"))
        self._write()

    def _write(self) -> None:
        write_atomic(self.path, json.dumps({"settings": self.settings, "stages": self.stages}, indent=1))


class PipelineStopped(Exception):
    """A training stage stopped before its last step (SIGINT or SIGTERM: the trainer saved a checkpoint), or
    finished its last step with a stop asked; the stages after it need its ``final/`` model, so the pipeline
    stops too. The message says how to resume."""


def resume_hint(root) -> str:
    """How a stopped pipeline resumes: every stage skips what it finished (see the module docstring)."""
    return f"run the same tuna pipeline command (same --output-dir {root} and settings) to resume"


class PipelineRun:
    """One run directory: the configuration, the manifest, and the inputs and outputs of every stage. Each path
    follows from the configuration alone, so a stage finds its inputs whether the stages before it ran now or in
    an earlier run of the same command."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.root = root = Path(config.output_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest(root / "manifest.json")
        self.manifest.check_settings(config)
        self.verifiable = config.instructions == VERIFIABLE
        # the built-in inputs: three disjoint seeds; a verifiable task set from the seed (the same every run)
        self.data_p, self.eval_path, self.instructions = config.data, config.eval_data, config.instructions
        if self.verifiable:
            splits = {name: root / "verifiable" / f"{name}.jsonl" for name in ("train",) + HELDOUT_SPLITS}
            if not all(path.exists() for path in splits.values()):
                write_pipeline_task_set(root / "verifiable", config.seed, config.contextual_examples,
                                        config.eval_examples, config.max_new_tokens, config.max_constraints,
                                        config.train_kinds)
            self.instructions = str(splits["train"])
        if self.data_p is None and config.tuna_p:
            self.data_p = self._built_in("data_p.jsonl", lambda: make_records(config.synthetic_examples,
                                                                              seed=config.seed))
        # held-out instructions: none of them occurs in any training stage
        self.eval_path = self.eval_path or self._built_in("eval.jsonl", lambda: make_records(
            config.eval_examples, seed=config.seed + 1, split="heldout"))
        # the same instruction drawn twice is sampled and judged once (records are keyed by content)
        self.instructions = self.instructions or self._built_in("instructions.jsonl", lambda: make_task_records(
            config.contextual_examples, seed=config.seed + 2))
        self.scores_data = config.teacher is not None and config.tuna_p
        self.scored = root / "scored.jsonl"
        self.builds_start_model = config.model is None and config.sft_examples > 0
        self.start_model = str(root / "sft" / "final") if self.builds_start_model else config.model
        self.tuna_p = str(root / "train_p" / "final") if config.tuna_p else None
        self.sampler = self.tuna_p or self.start_model  # the method's diversity rule: the trained model samples
        self.generated, self.ranked = root / "generated.jsonl", root / "ranked.jsonl"
        self.mixes_sft = self.builds_start_model and config.mix_sft_into_c
        self.data_c = root / "data_c.jsonl" if self.mixes_sft else self.ranked
        # the ranked held-out records every training stage evaluates pairwise (the verifiable set has none: its
        # figures are the eval stages')
        self.train_eval = {} if self.verifiable else {"eval_data": self.eval_path}
        self.stop_message: Optional[str] = None

    def _built_in(self, name: str, make) -> str:
        path = self.root / name
        if not path.exists():
            write_jsonl(path, make())
        return str(path)

    @property
    def models(self) -> Dict[str, Optional[str]]:
        """The models the evaluation compares, by name: the start model (None: the untrained one Tuna_p starts
        from), Tuna_p, Tuna_c and each control."""
        models = {"start": self.start_model, "tuna_p": self.tuna_p, "tuna_c": str(self.root / "train_c" / "final")}
        if not self.config.tuna_p:
            del models["tuna_p"]
        return dict(models, **{name: str(self.root / f"control_{name}" / "final") for name in self.config.controls})

    @property
    def settings_c(self) -> Dict[str, Any]:
        """The tuna train fields of Tuna_c (and of the controls): train_c over those it inherits from train_p."""
        config = self.config
        inherited = {key: config.train_p[key] for key in INHERITED_BY_TUNA_C if key in config.train_p}
        return dict(inherited, **config.train_c, **self.train_eval, **({"model": self.sampler} if self.sampler else {}))

    def train(self, stage: str, overrides: Dict[str, Any]) -> Dict[str, Any]:
        """``tuna train`` into ``<root>/<stage>``: the manifest info of a finished stage. A stage stopped before
        its last step is recorded partial and stops the pipeline; a stop asked in its last step stops it after."""
        out = self.root / stage
        settings = dict(dict(template=self.config.prompt_template, seed=self.config.seed), **overrides)
        summary = Trainer(load_config(None, dict(settings, output_dir=str(out)))).run()
        outputs = [str(out / "summary.json"), str(out / "final")]
        if summary["status"] != "finished":  # no final/ yet: the next stage would load a model that does not exist
            self.manifest.record(stage, "partial", outputs=outputs, steps=summary["steps"])
            raise PipelineStopped(f"stage {stage} stopped at step {summary['steps']} of {summary['total_steps']} "
                                  f"(checkpoint in {out / 'checkpoints'}); {resume_hint(self.root)} it there")
        if summary.get("stop_requested"):  # Ctrl-C in the stage's last step: the stage is done, the run stops
            self.stop_message = (f"stage {stage} finished its last step ({summary['steps']}) and stopped there, as "
                                 f"asked; {resume_hint(self.root)} the stages after it")
        return {"outputs": outputs, "steps": summary["steps"]}

    def summary(self, stage: str) -> Dict[str, Any]:
        """The summary.json of a finished training stage, or {} for one this run skips."""
        path = self.root / stage / "summary.json"
        return json.loads(path.read_text()) if path.exists() and self.manifest.done(stage) else {}


# ------------------------------------------------------------------------------------------------ the stages
# Each stage is a function of the run that does its work and returns what the manifest records of it.


def _score(run: PipelineRun) -> Dict[str, Any]:
    config = run.config
    records = score_with_model(config.placement.load(config.teacher), load_tokenizer(config.teacher),
                               read_jsonl(run.data_p), config.scoring, teacher_name=config.teacher)
    write_jsonl(run.scored, records)
    return {"outputs": [str(run.scored)], "records": len(records)}


def _sft(run: PipelineRun) -> Dict[str, Any]:
    config, sft_data = run.config, run.root / "sft.jsonl"
    if not sft_data.exists():  # the reference answers as one-candidate groups: the loss is the MLE term alone
        write_jsonl(sft_data, [dict(r, responses=r["references"], scores=[0.0])
                               for r in make_task_records(config.sft_examples, seed=config.seed + 3)])
    return run.train("sft", dict(config.sft, data=str(sft_data), eval_data=run.eval_path))


def _train_p(run: PipelineRun) -> Dict[str, Any]:
    data = str(run.scored) if run.scores_data else run.data_p
    model = {} if run.start_model is None else {"model": run.start_model}
    return run.train("train_p", dict(run.config.train_p, data=data, **run.train_eval, **model))


def _generate(run: PipelineRun) -> Dict[str, Any]:
    config = run.config
    stats = generate_records(config.placement.load(run.sampler), load_tokenizer(run.sampler),
                             read_jsonl(run.instructions), run.generated, config.prompt_template, seed=config.seed,
                             **options_of(config, SamplingOptions))
    return dict(outputs=[str(run.generated)], **stats)


def _rank(run: PipelineRun) -> Dict[str, Any]:
    config = run.config
    judge = make_judge(config.judge, config, config.placement)
    stats = rank_records(read_jsonl(str(run.generated)), judge, run.ranked, config.concurrency,
                         config.parse_attempts, include_judge_response=config.include_judge_response)
    return dict(outputs=[str(run.ranked)], **stats, **tie_counts(read_jsonl(str(run.ranked))))


def _write_data_c(run: PipelineRun) -> None:
    """The paper mixes its Alpaca examples into the ranking data as a regulariser: here, as many of the
    supervised stage's examples (one-candidate groups, the MLE term alone) as there are ranked groups."""
    if run.mixes_sft:
        ranked = read_jsonl(str(run.ranked))
        write_jsonl(run.data_c, ranked + read_jsonl(str(run.root / "sft.jsonl"))[:len(ranked)])


def _train_c(run: PipelineRun) -> Dict[str, Any]:
    _write_data_c(run)
    return run.train("train_c", dict(run.settings_c, data=str(run.data_c)))


def _control(name: str) -> Callable[[PipelineRun], Dict[str, Any]]:
    """The control stage ``name``: Tuna_c's data and fields, one ingredient taken away."""
    def train_control(run: PipelineRun) -> Dict[str, Any]:
        data = run.root / f"data_{name}.jsonl"
        if not data.exists():
            _write_data_c(run)
            write_jsonl(data, control_records(name, read_jsonl(str(run.data_c)), run.config.seed))
        return run.train(f"control_{name}", dict(run.settings_c, data=str(data)))
    return train_control


def _evaluation(name: str) -> Callable[[PipelineRun], Dict[str, Any]]:
    """The evaluation stage of model ``name`` (``eval/<name>/``)."""
    def evaluate(run: PipelineRun) -> Dict[str, Any]:
        model, tokenizer = load_stage_model(run.config, run.root, run.models[name])
        return (evaluate_verifiable if run.verifiable else evaluate_built_in)(run, name, model, tokenizer)
    return evaluate


@dataclass(frozen=True)
class Stage:
    """One row of the pipeline: ``run`` does the stage's work, unless ``skip`` gives the reason this run leaves
    it out (recorded as skipped) or ``absent`` says the stage is not part of this run at all."""

    name: str
    run: Callable[[PipelineRun], Dict[str, Any]]
    skip: Callable[[PipelineRun], Optional[str]] = lambda run: None
    absent: Callable[[PipelineRun], bool] = lambda run: False


def stages(run: PipelineRun) -> List[Stage]:
    """The table of stages, in the order they run (the module docstring draws it)."""
    return [
        Stage("score", _score, skip=lambda run: None if run.scores_data else
              "no teacher configured: the data's own scores rank it" if run.config.tuna_p else "tuna_p: false"),
        Stage("sft", _sft, absent=lambda run: not run.builds_start_model),
        Stage("train_p", _train_p, skip=lambda run: None if run.config.tuna_p else
              "tuna_p: false (Tuna_c starts from the start model)"),
        Stage("generate", _generate),
        Stage("rank", _rank),
        Stage("train_c", _train_c),
        *(Stage(f"control_{name}", _control(name)) for name in run.config.controls),
        *(Stage(f"eval_{name}", _evaluation(name)) for name in run.models),
    ]


def run_pipeline(config: PipelineConfig) -> Dict[str, Any]:
    """Every stage of the table once: a stage whose outputs the manifest records as done is skipped, any other
    runs and is recorded with its time; then the comparison of the models and ``summary.json``."""
    run = PipelineRun(config)
    for stage in stages(run):
        if stage.absent(run):
            continue
        reason = stage.skip(run)
        if reason is not None:
            run.manifest.record(stage.name, "skipped", reason=reason)
            continue
        if run.manifest.done(stage.name):
            continue
        started = time.perf_counter()
        info = stage.run(run)
        run.manifest.record(stage.name, "done", seconds=round(time.perf_counter() - started, 1), **info)
        if run.stop_message:
            raise PipelineStopped(run.stop_message)
    evaluations = compare_models(run)
    summary_p, summary_c = run.summary("train_p"), run.summary("train_c")
    report = {
        "pair_accuracy": {"before": _accuracy(summary_p.get("initial_eval")),
                          "after_tuna_p": _accuracy(summary_p.get("final_eval")),
                          "after_tuna_c": _accuracy(summary_c.get("final_eval"))},
        "eval": evaluations,
        "stages": run.manifest.stages,
    }
    write_atomic(run.root / "summary.json", json.dumps(report, indent=1))
    return report


def _accuracy(result: Optional[Dict]) -> Optional[float]:
    return None if not result else result.get("pair_accuracy")


def tie_counts(records) -> Dict[str, int]:
    """How much of the ranked data the loss sees with ``skip_ties``: candidate pairs, pairs with unequal scores
    and groups whose candidates all score the same (a record without scores has no ties)."""
    pairs = untied = tied_groups = 0
    for record in records:
        scores = record.get("scores") or list(range(len(record["responses"])))
        group_untied = sum(a != b for i, a in enumerate(scores) for b in scores[i + 1:])
        pairs += len(scores) * (len(scores) - 1) // 2
        untied += group_untied
        tied_groups += len(scores) > 1 and group_untied == 0
    return {"pairs": pairs, "untied_pairs": untied, "tied_groups": tied_groups}


def load_stage_model(config: PipelineConfig, root: Path, path: Optional[str]):
    """(model, tokenizer) of a model to evaluate: ``path``, or (None) the untrained start Tuna_p was built from."""
    if path is None:
        settings = dict(dict(template=config.prompt_template, seed=config.seed), **config.train_p)
        return build_model(load_config(None, dict(settings, output_dir=str(root / "train_p"))))
    return config.placement.load(path), load_tokenizer(path)


def evaluate_verifiable(run: PipelineRun, name: str, model, tokenizer) -> Dict[str, Any]:
    """`tuna eval verifiable` of one model on both held-out splits of the task set (``eval/<name>/<split>/``)."""
    outs = {split: run.root / "eval" / name / split for split in HELDOUT_SPLITS}
    for split, out in outs.items():
        task_file = run.root / "verifiable" / f"{split}.jsonl"
        metrics = evaluate_model(model, tokenizer, read_jsonl(str(task_file)), out, run.config.prompt_template,
                                 run.config.max_new_tokens, run.config.batch_size, str(task_file))
        write_report(out, "verifiable", f"{name} {split}", metrics)
    return {"outputs": [str(report_path(out, "verifiable")) for out in outs.values()]}


def evaluate_built_in(run: PipelineRun, name: str, model, tokenizer) -> Dict[str, Any]:
    """`tuna eval ranking` and `tuna eval generation` (ROUGE-L, exact match) of one model on the held-out
    instructions (``eval/<name>/ranking/`` and ``generation/``)."""
    out, tasks = run.root / "eval" / name, read_jsonl(_generation_tasks(run))
    examples, _ = load_ranked(run.eval_path)
    write_report(out / "ranking", "ranking", name, evaluate_ranking(model, tokenizer, examples, run.config.scoring))
    # batched as tuna eval generation batches by default
    predictions = greedy_generations(model, tokenizer, tasks, out / "generation" / "progress.jsonl",
                                     run.config.prompt_template, run.config.max_new_tokens, EvalConfig.batch_size)
    save_generations(out / "generation", tasks, predictions)
    write_report(out / "generation", "generation", name, generation_metrics(tasks, predictions))
    return {"outputs": [str(report_path(out / "ranking", "ranking")),
                        str(report_path(out / "generation", "generation"))]}


def _generation_tasks(run: PipelineRun) -> str:
    """The generation evaluation's tasks: generation_tasks, or the held-out instructions with their references."""
    if run.config.generation_tasks is not None:
        return run.config.generation_tasks
    path = run.root / "generation_tasks.jsonl"
    if not path.exists():
        write_jsonl(path, [{"id": i, "instruction": r["instruction"], "task": r["task"], "references": r["references"]}
                           for i, r in enumerate(read_jsonl(run.eval_path))])
    return str(path)


def compare_models(run: PipelineRun) -> Dict[str, Dict[str, Any]]:
    """Every model's figures from its evaluation's reports, by name (verifiable: {split: IFEval's four figures
    with intervals}; built-in: pairwise accuracy, Kendall tau, ROUGE-L and exact match, also written to
    ``eval/<name>/report-eval``), and ``eval/comparison.md`` and ``.png`` side by side."""
    eval_dir, results = run.root / "eval", {}
    for name in run.models:
        if run.verifiable:
            results[name] = {split: json.loads(report_path(eval_dir / name / split, "verifiable").read_text())
                             ["metrics"] for split in HELDOUT_SPLITS}
            continue
        ranking = json.loads(report_path(eval_dir / name / "ranking", "ranking").read_text())["metrics"]
        generation = json.loads(report_path(eval_dir / name / "generation", "generation").read_text())["metrics"]
        results[name] = {"pair_accuracy": ranking["pair_accuracy"], "kendall_tau": ranking["kendall_tau"],
                         "rouge_l": generation["rouge_l"], "exact_match": generation.get("exact_match")}
        write_report(eval_dir / name, "eval", name, results[name])
    columns = ([str(eval_dir / name / split) for split in HELDOUT_SPLITS for name in results] if run.verifiable
               else [str(eval_dir / name) for name in results])
    write_atomic(eval_dir / "comparison.md", compare(columns, png=str(eval_dir / "comparison.png")))
    return results
