"""Issue 23 point 4: `tuna rank` and `tuna score` against a real OpenAI-compatible server, `transformers serve`
(the serving extra) with SmolLM2-135M-Instruct, on 127.0.0.1, bounded in time and in requests.

What transformers serve 5.23 does and does not serve, as this test checks it:

- ``/v1/chat/completions`` answers (the judge's request): SmolLM2 (135M) writes text, not the judge's
  ``rank: [...]`` line, so each record fails as unparsable, with its answers kept; nothing is ranked (exit 3);
- ``/v1/completions`` ignores ``echo`` and ``logprobs`` (its log says so) and answers ``max_tokens 0`` with
  HTTP 500: it serves no prompt log-probs, so `tuna score --teacher openai:...` cannot score against it and
  says why (the request it makes and what the endpoint must serve) in each record's reason; exit 3.

The API key is set in the environment of both commands and must appear in no output and no file.
"""

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

RECORDS = [
    {"id": "colour", "instruction": "Name a primary colour.", "responses": ["Red.", "Banana."]},
    {"id": "sum", "instruction": "What is 2 + 2?", "responses": ["5", "4"]},
]
HEALTH_WAIT = 180  # seconds for the server to load the model and answer /health
COMMAND_WAIT = 240  # seconds for each tuna command (2 records, answers of at most 32 tokens)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _health(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


@pytest.fixture
def server(smollm2_dir, tmp_path):
    """A `transformers serve` process for SmolLM2 on a free port: (base URL, model name, log file, env with the
    key); stopped (its whole process group) when the test ends, also on failure."""
    for module in ("fastapi", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            if os.environ.get("CI"):
                pytest.fail(f"{module} is not installed on CI (the serving extra)")
            pytest.skip(f"{module} is not installed (pip install -c requirements/constraints.txt -e '.[serving]')")
    port, log = _free_port(), tmp_path / "server.log"
    env = dict(os.environ, OPENAI_API_KEY="sk-test-" + secrets.token_hex(16), HF_HUB_OFFLINE="1",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    serve = Path(sys.executable).with_name("transformers")  # the console script of the same environment
    with open(log, "w") as out:
        process = subprocess.Popen([str(serve), "serve", "--host", "127.0.0.1", "--port", str(port),
                                    "--log-level", "info", "--device", "cpu", str(smollm2_dir)],
                                   stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + HEALTH_WAIT
        while not _health(port):
            assert process.poll() is None, f"transformers serve exited ({process.returncode}): {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no /health within {HEALTH_WAIT} s: {log.read_text()[-3000:]}"
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1", str(smollm2_dir), log, env
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


def _tuna(env, *args):
    return subprocess.run([sys.executable, "-m", "tuna_train.cli", *args], capture_output=True, text=True,
                          env=env, timeout=COMMAND_WAIT)


def _posts(log: Path, path: str) -> int:
    return len(re.findall(rf'"POST /v1/{path} HTTP/1.1"', log.read_text()))


def test_rank_and_score_against_transformers_serve(server, tmp_path):
    base_url, model, log, env = server
    key = env["OPENAI_API_KEY"]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in RECORDS))
    bounds = ["--base-url", base_url, "--timeout", "120", "--max-retries", "1", "--max-backoff", "0",
              "--concurrency", "1"]

    started = time.monotonic()
    ranked = tmp_path / "ranked.jsonl"
    rank = _tuna(env, "rank", "--judge", f"openai:{model}", "--data", str(data), "--out", str(ranked),
                 "--judge-max-tokens", "32", "--parse-attempts", "1", *bounds)
    rank_seconds = time.monotonic() - started
    failures = [json.loads(line) for line in Path(f"{ranked}.failures.jsonl").read_text().splitlines()]
    done = [json.loads(line) for line in ranked.read_text().splitlines()]
    # every record was answered by the server (real text kept), none lost: ranked, or unparsable with its answer
    assert len(done) + len(failures) == len(RECORDS), rank.stderr[-2000:]
    assert _posts(log, "chat/completions") == len(RECORDS)  # one request per record: --parse-attempts 1, no retry
    for failure in failures:
        assert failure["judge_failure"].startswith("unparsable after 1 answers"), failure
        assert failure["judge_answers"][0].strip(), failure
    for record in done:
        assert sorted(record["ranking"]) == list(range(len(record["responses"])))
    assert rank.returncode == (0 if done else 3), rank.stderr[-2000:]

    scored = tmp_path / "scored.jsonl"
    score = _tuna(env, "score", "--teacher", f"openai:{model}", "--data", str(data), "--out", str(scored),
                  "--template", "none", *bounds)
    assert score.returncode == 3 and "no record was scored (2 failed" in score.stderr, score.stderr[-2000:]
    reasons = [json.loads(line)["score_failure"]
               for line in Path(f"{scored}.failures.jsonl").read_text().splitlines()]
    assert len(reasons) == len(RECORDS)
    for reason in reasons:  # the endpoint errs on max_tokens 0; the reason says what a teacher endpoint must serve
        assert "/completions: HTTP 500 after 2 attempts" in reason and "echo and logprobs" in reason, reason
    ignored = re.search(r"Ignoring unsupported fields in the request: \{(.*)\}", log.read_text())
    assert ignored and {"'echo'", "'logprobs'"} <= set(ignored.group(1).split(", ")), ignored  # the server says so
    assert _posts(log, "completions") == len(RECORDS) * 2  # the first response of each record, 1 + 1 retry

    for text in (rank.stdout, rank.stderr, score.stdout, score.stderr):
        assert key not in text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
    print(f"rank against transformers serve: {rank_seconds:.1f} s for {len(RECORDS)} records")
