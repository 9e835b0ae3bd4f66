"""A real HTTP server on 127.0.0.1 that speaks the chat-completions (and completions) protocol and injects
faults, for the judge-client tests. It counts requests per record; nothing leaves this machine."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


DIGITS_ANSWER = "Response 0: [3]\nrank: [0, 1, " + "7" * 5000 + "]"
LONG_ANSWER = "LONG-ANSWER-START " + "blah " * 2_000_000 + "\nrank: [1, 2, 0]"


class FakeOpenAI:
    """Faults by the record name found in the instruction ("Instruction:\\n<name>"):

    - ``r429``: the first request gets 429 with Retry-After: 0, then a good answer;
    - ``r500``: the first request gets 500, then a good answer;
    - ``rhang``: the first request hangs past the client's timeout, then a good answer;
    - ``rgarbage``: always an answer with no ranking;
    - ``rbadindex``: always a ranking that names response 9 (there are 3);
    - ``rparts``: content as a list of content parts (valid OpenAI output) holding the ranking;
    - ``rint``: always message content that is a number;
    - ``rbytes``: always a body that is not UTF-8;
    - ``rcut``: the first body is cut short (Content-Length promises more), then a good answer;
    - ``rstatus``: always a garbage status line;
    - ``rinf``, ``rnan``, ``rneg``, ``rhuge``: the first request gets 429 with Retry-After inf, nan, -5,
      100000, then a good answer;
    - ``rtrickle``: always a body sent one byte every ``trickle_seconds``;
    - ``rdigits``: always a ranking whose last index has 5000 digits (:data:`DIGITS_ANSWER`);
    - ``rlong``: always a 10 MB answer (:data:`LONG_ANSWER`), its ranking "rank: [1, 2, 0]" at the end;
    - anything else: "rank: [2, 0, 1]". ``delay`` slows every answer (for the kill test).

    ``redirect_to``: every request gets a 307 redirect to that base URL instead. The Authorization header of
    every request is recorded in ``authorizations``.

    A completions request (a ``prompt``, as ``tuna score`` sends its teacher) is answered by :func:`echo_logprobs`,
    or with these faults (``r429``, ``r500`` and ``rhang`` as above, a good answer after):

    - ``s500``: always 500; ``sredirect``: always a 307 to another host;
    - ``snolog``: always an answer without ``logprobs``; ``smalformed``: ``text_offset`` one entry short;
    - ``snan``, ``sinf``, ``snull``: the last token's log-prob is NaN, -Infinity, null.

    Every completions prompt is counted in ``prompts``.
    """

    def __init__(self, hang_seconds: float = 2.0, delay: float = 0.0, trickle_seconds: float = 0.2,
                 redirect_to: str = None) -> None:
        self.requests = Counter()
        self.prompts = Counter()
        self.authorizations = []
        self.hang_seconds, self.delay = hang_seconds, delay
        self.trickle_seconds, self.redirect_to = trickle_seconds, redirect_to
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.authorizations.append(self.headers.get("Authorization"))
                if fake.redirect_to:
                    return self._send(307, {}, {"Location": fake.redirect_to + self.path.split("/v1", 1)[-1]})
                text = json.dumps(body.get("messages") or body.get("prompt"))
                match = re.search(r"Instruction:\\n(\w+)", text)
                name = match.group(1) if match else "unknown"
                with fake.lock:
                    fake.requests[name] += 1
                    count = fake.requests[name]
                if fake.delay:
                    time.sleep(fake.delay)
                if "prompt" in body:  # completions: tuna score's teacher
                    return self._completion(name, count, body["prompt"])
                if name == "r429" and count == 1:
                    return self._send(429, {"error": "slow down"}, {"Retry-After": "0"})
                if name == "r500" and count == 1:
                    return self._send(500, {"error": "boom"})
                retry_after = {"rinf": "inf", "rnan": "nan", "rneg": "-5", "rhuge": "100000"}.get(name)
                if retry_after and count == 1:
                    return self._send(429, {"error": "slow down"}, {"Retry-After": retry_after})
                if name == "rparts":
                    return self._send(200, _chat([{"type": "text", "text": "Response 0: [3]\nrank: [1, "},
                                                  {"type": "text", "text": "0, 2]"}]))
                if name == "rint":
                    return self._send(200, _chat(7))
                if name == "rbytes":
                    return self._raw(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: 4"
                                     b"\r\n\r\n\xff\xfe\xfd\xfc")
                if name == "rcut" and count == 1:
                    return self._raw(b"HTTP/1.0 200 OK\r\nContent-Length: 500\r\n\r\n{\"choices\": [")
                if name == "rstatus":
                    return self._raw(b"SPAM AND EGGS\r\n\r\n")
                if name == "rtrickle":
                    data = json.dumps(_chat("rank: [0, 1, 2]")).encode()
                    try:
                        self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data))
                        for byte in data:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(fake.trickle_seconds)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
                if name == "rhang" and count == 1:
                    time.sleep(fake.hang_seconds)
                    return self._send(200, _chat("rank: [0, 1, 2]"))
                if "[The Start of Assistant A's Answer]" in text:
                    first = re.search(r"Assistant A's Answer\]\\n(.*?)\\n\[The End", text).group(1)
                    second = re.search(r"Assistant B's Answer\]\\n(.*?)\\n\[The End", text).group(1)
                    if name == "rgarbage":
                        return self._send(200, _chat("Both are fine, I think."))
                    verdict = "A" if "good" in first and "good" not in second else (
                        "B" if "good" in second and "good" not in first else "C")
                    return self._send(200, _chat(f"Explanation...\n[[{verdict}]]"))
                if name == "rgarbage":
                    return self._send(200, _chat("I cannot decide which is better."))
                if name == "rdigits":
                    return self._send(200, _chat(DIGITS_ANSWER))
                if name == "rlong":
                    return self._send(200, _chat(LONG_ANSWER))
                if name == "rbadindex":
                    return self._send(200, _chat("Response 0: [9]\nrank: [0, 9, 1]"))
                self._send(200, _chat("Response 0: [10]\nResponse 1: [5]\nResponse 2: [12]\nrank: [2, 0, 1]"))

            def _completion(self, name, count, prompt):
                with fake.lock:
                    fake.prompts[prompt] += 1
                if (name == "r429" and count == 1) or name == "s500" or (name == "r500" and count == 1):
                    return self._send(429 if name == "r429" else 500, {"error": "boom"}, {"Retry-After": "0"})
                if name == "sredirect":
                    return self._send(307, {}, {"Location": "http://127.0.0.2:9/v1/completions"})
                if name == "rhang" and count == 1:
                    time.sleep(fake.hang_seconds)
                answer = echo_logprobs(prompt)
                logprobs = answer["choices"][0]["logprobs"]
                if name == "snolog":
                    del answer["choices"][0]["logprobs"]
                elif name == "smalformed":
                    logprobs["text_offset"].pop()
                elif name in ("snan", "sinf", "snull"):
                    logprobs["token_logprobs"][-1] = {"snan": float("nan"), "sinf": float("-inf"), "snull": None}[name]
                self._send(200, answer)

            def _raw(self, data):
                try:
                    self.wfile.write(data)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

            def _send(self, code, payload, headers=None):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (the hang fault)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


FAKE_TOKEN = re.compile(r"\s*\w+|\s*[^\s\w]+|\s+")


def fake_logprob(token: str) -> float:
    """The fake teacher's log-prob of a token: -(1 + its length) / 8."""
    return -(1 + len(token)) / 8


def echo_logprobs(text: str) -> dict:
    """A completions answer echoing ``text`` (max_tokens 0) in OpenAI's legacy logprobs form: tokens are, as in
    GPT-2's pre-tokenizer, a word or a run of punctuation with the spaces before it (:data:`FAKE_TOKEN`); the
    first token has no log-prob (null), the others :func:`fake_logprob`."""
    tokens = FAKE_TOKEN.findall(text)
    offsets = [match.start() for match in FAKE_TOKEN.finditer(text)]
    values = [None] + [fake_logprob(token) for token in tokens[1:]]
    return {"choices": [{"index": 0, "text": text, "finish_reason": "length",
                         "logprobs": {"tokens": tokens, "token_logprobs": values, "text_offset": offsets,
                                      "top_logprobs": None}}]}


def _chat(content: str) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": content}}]}
