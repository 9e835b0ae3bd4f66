"""``tuna pipeline``: the whole method as stages in one run directory.

    [sft] -> [score] -> train_p (Tuna_p) -> generate (with Tuna_p) -> rank (judge) -> train_c (Tuna_c from Tuna_p)

``manifest.json`` records each stage's status, output and counts. A stage whose output is complete is
skipped; a partial one resumes (training from its last checkpoint, generation and ranking from their
progress files). With no configuration it runs on the built-in tasks: a tiny Llama instruction-tuned first
(``sft``: MLE on the tasks' reference answers, as the paper starts from an Alpaca-tuned model), Tuna_p on the
tasks' ranked candidates, Tuna_c on its own samples ranked by the rule judge (the task's correctness), and
reports for the start model, Tuna_p and Tuna_c, on held-out instructions: ROUGE-L and exact match of greedy
answers and pairwise ranking accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from ..checkpoint import write_atomic
from .store import read_jsonl, write_jsonl

logger = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    output_dir: str = "runs/pipeline"
    data: Optional[str] = None  # probabilistic-ranking data; None = built-in synthetic tasks (rule scores)
    teacher: Optional[str] = None  # local model directory: (re)score `data` with it before train_p
    instructions: Optional[str] = None  # instructions to sample for contextual ranking; None = synthetic
    eval_data: Optional[str] = None  # held-out ranked data; None = built-in synthetic held-out set
    generation_tasks: Optional[str] = None  # tasks with references for `tuna eval generation`; None = synthetic
    judge: str = "rule"  # rule | openai:MODEL | local:PATH
    base_url: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4
    num_candidates: int = 4
    max_new_tokens: int = 16
    temperature: float = 1.0
    rouge_threshold: float = 0.8
    max_tries: int = 3
    template: str = "alpaca"
    synthetic_examples: int = 4000
    contextual_examples: int = 800
    eval_examples: int = 400
    seed: int = 42
    model: Optional[str] = None  # the start model (instruction-tuned); None = a tiny Llama tuned by the sft stage
    sft_examples: int = 3000  # built-in tasks for the supervised stage that makes the start model (0 = none)
    sft: Dict[str, Any] = field(default_factory=lambda: {"num_epochs": 2.0, "learning_rate": 3e-3,
                                                         "warmup_steps": 10, "eval_controls": False})
    mix_sft_into_c: bool = True  # Tuna_c's data mixed with as many supervised examples (the paper's regulariser)
    # TrainConfig fields for Tuna_p and Tuna_c. The built-in default puts the MLE term on the best candidate
    # only (an option of the method): its wrong candidates are other tasks' answers, not a teacher's samples
    train_p: Dict[str, Any] = field(default_factory=lambda: {"num_epochs": 1.0, "mle_on": "best"})
    train_c: Dict[str, Any] = field(default_factory=lambda: {"learning_rate": 1e-4, "num_epochs": 2.0,
                                                             "warmup_steps": 5, "batch_groups": 16,
                                                             "mle_on": "best"})


def load_pipeline_config(path: Optional[str]) -> PipelineConfig:
    if path is None:
        return PipelineConfig()
    import yaml

    values = yaml.safe_load(Path(path).read_text()) or {}
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown pipeline field '{unknown[0]}'")
    return PipelineConfig(**values)


class Manifest:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.stages: Dict[str, Dict[str, Any]] = json.loads(path.read_text())["stages"] if path.exists() else {}

    def done(self, stage: str) -> bool:
        entry = self.stages.get(stage)
        return bool(entry and entry["status"] == "done" and all(Path(p).exists() for p in entry.get("outputs", [])))

    def record(self, stage: str, status: str, **info) -> None:
        self.stages[stage] = dict(info, status=status, time=time.strftime("%Y-%m-%d %H:%M:%S"))
        write_atomic(self.path, json.dumps({"stages": self.stages}, indent=1))


def _accuracy(result: Optional[Dict]) -> Optional[float]:
    return None if not result else result.get("pair_accuracy")


def run_pipeline(config: PipelineConfig) -> Dict[str, Any]:
    from ..config import load_config
    from ..synthetic import make_records, make_task_records
    from ..trainer import Trainer

    root = Path(config.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(root / "manifest.json")

    # inputs: the user's files, or the built-in tasks (three disjoint seeds)
    data_p, eval_path, instructions = config.data, config.eval_data, config.instructions
    if data_p is None:
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

    if config.teacher is not None:
        scored = root / "scored.jsonl"
        if not manifest.done("score"):
            from ..model import load_model, load_tokenizer
            from .score import score_with_model

            records = score_with_model(load_model(config.teacher), load_tokenizer(config.teacher), read_jsonl(data_p),
                                       config.template, teacher_name=config.teacher)
            write_jsonl(scored, records)
            manifest.record("score", "done", outputs=[str(scored)], records=len(records))
        data_p = str(scored)
    else:
        manifest.record("score", "skipped", reason="no teacher configured: the data's own scores rank it")

    def train(stage: str, overrides: Dict[str, Any]) -> Dict[str, Any]:
        out = root / stage
        summary_path = out / "summary.json"
        if manifest.done(stage):
            return json.loads(summary_path.read_text())
        settings = dict(dict(template=config.template, seed=config.seed, progress=False), **overrides)
        summary = Trainer(load_config(None, dict(settings, output_dir=str(out)))).run()
        manifest.record(stage, "done" if summary["status"] == "finished" else "partial",
                        outputs=[str(summary_path), str(out / "final")], steps=summary["steps"])
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
    summary_p = train("train_p", dict(config.train_p, data=data_p, eval_data=eval_path, **model_p))
    tuna_p = str(root / "train_p" / "final")

    generated = root / "generated.jsonl"
    if not manifest.done("generate"):
        from ..model import load_model, load_tokenizer
        from .generate import generate_records

        stats = generate_records(load_model(tuna_p), load_tokenizer(tuna_p), read_jsonl(instructions), generated,
                                 config.num_candidates, config.template, config.max_new_tokens, config.temperature,
                                 rouge_threshold=config.rouge_threshold, max_tries=config.max_tries, seed=config.seed)
        manifest.record("generate", "done", outputs=[str(generated)], **stats)

    ranked = root / "ranked.jsonl"
    if not manifest.done("rank"):
        from .judge import make_judge
        from .rank import rank_records

        judge = make_judge(config.judge, config.base_url, config.api_key_env)
        stats = rank_records(read_jsonl(str(generated)), judge, ranked, config.concurrency)
        manifest.record("rank", "done", outputs=[str(ranked)], **stats)

    data_c = str(ranked)
    if start_model is not None and config.model is None and config.mix_sft_into_c:
        # the paper mixes its Alpaca examples into the ranking data as a regulariser: here, as many of the
        # supervised stage's examples (one-candidate groups, the MLE term alone) as there are ranked groups
        ranked_records = read_jsonl(str(ranked))
        data_c = str(root / "data_c.jsonl")
        write_jsonl(Path(data_c), ranked_records + read_jsonl(str(root / "sft.jsonl"))[:len(ranked_records)])
    summary_c = train("train_c", dict(config.train_c, model=tuna_p, data=data_c, eval_data=eval_path))
    evaluations = evaluate_stages(config, root, manifest, eval_path, start_model, tuna_p,
                                  str(root / "train_c" / "final"))
    report = {
        "pair_accuracy": {"before": _accuracy(summary_p.get("initial_eval")),
                          "after_tuna_p": _accuracy(summary_p.get("final_eval")),
                          "after_tuna_c": _accuracy(summary_c.get("final_eval"))},
        "eval": evaluations,
        "stages": manifest.stages,
    }
    write_atomic(root / "summary.json", json.dumps(report, indent=1))
    return report


def evaluate_stages(config: PipelineConfig, root: Path, manifest: Manifest, eval_path: str,
                    start_model: Optional[str], tuna_p: str, tuna_c: str) -> Dict[str, Dict[str, Any]]:
    """`tuna eval ranking` and `tuna eval generation` (ROUGE-L, exact match) for the starting model, Tuna_p and
    Tuna_c, on held-out instructions; ``eval/comparison.md`` and ``eval/comparison.png`` side by side."""
    from .. import eval as evaluation
    from ..config import load_config
    from ..data import load_ranked
    from ..model import load_model, load_tokenizer
    from ..trainer import build_model

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
    for name in ("start", "tuna_p", "tuna_c"):
        out = root / "eval" / name
        if manifest.done(f"eval_{name}"):
            ranking = json.loads((out / "ranking" / "report.json").read_text())
            generation = json.loads((out / "generation" / "report.json").read_text())
        else:
            if name == "start" and start_model is None:
                settings = dict(dict(template=config.template, seed=config.seed, progress=False), **config.train_p)
                model, tokenizer = build_model(load_config(None, dict(settings, output_dir=str(root / "train_p"))))
            else:
                path = {"start": start_model, "tuna_p": tuna_p, "tuna_c": tuna_c}[name]
                model, tokenizer = load_model(path), load_tokenizer(path)
            ranking = evaluation.write_report(out / "ranking", "ranking", name, evaluation.evaluate_ranking(
                model, tokenizer, examples, template=config.template))
            predictions = evaluation.greedy_generations(model, tokenizer, tasks, out / "generation" / "progress.jsonl",
                                                        config.template, config.max_new_tokens)
            evaluation.save_generations(out / "generation", tasks, predictions)
            generation = evaluation.write_report(out / "generation", "generation", name,
                                                 evaluation.generation_metrics(tasks, predictions))
            manifest.record(f"eval_{name}", "done", outputs=[str(out / "ranking" / "report.json"),
                                                              str(out / "generation" / "report.json")])
        results[name] = {"pair_accuracy": ranking["metrics"]["pair_accuracy"],
                         "kendall_tau": ranking["metrics"]["kendall_tau"],
                         "rouge_l": generation["metrics"]["rouge_l"],
                         "exact_match": generation["metrics"].get("exact_match")}
        evaluation.write_report(out, "eval", name, results[name])
    table = evaluation.compare([str(root / "eval" / name) for name in results], png=str(root / "eval" / "comparison.png"))
    write_atomic(root / "eval" / "comparison.md", table)
    return results
