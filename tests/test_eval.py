"""tuna eval: ROUGE-L with per-task averaging against rouge-score directly; pairwise accuracy and Kendall's
tau-b against independent computations on random, tied, ragged groups."""

import itertools
import json
import math
import random
import signal
import subprocess
import sys
import time

import pytest
from rouge_score import rouge_scorer

from helpers import naive_sums, release_contextual
from tuna_train.evaluation.ranking import kendall_tau_b, ranking_metrics
from tuna_train.evaluation.text import generation_metrics
from tuna_train.synthetic import make_records

FIXTURE = [
    {"task": "task1", "references": ["the cat sat on the mat"], "prediction": "the cat sat"},
    {"task": "task1", "references": ["a quick brown fox", "the fast fox"], "prediction": "the quick fox"},
    {"task": "task2", "references": ["Paris is the capital"], "prediction": "the capital is Paris"},
    {"task": "task2", "output": "forty two", "prediction": "42"},
    {"task": "task3", "references": ["yes"], "prediction": "Yes!"},
]


def test_rouge_l_per_task_matches_rouge_score_exactly():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    per_record = []
    for record in FIXTURE:
        references = record.get("references") or [record["output"]]
        per_record.append(max(scorer.score(ref, record["prediction"])["rougeL"].fmeasure for ref in references))
    by_task = {}
    for record, value in zip(FIXTURE, per_record):
        by_task.setdefault(record["task"], []).append(value)
    expected_tasks = {task: sum(v) / len(v) for task, v in by_task.items()}
    metrics = generation_metrics(FIXTURE, [r["prediction"] for r in FIXTURE])
    assert metrics["rouge_l_per_task"] == expected_tasks
    assert metrics["rouge_l"] == sum(expected_tasks.values()) / 3  # each task counts once
    assert metrics["tasks"] == 3 and metrics["records"] == 5
    # exact match per task (white space around ignored), then over tasks: task1 0/2, task2 0/2, task3 0/1
    assert metrics["exact_match"] == 0.0
    matched = generation_metrics(FIXTURE, [" the cat sat on the mat", "x", "y", "forty two", "yes"])
    assert matched["exact_match"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 1) / 3)


def naive_tau_b(x, y):
    """tau-b = (n_c - n_d) / sqrt((n0 - n1)(n0 - n2)), with tie corrections from the tie groups."""
    n = len(x)
    n0 = n * (n - 1) / 2
    sign = lambda v: (v > 0) - (v < 0)  # noqa: E731
    s = sum(sign(x[i] - x[j]) * sign(y[i] - y[j]) for i in range(n) for j in range(i + 1, n))
    n1 = sum(c * (c - 1) / 2 for c in (x.count(v) for v in set(x)))
    n2 = sum(c * (c - 1) / 2 for c in (y.count(v) for v in set(y)))
    denominator = math.sqrt((n0 - n1) * (n0 - n2))
    return None if denominator == 0 else s / denominator


@pytest.mark.parametrize("seed", range(10))
def test_pairwise_accuracy_and_kendall_tau_match_naive(seed):
    rng = random.Random(seed)
    model, target = [], []
    for _ in range(12):
        size = rng.randint(1, 6)  # ragged, single-candidate groups included
        model.append([rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(size)])  # ties in the model
        target.append([float(rng.randint(0, 3)) for _ in range(size)])  # ties in the ranking
    metrics = ranking_metrics(model, target)

    correct = pairs = 0
    for m, t in zip(model, target):
        for i, j in itertools.permutations(range(len(m)), 2):
            if t[i] > t[j]:
                pairs += 1
                correct += m[i] > m[j]
    assert metrics["pairs"] == pairs
    assert metrics["pair_accuracy"] == pytest.approx(correct / pairs, abs=1e-12)
    taus = [naive_tau_b(m, t) for m, t in zip(model, target)]
    taus = [tau for tau in taus if tau is not None]
    assert metrics["groups_with_tau"] == len(taus)
    assert metrics["kendall_tau"] == pytest.approx(sum(taus) / len(taus), abs=1e-12)


def test_kendall_tau_extremes():
    assert kendall_tau_b([3, 2, 1], [3, 2, 1]) == 1.0
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau_b([1, 1, 1], [3, 2, 1]) is None


def test_judge_comparison_both_orders_faults_and_resume(tmp_path):
    from fake_openai import FakeOpenAI
    from tuna_train.pipeline.http import JsonClient
    from tuna_train.pipeline.judge import ChatJudge
    from tuna_train.pipeline.pairwise import judge_pairwise

    questions = [{"id": n, "instruction": n} for n in ("q1", "q2", "r429", "r500", "rgarbage", "q3")]
    mine = ["good answer", "meh", "good answer", "meh", "good answer", "good one"]
    baseline = ["meh", "good answer", "meh", "meh", "meh", "good too"]
    with FakeOpenAI() as server:
        judge = ChatJudge("m", JsonClient(server.base_url, None, timeout=2, max_retries=3, backoff=0.01))
        result = judge_pairwise(judge, questions[:4], mine[:4], baseline[:4], tmp_path / "cache.jsonl", parse_attempts=2)
        assert result["asked"] == 8
        assert dict(server.requests) == {"q1": 2, "q2": 2, "r429": 3, "r500": 3}  # both orders; one retry each
        result = judge_pairwise(judge, questions, mine, baseline, tmp_path / "cache.jsonl", parse_attempts=2)
        assert result["asked"] == 4  # resumed: only the new questions are asked
        assert server.requests["q1"] == 2 and server.requests["rgarbage"] == 4
    assert (result["wins"], result["losses"], result["ties"], result["failed"]) == (2, 1, 2, 1)
    assert result["win_rate"] == pytest.approx((2 + 1) / 5)
    low, high = result["win_rate_ci95"]
    assert 0.0 <= low <= result["win_rate"] <= high <= 1.0
    outcomes = {row["key"]: row["outcome"] for row in result["rows"]}
    assert outcomes == {"id:q1": "win", "id:q2": "loss", "id:r429": "win", "id:r500": "tie",
                        "id:rgarbage": "failed", "id:q3": "tie"}


def test_eval_ranking_cli_matches_naive_scores(tiny_model_dir, tmp_path):
    from tuna_train.cli import main
    from tuna_train.model import load_model, load_tokenizer

    records = make_records(6, seed=3)
    data = tmp_path / "ranked.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["eval", "ranking", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "r"),
                 "--alpha", "0.5"]) == 0
    report = json.loads((tmp_path / "r" / "report-ranking.json").read_text())

    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    naive = []
    for record in records:  # each candidate in its own row, logits materialised, float64
        sums, counts = naive_sums(model, tokenizer, record)
        naive.append([s / c ** 0.5 for s, c in zip(sums, counts)])
    expected = ranking_metrics(naive, [r["scores"] for r in records])
    assert report["metrics"]["pairs"] == expected["pairs"]
    for key in ("pair_accuracy", "kendall_tau", "score_gap"):
        assert report["metrics"][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6)


def test_eval_generation_cli_saves_scores_resumes_and_compares(tiny_model_dir, tmp_path, capsys):
    from tuna_train.cli import main

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": i, "task": f"t{i % 2}", "instruction": "Repeat the input.", "input": word, "references": [word]}
        for i, word in enumerate(["abc", "hello", "xyz"])]))
    command = ["eval", "generation", "--model", str(tiny_model_dir), "--data", str(tasks), "--max-new-tokens", "6"]
    assert main(command + ["--out", str(tmp_path / "a"), "--name", "A"]) == 0
    progress = (tmp_path / "a" / "progress.jsonl").read_text()
    assert main(command + ["--out", str(tmp_path / "a"), "--name", "A"]) == 0  # resumed: nothing generated again
    assert (tmp_path / "a" / "progress.jsonl").read_text() == progress
    generations = [json.loads(line) for line in (tmp_path / "a" / "generations.jsonl").read_text().splitlines()]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for row in generations:
        assert row["rouge_l"] == scorer.score(row["references"][0], row["prediction"])["rougeL"].fmeasure
    report = json.loads((tmp_path / "a" / "report-generation.json").read_text())
    assert report["metrics"] == generation_metrics(generations, [row["prediction"] for row in generations])

    assert main(command + ["--out", str(tmp_path / "b"), "--name", "B"]) == 0
    png = tmp_path / "compare.png"
    data = tmp_path / "ranked.jsonl"  # a ranking report in the same --out keeps the generation report
    data.write_text("".join(json.dumps(r) + "\n" for r in make_records(4, seed=5)))
    assert main(["eval", "ranking", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "a"),
                 "--name", "A"]) == 0
    assert json.loads((tmp_path / "a" / "report-generation.json").read_text()) == report
    capsys.readouterr()
    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b" / "report-generation.json"),
                 "--png", str(png)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0] == "| metric | A | B |" and "| rouge_l[t0] |" in table
    assert "| pair_accuracy |" in table and table.count("–") >= 1  # B has no ranking report: shown as missing
    assert png.stat().st_size > 1000


@pytest.mark.slow
def test_eval_judge_killed_run_resumes_without_repeated_requests(tiny_model_dir, tmp_path):
    from fake_openai import FakeOpenAI

    names = [f"rec{i}" for i in range(20)]
    questions, baseline = tmp_path / "questions.jsonl", tmp_path / "baseline.jsonl"
    questions.write_text("".join(json.dumps({"id": n, "instruction": n}) + "\n" for n in names))
    baseline.write_text("".join(json.dumps({"answer": "a good answer"}) + "\n" for _ in names))
    out = tmp_path / "judge"
    cache = out / "verdicts.cache.jsonl"
    with FakeOpenAI(delay=0.05) as server:
        command = [sys.executable, "-m", "tuna_train.cli", "eval", "judge", "--model", str(tiny_model_dir), "--data",
                   str(questions), "--baseline-answers", str(baseline), "--judge", "openai:m", "--base-url",
                   server.base_url, "--out", str(out), "--concurrency", "1", "--max-new-tokens", "4",
                   "--api-key-env", "TUNA_NO_KEY"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 300
        while not (cache.exists() and len(cache.read_text().splitlines()) >= 6):
            assert process.poll() is None and time.time() < deadline, process.stderr.read().decode()[-2000:]
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
        finished = {json.loads(line)["key"] for line in cache.read_text().splitlines() if line.endswith("}")}
        assert 6 <= len(finished) < 40 and not (out / "report-judge.json").exists()
        resumed = subprocess.run(command, capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        counts = dict(server.requests)
    for name in names:  # both orders asked once each, except at most the one in flight at the kill
        both_done = {f"id:{name}|model-first", f"id:{name}|model-second"} <= finished
        assert counts[name] == 2 if both_done else 2 <= counts[name] <= 3
    assert sum(counts.values()) <= 2 * len(names) + 1
    report = json.loads((out / "report-judge.json").read_text())["metrics"]
    assert report["wins"] + report["ties"] + report["losses"] + report["failed"] == len(names)
    assert len((out / "verdicts.jsonl").read_text().splitlines()) == len(names)


def test_eval_ranking_of_release_contextual_records_scores_instruct(tiny_model_dir, tmp_path):
    """`tuna eval ranking` reads raw contextual records through the training loader: candidates are scored
    given `instruct` (the templated instruction), not the judge's prompt that shows all of them."""
    from tuna_train.cli import main
    from tuna_train.model import load_model, load_tokenizer

    records = [release_contextual("Continue the alphabet after c.", ["def", "dfe", "xyz", "de"], [0, 3, 1, 2]),
               release_contextual("Repeat the letter q.", ["qqq", "qq", "q", "qqqq"], [1, 0, 4, 3, 2], key="ranks",
                                  judge_response="qqqq", id=2)]
    data = tmp_path / "contextual.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["eval", "ranking", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "r")]) == 0
    report = json.loads((tmp_path / "r" / "report-ranking.json").read_text())

    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    naive, targets = [], []
    for record in records:  # best first, the judge's own response (index 4) left out
        order = [i for i in record.get("rank", record.get("ranks")) if i < 4]
        sums, counts = naive_sums(model, tokenizer, {"prompt": record["instruct"],
                                                     "responses": [record["generation"][i] for i in order]})
        naive.append([s / c for s, c in zip(sums, counts)])
        targets.append([-float(position) for position in range(len(order))])
    expected = ranking_metrics(naive, targets)
    assert report["metrics"]["pairs"] == expected["pairs"]
    for key in ("pair_accuracy", "kendall_tau", "score_gap"):
        assert report["metrics"][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6)
