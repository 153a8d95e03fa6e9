"""The server's jobs: one GPU thread works through a bounded queue; finished results wait to be fetched.

A job's life: ``awaiting_region`` (created; the client sends the block the job asked for) -> ``queued`` ->
``running`` -> ``done`` | ``failed`` | ``cancelled``. Every job not yet finished takes a backlog slot, so a
full server says "busy" at submission instead of letting a queue (and its CT blocks) grow. Results are
encoded once, handed out once and then dropped; a job whose client vanished is dropped after a TTL, so
memory stays flat however many requests come.
"""

from __future__ import annotations

import collections
import queue
import secrets
import threading
import time
from typing import Optional

from ProbSAMLib.app import wire
from ProbSAMLib.app.jobs import SampleJob, check_region, error_kind
from ProbSAMLib.errors import Cancelled, message as error_line

UNFINISHED = ("awaiting_region", "queued", "running")
FINISHED = ("done", "failed", "cancelled")


class ServerBusy(Exception):
    """The backlog is full; the client should try again later."""


class UnknownJob(KeyError):
    """No such job here: never made, already fetched, cancelled, or expired."""

    def __str__(self) -> str:
        return (f"no job {self.args[0]} on this server (already fetched, cancelled, expired, or the server "
                f"restarted); run it again")


class JobConflict(Exception):
    """The job is not in a state where this request makes sense (region sent twice, result not ready)."""


class Job:
    """One sample request on the server; its fields change under JobQueue.lock."""

    def __init__(self, sample_job: SampleJob):
        self.id = secrets.token_urlsafe(16)  # unguessable: one client cannot guess another's job
        self.sample_job = sample_job
        self.state, self.fraction, self.message = "awaiting_region", 0.0, "waiting for the CT block"
        self.values = None  # the CT block, from its upload until it is sampled
        self.result: Optional[bytes] = None  # the encoded result message
        self.error: Optional[str] = None
        self.kind: Optional[str] = None
        self.cancel_requested = False
        self.uploads = 0  # CT blocks arriving for it: a slow link must not make it expire mid-upload
        self.touched = time.monotonic()
        self.version = 0  # bumped on every change, for clients waiting on one

    def status(self) -> dict:
        return {"id": self.id, "state": self.state, "fraction": self.fraction, "message": self.message,
                "error": self.error, "kind": self.kind, "version": self.version}


class JobQueue:
    """The jobs of one served model: submit, upload a region, follow, cancel, fetch; one GPU worker thread.

    ``max_backlog``: unfinished jobs at most; ``region_ttl_s``: how long a job waits for its CT block;
    ``result_ttl_s``: how long a finished job waits to be fetched.
    """

    def __init__(self, models, max_backlog: int = 4, region_ttl_s: float = 120.0, result_ttl_s: float = 600.0):
        self.models, self.max_backlog = models, max_backlog
        self.max_held = 4 * max_backlog  # finished but unfetched results count too, so memory stays bounded
        self.region_ttl_s, self.result_ttl_s = region_ttl_s, result_ttl_s
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.jobs: "collections.OrderedDict[str, Job]" = collections.OrderedDict()
        self.pending: "queue.Queue[Optional[Job]]" = queue.Queue()
        self.counts = collections.Counter()
        self.closing = False
        self.thread = threading.Thread(target=self._work, name="ProbSAMServerGPU", daemon=True)

    # --- lifetime --------------------------------------------------------------------------------------
    def start(self) -> "JobQueue":
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what runs, drop what waits, end the GPU thread."""
        with self.lock:
            self.closing = True
        self.pending.put(None)
        self.thread.join(timeout)

    # --- the client's requests -------------------------------------------------------------------------
    def submit(self, request: dict) -> Job:
        """A new job for ``request`` (RequestError if it breaks the schema); ServerBusy if the backlog is full."""
        self._check_room()  # before the request's checks: a full server answers at once
        job = Job(SampleJob(request, self.models))
        with self.lock:
            self._check_room_locked()
            self.jobs[job.id] = job
            self.counts["submitted"] += 1
        return job

    def begin_upload(self, job_id: str) -> None:
        """A CT block starts arriving for the job (UnknownJob at once, before the body is read)."""
        with self.lock:
            self._job(job_id).uploads += 1

    def end_upload(self, job_id: str) -> None:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is not None:
                job.uploads -= 1
                job.touched = time.monotonic()

    def put_region(self, job_id: str, values) -> dict:
        with self.lock:
            job = self._job(job_id)
            if job.state != "awaiting_region":
                raise JobConflict(f"job {job_id} already has its CT block (state {job.state})")
            job.values = check_region(values, job.sample_job.region)
            self._set(job, state="queued", message="queued")
        self.pending.put(job)
        return self.status(job_id)

    def status(self, job_id: str, wait_s: float = 0.0, since: Optional[int] = None) -> dict:
        """The job's state; with ``wait_s``, waits that long for a change past version ``since``."""
        deadline = time.monotonic() + max(0.0, wait_s)
        with self.lock:
            job = self._job(job_id)
            while since is not None and job.version == since and job.state not in FINISHED:
                left = deadline - time.monotonic()
                if left <= 0 or not self.changed.wait(left):
                    break
            status = job.status()
            if job.state == "queued":
                status["message"] = f"queued, {self._ahead(job)} job(s) ahead"
            return status

    def take_result(self, job_id: str) -> bytes:
        """The encoded result, handed out once: the job is dropped with it."""
        with self.lock:
            job = self._job(job_id)
            if job.state != "done":
                raise JobConflict(f"job {job_id} has no result (state {job.state})")
            del self.jobs[job_id]
            self.counts["fetched"] += 1
            return job.result

    def cancel(self, job_id: str) -> dict:
        """Cancel a job (a running one stops at its next slice chunk); a finished one is dropped."""
        with self.lock:
            job = self._job(job_id)
            if job.state in FINISHED or job.state == "awaiting_region":
                del self.jobs[job_id]
                if job.state not in FINISHED:
                    self.counts["cancelled"] += 1
                return {"id": job_id, "state": "cancelled" if job.state != "done" else "dropped"}
            job.cancel_requested = True  # the GPU thread drops it when it stops
            self._set(job, message="cancelling")
            return {"id": job_id, "state": "cancelling"}

    def info(self) -> dict:
        with self.lock:
            self._expire()
            states = collections.Counter(job.state for job in self.jobs.values())
            return {"max_backlog": self.max_backlog, "unfinished": sum(states[s] for s in UNFINISHED),
                    "states": dict(states), "counts": dict(self.counts)}

    # --- the GPU thread --------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self.pending.get()
            if job is None:
                return
            with self.lock:
                if job.cancel_requested or self.closing:
                    self._end(job, "cancelled", error="cancelled before it started", kind="cancelled")
                    continue
                self._set(job, state="running", message="sampling")
            self._run(job)

    def _run(self, job: Job) -> None:
        def progress(fraction: float, message: str) -> None:
            with self.lock:
                self._set(job, fraction=float(fraction), message=str(message))

        try:
            fields = job.sample_job.run(job.values, progress=progress,
                                        cancel=lambda: job.cancel_requested or self.closing)
            job.values = None  # the CT block is not needed any more
            result = wire.encode(fields)
        except Exception as error:  # the job fails; the server and its queue live on
            kind = error_kind(error)
            with self.lock:
                self._end(job, "cancelled" if isinstance(error, Cancelled) else "failed",
                          error=error_line(error), kind=kind)
            return
        with self.lock:
            self._end(job, "done", result=result)

    # --- helpers (called with the lock held unless said) -----------------------------------------------
    def _check_room(self) -> None:
        with self.lock:
            self._check_room_locked()

    def _check_room_locked(self) -> None:
        self._expire()
        unfinished = sum(job.state in UNFINISHED for job in self.jobs.values())
        if unfinished >= self.max_backlog or len(self.jobs) >= self.max_held or self.closing:
            self.counts["busy"] += 1
            raise ServerBusy(f"server busy ({unfinished} job(s) in hand, at most {self.max_backlog}); "
                             f"try again in a little while")

    def _job(self, job_id: str) -> Job:
        self._expire()
        job = self.jobs.get(job_id)
        if job is None:
            raise UnknownJob(job_id)
        job.touched = time.monotonic()
        return job

    def _ahead(self, job: Job) -> int:
        ahead = 0
        for other in self.jobs.values():
            if other is job:
                break
            ahead += other.state in ("queued", "running")
        return ahead

    def _set(self, job: Job, **fields) -> None:
        for name, value in fields.items():
            setattr(job, name, value)
        job.version += 1
        self.changed.notify_all()

    def _end(self, job: Job, state: str, **fields) -> None:
        job.values = None
        self._set(job, state=state, fraction=1.0 if state == "done" else job.fraction,
                  message={"done": "done", "failed": "failed", "cancelled": "cancelled"}[state], **fields)
        self.counts[state] += 1
        if job.cancel_requested:  # its client asked to cancel and does not come back for it
            self.jobs.pop(job.id, None)

    def _expire(self) -> None:
        """Drop jobs whose client went away: no CT block within region_ttl_s, no fetch within result_ttl_s."""
        now = time.monotonic()
        for job_id, job in list(self.jobs.items()):
            ttl = {"awaiting_region": self.region_ttl_s}.get(job.state, self.result_ttl_s)
            if job.state in ("queued", "running") or job.uploads:
                continue
            if now - job.touched > ttl:
                del self.jobs[job_id]
                self.counts["expired"] += 1
