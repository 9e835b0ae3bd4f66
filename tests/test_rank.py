"""tuna rank against a real local HTTP server that injects faults: nothing is lost, each fault ends as a
retry or a recorded failure, and a killed run resumes without asking again for finished records."""

import json
import subprocess
import sys

import pytest

from fake_openai import FakeOpenAI
from helpers import sigkill_once_cached
from tuna_train.data import examples_from_records, load_ranked
from tuna_train.pipeline.http import JsonClient
from tuna_train.pipeline.judge import (
    ChatJudge,
    RankingParseError,
    RuleJudge,
    judge_response,
    parse_ranking,
    parse_scores,
)
from tuna_train.pipeline.rank import rank_records, ranked_record
from tuna_train.synthetic import make_task_records


def records(names):
    return [{"id": name, "instruction": name, "responses": ["alpha", "beta", "gamma"]} for name in names]


def test_parse_ranking():
    assert parse_ranking("blah\nrank: [2, 0, 1]", 3) == [2, 0, 1]
    assert parse_ranking("Ranking: 3, 1", 3) == [3, 1]  # the judge's own response (3), a dropped duplicate
    assert parse_ranking("rank: [0, 1]\n...\nrank: [1, 0]", 2) == [1, 0]  # the last ranking counts
    for bad in ("no ranking here", "rank: []", "rank: [0, 4]", "rank: [1, 1, 0]"):
        with pytest.raises(RankingParseError):
            parse_ranking(bad, 3)


def test_faults_end_as_retries_or_recorded_failures(tmp_path):
    names = ["ok1", "r429", "r500", "rhang", "rgarbage", "rbadindex", "ok2"]
    with FakeOpenAI(hang_seconds=1.5) as server:
        judge = ChatJudge("judge-model", JsonClient(server.base_url, None, timeout=0.5, max_retries=3, backoff=0.01))
        stats = rank_records(records(names), judge, tmp_path / "ranked.jsonl", concurrency=3, parse_attempts=2)
        counts = dict(server.requests)
    assert stats == {"records": 7, "ranked": 5, "failed": 2, "asked": 7}
    assert counts["r429"] == 2 and counts["r500"] == 2 and counts["rhang"] == 2  # one retry each
    assert counts["rgarbage"] == 2 and counts["rbadindex"] == 2  # asked again, then recorded as failures
    assert counts["ok1"] == 1 and counts["ok2"] == 1
    ranked = [json.loads(line) for line in (tmp_path / "ranked.jsonl").read_text().splitlines()]
    assert [r["id"] for r in ranked] == ["ok1", "r429", "r500", "rhang", "ok2"]
    assert ranked[0]["responses"] == ["gamma", "alpha", "beta"] and ranked[0]["judge"]["ranking"] == [2, 0, 1]
    assert "rank: [2, 0, 1]" in ranked[0]["judge"]["answer"]
    failures = [json.loads(line) for line in (tmp_path / "ranked.jsonl.failures.jsonl").read_text().splitlines()]
    assert {f["id"] for f in failures} == {"rgarbage", "rbadindex"}
    assert all(len(f["judge_answers"]) == 2 for f in failures)  # raw answers kept for audit
    examples, report = load_ranked(str(tmp_path / "ranked.jsonl"))  # readable by tuna train as it is
    assert report.data_format == "native" and examples[0].responses == ["gamma", "alpha", "beta"]

    # a rerun asks nothing again: finished records (ranked or failed) come from the cache
    with FakeOpenAI() as server:
        judge = ChatJudge("judge-model", JsonClient(server.base_url, None, timeout=0.5, max_retries=1, backoff=0.01))
        again = rank_records(records(names), judge, tmp_path / "ranked.jsonl", concurrency=3)
        assert sum(server.requests.values()) == 0 and again["asked"] == 0


def test_api_key_is_sent_but_never_written(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNA_TEST_KEY", "sk-secret-123")
    client = JsonClient("http://127.0.0.1:9/v1", "TUNA_TEST_KEY")
    assert "sk-secret" not in repr(client)
    with FakeOpenAI() as server:
        judge = ChatJudge("m", JsonClient(server.base_url, "TUNA_TEST_KEY", timeout=2, max_retries=0))
        rank_records(records(["ok1"]), judge, tmp_path / "ranked.jsonl")
    for file in tmp_path.iterdir():
        assert "sk-secret" not in file.read_text()


@pytest.mark.slow
def test_killed_run_resumes_without_repeated_requests(tmp_path):
    names = [f"rec{i}" for i in range(40)]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(names)))
    out = tmp_path / "ranked.jsonl"
    cache = tmp_path / "ranked.jsonl.cache.jsonl"
    with FakeOpenAI(delay=0.05) as server:
        command = [sys.executable, "-m", "tuna_train.cli", "rank", "--judge", "openai:m", "--base-url",
                   server.base_url, "--data", str(data), "--out", str(out), "--concurrency", "1",
                   "--api-key-env", "TUNA_NO_KEY"]
        sigkill_once_cached(command, cache, 5)
        finished_before = {json.loads(line)["id"] for line in cache.read_text().splitlines() if line.endswith("}")}
        assert 5 <= len(finished_before) < 40
        assert not out.exists()
        subprocess.run(command, check=True, capture_output=True)
        counts = dict(server.requests)
    assert all(counts[name] == 1 for name in names if name in finished_before)
    assert sum(counts.values()) <= 40 + 1  # at most the one request in flight at the kill is repeated
    assert len(out.read_text().splitlines()) == 40


def test_rule_judge_ranks_by_correctness():
    record = {"instruction": "Continue the alphabet for 3 letters after the letter a.",
              "responses": ["bcx", "bcd", "xyz", "bcd"]}
    assert parse_ranking(RuleJudge().ask(record), 4) == [1, 0, 2]  # the duplicate (3) is dropped
    # the same responses, graded for another instruction on the same letter: the task decides
    record = {"instruction": "Write 3 times the letter b.", "responses": ["bcd", "bbb", "abc", "bbx"]}
    assert parse_ranking(RuleJudge().ask(record), 4) == [1, 3, 0, 2]


def test_judge_own_response_and_scores_reach_the_ranked_record():
    # no response is the answer: the rule judge writes its own (index 4) and ranks it first
    record = {"instruction": "Write 4 times the letter z.", "responses": ["aaaa", "zzzy", "yyyy", "aaaa"]}
    answer = RuleJudge().ask(record)
    entry = {"ranking": parse_ranking(answer, 4), "answers": [answer]}
    assert entry["ranking"][0] == 4 and judge_response(answer, 4) == "zzzz"
    assert parse_scores(answer) == {0: 11.0, 1: 14.0, 2: 11.0, 4: 15.0}  # the ###Response 4 heading is no score
    kept = ranked_record(record, entry, "rule", include_judge_response=True)
    assert kept["responses"] == ["zzzz", "zzzy", "aaaa", "yyyy"]  # best first, the duplicate (3) left out
    assert kept["ranking"] == [0, 1, 2, 3] and kept["scores"] == [15.0, 14.0, 11.0, 11.0]
    examples = examples_from_records([kept])
    assert examples[0].responses == kept["responses"] and examples[0].scores[2:] == [11.0, 11.0]  # ties kept, in order
    without = ranked_record(record, entry, "rule")
    assert without["responses"] == ["zzzy", "aaaa", "yyyy"] and without["ranking"] == [0, 1, 2]

    # a model judge: its own response spans lines and ends at the score lines; scores that contradict its
    # ranking are not written (the ranking decides)
    chat = ("open-ended\n###Response 2:\nA longer answer\non two lines.\n\nResponse 0: [9]\nResponse 1: [12]\n"
            "Response 2: [14]\nrank: [2, 0, 1]")
    assert judge_response(chat, 2) == "A longer answer\non two lines." and judge_response(chat, 3) is None
    two = {"instruction": "Say something.", "responses": ["first", "second"]}
    kept = ranked_record(two, {"ranking": [2, 0, 1], "answers": [chat]}, "openai:m", include_judge_response=True)
    assert kept["responses"] == ["A longer answer\non two lines.", "first", "second"] and "scores" not in kept

    # the own response ends at a response heading, a score line or the rank line, not at a Markdown heading;
    # an empty one is none; one that repeats a candidate is not added twice; "### Response K:" is no score
    markdown = "###Response 1:\nA recipe.\n### Ingredients\n- eggs\nResponse 0: [3]\nrank: [1, 0]"
    assert judge_response(markdown, 1) == "A recipe.\n### Ingredients\n- eggs"
    assert judge_response("###Response 2:\nResponse 0: [3]\nrank: [2, 0, 1]", 2) is None
    assert parse_scores("### Response 2:\n[3] steps\n- Response 0: [9]") == {0: 9.0}
    same = ranked_record(two, {"ranking": [2, 0, 1], "answers": ["###Response 2:\nfirst\nrank: [2, 0, 1]"]},
                         "openai:m", include_judge_response=True)
    assert same["responses"] == ["first", "second"]


def test_rank_records_keeps_the_rule_judges_answer_as_the_best_candidate(tmp_path):
    records = make_task_records(12, seed=5)
    for record in records:  # wrong answers only: every group gets the judge's own as its best
        record["responses"] = [record["references"][0][::-1] + "x", "abc"]
    stats = rank_records(records, RuleJudge(), tmp_path / "ranked.jsonl", include_judge_response=True)
    assert stats["ranked"] == 12
    examples, _ = load_ranked(str(tmp_path / "ranked.jsonl"))
    assert [e.responses[0] for e in examples] == [r["references"][0] for r in records]


def test_a_ranked_record_keeps_what_its_generated_record_carried():
    """tuna rank copies the fields tuna generate copied (one list, tuna_train.schema): the id, the prompt the
    responses were sampled under, the task and the constraints, so training and evaluation read the same."""
    generated = {"id": "g1", "instruction": "Write 4 times the letter z.", "prompt": "Q: Write 4 times z.\nA:",
                 "task": "repeat", "constraints": [], "responses": ["zzzz", "aaaa"], "finish_reasons": ["stop"] * 2,
                 "generation": {"temperature": 1.0}}
    answer = RuleJudge().ask(generated)
    kept = ranked_record(generated, {"ranking": parse_ranking(answer, 2), "answers": [answer]}, "rule")
    assert {k: kept[k] for k in ("id", "instruction", "prompt", "task", "constraints")} == \
        {k: generated[k] for k in ("id", "instruction", "prompt", "task", "constraints")}
    assert "generation" not in kept and kept["responses"] == ["zzzz", "aaaa"]
