"""The HTTP routes of ``probsam serve`` (FastAPI): the worker's job protocol as REST resources.

    GET    /v1/health             {"status": "ok"}: no token, no handshake (for load balancers, scripts)
    GET    /v1/info               versions, model, SHA-256, device, free GPU memory, backlog, limits
    POST   /v1/jobs               the sample request (JSON, ProbSAMLib.app.jobs) -> 202 {id, region, warning}
    PUT    /v1/jobs/{id}/region   the CT block the job asked for (wire body {values}) -> queued
    GET    /v1/jobs/{id}          {state, fraction, message, error, kind, version}; ?wait=S&since=V waits
                                  up to S seconds for a change past version V (long polling)
    GET    /v1/jobs/{id}/events   the same status as server-sent events, one per change, until finished
    GET    /v1/jobs/{id}/result   the result message (wire body), handed out once
    DELETE /v1/jobs/{id}          cancel (a running job stops at its next slice chunk) or drop

Every answer that is not a success is JSON ``{"error": one line, "kind": ...}`` with its status: 400
bad_request, 401 unauthorized, 404 not_found, 409 conflict, 413 too_large, 415 bad_request, 426
version_mismatch, 429 rate_limited, 503 busy (with Retry-After), 500 error. Arrays travel only as
ProbSAMLib.app.wire messages (never pickle).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Optional

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ProbSAMLib.app import wire
from ProbSAMLib.app.jobs import RequestError
from ProbSAMLib.app.server.jobqueue import FINISHED, JobConflict, JobQueue, ServerBusy, UnknownJob
from ProbSAMLib.app.server.protocol import (PREFIX, PROBSAM_VERSION, PROTOCOL_HEADER, PROTOCOL_VERSION,
                                            VERSION_HEADER, WIRE_TYPE)
from ProbSAMLib.app.server.security import RateLimiter, token_matches
from ProbSAMLib.errors import InputError, message as error_line

log = logging.getLogger("probsam.server")
MAX_JSON_BYTES = 2 ** 20  # a sample request is a few hundred bytes; CT values travel as wire bodies
BUSY_RETRY_AFTER_S = 2
MAX_WAIT_S = 10.0


@dataclass(frozen=True)
class Limits:
    token: Optional[str] = None
    max_request_bytes: int = 256 * 2 ** 20
    rate_per_s: float = 50.0  # per client address; 0: no limit


class Failure(Exception):
    """An answer other than success: HTTP status, kind (for programs) and one line (for people)."""

    def __init__(self, status: int, kind: str, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers or {}


def create_app(models, jobs: JobQueue, limits: Limits = Limits()) -> FastAPI:
    """The application; ``models`` is the ServedModel, ``jobs`` its (started) JobQueue."""
    app = FastAPI(title="probsam serve", version=PROBSAM_VERSION, docs_url=None, redoc_url=None,
                  openapi_url=None)  # no schema pages: a server off loopback shows nothing without a token
    rate = RateLimiter(limits.rate_per_s)
    _add_error_handlers(app)

    def limited(request: Request) -> None:
        if not rate.allow(request.client.host if request.client else "?"):
            raise Failure(429, "rate_limited", f"too many requests (more than {limits.rate_per_s:g} a second); "
                          f"slow down", {"Retry-After": "1"})

    def guarded(request: Request, _=Depends(limited)) -> None:
        if not token_matches(limits.token, request.headers.get("authorization")):
            raise Failure(401, "unauthorized", "wrong or missing token (send Authorization: Bearer <token>, the "
                          "token the server was started with)", {"WWW-Authenticate": "Bearer"})
        _check_versions(request.headers.get(PROTOCOL_HEADER), request.headers.get(VERSION_HEADER))

    @app.get(PREFIX + "/health", dependencies=[Depends(limited)])
    def health():
        return {"status": "ok"}

    @app.get(PREFIX + "/info", dependencies=[Depends(guarded)])
    def info():
        return {"probsam_version": PROBSAM_VERSION, "protocol": PROTOCOL_VERSION, "model": models.name,
                "sha256": models.sha256, "device": models.device, "free_gpu_bytes": models.free_gpu_bytes(),
                "backlog": jobs.info(), "max_request_bytes": limits.max_request_bytes}

    @app.post(PREFIX + "/jobs", status_code=202, dependencies=[Depends(guarded)])
    async def submit(request: Request):
        body = await _read_body(request, MAX_JSON_BYTES)
        try:
            sample_request = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise Failure(400, "bad_request", f"the sample request is not JSON: {error}") from None
        job = await run_in_threadpool(jobs.submit, sample_request)
        return {"id": job.id, "region": list(job.sample_job.region), "warning": job.sample_job.warning,
                "state": job.state, "max_request_bytes": limits.max_request_bytes}

    @app.put(PREFIX + "/jobs/{job_id}/region", dependencies=[Depends(guarded)])
    async def put_region(job_id: str, request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip() != WIRE_TYPE:
            raise Failure(415, "bad_request", f"send the CT block as {WIRE_TYPE} (a ProbSAM wire message)")
        jobs.begin_upload(job_id)
        try:
            body = await _read_body(request, limits.max_request_bytes)
            message = await run_in_threadpool(wire.decode, body, limits.max_request_bytes)
            if "values" not in message:
                raise RequestError("field 'values' (the CT block) is missing")
            return await run_in_threadpool(jobs.put_region, job_id, message["values"])
        finally:
            jobs.end_upload(job_id)

    @app.get(PREFIX + "/jobs/{job_id}", dependencies=[Depends(guarded)])
    def status(job_id: str, wait: float = 0.0, since: Optional[int] = None):
        return jobs.status(job_id, min(wait, MAX_WAIT_S) if wait > 0 else 0.0, since)  # NaN: no wait

    @app.get(PREFIX + "/jobs/{job_id}/events", dependencies=[Depends(guarded)])
    def events(job_id: str):
        first = jobs.status(job_id)  # 404 now, not inside a stream that has already said 200
        return StreamingResponse(_event_stream(jobs, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.get(PREFIX + "/jobs/{job_id}/result", dependencies=[Depends(guarded)])
    def result(job_id: str):
        return Response(content=jobs.take_result(job_id), media_type=WIRE_TYPE)

    @app.delete(PREFIX + "/jobs/{job_id}", dependencies=[Depends(guarded)])
    def cancel(job_id: str):
        return jobs.cancel(job_id)

    return app


async def _event_stream(jobs: JobQueue, status: dict):
    """Server-sent events: the job's status on every change, until it is finished or gone."""
    while True:
        yield f"event: status\ndata: {json.dumps(status)}\n\n"
        if status["state"] in FINISHED:
            return
        try:
            status = await run_in_threadpool(jobs.status, status["id"], MAX_WAIT_S, status["version"])
        except UnknownJob as error:
            yield f"event: error\ndata: {json.dumps({'error': str(error), 'kind': 'not_found'})}\n\n"
            return


def _check_versions(protocol: Optional[str], version: Optional[str]) -> None:
    """426 with what to update, when the client speaks another protocol version (or none)."""
    if protocol == str(PROTOCOL_VERSION):
        return
    theirs = f"probsam {version}" if version else "an unknown version"
    try:
        older = int(protocol) < PROTOCOL_VERSION
    except (TypeError, ValueError):
        older = True
    update = (f"update the extension (client) to probsam {PROBSAM_VERSION}" if older
              else f"update the server to probsam {version or 'of the client'}")
    raise Failure(426, "version_mismatch", f"this server speaks protocol {PROTOCOL_VERSION} (probsam "
                  f"{PROBSAM_VERSION}), the client protocol {protocol or 'none'} ({theirs}): {update}",
                  {"Upgrade": f"probsam-protocol/{PROTOCOL_VERSION}"})


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (by its header or while streaming)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> Failure:
    return Failure(413, "too_large", f"the request body has {size} bytes, more than this server's limit of "
                   f"{limit} bytes ({limit / 2 ** 20:g} MiB, --max-request-mb); use a smaller ROI")


def _add_error_handlers(app: FastAPI) -> None:
    def answer(status: int, kind: str, text: str, headers: Optional[dict] = None) -> JSONResponse:
        return JSONResponse({"error": " ".join(text.split()), "kind": kind}, status_code=status, headers=headers)

    @app.exception_handler(Failure)
    async def failure(request, error: Failure):
        return answer(error.status, error.kind, str(error), error.headers)

    @app.exception_handler(InputError)  # the request schema's checks (jobs.RequestError), wire.WireError
    async def bad_request(request, error):
        return answer(400, "bad_request", str(error))

    @app.exception_handler(ServerBusy)
    async def busy(request, error):
        return answer(503, "busy", str(error), {"Retry-After": str(BUSY_RETRY_AFTER_S)})

    @app.exception_handler(UnknownJob)
    async def unknown(request, error):
        return answer(404, "not_found", str(error))

    @app.exception_handler(JobConflict)
    async def conflict(request, error):
        return answer(409, "conflict", str(error))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error):
        where = ".".join(str(p) for p in error.errors()[0].get("loc", ())) if error.errors() else "request"
        return answer(400, "bad_request", f"{where}: {error.errors()[0].get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error):
        kind = {404: "not_found", 405: "bad_request"}.get(error.status_code, "error")
        return answer(error.status_code, kind, f"{error.detail}: {request.method} {request.url.path}")

    @app.exception_handler(Exception)
    async def unexpected(request, error):
        log.exception("request %s %s failed", request.method, request.url.path)
        return answer(500, "error", error_line(error))
