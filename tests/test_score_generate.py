"""tuna score (fused teacher log-likelihoods) against a naive materialised-logits computation; tuna generate
(diversity rule, resumable); both outputs readable by tuna train."""

import json
import shutil
import subprocess
import sys

import pytest

from helpers import naive_sums
from tuna_train.data import load_ranked
from tuna_train.options import ScoringOptions
from tuna_train.pipeline.generate import generate_records, max_pairwise_rouge_l
from tuna_train.pipeline.score import score_with_model
from tuna_train.synthetic import correct_answer, make_records


@pytest.fixture
def teacher_dir(tiny_model_dir):
    return tiny_model_dir


def test_score_matches_naive_logits(teacher_dir):
    from tuna_train.model import load_model, load_tokenizer

    model, tokenizer = load_model(str(teacher_dir)), load_tokenizer(str(teacher_dir))
    records = make_records(6, seed=2)
    records[1]["responses"] = records[1]["responses"][:2]
    scored = score_with_model(model, tokenizer, records, ScoringOptions(token_budget=700))  # several batches
    for record, result in zip(records, scored):
        sums, counts = naive_sums(model, tokenizer, record)
        assert result["teacher"]["tokens"] == counts
        for got, want in zip(result["teacher"]["sum"], sums):
            assert abs(got - want) <= 1e-5 * abs(want)
        means = [s / c for s, c in zip(sums, counts)]
        for got, want in zip(result["scores"], means):
            assert abs(got - want) <= 1e-5 * abs(want)
        assert result["ranking"] == sorted(range(len(means)), key=lambda i: -means[i])


def test_score_cli_output_trains(teacher_dir, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "scores"}) + "\n"
                            for r in make_records(5, seed=3)))
    out = tmp_path / "scored.jsonl"
    subprocess.run([sys.executable, "-m", "tuna_train.cli", "score", "--teacher", str(teacher_dir), "--data",
                    str(data), "--out", str(out)], check=True, capture_output=True)
    examples, report = load_ranked(str(out))
    assert report.loaded == 5 and report.data_format == "native"
    assert all(e.scores == sorted(e.scores, reverse=True) for e in examples)


def test_generate_is_diverse_resumable_and_readable(teacher_dir, tmp_path):
    from tuna_train.model import load_model, load_tokenizer

    model, tokenizer = load_model(str(teacher_dir)), load_tokenizer(str(teacher_dir))
    instructions = [dict({k: v for k, v in r.items() if k not in ("responses", "scores")}, id=i)
                    for i, r in enumerate(make_records(5, seed=4))]
    out = tmp_path / "generated.jsonl"
    stats = generate_records(model, tokenizer, instructions[:3], out, num_candidates=3, max_new_tokens=6, batch_size=2)
    assert stats == {"records": 3, "generated": 3}
    stats = generate_records(model, tokenizer, instructions, out, num_candidates=3, max_new_tokens=6, batch_size=2)
    assert stats == {"records": 5, "generated": 2}  # the first three came from the progress file
    generated = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(generated) == 5 and all(len(g["responses"]) == 3 for g in generated)
    for g in generated:
        assert g["generation"]["max_rouge_l"] == pytest.approx(max_pairwise_rouge_l(g["responses"]))
        assert 1 <= g["generation"]["tries"] <= 3


def test_rouge_l_rule():
    assert max_pairwise_rouge_l(["the cat sat", "the cat sat", "a dog"]) == pytest.approx(1.0)
    assert max_pairwise_rouge_l(["the cat sat", "a dog ran", "birds fly"]) == pytest.approx(0.0)


#: the pipeline's default stages at about half their data (70 s instead of 2 min 40 s on 2 cores); the default
#: itself, over three seeds, is measured by benchmarks/test_pipeline_default.py
SMALLER_PIPELINE = ["--sft-examples", "1500", "--synthetic-examples", "1600", "--contextual-examples", "320",
                    "--eval-examples", "160"]


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_skips_them(tmp_path):
    """`tuna pipeline` on the built-in tasks: every stage, accuracy after each stage; a second run skips every
    finished stage and recomputes the same evaluations."""
    command = [sys.executable, "-m", "tuna_train.cli", "pipeline", *SMALLER_PIPELINE]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    root = tmp_path / "runs" / "pipeline"
    summary = json.loads((root / "summary.json").read_text())
    accuracy = summary["pair_accuracy"]
    assert accuracy["before"] >= 0.7  # the start model (sft stage) already follows the task
    assert accuracy["after_tuna_p"] >= 0.7 and accuracy["after_tuna_c"] is not None
    stages = summary["stages"]
    assert stages["score"]["status"] == "skipped"
    assert all(stages[s]["status"] == "done" for s in ("sft", "train_p", "generate", "rank", "train_c"))
    for name in ("generated.jsonl", "ranked.jsonl"):
        [json.loads(line) for line in (root / name).read_text().splitlines()]
    examples, report = load_ranked(str(root / "ranked.jsonl"))  # Tuna_c data as tuna train reads it
    assert report.loaded > 0
    # the rule judge's own answer is a candidate (its best) where no sample is right: every group's best is right
    assert all(e.responses[0] == correct_answer(e.instruction) for e in examples)
    # template auto: the pipeline's own tiny start model is trained and evaluated without the Alpaca wrapper
    assert all(json.loads((root / stage / "config.json").read_text())["template"] == "none"
               for stage in ("sft", "train_p", "train_c"))
    evaluations = summary["eval"]  # tuna eval ranking + generation of the starting model and each stage
    assert set(evaluations) == {"start", "tuna_p", "tuna_c"}
    assert evaluations["start"]["pair_accuracy"] >= 0.7  # the start model is instruction-tuned (sft stage)
    assert all(evaluations[name]["rouge_l"] is not None for name in evaluations)
    assert all(evaluations[name]["exact_match"] is not None for name in evaluations)
    assert "| exact_match |" in (root / "eval" / "comparison.md").read_text()
    assert (root / "eval" / "comparison.png").stat().st_size > 1000
    # evaluation instructions never occur in a training stage
    trained = {r["instruction"] for name in ("sft.jsonl", "data_p.jsonl", "instructions.jsonl")
               for r in map(json.loads, (root / name).read_text().splitlines())}
    assert not trained & {json.loads(line)["instruction"] for line in (root / "eval.jsonl").read_text().splitlines()}

    # a second run skips every finished stage; with the evaluations removed, it recomputes the same numbers
    shutil.rmtree(root / "eval")
    metrics_before = (root / "train_p" / "metrics.jsonl").read_text()
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (root / "train_p" / "metrics.jsonl").read_text() == metrics_before  # nothing retrained
    rerun = json.loads((root / "summary.json").read_text())
    assert rerun["pair_accuracy"] == accuracy and rerun["eval"] == evaluations

    # other settings on the same run directory: refused before any stage, naming what changed
    changed = subprocess.run(command + ["--num-candidates", "3"], cwd=tmp_path, capture_output=True, text=True)
    assert changed.returncode != 0 and "num_candidates: 4 -> 3" in changed.stderr
    assert "Traceback" not in changed.stderr
    assert (root / "train_p" / "metrics.jsonl").read_text() == metrics_before
