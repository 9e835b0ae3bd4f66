"""A small JSON-over-HTTP client for OpenAI-compatible endpoints, with retries and bounded waits.

Retried, with exponential back-off: 429, 5xx, time-outs, refused or reset connections, and answers
that break the protocol (a garbage status line, a body cut short, a body that is not UTF-8 JSON). Any
other HTTP error is final, and so is a redirect: a redirect is never followed (the API key must not reach
another address, and an API does not redirect its POSTs); point ``base_url`` at the final address.

Every wait is bounded:

- ``timeout`` is a deadline for a whole attempt (connect, send, status, headers and body), not per socket
  read: a server that trickles its answer is cut at the deadline;
- a back-off sleep is at most ``max_backoff`` seconds, also when the server's ``Retry-After`` asks for more
  (a value that is not a finite number >= 0 is ignored);
- so one request takes at most ``(max_retries + 1) * timeout + max_retries * max_backoff`` seconds;
- :meth:`JsonClient.abort` (a second Ctrl-C) ends every request in flight at once: open sockets are shut
  down, back-off sleeps end, and no attempt follows (each raises :class:`RequestFailed`, ``aborted``).

``timeout`` must be a finite number > 0, ``max_retries`` and ``max_backoff`` >= 0 (else ValueError at
construction, before any request: a zero deadline would fail every request).

The API key is read from an environment variable and only ever sent in the Authorization header to the
``base_url`` host (through the ``https_proxy`` tunnel if one is set): it is never logged or written.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import random
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, Optional, Tuple

from ..options import EndpointOptions


class RequestFailed(RuntimeError):
    """A request that failed for good (a final HTTP error, or retries exhausted)."""

    def __init__(self, message: str, attempts: int, aborted: bool = False) -> None:
        super().__init__(message)
        self.attempts, self.aborted = attempts, aborted


class _Retryable(Exception):
    """One attempt failed in a way worth retrying; the message says how."""


class _Final(Exception):
    """One attempt failed in a way that retrying cannot fix."""


def retry_after_seconds(value: Optional[str]) -> Optional[float]:
    """A ``Retry-After`` header in seconds, or None when it is absent or not a finite number >= 0
    (an HTTP date is not parsed: the client's own back-off applies)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class JsonClient:
    def __init__(self, base_url: str, api_key_env: Optional[str] = EndpointOptions.api_key_env,
                 timeout: float = EndpointOptions.timeout, max_retries: int = EndpointOptions.max_retries,
                 backoff: float = 1.0, max_backoff: float = EndpointOptions.max_backoff,
                 sleep: Optional[Callable[[float], None]] = None) -> None:
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
        if not (isinstance(max_retries, int) and max_retries >= 0):
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if not (isinstance(max_backoff, (int, float)) and math.isfinite(max_backoff) and max_backoff >= 0):
            raise ValueError(f"max_backoff must be a finite number of seconds >= 0, got {max_backoff!r}")
        self.base_url = base_url.rstrip("/")
        parsed = urllib.parse.urlsplit(self.base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"base URL must be http(s)://HOST[:PORT]/PATH, got {base_url!r}")
        self._scheme, self._host, self._port = parsed.scheme, parsed.hostname, parsed.port
        self._prefix, self._netloc = parsed.path, parsed.netloc
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.timeout, self.max_retries = timeout, max_retries
        self._aborted = threading.Event()
        self._cuts = set()  # the socket cutters of the attempts in flight, for abort()
        self._cuts_lock = threading.Lock()
        # the default back-off sleep ends early on abort(); a test may pass its own
        self.backoff, self.max_backoff = backoff, max_backoff
        self.sleep = sleep if sleep is not None else self._aborted.wait

    def abort(self) -> None:
        """End every request in flight now and refuse new attempts (they raise RequestFailed, ``aborted``)."""
        self._aborted.set()
        with self._cuts_lock:
            cuts = list(self._cuts)
        for cut in cuts:
            cut()

    def __repr__(self) -> str:  # no key here, ever
        return f"JsonClient({self.base_url!r}, timeout={self.timeout}, max_retries={self.max_retries})"

    @property
    def max_seconds(self) -> float:
        """The longest one :meth:`post` can take (every attempt at its deadline, every back-off at its cap)."""
        return (self.max_retries + 1) * self.timeout + self.max_retries * self.max_backoff

    def _delay(self, attempt: int, retry_after: Optional[str]) -> float:
        delay = min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + random.random() / 2)
        asked = retry_after_seconds(retry_after)
        return min(self.max_backoff, asked) if asked is not None else delay

    def _connection(self, timeout: float) -> Tuple[http.client.HTTPConnection, str]:
        """A connection to the endpoint, or to the proxy that ``http(s)_proxy`` / ``no_proxy`` name for it
        (an https endpoint is reached through a CONNECT tunnel); and the request target to send."""
        proxy = urllib.request.getproxies().get(self._scheme)
        if proxy and not urllib.request.proxy_bypass(self._host):
            via = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
            if self._scheme == "http":  # a plain-HTTP proxy takes the absolute URL
                return (http.client.HTTPConnection(via.hostname, via.port, timeout=timeout),
                        f"http://{self._netloc}{self._prefix}")
            connection = http.client.HTTPSConnection(via.hostname, via.port, timeout=timeout,
                                                     context=ssl.create_default_context())
            connection.set_tunnel(self._host, self._port)
            return connection, self._prefix
        if self._scheme == "https":
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout,
                                               context=ssl.create_default_context()), self._prefix
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout), self._prefix

    def _attempt(self, path: str, body: bytes, headers: Dict[str, str]) -> Dict[str, Any]:
        """One request under one deadline: a watchdog shuts the socket down when ``timeout`` has passed,
        which ends any blocked read however slowly the server sends."""
        deadline = time.monotonic() + self.timeout
        connection, target = self._connection(self.timeout)  # connect() itself gives up after timeout
        expired = threading.Event()
        sockets = []  # the connection drops its socket once the response is read: keep our own reference

        def cut() -> None:
            expired.set()
            for sock in sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        watchdog = threading.Timer(self.timeout, cut)
        watchdog.daemon = True
        watchdog.start()
        with self._cuts_lock:
            self._cuts.add(cut)
        try:
            connection.connect()
            sockets.append(connection.sock)
            if expired.is_set():
                cut()
            connection.request("POST", target + path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            status, retry_after = response.status, response.getheader("Retry-After")
        except (OSError, http.client.HTTPException) as error:
            if expired.is_set() or time.monotonic() >= deadline:
                raise _Retryable(f"no complete answer within the {self.timeout:g} s deadline") from None
            raise _Retryable(f"{type(error).__name__}: {str(error)[:200]}") from None
        finally:
            watchdog.cancel()
            with self._cuts_lock:
                self._cuts.discard(cut)
            connection.close()
        if 300 <= status < 400:
            raise _Final(f"HTTP {status} redirect refused (redirects are not followed, so the API key never "
                         "leaves the base URL's host): set the base URL to the final address")
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status}", retry_after)
        if status >= 400:
            raise _Final(f"HTTP {status}")
        try:
            return json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise _Retryable("the answer is not UTF-8") from None
        except json.JSONDecodeError:
            raise _Retryable("the answer is not JSON") from None

    def post(self, path: str, payload: Dict[str, Any]) -> Dict[str, Any]:
        """POST JSON, return the decoded JSON answer; raises RequestFailed (after at most
        :attr:`max_seconds`)."""
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if self._aborted.is_set():
                raise RequestFailed(f"{path}: aborted (interrupted)", attempt, aborted=True)
            try:
                return self._attempt(path, body, headers)
            except _Final as error:
                raise RequestFailed(f"{path}: {error} (not retried)", attempt + 1) from None
            except _Retryable as error:
                last = str(error.args[0])
                retry_after = error.args[1] if len(error.args) > 1 else None
            if attempt < self.max_retries:
                self.sleep(self._delay(attempt, retry_after))
        if self._aborted.is_set():  # the last attempt was cut by abort(), not by the endpoint
            raise RequestFailed(f"{path}: aborted (interrupted)", self.max_retries + 1, aborted=True)
        raise RequestFailed(f"{path}: {last} after {self.max_retries + 1} attempts", self.max_retries + 1)
