"""A sample job run by a ``probsam serve`` server: the client side, standard library only.

RemoteJob has SampleJob's interface (ProbSAMLib.app.jobs): ``region`` (which CT block to send),
``warning``, ``run(values, progress, cancel)`` -> the result fields. So the Slicer worker runs a job
locally or on a server with one line (``request["server"]`` set or not), and the same model, device and
seed give the same arrays either way. Only the request (box geometry, settings) and the CT block around
the box leave the machine; weights files named locally are never sent or named (the server serves its own
model and says which, with its SHA-256).

urllib and ssl only: Slicer's Python needs no new package for it. Every failure is one line naming the
server: cannot connect, TLS, token, version, busy (retried a few times first), the server gone mid-job.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Optional

import numpy as np

from ProbSAMLib.app import wire
from ProbSAMLib.app.jobs import RequestError
from ProbSAMLib.app.server.protocol import PREFIX, WIRE_TYPE, client_headers
from ProbSAMLib.app.server.security import is_loopback
from ProbSAMLib.errors import Cancelled, ProbSAMError

POLL_WAIT_S = 0.25  # long-poll wait: a cancel reaches the server within this (Slicer kills after 1 s)
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0)  # answers "busy" (503) or "slow down" (429) are retried after these
TIMEOUT_S = 60.0
LOCAL_ONLY_FIELDS = ("type", "id", "server")


class RemoteError(ProbSAMError, RuntimeError):
    """The server could not be reached or refused; ``kind`` as the server's error kinds."""

    def __init__(self, message: str, kind: str = "error"):
        super().__init__(message)
        self.kind = kind


class ServerBusy(RemoteError):
    def __init__(self, message: str):
        super().__init__(message, "busy")


class Client:
    """Requests to one server. ``server``: {url, token, cafile (a CA bundle for a private certificate),
    verify (False: no certificate check, for testing only), retries (how many busy answers to sit out)}."""

    def __init__(self, server: dict):
        url = str(server.get("url") or "").strip().rstrip("/")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemoteError(f"the server URL must look like https://host:port, got {url!r}", "bad_request")
        self.url, self.token = url, server.get("token") or None
        self.retries = RETRY_DELAYS_S[:int(server.get("retries", len(RETRY_DELAYS_S)))]
        handlers = [urllib.request.HTTPSHandler(context=_tls_context(server))]
        if is_loopback(parts.hostname):
            handlers.append(urllib.request.ProxyHandler({}))  # a proxy from the environment cannot reach it
        self.opener = urllib.request.build_opener(*handlers)

    def json(self, method: str, path: str, payload: Optional[dict] = None, during: Optional[str] = None) -> dict:
        body = None if payload is None else json.dumps(payload, default=_plain).encode("utf-8")
        return json.loads(self.call(method, path, body, "application/json", during).decode("utf-8"))

    def call(self, method: str, path: str, body: Optional[bytes] = None, content_type: Optional[str] = None,
             during: Optional[str] = None) -> bytes:
        """The answer's body; RemoteError (one line) for anything else. Busy answers are retried."""
        headers = client_headers(self.token)
        if content_type:
            headers["Content-Type"] = content_type
        for delay in (*self.retries, None):
            request = urllib.request.Request(self.url + PREFIX + path, data=body, method=method, headers=headers)
            try:
                with self.opener.open(request, timeout=TIMEOUT_S) as answer:
                    return answer.read()
            except urllib.error.HTTPError as error:
                failure = self._http_error(error)
            except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
                raise self._connection_error(error, during) from None
            if not isinstance(failure, ServerBusy) or delay is None:
                raise failure
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _http_error(self, error: urllib.error.HTTPError) -> RemoteError:
        try:
            answer = json.loads(error.read().decode("utf-8"))
            text, kind = answer["error"], answer.get("kind", "error")
        except (ValueError, KeyError, TypeError, OSError):
            text, kind = f"HTTP {error.code} {error.reason}", "error"
        if error.code in (429, 503):
            return ServerBusy(f"the server at {self.url} is busy ({text}); try again later")
        if error.code == 401:
            return RemoteError(f"the server at {self.url} refused the token: check the token in the server "
                               f"settings", "unauthorized")
        if error.code == 400:
            return RequestError(f"the server at {self.url} refused the request: {text}")
        return RemoteError(f"the server at {self.url} answered: {text}", kind)

    def _connection_error(self, error: Exception, during: Optional[str]) -> RemoteError:
        reason = getattr(error, "reason", error)
        if isinstance(reason, ssl.SSLCertVerificationError):
            what = (f"TLS failure with {self.url}: {reason.verify_message or reason}; give the server's certificate "
                    f"(CA file) in the server settings, or check the URL")
        elif isinstance(reason, ssl.SSLError):
            what = f"TLS failure with {self.url}: {reason.reason or reason} (is it an http:// server?)"
        elif isinstance(reason, ConnectionRefusedError):
            what = f"cannot reach the probsam server at {self.url}: connection refused (is probsam serve running?)"
        elif isinstance(reason, (socket.timeout, TimeoutError)):
            what = f"the server at {self.url} did not answer within {TIMEOUT_S:g} s"
        elif isinstance(reason, socket.gaierror):
            what = f"cannot find the server {urllib.parse.urlsplit(self.url).hostname}: {reason.strerror or reason}"
        elif isinstance(reason, (http.client.HTTPException, ConnectionError)):
            what = f"the server at {self.url} closed the connection (a https:// server, or it stopped?)"
        else:
            what = f"cannot reach the probsam server at {self.url}: {reason}"
        if during:
            what += f"; job {during} is lost: run it again"
        return RemoteError(what, "connection")


class RemoteJob:
    """SampleJob's interface, run by the server in ``request["server"]`` ({url, token, cafile, verify}).

    ``models`` is there for the same signature as SampleJob; a server loads only its own model.
    """

    def __init__(self, request: dict, models=None):
        self.client = Client(request.get("server") or {})
        answer = self.client.json("POST", "/jobs", job_payload(request))
        self.id, self.region = answer["id"], tuple(int(n) for n in answer["region"])
        self.warning = answer.get("warning")
        self.max_request_bytes = answer.get("max_request_bytes")

    def run(self, values: np.ndarray, progress: Optional[Callable] = None,
            cancel: Optional[Callable] = None) -> dict:
        """The result fields, as SampleJob.run gives them; Cancelled when ``cancel()`` says so."""
        try:
            self._upload(values)
            self._follow(progress, cancel)
            fields = wire.decode(self.client.call("GET", f"/jobs/{self.id}/result", during=self.id))
        except Cancelled:
            self._forget()
            raise
        fields["lo"] = tuple(fields["lo"])
        fields["model"] = {**fields["model"], "server": self.client.url}
        return fields

    def _upload(self, values: np.ndarray) -> None:
        body = wire.encode({"values": np.ascontiguousarray(values, dtype=np.float32)})
        if self.max_request_bytes and len(body) > self.max_request_bytes:
            self._forget()
            raise RemoteError(f"the CT block is {len(body) / 2 ** 20:.1f} MiB, more than the server's limit of "
                              f"{self.max_request_bytes / 2 ** 20:g} MiB; use a smaller ROI", "too_large")
        self.client.call("PUT", f"/jobs/{self.id}/region", body, WIRE_TYPE, during=self.id)

    def _follow(self, progress: Optional[Callable], cancel: Optional[Callable]) -> None:
        version, shown = None, None
        while True:
            if cancel is not None and cancel():
                raise Cancelled("sampling was cancelled")
            since = "" if version is None else f"&since={version}"
            status = self.client.json("GET", f"/jobs/{self.id}?wait={POLL_WAIT_S}{since}", during=self.id)
            version = status["version"]
            if progress is not None and (status["fraction"], status["message"]) != shown:
                shown = (status["fraction"], status["message"])
                progress(*shown)
            if status["state"] == "done":
                return
            if status["state"] in ("failed", "cancelled"):
                raise job_failure(status)

    def abandon(self) -> None:
        """The client will not send the CT block or fetch the result: drop the job on the server now."""
        self._forget()

    def _forget(self) -> None:
        """Cancel the job on the server (it stops at its next slice chunk); a server gone is no news."""
        try:
            self.client.call("DELETE", f"/jobs/{self.id}")
        except RemoteError:
            pass


def job_payload(request: dict) -> dict:
    """What a server gets of a sample request: the box and settings, not the local files or the server."""
    payload = {key: value for key, value in request.items() if key not in LOCAL_ONLY_FIELDS}
    model = request.get("model") or {}
    payload["model"] = {"name": model.get("name"), "device": model.get("device")}
    return payload


def job_failure(status: dict) -> Exception:
    """The error a failed remote job raises, of the kind a local one would (jobs.error_kind reads it)."""
    text = f"on the server: {status.get('error')}"
    kind = status.get("kind")
    if kind == "cancelled":
        return Cancelled(f"sampling was cancelled {text}")
    if kind == "out_of_memory":
        return MemoryError(f"out of memory {text}")
    if kind == "bad_request":
        return RequestError(text)
    return RemoteError(f"the job failed {text}", kind or "error")


def test_connection(url: str, token: Optional[str] = None, cafile: Optional[str] = None,
                    verify: bool = True) -> str:
    """One line saying what answers at ``url``; RemoteError (one line) if nothing does or it refuses."""
    client = Client({"url": url, "token": token, "cafile": cafile, "verify": verify})
    info = client.json("GET", "/info")
    free = info.get("free_gpu_bytes")
    memory = f", {free / 2 ** 30:.1f} GiB GPU memory free" if free is not None else ""
    return (f"connected to probsam {info['probsam_version']} at {client.url}: model {info['model']} (SHA-256 "
            f"{str(info['sha256'])[:12]}...), device {info['device']}{memory}, "
            f"{info['backlog']['unfinished']} job(s) in hand")


test_connection.__test__ = False  # not a pytest test, whatever its name


def _tls_context(server: dict) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=server.get("cafile") or None)
    if server.get("verify") is False:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"a value of type {type(value).__name__} cannot be sent to a server")
