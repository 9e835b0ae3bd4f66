"""``tuna eval``: the evaluations of the paper a user can run on local data.

- ``ranking``: held-out pairwise ranking accuracy (ordered pairs whose model scores agree with the given
  ranking; pairs tied in the ranking are left out, a model tie counts as a disagreement), Kendall's tau-b
  per group averaged over groups where it is defined, and the mean model-score gap between each group's
  best and worst candidate; scores are fused ``sequence_logprobs`` with the training length normalisation.
- ``generation``: greedy generation on instruction tasks with references (Super-NaturalInstructions
  style), ROUGE-L F (``rouge-score``, best over references) per record, averaged per task, then over tasks;
  batched, resumable, generations saved.
- ``verifiable``: greedy generation on records with IFEval ``constraints``, IFEval's four figures with bootstrap
  intervals (:mod:`.verifiable.evaluate`).

Each writes ``<out>/report-<kind>.json`` and ``<out>/report-<kind>.md`` (kinds share an ``--out`` without
overwriting each other); :func:`compare` puts reports side by side.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from rouge_score import rouge_scorer

from tuna_kernels import length_normalised, ranking_counts, ranking_summary

from .data import RankedExample
from .files import write_atomic
from .pipeline.generate import decode_batch, pending_batches
from .pipeline.score import group_logprobs
from .pipeline.store import JsonlStore, record_key, write_jsonl
from .verifiable.evaluate import FIGURES


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Kendall's tau-b between two score lists (ties in either handled); None when undefined."""
    concordant = discordant = ties_x = ties_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            ties_x += 1
        elif dy == 0:
            ties_y += 1
        elif (dx > 0) == (dy > 0):
            concordant += 1
        else:
            discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return None if denominator == 0 else (concordant - discordant) / denominator


def ranking_metrics(model_scores: Sequence[Sequence[float]], target_scores: Sequence[Sequence[float]]) -> Dict[str, Any]:
    """Pairwise accuracy and mean best-minus-worst gap (as :func:`tuna_kernels.ranking_counts` defines them)
    and mean Kendall tau-b over ragged groups, candidates in any order."""
    counts = ranking_counts(*ragged_to_matrices(model_scores, target_scores))
    summary = ranking_summary(counts)
    taus = [tau for tau in (kendall_tau_b(model, target) for model, target in zip(model_scores, target_scores))
            if tau is not None]
    defined = lambda value: None if math.isnan(value) else value  # noqa: E731
    return {"pair_accuracy": defined(float(summary["pair_accuracy"])), "pairs": int(counts["pairs"]),
            "kendall_tau": sum(taus) / len(taus) if taus else None, "groups_with_tau": len(taus),
            "score_gap": defined(float(summary["score_gap"])), "groups": len(model_scores)}


def ragged_to_matrices(model_scores: Sequence[Sequence[float]], target_scores: Sequence[Sequence[float]]):
    """Ragged groups -> ``(scores, valid, targets)`` [G, K] float64, each group sorted best first by its target
    (stable: among tied candidates the earlier one comes first), as the ranking metrics take them."""
    width = max((len(group) for group in model_scores), default=0)
    scores = torch.zeros(len(model_scores), max(width, 1), dtype=torch.float64)
    targets = torch.zeros_like(scores)
    valid = torch.zeros_like(scores, dtype=torch.bool)
    for row, (model, target) in enumerate(zip(model_scores, target_scores)):
        order = sorted(range(len(target)), key=lambda k: -target[k])
        scores[row, :len(order)] = torch.tensor([float(model[k]) for k in order], dtype=torch.float64)
        targets[row, :len(order)] = torch.tensor([float(target[k]) for k in order], dtype=torch.float64)
        valid[row, :len(order)] = True
    return scores, valid, targets


def model_scores(model, tokenizer, examples: List[RankedExample], template: str = "alpaca", max_length: int = 512,
                 alpha: float = 1.0, token_budget: int = 16384, impl: str = "auto") -> List[List[float]]:
    """Per group, the model's score of each candidate: sum log p / tokens ** alpha (as in training)."""
    return [[length_normalised(s, c, alpha) for s, c in zip(sums, counts)]
            for sums, counts in group_logprobs(model, tokenizer, examples, template, max_length, token_budget, impl)]


def evaluate_ranking(model, tokenizer, examples: List[RankedExample], **options) -> Dict[str, Any]:
    scores = model_scores(model, tokenizer, examples, **options)
    return ranking_metrics(scores, [e.scores for e in examples])


@functools.lru_cache(maxsize=1)
def _rouge():
    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F of a prediction, best over its references."""
    return max(_rouge().score(reference, prediction)["rougeL"].fmeasure for reference in references)


def references_of(record: Dict[str, Any]) -> List[str]:
    refs = record.get("references") or record.get("output") or record.get("answer")
    refs = [refs] if isinstance(refs, str) else list(refs or [])
    if not refs:
        raise ValueError(f"record {record.get('id', '?')}: no 'references' (or 'output') to score against")
    return refs


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the prediction equals a reference (surrounding white space ignored), else 0.0."""
    return float(prediction.strip() in {reference.strip() for reference in references})


def generation_metrics(records: List[Dict[str, Any]], predictions: List[str]) -> Dict[str, Any]:
    """ROUGE-L and exact match per record, mean per task, and the mean over tasks (each task counts once, as
    the paper does for ROUGE-L)."""
    per_task: Dict[str, List[float]] = {}
    matches: Dict[str, List[float]] = {}
    for record, prediction in zip(records, predictions):
        task = str(record.get("task", "all"))
        per_task.setdefault(task, []).append(rouge_l(prediction, references_of(record)))
        matches.setdefault(task, []).append(exact_match(prediction, references_of(record)))
    task_means = {task: sum(v) / len(v) for task, v in sorted(per_task.items())}
    match_means = {task: sum(v) / len(v) for task, v in sorted(matches.items())}
    return {"rouge_l": sum(task_means.values()) / len(task_means) if task_means else None,
            "exact_match": sum(match_means.values()) / len(match_means) if match_means else None,
            "rouge_l_per_task": task_means, "records": len(records), "tasks": len(task_means)}


@torch.no_grad()
def greedy_generations(model, tokenizer, records: List[Dict[str, Any]], progress: Path, template: str = "alpaca",
                       max_new_tokens: int = 128, batch_size: int = 16) -> List[str]:
    """Greedy responses, resumable through the ``progress`` store (one entry per finished record)."""
    store = JsonlStore(progress)
    keys = [record_key(r) for r in records]
    model.eval()
    for indices, prompts in pending_batches(records, keys, store, tokenizer, template, batch_size, desc="eval"):
        texts = decode_batch(model, tokenizer, prompts, 1, None, 1.0, max_new_tokens)
        for i, generated in zip(indices, texts):
            store.put(keys[i], {"prediction": generated[0]})
    return [store.entries[key]["prediction"] for key in keys]


def report_path(out: Path, kind: str, suffix: str = ".json") -> Path:
    """Where ``write_report`` puts the report of ``kind`` (ranking, generation, judge, eval) in ``out``."""
    return Path(out) / f"report-{kind}{suffix}"


def write_report(out: Path, kind: str, name: str, metrics: Dict[str, Any]) -> Dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    report = {"kind": kind, "name": name, "metrics": metrics}
    write_atomic(report_path(out, kind), json.dumps(report, indent=1))
    write_atomic(report_path(out, kind, ".md"), markdown([report]))
    return report


def read_reports(path: str) -> Dict[str, Any]:
    """A report file, or a directory's reports (every kind in it) merged into one column."""
    path = Path(path)
    files = sorted(path.glob("report-*.json")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: no report-<kind>.json in this directory (written by tuna eval --out)")
    reports = [json.loads(file.read_text()) for file in files]
    metrics: Dict[str, Any] = {}
    for report in reports:
        metrics.update(report["metrics"])
    return {"kind": "+".join(r["kind"] for r in reports), "name": reports[0]["name"], "metrics": metrics}


def _cell(value) -> str:
    if isinstance(value, list):  # an interval, [low, high]
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return "–" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))


def markdown(reports: List[Dict[str, Any]]) -> str:
    """One table: a column per report, a row per scalar metric (per-task ROUGE-L rows included)."""
    rows: Dict[str, List[str]] = {}
    for index, report in enumerate(reports):
        flat = {k: v for k, v in report["metrics"].items() if not isinstance(v, dict)}
        for task, value in report["metrics"].get("rouge_l_per_task", {}).items():
            flat[f"rouge_l[{task}]"] = value
        for key, value in flat.items():
            rows.setdefault(key, ["–"] * len(reports))[index] = _cell(value)
    header = "| metric | " + " | ".join(r["name"] for r in reports) + " |"
    lines = [header, "|---" * (len(reports) + 1) + "|"] + [f"| {k} | " + " | ".join(v) + " |" for k, v in rows.items()]
    return "\n".join(lines) + "\n"


#: what a model that orders candidates at random scores, per plotted metric (the plot's chance line)
CHANCE = {"pair_accuracy": 0.5, "kendall_tau": 0.0}
PLOTTED = ("pair_accuracy", "kendall_tau", "rouge_l", "exact_match") + FIGURES


def compare(report_paths: List[str], png: Optional[str] = None) -> str:
    """Side-by-side Markdown of several reports (files, or directories of ``report-<kind>.json``) and, with
    ``png``, a bar chart: a group per metric, a bar per report with its value written on it, a missing value
    marked "n/a" (not drawn as 0), and the chance level of the ranking metrics as a dashed line."""
    reports = [read_reports(path) for path in report_paths]
    table = markdown(reports)
    if png:
        plot_comparison(reports, png)
    return table


def plot_comparison(reports: List[Dict[str, Any]], png: str) -> None:
    import matplotlib  # optional (the bench extra): only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in PLOTTED if any(r["metrics"].get(k) is not None for r in reports)]
    figure, axis = plt.subplots(figsize=(2.5 + 2.2 * len(keys), 4.2))
    width = 0.8 / max(1, len(reports))
    labelled = set()
    for i, report in enumerate(reports):
        for x, key in enumerate(keys):
            value, position = report["metrics"].get(key), x + i * width
            if value is None:
                axis.text(position, 0.02, "n/a", ha="center", va="bottom", fontsize=8, rotation=90, color="grey")
                continue
            axis.bar(position, value, width, color=f"C{i}", label=None if i in labelled else report["name"])
            labelled.add(i)
            axis.text(position, value, f"{value:.3f}", ha="center", va="bottom" if value >= 0 else "top", fontsize=7)
    for x, key in enumerate(keys):
        if key in CHANCE:
            axis.hlines(CHANCE[key], x - width / 2, x + width * (len(reports) - 0.5), colors="black",
                        linestyles="dashed", linewidth=1, label="chance (random order)" if key == "pair_accuracy"
                        else None)
    axis.set_xticks([x + width * (len(reports) - 1) / 2 for x in range(len(keys))])
    axis.set_xticklabels(keys)
    axis.set_ylabel("value (higher is better)")
    axis.set_title("tuna eval: " + " vs ".join(r["name"] for r in reports))
    axis.axhline(0, color="grey", linewidth=0.5)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)


def save_generations(out: Path, records: List[Dict[str, Any]], predictions: List[str]) -> None:
    write_jsonl(out / "generations.jsonl", [dict(r, prediction=p, rouge_l=rouge_l(p, references_of(r)))
                                            for r, p in zip(records, predictions)])
