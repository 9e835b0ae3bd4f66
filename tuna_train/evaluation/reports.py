"""Evaluation reports: ``<out>/report-<kind>.json`` and ``.md`` (kinds share an ``--out`` without overwriting
each other), reading them back, side-by-side Markdown and the comparison plot (``tuna eval --compare``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..files import write_atomic
from ..verifiable.evaluate import FIGURES


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
