"""Faults and bad inputs of the judge client, the judgement cache and the stores (issue 15, points 2 and 4-8),
against real HTTP servers on 127.0.0.1 (nothing leaves the machine); a damaged pipeline manifest (issue 27.11)."""

import json
import time

import pytest

from fake_openai import FakeOpenAI
from helpers import sigkill_once_cached
from tuna_train.pipeline.http import JsonClient, RequestFailed
from tuna_train.pipeline.judge import ChatJudge
from tuna_train.pipeline.rank import rank_records
from tuna_train.pipeline.store import JsonlStore
from tuna_train.pipeline.workflow import Manifest


def records(names, responses=("alpha", "beta", "gamma")):
    return [{"id": name, "instruction": name, "responses": list(responses)} for name in names]


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_api_key_never_follows_a_redirect(monkeypatch):
    """Point 2: a 307 to another port is refused (not followed), so the key reaches only base_url's host."""
    monkeypatch.setenv("TUNA_TEST_KEY", "sk-secret-456")
    with FakeOpenAI() as other:
        with FakeOpenAI(redirect_to=other.base_url) as first:
            client = JsonClient(first.base_url, "TUNA_TEST_KEY", timeout=2, max_retries=2, backoff=0.01)
            with pytest.raises(RequestFailed, match="redirect refused") as failure:
                client.post("/chat/completions", {"messages": []})
            assert failure.value.attempts == 1  # final: not retried
            assert first.authorizations == ["Bearer sk-secret-456"]  # the key goes to base_url
        assert other.authorizations == []  # and nowhere else
    assert "sk-secret" not in str(failure.value)


@pytest.mark.parametrize("header", ["inf", "nan", "-5", "100000"])
def test_retry_after_is_clamped_to_max_backoff(header):
    """Point 5: any Retry-After (infinite, NaN, negative, huge) ends in a wait of at most max_backoff."""
    name = {"inf": "rinf", "nan": "rnan", "-5": "rneg", "100000": "rhuge"}[header]
    waits = []
    with FakeOpenAI() as server:
        client = JsonClient(server.base_url, None, timeout=2, max_retries=2, backoff=0.01, max_backoff=0.5,
                            sleep=waits.append)
        answer = client.post("/chat/completions", {"messages": [{"content": f"Instruction:\n{name}"}]})
    assert "rank:" in answer["choices"][0]["message"]["content"]
    assert len(waits) == 1 and 0.0 <= waits[0] <= 0.5
    assert client.max_seconds == 3 * 2 + 2 * 0.5


def test_a_trickling_server_is_cut_at_the_deadline():
    """Point 5: the timeout bounds the whole attempt, not each socket read."""
    with FakeOpenAI(trickle_seconds=0.1) as server:  # ~80 bytes at 0.1 s each: ~8 s per attempt if not cut
        client = JsonClient(server.base_url, None, timeout=0.6, max_retries=1, backoff=0.01, max_backoff=0.01)
        started = time.monotonic()
        with pytest.raises(RequestFailed, match="deadline") as failure:
            client.post("/chat/completions", {"messages": [{"content": "Instruction:\nrtrickle"}]})
        elapsed = time.monotonic() - started
        assert server.requests["rtrickle"] == 2 and failure.value.attempts == 2
    assert elapsed < client.max_seconds + 0.5, elapsed


FAULTS = ["ok1", "rparts", "rint", "rbytes", "rcut", "rstatus", "rinf", "rnan", "rneg", "rhuge", "rgarbage", "ok2"]


def test_a_server_mixing_every_fault_never_stops_the_run(tmp_path):
    """Point 4: every reply fault ends as a retry or a recorded failure with its reason; nothing is lost; the
    output is written; a rerun asks nothing again and does not crash on the poison records."""
    out = tmp_path / "ranked.jsonl"
    with FakeOpenAI() as server:
        judge = ChatJudge("m", JsonClient(server.base_url, None, timeout=2, max_retries=2, backoff=0.01,
                                          max_backoff=0.05))
        stats = rank_records(records(FAULTS), judge, out, concurrency=3, parse_attempts=2)
        counts = dict(server.requests)
    ranked, failed = read_lines(out), read_lines(tmp_path / "ranked.jsonl.failures.jsonl")
    assert sorted(r["id"] for r in ranked + failed) == sorted(FAULTS)  # every record in one of the two files
    assert {r["id"] for r in ranked} == {"ok1", "ok2", "rparts", "rcut", "rinf", "rnan", "rneg", "rhuge"}
    assert next(r for r in ranked if r["id"] == "rparts")["judge"]["ranking"] == [1, 0, 2]  # the text parts, joined
    reasons = {f["id"]: f["judge_failure"] for f in failed}
    assert "content is int" in reasons["rint"]
    assert "not UTF-8" in reasons["rbytes"] and "after 3 attempts" in reasons["rbytes"]
    assert "BadStatusLine" in reasons["rstatus"] and "after 3 attempts" in reasons["rstatus"]
    assert "unparsable" in reasons["rgarbage"]
    assert counts["rcut"] == 2 and counts["rhuge"] == 2 and counts["rstatus"] == 3 and counts["rint"] == 2
    assert stats == {"records": 12, "ranked": 8, "failed": 4, "asked": 12}

    with FakeOpenAI() as server:  # a rerun: everything comes from the cache, the poison records included
        judge = ChatJudge("m", JsonClient(server.base_url, None, timeout=2, max_retries=0))
        again = rank_records(records(FAULTS), judge, out, concurrency=3)
        assert sum(server.requests.values()) == 0 and again["asked"] == 0
    assert read_lines(out) == ranked


def test_cache_is_keyed_by_what_decides_the_judgement(tmp_path):
    """Point 6: same id with other responses, or another judge model, is asked again; the same content is not."""
    out = tmp_path / "ranked.jsonl"
    twins = [{"id": 1, "instruction": "dup", "responses": ["a", "b"]},
             {"id": 1, "instruction": "dup", "responses": ["c", "d", "e"]}]
    with FakeOpenAI() as server:
        client = JsonClient(server.base_url, None, timeout=2, max_retries=0)
        stats = rank_records(twins, ChatJudge("m", client), out)
        assert server.requests["dup"] == 2 and stats["asked"] == 2  # two records, two judgements
        assert [len(r["responses"]) for r in read_lines(out)] == [2, 3]

        rank_records(twins, ChatJudge("m", client), out)  # unchanged: nothing asked
        assert server.requests["dup"] == 2
        changed = [twins[0], dict(twins[1], responses=["c", "d", "f"])]
        assert rank_records(changed, ChatJudge("m", client), out)["asked"] == 1  # changed responses
        assert rank_records(changed, ChatJudge("other", client), out)["asked"] == 2  # another judge
        assert server.requests["dup"] == 5
    assert {r["judge"]["name"] for r in read_lines(out)} == {"openai:other"}


def test_store_repairs_a_torn_last_line_before_appending(tmp_path, caplog):
    """Point 7: an entry cut short by a kill is removed (with a warning naming the file), not glued to the next."""
    path = tmp_path / "cache.jsonl"
    store = JsonlStore(path)
    store.put("a", {"value": 1})
    with open(path, "a") as handle:
        handle.write('{"value": 2, "ke')  # the kill
    with caplog.at_level("WARNING"):
        store.put("c", {"value": 3})  # the same store object appends after the tear
        JsonlStore(path).put("d", {"value": 4})  # and a new one, as a rerun does
    assert str(path) in caplog.text and "cut short" in caplog.text
    reread = JsonlStore(path)
    assert sorted(reread.entries) == ["a", "c", "d"]
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "c", "d"]


def test_malformed_rank_records_are_listed_as_failures(tmp_path):
    """Point 8: no responses, wrong types -> failures with reasons; the good records are still ranked."""
    bad = [{"id": "a", "instruction": "x"}, {"id": "b", "instruction": "x", "responses": "one"},
           {"id": "c", "instruction": "x", "responses": ["ok", 3]}, {"id": "d", "instruction": 5, "responses": ["r"]},
           {"id": "e", "instruction": "x", "input": ["list"], "responses": ["r"]}]
    out = tmp_path / "ranked.jsonl"
    with FakeOpenAI() as server:
        judge = ChatJudge("m", JsonClient(server.base_url, None, timeout=2, max_retries=0))
        stats = rank_records(records(["ok1"]) + bad, judge, out)
        assert sum(server.requests.values()) == 1  # the bad records are never sent
    assert stats["ranked"] == 1 and stats["failed"] == 5
    reasons = {f["id"]: f["judge_failure"] for f in read_lines(tmp_path / "ranked.jsonl.failures.jsonl")}
    assert reasons["a"] == "record 2: no 'responses' field"
    assert "record 3: field 'responses' must be a non-empty list" in reasons["b"]
    assert "record 4: field 'responses': item 1 is int" in reasons["c"]
    assert "record 5: field 'instruction'" in reasons["d"]
    assert "record 6: field 'input'" in reasons["e"]


def test_requests_go_through_the_configured_proxy(monkeypatch):
    """The client honours http_proxy / no_proxy as urllib did (a plain-HTTP proxy gets the absolute URL)."""
    with FakeOpenAI() as proxy:
        monkeypatch.setenv("http_proxy", proxy.base_url.rsplit("/v1", 1)[0])
        monkeypatch.setenv("no_proxy", "")
        client = JsonClient("http://api.invalid/v1", None, timeout=2, max_retries=0)
        answer = client.post("/chat/completions", {"messages": [{"content": "Instruction:\nok1"}]})
        assert "rank:" in answer["choices"][0]["message"]["content"] and proxy.requests["ok1"] == 1
        monkeypatch.setenv("no_proxy", "api.invalid")
        with pytest.raises(RequestFailed):
            client.post("/chat/completions", {"messages": [{"content": "Instruction:\nok1"}]})
        assert proxy.requests["ok1"] == 1


@pytest.mark.slow
def test_killed_run_against_a_faulty_server_resumes_without_judging_twice(tmp_path):
    """Acceptance: `tuna rank` on a server mixing every fault, killed and rerun: every record ranked or listed
    as failed, none lost, and no record finished before the kill is asked again."""
    import subprocess
    import sys

    names = [f"rec{i}" for i in range(20)] + FAULTS
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(names)))
    out, cache = tmp_path / "ranked.jsonl", tmp_path / "ranked.jsonl.cache.jsonl"
    with FakeOpenAI(delay=0.05) as server:
        command = [sys.executable, "-m", "tuna_train.cli", "rank", "--judge", "openai:m", "--base-url",
                   server.base_url, "--data", str(data), "--out", str(out), "--concurrency", "2", "--timeout", "2",
                   "--max-retries", "2", "--max-backoff", "0.05", "--parse-attempts", "2", "--api-key-env", "NO_KEY"]
        sigkill_once_cached(command, cache, 8)
        at_kill = dict(server.requests)
        finished = {json.loads(line)["id"] for line in cache.read_text().splitlines() if line.endswith("}")}
        assert 8 <= len(finished) < len(names) and not out.exists()
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        final = dict(server.requests)
    assert all(final[name] == at_kill[name] for name in finished)  # none judged twice
    ranked, failed = read_lines(out), read_lines(tmp_path / "ranked.jsonl.failures.jsonl")
    assert sorted(r["id"] for r in ranked + failed) == sorted(names)  # none lost
    assert {f["id"] for f in failed} == {"rint", "rbytes", "rstatus", "rgarbage"}
    assert all(f["judge_failure"] for f in failed)


@pytest.mark.parametrize("content", [b"{\"stages\":", b"\xff\xfe", b"[]", b"{\"stages\": []}",
                                     b"{\"stages\": {\"score\": \"done\"}}",
                                     b"{\"stages\": {\"score\": {\"status\": \"done\", \"outputs\": \"a.jsonl\"}}}",
                                     b"{\"settings\": 3}"])
def test_a_damaged_pipeline_manifest_is_one_line_naming_it(tmp_path, content):
    """Issue 27.11: not JSON, not UTF-8, or of another shape, the pipeline's manifest.json is refused naming it
    (before: a JSONDecodeError naming nothing, an AttributeError, or a TypeError in a later stage); the file
    is left as it was."""
    path = tmp_path / "manifest.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^{path}: ") as refused:
        Manifest(path)
    assert "\n" not in str(refused.value) and "--output-dir" in str(refused.value)
    assert path.read_bytes() == content
