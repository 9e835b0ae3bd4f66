"""`tuna score --teacher openai:MODEL` against a local fake completions endpoint (issue 27, point 3): scores from the
echoed log-probs of the response's tokens; every fault ends as a retry or as that record's listed failure; the
cache resumes; Ctrl-C keeps what was scored; flags checked before any request; the API key written nowhere."""

import functools
import json
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from fake_openai import FakeOpenAI
from tuna_train.cli import main
from tuna_train.data import load_ranked
from tuna_train.pipeline.http import JsonClient
from tuna_train.pipeline.pool import Interrupted, run_cached
from tuna_train.pipeline.score import score_with_endpoint
from tuna_train.pipeline.store import JsonlStore

RESPONSES = ["a bb", "ccc dddd eeeee", "f"]


def records(names, responses=RESPONSES):
    return [{"id": name, "instruction": name, "responses": list(responses)} for name in names]


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_sum_and_tokens(response):
    """The fake teacher's definition (tests/fake_openai.py): a token is a word or a run of punctuation with the
    spaces before it, of log-prob -(1 + its length) / 8; the response's tokens are those after the prompt (which
    ends in "Response:", so none straddles)."""
    tokens = re.findall(r"\s*\w+|\s*[^\s\w]+", response)
    return sum(-(1 + len(t)) / 8 for t in tokens), len(tokens)


def client(server, **options):
    return JsonClient(server.base_url, None, **{"timeout": 2, "max_retries": 2, "backoff": 0.01,
                                                "max_backoff": 0.05, **options})


def test_endpoint_scores_are_the_response_tokens_mean_log_prob(tmp_path):
    """Good answers, and answers after a 429, a 500 and a hang past --timeout (each retried once)."""
    out = tmp_path / "scored.jsonl"
    names = ["ok1", "r429", "r500", "rhang"]
    with FakeOpenAI(hang_seconds=1.0) as server:
        stats = score_with_endpoint(client(server, timeout=0.4), "teacher", records(names), out, concurrency=2)
        counts = dict(server.requests)
    assert stats == {"records": 4, "scored": 4, "failed": 0, "asked": 4}
    assert counts["ok1"] == 3 and all(counts[name] == 4 for name in names[1:])  # one retry each
    sums, tokens = zip(*map(expected_sum_and_tokens, RESPONSES))
    for record in read_lines(out):
        assert record["teacher"]["sum"] == pytest.approx(list(sums), abs=1e-12)
        assert record["teacher"]["tokens"] == list(tokens)
        means = [s / t for s, t in zip(sums, tokens)]
        assert record["scores"] == pytest.approx(means, abs=1e-12)
        assert record["ranking"] == sorted(range(3), key=lambda i: -means[i])
    examples, report = load_ranked(str(out))
    assert report.loaded == 4 and report.data_format == "native"


FAULTS = ["ok1", "snolog", "s500", "sredirect", "snan", "sinf", "snull", "smalformed", "ok2"]


def test_every_endpoint_fault_is_a_listed_failure_and_the_rest_is_scored(tmp_path):
    """No answer, a persistent 500, a redirect, NaN / -inf / null log-probs, malformed log-probs, a record that cannot
    be prompted: each fails its own record with its reason; the others are scored and written; a rerun asks
    nothing again."""
    out = tmp_path / "scored.jsonl"
    bad = [{"id": "noresp", "instruction": "x"}, {"id": "notext", "instruction": 5, "responses": ["r"]}]
    with FakeOpenAI() as server:
        stats = score_with_endpoint(client(server), "teacher", records(FAULTS) + bad, out)
        counts = dict(server.requests)
    assert stats == {"records": 11, "scored": 2, "failed": 9, "asked": 9}
    assert counts["s500"] == 3 and counts["sredirect"] == 1  # retried up to --max-retries; a redirect is final
    assert [r["id"] for r in read_lines(out)] == ["ok1", "ok2"]
    failed = read_lines(tmp_path / "scored.jsonl.failures.jsonl")
    assert [f["id"] for f in failed] == FAULTS[1:-1] + ["noresp", "notext"]  # in input order, whole
    assert all(f["responses"] == RESPONSES for f in failed[:7])
    reasons = {f["id"]: f["score_failure"] for f in failed}
    assert reasons["snolog"].startswith("record 2 (id 'snolog'): response 0: the answer has no choices[0].logprobs")
    assert "HTTP 500 after 3 attempts" in reasons["s500"]
    # an HTTP error may be the endpoint refusing the echo request (transformers serve errs on max_tokens 0): said so
    assert "the endpoint must serve echoed prompt log-probs" in reasons["s500"]
    assert "redirect refused" in reasons["sredirect"] and "echoed prompt log-probs" not in reasons["sredirect"]
    assert "log-prob nan, not a finite number" in reasons["snan"]
    assert "log-prob -inf" in reasons["sinf"] and "log-prob None" in reasons["snull"]
    assert "malformed logprobs" in reasons["smalformed"]
    assert "record 10 (id 'noresp')" in reasons["noresp"] and "no 'responses'" in reasons["noresp"]
    assert "string 'instruction'" in reasons["notext"]

    with FakeOpenAI() as server:  # everything comes from the cache, the failures too
        again = score_with_endpoint(client(server), "teacher", records(FAULTS) + bad, out)
        assert sum(server.requests.values()) == 0 and again["asked"] == 0
        # --retry-failed asks again for the failed records only
        retried = score_with_endpoint(client(server), "teacher", records(FAULTS) + bad, out, retry_failed=True)
        assert retried["asked"] == 7 and server.requests["ok1"] == 0
    assert [r["id"] for r in read_lines(out)] == ["ok1", "ok2"]


def test_a_rerun_asks_only_the_missing_records_and_alpha_asks_nothing(tmp_path):
    out = tmp_path / "scored.jsonl"
    with FakeOpenAI() as server:
        score_with_endpoint(client(server), "teacher", records(["a1", "a2"]), out)
        stats = score_with_endpoint(client(server), "teacher", records(["a1", "a2", "a3"]), out, alpha=0.0)
        assert stats["asked"] == 1 and server.requests == {"a1": 3, "a2": 3, "a3": 3}
        sums = [expected_sum_and_tokens(r)[0] for r in RESPONSES]
        assert all(r["scores"] == pytest.approx(sums) for r in read_lines(out))  # alpha 0: the sums, from the cache
        changed = score_with_endpoint(client(server), "teacher", records(["a1"], ["other"]), out)
        assert changed["asked"] == 1 and server.requests["a1"] == 4  # other responses are other texts: asked anew


def test_the_shared_loop_on_ctrl_c_sends_nothing_more_and_keeps_every_answer(tmp_path):
    """The asking loop of score, rank and eval judge: a Ctrl-C (SIGINT to the main thread, from job 3) cancels the
    queued jobs (at most the one a worker took meanwhile still runs) and caches every job that ran, the one in
    flight too; a job's fault is its own."""
    cache, asked = JsonlStore(tmp_path / "cache.jsonl"), []

    def job(item):
        asked.append(item)
        if item == 3:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(0.2)  # still in flight when the Ctrl-C arrives
        if item == 1:
            raise RuntimeError("a fault of this item only")
        return {"status": "ok", "value": item}

    try:
        run_cached({f"k{i}": functools.partial(job, i) for i in range(10)}, cache, 1, "test")
    except KeyboardInterrupt as error:  # caught here, so that a bare one fails this test, not the session
        interrupt = error
    assert isinstance(interrupt, Interrupted) and "run the same command again" in str(interrupt)
    time.sleep(0.3)  # nothing queued may start now
    assert asked[:4] == [0, 1, 2, 3] and len(asked) <= 5
    stored = JsonlStore(tmp_path / "cache.jsonl").entries  # on disk
    assert sorted(stored) == sorted(f"k{i}" for i in asked) and f"{len(stored)} of the 10" in str(interrupt)
    assert stored["k1"]["status"] == "failed" and "a fault of this item only" in stored["k1"]["reason"]


def wait_for_lines(path, count, process, deadline):
    while not (path.exists() and len(path.read_text().splitlines()) >= count):
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-2000:]
        time.sleep(0.02)


def test_ctrl_c_keeps_what_was_scored_and_the_rerun_asks_only_the_rest(tmp_path):
    """SIGINT to `tuna score` mid-run: a one-line message (no traceback), exit 130, the records scored so far kept
    in the cache, nothing more sent; the rerun asks each missing response once and none twice."""
    names = [f"rec{i}" for i in range(30)]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(names)))
    out, cache = tmp_path / "scored.jsonl", tmp_path / "scored.jsonl.cache.jsonl"
    with FakeOpenAI(delay=0.03) as server:
        command = [sys.executable, "-m", "tuna_train.cli", "score", "--teacher", "openai:m", "--base-url",
                   server.base_url, "--data", str(data), "--out", str(out), "--concurrency", "2",
                   "--api-key-env", "TUNA_NO_KEY"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_lines(cache, 4, process, time.time() + 120)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        sent = sum(server.requests.values())
        kept = read_lines(cache)
        assert process.returncode == 130, stderr[-2000:]
        assert "Traceback" not in stderr and "interrupted:" in stderr and "run the same command again" in stderr
        assert 4 <= len(kept) < 30 and sent == 3 * len(kept)  # every answer received is kept, nothing more sent
        assert not out.exists()
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert all(count == 1 for count in server.prompts.values())  # no response asked twice
        assert sum(server.prompts.values()) == 3 * 30
    assert [r["id"] for r in read_lines(out)] == names


def run_score(server, tmp_path, capsys, caplog, *flags, names=("ok1",)):
    """`tuna score` in this process (its flags and messages as a user sees them, without a second interpreter's
    start-up): (exit code, everything it printed or logged)."""
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(names)))
    argv = ["score", "--teacher", "openai:m", "--base-url", server.base_url, "--data", str(data), "--out",
            str(tmp_path / "scored.jsonl"), "--api-key-env", "TUNA_TEST_KEY", *flags]
    caplog.clear()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse refusing a flag
        code = exit_.code
    printed = capsys.readouterr()
    return code, printed.out + printed.err + caplog.text


@pytest.mark.parametrize("flags, words", [
    (["--timeout", "0"], "argument --timeout: must be > 0, got '0'"),
    (["--timeout", "-1"], "argument --timeout: must be > 0, got '-1'"),
    (["--timeout", "nan"], "argument --timeout: must be > 0, got 'nan'"),
    (["--max-retries", "-1"], "argument --max-retries: must be >= 0, got '-1'"),
    (["--max-retries", "1.5"], "argument --max-retries: must be an integer"),
    (["--concurrency", "0"], "argument --concurrency: must be >= 1, got '0'"),
    (["--max-backoff", "-1"], "argument --max-backoff: must be >= 0, got '-1'"),
])
def test_endpoint_flags_are_checked_before_any_request(tmp_path, capsys, caplog, flags, words):
    with FakeOpenAI() as server:
        code, printed = run_score(server, tmp_path, capsys, caplog, *flags)
        assert sum(server.requests.values()) == 0
    assert code == 2 and words in printed and "Traceback" not in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # nothing written


def test_cli_lists_failures_exits_nonzero_when_nothing_is_scored_and_never_writes_the_key(tmp_path, capsys, caplog,
                                                                                           monkeypatch):
    monkeypatch.setenv("TUNA_TEST_KEY", "sk-secret-789")
    with FakeOpenAI(hang_seconds=1.5) as server:
        code, partly = run_score(server, tmp_path, capsys, caplog, "--max-retries", "0", "--timeout", "0.5",
                                 names=("ok1", "s500", "rhang"))
        authorizations, counts = list(server.authorizations), dict(server.requests)
    assert code == 0, partly
    assert counts == {"ok1": 3, "s500": 1, "rhang": 1}  # --max-retries 0: nothing retried
    # each failure is named with the file, record, line and id
    assert f"{tmp_path / 'in.jsonl'}: record 2 (line 2) (id 's500'): response 0: /completions: HTTP 500" in partly
    assert "record 3 (line 3) (id 'rhang'): response 0: /completions: no complete answer within the 0.5 s" in partly
    assert set(authorizations) == {"Bearer sk-secret-789"}  # the key is sent to the endpoint ...

    with FakeOpenAI() as server:
        code, none = run_score(server, tmp_path, capsys, caplog, "--max-retries", "0", names=("sredirect", "snolog"))
    assert code == 3 and "no record was scored (2 failed; their reasons are in" in none
    assert "redirect refused" in none and "no choices[0].logprobs" in none
    for text in [partly, none] + [p.read_text() for p in tmp_path.iterdir()]:
        assert "sk-secret" not in text  # ... and written nowhere
