"""``tuna pipeline``: the whole method as stages in one run directory (the orchestration above training,
evaluation and the pipeline's stages; nothing below imports it).

    [sft] -> [score] -> train_p (Tuna_p) -> generate (with Tuna_p) -> rank (judge) -> train_c (Tuna_c from Tuna_p)
          -> [controls: the same data and budget, one ingredient taken away] -> evaluation

``tuna_p: false`` leaves Tuna_p out: the start model samples its own candidates and Tuna_c starts from it.
``instructions: verifiable`` builds the verifiable task set (IFEval constraints, :mod:`tuna_train.verifiable`) in
the run directory and evaluates every model with IFEval's figures on its two held-out splits (in-kind and
unseen-kind) instead of the built-in tasks' ranking and generation figures
(``configs/smollm2_verifiable.yaml``).

``manifest.json`` records each stage's status, output and counts. A stage whose output is complete is
skipped; a partial one resumes (training from its last checkpoint, generation and ranking from their
progress files). With no configuration it runs on the built-in tasks: a tiny Llama instruction-tuned first
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
from typing import Any, Dict, Optional

from .build import build_model
from .config import TrainConfig, load_config
from .data import load_ranked
from .evaluation.generation import greedy_generations, save_generations
from .evaluation.reports import compare, report_path, write_report
from .evaluation.scoring import evaluate_ranking
from .evaluation.text import generation_metrics
from .files import read_json, write_atomic
from .model import load_tokenizer
from .pipeline.generate import generate_records
from .pipeline.judge import make_judge
from .pipeline.rank import rank_records
from .pipeline.score import score_with_model
from .pipeline.store import read_jsonl, write_jsonl
from .pipeline.training_controls import TRAINING_CONTROLS, control_records
from .synthetic import make_records, make_task_records
from .options import (JudgeOptions, PlacementOptions, SamplingOptions, ScoringOptions, TextOptions, at_least,
                      check_options, field_of, option, options_of)
from .trainer import Trainer
from .verifiable.pipeline import HELDOUT_SPLITS, evaluate_model, write_pipeline_task_set

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
    max_constraints: int = option(3, "instructions: verifiable: constraints per instruction, 1 to this many (more "
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
    """A training stage stopped before its last step (SIGINT or SIGTERM: the trainer saved a checkpoint); the
    stages after it need its ``final/`` model, so the pipeline stops too. The message says how to resume."""


def resume_hint(root) -> str:
    """How a stopped pipeline resumes: every stage skips what it finished (see the module docstring)."""
    return f"run the same tuna pipeline command (same --output-dir {root} and settings) to resume"


def _accuracy(result: Optional[Dict]) -> Optional[float]:
    return None if not result else result.get("pair_accuracy")


def run_pipeline(config: PipelineConfig) -> Dict[str, Any]:
    root = Path(config.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(root / "manifest.json")
    manifest.check_settings(config)

    # inputs: the user's files, or the built-in tasks (three disjoint seeds)
    data_p, eval_path, instructions = config.data, config.eval_data, config.instructions
    verifiable = instructions == VERIFIABLE
    if verifiable:  # the task set, from the seed: the same in every run of these settings
        splits = {name: root / "verifiable" / f"{name}.jsonl" for name in ("train",) + HELDOUT_SPLITS}
        if not all(path.exists() for path in splits.values()):
            write_pipeline_task_set(root / "verifiable", config.seed, config.contextual_examples,
                                    config.eval_examples, config.max_new_tokens, config.max_constraints,
                                    config.train_kinds)
        instructions = str(splits["train"])
    if data_p is None and config.tuna_p:
        data_p = str(root / "data_p.jsonl")
        if not Path(data_p).exists():
            write_jsonl(Path(data_p), make_records(config.synthetic_examples, seed=config.seed))
    if eval_path is None:  # held-out instructions: none of them occurs in any training stage
        eval_path = str(root / "eval.jsonl")
        if not Path(eval_path).exists():
            write_jsonl(Path(eval_path), make_records(config.eval_examples, seed=config.seed + 1, split="heldout"))
    if instructions is None:
        instructions = str(root / "instructions.jsonl")
        if not Path(instructions).exists():
            # the same instruction drawn twice is sampled and judged once (records are keyed by content)
            write_jsonl(Path(instructions), make_task_records(config.contextual_examples, seed=config.seed + 2))

    if config.teacher is not None and config.tuna_p:
        scored = root / "scored.jsonl"
        if not manifest.done("score"):
            records = score_with_model(config.placement.load(config.teacher), load_tokenizer(config.teacher),
                                       read_jsonl(data_p), config.scoring, teacher_name=config.teacher)
            write_jsonl(scored, records)
            manifest.record("score", "done", outputs=[str(scored)], records=len(records))
        data_p = str(scored)
    else:
        manifest.record("score", "skipped", reason="no teacher configured: the data's own scores rank it"
                        if config.tuna_p else "tuna_p: false")

    def train(stage: str, overrides: Dict[str, Any]) -> Dict[str, Any]:
        out = root / stage
        summary_path = out / "summary.json"
        if manifest.done(stage):
            return json.loads(summary_path.read_text())
        settings = dict(dict(template=config.prompt_template, seed=config.seed), **overrides)
        started = time.perf_counter()
        summary = Trainer(load_config(None, dict(settings, output_dir=str(out)))).run()
        finished = summary["status"] == "finished"
        manifest.record(stage, "done" if finished else "partial", outputs=[str(summary_path), str(out / "final")],
                        steps=summary["steps"], seconds=round(time.perf_counter() - started, 1))
        if not finished:  # no final/ yet: the next stage would load a model that does not exist
            raise PipelineStopped(f"stage {stage} stopped at step {summary['steps']} of {summary['total_steps']} "
                                  f"(checkpoint in {out / 'checkpoints'}); {resume_hint(root)} it there")
        if summary.get("stop_requested"):  # Ctrl-C in the stage's last step: the stage is done, the run stops
            raise PipelineStopped(f"stage {stage} finished its last step ({summary['steps']}) and stopped there, as "
                                  f"asked; {resume_hint(root)} the stages after it")
        return summary

    start_model = config.model
    if start_model is None and config.sft_examples > 0:  # the paper starts from an instruction-tuned model
        sft_data = root / "sft.jsonl"
        if not sft_data.exists():  # the reference answers as one-candidate groups: the loss is the MLE term alone
            write_jsonl(sft_data, [dict(r, responses=r["references"], scores=[0.0])
                                   for r in make_task_records(config.sft_examples, seed=config.seed + 3)])
        train("sft", dict(config.sft, data=str(sft_data), eval_data=eval_path))
        start_model = str(root / "sft" / "final")
    model_p = {} if start_model is None else {"model": start_model}
    # the ranked held-out records every training stage evaluates pairwise (the verifiable set has none: its
    # figures are the eval stages')
    train_eval = {} if verifiable else {"eval_data": eval_path}
    summary_p: Dict[str, Any] = {}
    tuna_p: Optional[str] = None
    if config.tuna_p:
        summary_p = train("train_p", dict(config.train_p, data=data_p, **train_eval, **model_p))
        tuna_p = str(root / "train_p" / "final")
    else:
        manifest.record("train_p", "skipped", reason="tuna_p: false (Tuna_c starts from the start model)")
    sampler = tuna_p or start_model  # the method's diversity rule: the model being trained samples its candidates

    generated = root / "generated.jsonl"
    if not manifest.done("generate"):
        started = time.perf_counter()
        stats = generate_records(config.placement.load(sampler), load_tokenizer(sampler), read_jsonl(instructions),
                                 generated, config.prompt_template, seed=config.seed,
                                 **options_of(config, SamplingOptions))
        manifest.record("generate", "done", outputs=[str(generated)], seconds=round(time.perf_counter() - started, 1),
                        **stats)

    ranked = root / "ranked.jsonl"
    if not manifest.done("rank"):
        started = time.perf_counter()
        judge = make_judge(config.judge, config, config.placement)
        stats = rank_records(read_jsonl(str(generated)), judge, ranked, config.concurrency, config.parse_attempts,
                             include_judge_response=config.include_judge_response)
        manifest.record("rank", "done", outputs=[str(ranked)], seconds=round(time.perf_counter() - started, 1),
                        **stats, **tie_counts(read_jsonl(str(ranked))))

    data_c = str(ranked)
    if start_model is not None and config.model is None and config.mix_sft_into_c:
        # the paper mixes its Alpaca examples into the ranking data as a regulariser: here, as many of the
        # supervised stage's examples (one-candidate groups, the MLE term alone) as there are ranked groups
        ranked_records = read_jsonl(str(ranked))
        data_c = str(root / "data_c.jsonl")
        write_jsonl(Path(data_c), ranked_records + read_jsonl(str(root / "sft.jsonl"))[:len(ranked_records)])
    inherited = {key: config.train_p[key] for key in INHERITED_BY_TUNA_C if key in config.train_p}
    settings_c = dict(inherited, **config.train_c, **train_eval, **({"model": sampler} if sampler else {}))
    summary_c = train("train_c", dict(settings_c, data=data_c))
    models = {"start": start_model, "tuna_p": tuna_p, "tuna_c": str(root / "train_c" / "final")}
    if not config.tuna_p:
        del models["tuna_p"]
    if config.controls:  # the same data and fields as Tuna_c, one ingredient taken away
        records_c = read_jsonl(data_c)
        for name in config.controls:
            data = root / f"data_{name}.jsonl"
            if not data.exists():
                write_jsonl(data, control_records(name, records_c, config.seed))
            train(f"control_{name}", dict(settings_c, data=str(data)))
            models[name] = str(root / f"control_{name}" / "final")
    if verifiable:
        evaluations = evaluate_verifiable(config, root, manifest, models)
    else:
        evaluations = evaluate_stages(config, root, manifest, eval_path, models)
    report = {
        "pair_accuracy": {"before": _accuracy(summary_p.get("initial_eval")),
                          "after_tuna_p": _accuracy(summary_p.get("final_eval")),
                          "after_tuna_c": _accuracy(summary_c.get("final_eval"))},
        "eval": evaluations,
        "stages": manifest.stages,
    }
    write_atomic(root / "summary.json", json.dumps(report, indent=1))
    return report


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


def evaluate_verifiable(config: PipelineConfig, root: Path, manifest: Manifest,
                        models: Dict[str, Optional[str]]) -> Dict[str, Dict[str, Any]]:
    """`tuna eval verifiable` of every model on both held-out splits of the task set (``eval/<model>/<split>/``):
    {model: {split: IFEval's four figures with intervals}}; ``eval/comparison.md`` and ``.png``, a column per
    model and split."""
    splits = {split: read_jsonl(str(root / "verifiable" / f"{split}.jsonl")) for split in HELDOUT_SPLITS}
    results: Dict[str, Dict[str, Any]] = {}
    for name, path in models.items():
        outs = {split: root / "eval" / name / split for split in HELDOUT_SPLITS}
        if not manifest.done(f"eval_{name}"):
            started = time.perf_counter()
            model, tokenizer = load_stage_model(config, root, path)
            for split, records in splits.items():
                metrics = evaluate_model(model, tokenizer, records, outs[split], config.prompt_template,
                                         config.max_new_tokens, config.batch_size, f"{root / 'verifiable' / split}.jsonl")
                write_report(outs[split], "verifiable", f"{name} {split}", metrics)
            manifest.record(f"eval_{name}", "done", seconds=round(time.perf_counter() - started, 1), outputs=[
                str(report_path(out, "verifiable")) for out in outs.values()])
        results[name] = {split: json.loads(report_path(out, "verifiable").read_text())["metrics"]
                         for split, out in outs.items()}
    columns = [str(root / "eval" / name / split) for split in HELDOUT_SPLITS for name in results]
    write_atomic(root / "eval" / "comparison.md", compare(columns, png=str(root / "eval" / "comparison.png")))
    return results


def evaluate_stages(config: PipelineConfig, root: Path, manifest: Manifest, eval_path: str,
                    models: Dict[str, Optional[str]]) -> Dict[str, Dict[str, Any]]:
    """`tuna eval ranking` and `tuna eval generation` (ROUGE-L, exact match) for each model (the starting
    model, Tuna_p, Tuna_c, the controls), on held-out instructions; ``eval/comparison.md`` and
    ``eval/comparison.png`` side by side."""
    tasks_path = config.generation_tasks
    if tasks_path is None:
        tasks_path = str(root / "generation_tasks.jsonl")
        if not Path(tasks_path).exists():
            write_jsonl(Path(tasks_path), [
                {"id": i, "instruction": r["instruction"], "task": r["task"], "references": r["references"]}
                for i, r in enumerate(read_jsonl(eval_path))])
    examples, _ = load_ranked(eval_path)
    tasks = read_jsonl(tasks_path)
    results: Dict[str, Dict[str, Any]] = {}
    for name, path in models.items():
        out = root / "eval" / name
        if manifest.done(f"eval_{name}"):
            ranking = json.loads(report_path(out / "ranking", "ranking").read_text())
            generation = json.loads(report_path(out / "generation", "generation").read_text())
        else:
            model, tokenizer = load_stage_model(config, root, path)
            ranking = write_report(out / "ranking", "ranking", name, evaluate_ranking(
                model, tokenizer, examples, config.scoring))
            predictions = greedy_generations(model, tokenizer, tasks, out / "generation" / "progress.jsonl",
                                                        config.prompt_template, config.max_new_tokens)
            save_generations(out / "generation", tasks, predictions)
            generation = write_report(out / "generation", "generation", name,
                                                 generation_metrics(tasks, predictions))
            manifest.record(f"eval_{name}", "done", outputs=[
                str(report_path(out / "ranking", "ranking")),
                str(report_path(out / "generation", "generation"))])
        results[name] = {"pair_accuracy": ranking["metrics"]["pair_accuracy"],
                         "kendall_tau": ranking["metrics"]["kendall_tau"],
                         "rouge_l": generation["metrics"]["rouge_l"],
                         "exact_match": generation["metrics"].get("exact_match")}
        write_report(out, "eval", name, results[name])
    table = compare([str(root / "eval" / name) for name in results], png=str(root / "eval" / "comparison.png"))
    write_atomic(root / "eval" / "comparison.md", table)
    return results
