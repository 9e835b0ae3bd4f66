"""A small JSON-over-HTTP client for OpenAI-compatible endpoints, with retries.

Retries with exponential back-off (and the server's ``Retry-After`` when it sends one) on 429, on 5xx and
on time-outs or refused connections; any other HTTP error is final. The API key is read from an
environment variable and only ever sent in the Authorization header: it is never logged or written.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, Optional


class RequestFailed(RuntimeError):
    """A request that failed for good (a final HTTP error, or retries exhausted)."""

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class JsonClient:
    def __init__(self, base_url: str, api_key_env: Optional[str] = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_retries: int = 5, backoff: float = 1.0, max_backoff: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.timeout, self.max_retries = timeout, max_retries
        self.backoff, self.max_backoff, self.sleep = backoff, max_backoff, sleep

    def __repr__(self) -> str:  # no key here, ever
        return f"JsonClient({self.base_url!r}, timeout={self.timeout}, max_retries={self.max_retries})"

    def _wait(self, attempt: int, retry_after: Optional[str]) -> None:
        delay = min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + random.random() / 2)
        if retry_after:
            try:
                delay = max(0.0, float(retry_after))
            except ValueError:
                pass
        self.sleep(delay)

    def post(self, path: str, payload: Dict[str, Any]) -> Dict[str, Any]:
        """POST JSON, return the decoded JSON answer; raises RequestFailed."""
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(self.base_url + path, data=body, headers=headers, method="POST")
            retry_after = None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode())
            except urllib.error.HTTPError as error:
                last = f"HTTP {error.code}"
                if error.code != 429 and error.code < 500:
                    raise RequestFailed(f"{path}: {last} (not retried)", attempt + 1) from None
                retry_after = error.headers.get("Retry-After") if error.headers else None
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as error:
                last = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
            except json.JSONDecodeError:
                raise RequestFailed(f"{path}: the answer is not JSON", attempt + 1) from None
            if attempt < self.max_retries:
                self._wait(attempt, retry_after)
        raise RequestFailed(f"{path}: {last} after {self.max_retries + 1} attempts", self.max_retries + 1)
