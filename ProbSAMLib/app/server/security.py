"""Who may talk to the server and how much: the start-up rules, the token, the rate limit.

The rules: a server listens on the loopback interface unless told otherwise. Anywhere else it needs a
token AND TLS (``--certfile``/``--keyfile``), or ``--insecure-http`` with the token still required (a
trusted network where TLS is done by a proxy in front). The token is compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import threading
import time
from pathlib import Path
from typing import Optional

from ProbSAMLib.app.server.protocol import TOKEN_ENV
from ProbSAMLib.errors import SettingsError

MIN_TOKEN_CHARS = 16


def read_token(token_file: Optional[Path]) -> Optional[str]:
    """The token from ``token_file`` (its first line) or the PROBSAM_SERVER_TOKEN variable; None if neither."""
    if token_file is not None:
        try:
            text = Path(token_file).read_text(encoding="utf-8")
        except OSError as error:
            raise SettingsError(f"cannot read --token-file {token_file}: {error.strerror or error}") from None
        token = text.strip().splitlines()[0].strip() if text.strip() else ""
        where = f"--token-file {token_file}"
    else:
        token, where = os.environ.get(TOKEN_ENV, "").strip(), TOKEN_ENV
        if not token:
            return None
    if len(token) < MIN_TOKEN_CHARS:
        raise SettingsError(f"the token in {where} has {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
                            f"(e.g. python -c \"import secrets; print(secrets.token_urlsafe(32))\")")
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve to anything
        return False


def check_exposure(host: str, token: Optional[str], tls: bool, insecure_http: bool) -> None:
    """SettingsError, one line, if the server would be reachable from other machines without protection."""
    if is_loopback(host):
        return
    if not token:
        raise SettingsError(f"--host {host} is reachable from other machines: give a token (--token-file FILE or "
                            f"{TOKEN_ENV}), or serve on 127.0.0.1")
    if not tls and not insecure_http:
        raise SettingsError(f"--host {host} is reachable from other machines: give --certfile and --keyfile for "
                            f"TLS, or --insecure-http if a TLS proxy stands in front (the token is still required)")


def token_matches(expected: Optional[str], authorization: Optional[str]) -> bool:
    """Whether the request's ``Authorization: Bearer <token>`` carries the server's token (any, if none set)."""
    if not expected:
        return True
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8"),
                                                              expected.encode("utf-8"))


class RateLimiter:
    """A token bucket per client address: ``rate`` requests a second on average, bursts of ``burst``.

    Buckets of clients idle long enough to be full again are dropped, so the table stays small.
    """

    def __init__(self, rate: float, burst: Optional[float] = None):
        self.rate, self.burst = float(rate), float(burst if burst is not None else 2 * rate)
        self.buckets: dict = {}  # client -> (tokens, time)
        self.lock = threading.Lock()

    def allow(self, client: str) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic()
        with self.lock:
            tokens, then = self.buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            if len(self.buckets) > 1000:
                self._forget_full(now)
            if tokens < 1:
                self.buckets[client] = (tokens, now)
                return False
            self.buckets[client] = (tokens - 1, now)
            return True

    def _forget_full(self, now: float) -> None:
        refill = self.burst / self.rate
        self.buckets = {c: (t, s) for c, (t, s) in self.buckets.items() if now - s < refill}
