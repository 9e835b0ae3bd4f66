"""tuna rank under Ctrl-C, bad flag values, outsized answers and judges that cannot apply (issue 27, points 2, 4
and 11; issue 23, point 3), against real HTTP servers on 127.0.0.1 (nothing leaves the machine)."""

import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from fake_openai import DIGITS_ANSWER, LONG_ANSWER, FakeOpenAI
from tuna_train.cli import main
from tuna_train.pipeline.http import JsonClient
from tuna_train.pipeline.judge import ChatJudge, LocalJudge, RuleJudge
from tuna_train.pipeline.pool import Interrupted
from tuna_train.pipeline.rank import MAX_STORED_ANSWER_CHARS, rank_one, rank_records
from tuna_train.synthetic import make_task_records


def records(names):
    return [{"id": name, "instruction": name, "responses": ["alpha", "beta", "gamma"]} for name in names]


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_data(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class CtrlC:
    """A judge that is another one (same name and cache identity) and presses Ctrl-C (SIGINT to the main thread)
    when its ``after``-th answer has arrived, and again at the ``again``-th if given."""

    def __init__(self, judge, after, again=None):
        self.judge, self.name, self.identity = judge, judge.name, judge.identity
        self.after, self.again, self.answers = after, again, 0
        self.lock = threading.Lock()
        self.abort = getattr(judge, "abort", None)  # the judge's own, where it has one

    def ask(self, record, *attempt):
        answer = self.judge.ask(record, *attempt)
        with self.lock:
            self.answers += 1
            if self.answers in (self.after, self.again):
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        return answer


def test_ctrl_c_keeps_every_answer_received_and_the_rerun_asks_only_the_others(tmp_path):
    """27.2: Ctrl-C sends no queued request, caches every answer that arrives (those in flight too) and says how
    to resume; the rerun asks only the records that were never answered."""
    names = [f"rec{i}" for i in range(20)]
    out, concurrency = tmp_path / "ranked.jsonl", 2
    with FakeOpenAI(delay=0.3) as server:
        judge = CtrlC(ChatJudge("m", JsonClient(server.base_url, None, timeout=5, max_retries=0)), after=3)
        with pytest.raises(KeyboardInterrupt) as interrupt:  # (not Interrupted: a bare one must fail, not escape)
            rank_records(records(names), judge, out, concurrency=concurrency)
        sent = dict(server.requests)
    assert isinstance(interrupt.value, Interrupted), repr(interrupt.value)
    cached = {entry["id"]: entry for entry in read_lines(tmp_path / "ranked.jsonl.cache.jsonl")}
    assert set(cached) == set(sent)  # every request sent got its answer kept, in flight at the Ctrl-C included
    assert all(entry["status"] == "ok" for entry in cached.values())
    assert 3 <= len(sent) <= 3 + concurrency  # the answers before it and those in flight; nothing queued was sent
    message = str(interrupt.value)
    assert f"{len(cached)} of the 20 records" in message and "same command again" in message and "\n" not in message
    assert not out.exists()  # written by the run that finishes

    with FakeOpenAI() as server:
        stats = rank_records(records(names), ChatJudge("m", JsonClient(server.base_url, None, timeout=5)), out)
        assert set(server.requests) == set(names) - set(cached) and set(server.requests.values()) == {1}
    assert stats["ranked"] == 20 and stats["asked"] == 20 - len(cached)


@pytest.mark.slow
def test_ctrl_c_in_the_command_exits_130_with_one_line_saying_how_to_resume(tmp_path):
    """27.2, as a user sees it: SIGINT to `tuna rank` -> no traceback, exit 130, one line; the rerun completes."""
    names = [f"rec{i}" for i in range(30)]
    data, out = write_data(tmp_path / "in.jsonl", records(names)), tmp_path / "ranked.jsonl"
    cache = tmp_path / "ranked.jsonl.cache.jsonl"
    with FakeOpenAI(delay=0.2) as server:
        command = [sys.executable, "-m", "tuna_train.cli", "rank", "--judge", "openai:m", "--base-url",
                   server.base_url, "--data", str(data), "--out", str(out), "--concurrency", "2",
                   "--api-key-env", "TUNA_NO_KEY"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not (cache.exists() and len(cache.read_text().splitlines()) >= 3):
            assert process.poll() is None and time.time() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        sent = dict(server.requests)
        cached = {json.loads(line)["id"] for line in cache.read_text().splitlines()}
        assert process.returncode == 130, stderr
        assert "Traceback" not in stderr
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("tuna rank: interrupted:") and "same command again" in last and str(cache) in last
        assert set(sent) == cached and len(sent) < 30
        judge = ChatJudge("m", JsonClient(server.base_url, None))  # the rerun (as the command, in this process)
        assert rank_records(records(names), judge, out)["ranked"] == 30
        assert all(server.requests[name] == 1 for name in names)  # nothing asked twice


@pytest.mark.parametrize("flag,value", [("--parse-attempts", "0"), ("--timeout", "0"), ("--timeout", "-1"),
                                        ("--timeout", "nan"), ("--max-retries", "-1"), ("--concurrency", "0"),
                                        ("--max-backoff", "-1")])
def test_flag_values_that_would_fail_every_record_are_refused_before_anything(tmp_path, capsys, flag, value):
    """27.4: such a value is a one-line error naming the flag, before any request, read or write."""
    data = write_data(tmp_path / "in.jsonl", records(["ok1"]))
    with FakeOpenAI() as server:
        with pytest.raises(SystemExit) as exit_:
            main(["rank", "--judge", "openai:m", "--base-url", server.base_url, "--data", str(data),
                  "--out", str(tmp_path / "ranked.jsonl"), "--api-key-env", "TUNA_NO_KEY", flag, value])
        assert sum(server.requests.values()) == 0
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}: must be" in error and repr(value) in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # nothing written


def test_library_refuses_the_same_values(tmp_path):
    """27.4: the functions the command calls refuse them too (for callers that are not the command)."""
    for options in ({"timeout": 0}, {"timeout": -1.0}, {"timeout": float("inf")}, {"max_retries": -1},
                    {"max_backoff": -1}):
        with pytest.raises(ValueError, match=next(iter(options))):
            JsonClient("http://127.0.0.1:9/v1", None, **options)
    for options in ({"parse_attempts": 0}, {"concurrency": 0}):
        with pytest.raises(ValueError, match=next(iter(options))):
            rank_records(records(["ok1"]), RuleJudge(), tmp_path / "ranked.jsonl", **options)
    assert list(tmp_path.iterdir()) == []  # refused before the cache is opened


def test_outsized_answers_keep_their_raw_text_cut_to_the_cap_and_stored_once(tmp_path):
    """27.11: an index of 5000 digits is an unparsable answer whose raw text is kept; a 10 MB answer is ranked
    from its whole text but stored cut (with a marker saying how much is missing), once per file."""
    out = tmp_path / "ranked.jsonl"
    with FakeOpenAI() as server:
        judge = ChatJudge("m", JsonClient(server.base_url, None, timeout=30, max_retries=0))
        stats = rank_records(records(["rdigits", "rlong", "ok1"]), judge, out, parse_attempts=2)
        assert server.requests["rdigits"] == 2  # asked again, as any unparsable answer
    assert stats == {"records": 3, "ranked": 2, "failed": 1, "asked": 3}
    [failure] = read_lines(tmp_path / "ranked.jsonl.failures.jsonl")
    assert failure["id"] == "rdigits" and failure["judge_answers"] == [DIGITS_ANSWER, DIGITS_ANSWER]
    assert "unparsable after 2 answers" in failure["judge_failure"] and len(failure["judge_failure"]) < 300

    long = next(r for r in read_lines(out) if r["id"] == "rlong")
    assert long["judge"]["ranking"] == [1, 2, 0]  # the ranking at the very end of the 10 MB
    stored = long["judge"]["answer"]
    assert stored.startswith(LONG_ANSWER[:MAX_STORED_ANSWER_CHARS])
    assert f"{len(LONG_ANSWER) - MAX_STORED_ANSWER_CHARS} more characters not stored" in stored
    assert len(stored) < MAX_STORED_ANSWER_CHARS + 100
    for path in (out, tmp_path / "ranked.jsonl.cache.jsonl"):
        text = path.read_text()
        assert text.count("LONG-ANSWER-START") == 1 and len(text) < 2 * MAX_STORED_ANSWER_CHARS, path


class CountingRuleJudge(RuleJudge):
    def __init__(self):
        self.asked = 0

    def ask(self, record, attempt=0):
        self.asked += 1
        return super().ask(record, attempt)


def test_rule_judge_refuses_other_instructions_at_once_and_the_command_fails_when_nothing_is_ranked(tmp_path,
                                                                                                   capsys):
    """23.3: the rule judge on instructions that are not built-in tasks says so once per record (one reason, not
    retried as a parse failure); `tuna rank` then exits non-zero as nothing was ranked, and 0 when one was."""
    judge = CountingRuleJudge()
    stats = rank_records(records(["hello", "world"]), judge, tmp_path / "ranked.jsonl", parse_attempts=3)
    assert judge.asked == 2 and stats["ranked"] == 0 and stats["failed"] == 2
    for failure in read_lines(tmp_path / "ranked.jsonl.failures.jsonl"):
        assert failure["judge_failure"].startswith("the rule judge ranks only instructions of the built-in tasks")
        assert repr(failure["instruction"]) in failure["judge_failure"] and failure["judge_answers"] == []

    other = write_data(tmp_path / "other.jsonl", records(["hello", "world"]))
    assert main(["rank", "--judge", "rule", "--data", str(other), "--out", str(tmp_path / "a.jsonl")]) == 3
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("tuna rank: error: no record was ranked (2 failed") and "a.jsonl.failures.jsonl" in error
    task = make_task_records(1, seed=0)[0]
    mixed = write_data(tmp_path / "mixed.jsonl", records(["hello"]) + [dict(task, responses=["x", "y"])])
    assert main(["rank", "--judge", "rule", "--data", str(mixed), "--out", str(tmp_path / "b.jsonl")]) == 0
    assert len(read_lines(tmp_path / "b.jsonl")) == 1


def test_local_judge_samples_the_answers_it_is_asked_again(tiny_model_dir):
    """23.3: greedy decoding repeats its answer, so a local judge's attempts after the first are sampled (seeded:
    a rerun samples the same); an untrained model never writes a ranking, so every attempt is made."""
    judge = LocalJudge(str(tiny_model_dir), max_new_tokens=8, placement=None)
    calls = []
    generate = judge.model.generate

    def recorded(**kwargs):
        calls.append({key: kwargs.get(key) for key in ("do_sample", "temperature")})
        return generate(**kwargs)

    judge.model.generate = recorded
    record = records(["hello"])[0]
    entry = rank_one(judge, record, parse_attempts=3)
    assert entry["status"] == "failed" and len(entry["answers"]) == 3
    assert calls == [{"do_sample": False, "temperature": None}] + [{"do_sample": True, "temperature": 0.7}] * 2
    assert len(set(entry["answers"])) > 1  # not the same generation three times
    assert rank_one(judge, record, parse_attempts=3)["answers"] == entry["answers"]
    assert judge.identity["retry_temperature"] == 0.7  # part of the cache key


def test_progress_shows_how_the_records_ended(tmp_path, monkeypatch, capsys):
    """23.3 (progress): the bar counts ranked and failed records as they end."""
    monkeypatch.setenv("TUNA_PROGRESS", "1")
    task = make_task_records(1, seed=0)[0]
    rank_records([dict(task, responses=["x", "y"])] + records(["hello"]), RuleJudge(), tmp_path / "r.jsonl")
    assert "ranked=1" in capsys.readouterr().err


def test_local_judge_abort_ends_its_generation_at_once(tiny_model_dir):
    """27.2 (second Ctrl-C, local judge): abort() stops the generation in flight at the next token and refuses
    new ones, so the interpreter does not wait for a long generation to end."""
    judge = LocalJudge(str(tiny_model_dir), max_new_tokens=40)
    forward, steps = judge.model.forward, []

    def counted(*args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            judge.abort()  # as a second Ctrl-C would, during the third decoding step
        return forward(*args, **kwargs)

    judge.model.forward = counted
    record = records(["hello"])[0]
    answer = judge.ask(record)
    assert len(steps) == 3 and len(judge.tokenizer(answer, add_special_tokens=False)["input_ids"]) <= 3
    with pytest.raises(RuntimeError, match="aborted"):
        judge.ask(record, 1)
    assert len(steps) == 3  # not even started
