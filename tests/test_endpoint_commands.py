"""What the three endpoint commands (`tuna rank`, `tuna score --teacher openai:MODEL`, `tuna eval judge`) share: one
set of flag checks, and one asking loop (tuna_train/pipeline/pool.py) whose Ctrl-C keeps every answer received,
whose second Ctrl-C drops the requests in flight, and which ends the command with one line and exit 130. Against
real HTTP servers on 127.0.0.1 (nothing leaves the machine)."""

import functools
import json
import signal
import threading
import time

import pytest

from fake_openai import FakeOpenAI
from tuna_train.cli import main
from tuna_train.pipeline.http import JsonClient
from tuna_train.pipeline.judge import ChatJudge
from tuna_train.pipeline.pairwise import judge_pairwise
from tuna_train.pipeline.pool import Interrupted, run_cached
from tuna_train.pipeline.rank import rank_records
from tuna_train.pipeline.score import score_with_endpoint
from tuna_train.pipeline.store import JsonlStore


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def ctrl_c_when(path, lines, presses=1):
    """Press Ctrl-C (SIGINT to the main thread) once ``path`` holds ``lines`` lines, ``presses`` times 0.3 s apart."""
    def watch():
        deadline = time.time() + 120
        while not (path.exists() and len(path.read_text().splitlines()) >= lines) and time.time() < deadline:
            time.sleep(0.01)
        for _ in range(presses):
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(0.3)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


def questions_and_answers(tmp_path, names):
    questions = write_lines(tmp_path / "questions.jsonl", [{"id": n, "instruction": n} for n in names])
    baseline = write_lines(tmp_path / "baseline.jsonl", [{"answer": "a good answer"} for _ in names])
    return questions, baseline


def command_args(command, server, tmp_path, tiny_model_dir):
    """The argv of each endpoint command against ``server``, without the flags under test."""
    data = write_lines(tmp_path / "in.jsonl", [{"id": "ok1", "instruction": "ok1", "responses": ["a", "b"]}])
    common = ["--base-url", server.base_url, "--data", str(data), "--api-key-env", "TUNA_NO_KEY"]
    if command == "rank":
        return ["rank", "--judge", "openai:m", "--out", str(tmp_path / "out.jsonl")] + common
    if command == "score":
        return ["score", "--teacher", "openai:m", "--out", str(tmp_path / "out.jsonl")] + common
    baseline = write_lines(tmp_path / "baseline.jsonl", [{"answer": "x"}])
    return ["eval", "judge", "--model", str(tiny_model_dir), "--judge", "openai:m", "--baseline-answers",
            str(baseline), "--out", str(tmp_path / "judge")] + common


BAD_FLAGS = [("--timeout", "0"), ("--timeout", "-1"), ("--timeout", "nan"), ("--timeout", "inf"),
             ("--max-retries", "-1"), ("--concurrency", "0"), ("--max-backoff", "-1"), ("--parse-attempts", "0")]


@pytest.mark.parametrize("command", ["rank", "score", "eval judge"])
@pytest.mark.parametrize("flag,value", BAD_FLAGS)
def test_every_endpoint_command_refuses_the_same_flag_values_before_anything(tmp_path, capsys, tiny_model_dir,
                                                                             command, flag, value):
    """One set of checks: each value is a one-line argparse error naming the flag (exit 2), before any request,
    read or write, in every command that takes the flag (score has no judge to parse: no --parse-attempts)."""
    with FakeOpenAI() as server:
        argv = command_args(command, server, tmp_path, tiny_model_dir)
        before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(SystemExit) as exit_:
            main(argv + [flag, value])
        assert sum(server.requests.values()) == 0
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    if command == "score" and flag == "--parse-attempts":
        assert "unrecognized arguments: --parse-attempts" in error
    else:
        assert f"argument {flag}: must be" in error and repr(value) in error
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_judge_max_tokens_bounds_every_judge_request(tmp_path, monkeypatch):
    """--judge-max-tokens is the max_tokens of each chat request (a slow endpoint's answer is bounded); default 2048."""
    asked = []

    def post(self, path, payload):
        asked.append(payload["max_tokens"])
        return {"choices": [{"message": {"content": "rank: [1, 0]"}}]}

    monkeypatch.setattr(JsonClient, "post", post)
    data = write_lines(tmp_path / "in.jsonl", [{"instruction": "q", "responses": ["a", "b"]}])
    for extra, expected in (([], 2048), (["--judge-max-tokens", "48"], 48)):
        out = tmp_path / f"ranked{expected}.jsonl"
        assert main(["rank", "--judge", "openai:m", "--base-url", "http://127.0.0.1:9/v1", "--data", str(data),
                     "--out", str(out)] + extra) == 0
        assert asked.pop() == expected and not asked


def test_the_bounds_apply_to_the_library_too(tmp_path):
    """Callers other than the command get a ValueError naming the value, before any cache is opened."""
    judge = ChatJudge("m", JsonClient("http://127.0.0.1:9/v1", None))
    with pytest.raises(ValueError, match="concurrency"):
        score_with_endpoint(judge.client, "m", [], tmp_path / "s.jsonl", concurrency=0)
    for options in ({"concurrency": 0}, {"parse_attempts": 0}):
        with pytest.raises(ValueError, match=next(iter(options))):
            judge_pairwise(judge, [], [], [], tmp_path / "cache.jsonl", **options)
    assert list(tmp_path.iterdir()) == []


def test_eval_judge_ctrl_c_keeps_every_verdict_and_exits_130_with_one_line(tiny_model_dir, tmp_path, capsys):
    """Ctrl-C during `tuna eval judge`: nothing queued is sent, every verdict that arrives (in flight too) is
    cached, one line says how to resume, exit 130; the rerun asks each order of each question exactly once."""
    names = [f"rec{i}" for i in range(15)]
    questions, baseline = questions_and_answers(tmp_path, names)
    out = tmp_path / "judge"
    cache = out / "verdicts.cache.jsonl"
    with FakeOpenAI(delay=0.2) as server:
        argv = ["eval", "judge", "--model", str(tiny_model_dir), "--data", str(questions), "--baseline-answers",
                str(baseline), "--judge", "openai:m", "--base-url", server.base_url, "--out", str(out),
                "--concurrency", "2", "--max-new-tokens", "4", "--api-key-env", "TUNA_NO_KEY"]
        watcher = ctrl_c_when(cache, 3)
        try:
            code = main(argv)
        except KeyboardInterrupt as error:  # caught, so that it fails this test and does not stop the session
            pytest.fail(f"the Ctrl-C escaped the command: {error!r}")
        watcher.join()
        sent = sum(server.requests.values())
        stderr = capsys.readouterr().err
        assert code == 130, stderr[-2000:]
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("tuna eval: interrupted: ") and "same command again" in last and str(cache) in last
        assert "Traceback" not in stderr
        kept = read_lines(cache)
        assert sent == len(kept) and 3 <= len(kept) < 30  # every request sent has its verdict kept, no more sent
        assert f"{len(kept)} of the 30 verdicts" in last
        assert not (out / "report-judge.json").exists()

        assert main(argv) == 0
        assert all(server.requests[name] == 2 for name in names)  # both orders, each asked once over the two runs
    assert json.loads((out / "report-judge.json").read_text())["metrics"]["asked"] == 30 - len(kept)


@pytest.mark.parametrize("command", ["rank", "score", "eval judge"])
def test_a_second_ctrl_c_drops_the_requests_in_flight_at_once(tmp_path, command):
    """27.2: the second Ctrl-C reaches the client of rank's judge, score's teacher and eval judge's judge: the
    requests in flight to an endpoint that takes 20 s are aborted at once (it is not waited for), and nothing is
    cached for them, so they are asked again, not recorded as failures."""
    with FakeOpenAI(delay=20) as slow:
        client = JsonClient(slow.base_url, None, timeout=30, max_retries=0)
        timers = [threading.Timer(seconds, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
                  for seconds in (0.5, 1.0)]
        for timer in timers:
            timer.start()
        started, before = time.monotonic(), set(threading.enumerate())
        with pytest.raises(KeyboardInterrupt) as interrupt:
            if command == "rank":
                rank_records([{"id": n, "instruction": n, "responses": ["a", "b"]} for n in ("s0", "s1", "s2")],
                             ChatJudge("m", client), tmp_path / "out.jsonl", concurrency=2)
            elif command == "score":
                score_with_endpoint(client, "m", [{"id": n, "instruction": n, "responses": ["a"]}
                                                  for n in ("s0", "s1", "s2")], tmp_path / "out.jsonl", concurrency=2)
            else:
                judge_pairwise(ChatJudge("m", client), [{"id": "q0", "instruction": "q0"}], ["a"], ["b"],
                               tmp_path / "out.jsonl.cache.jsonl", concurrency=1)
        elapsed = time.monotonic() - started
        in_flight = sum(slow.requests.values())
    assert isinstance(interrupt.value, Interrupted) and elapsed < 5, (interrupt.value, elapsed)
    assert in_flight == (1 if command == "eval judge" else 2)  # the queued ones were never sent
    while any(t.name.startswith("ThreadPoolExecutor") and t not in before for t in threading.enumerate()):
        assert time.monotonic() - started < 5, "the aborted requests are still waiting for the endpoint"
        time.sleep(0.05)  # (the interpreter joins these threads at exit: a process would wait for them)
    cache = tmp_path / "out.jsonl.cache.jsonl"
    assert not cache.exists() or cache.read_text() == ""  # nothing cached for the aborted requests


def test_a_cache_fault_stops_the_loop_and_is_raised(tmp_path):
    """A cache that cannot be written (a full disk) is not a job's fault: the loop raises it and sends nothing more
    (score and eval judge pass no progress callback, and the loop used to drop the fault then)."""
    class FullDisk(JsonlStore):
        def put(self, key, entry):
            raise OSError(28, "No space left on device")

    asked = []

    def job(item):
        asked.append(item)
        time.sleep(0.1)  # a request's time: the fault reaches the main thread before the queue is done
        return {"status": "ok"}

    with pytest.raises(OSError, match="No space left"):
        run_cached({f"k{i}": functools.partial(job, i) for i in range(10)}, FullDisk(tmp_path / "c.jsonl"), 1, "test")
    time.sleep(0.6)  # nothing queued may start now
    assert len(asked) <= 3
