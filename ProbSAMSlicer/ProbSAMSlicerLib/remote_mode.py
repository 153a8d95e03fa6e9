"""Remote mode seen from Slicer: the server's settings and "Test connection".

The server's URL, token and CA file live in Slicer's application settings (qt.QSettings, per user), never
in the scene or its parameter node: a saved or shared scene must not carry the token. An empty URL means
local mode. Slicer's process never speaks HTTP: a sample request carries ``server`` and the worker process
runs it on that server (ProbSAMLib.app.remote); "Test connection" is a ``test_connection`` request to the
same worker, answered by "connection" (one line) or "error".
"""

import time
from typing import Optional

URL_SETTING = "ProbSAM/ServerURL"
TOKEN_SETTING = "ProbSAM/ServerToken"
CAFILE_SETTING = "ProbSAM/ServerCAFile"
TEST_TIMEOUT_S = 90.0  # the worker's own HTTP timeout (60 s) plus starting the worker


def _settings():
    import qt

    return qt.QSettings()


def stored_settings() -> dict:
    """{url, token, cafile} as stored ("" when unset; all "" where there is no Qt: scripts, CI)."""
    try:
        settings = _settings()
        return {name: str(settings.value(key) or "").strip()
                for name, key in (("url", URL_SETTING), ("token", TOKEN_SETTING), ("cafile", CAFILE_SETTING))}
    except Exception:  # no Qt: local mode unless process(server=...) says otherwise
        return {"url": "", "token": "", "cafile": ""}


def server_settings() -> Optional[dict]:
    """What a sample request's ``server`` field gets: {url, token, cafile}; None in local mode (no URL)."""
    stored = stored_settings()
    if not stored["url"]:
        return None
    return {name: value or None for name, value in stored.items()}


def save_server_settings(url: str, token: str, cafile: str) -> None:
    settings = _settings()
    for key, value in ((URL_SETTING, url), (TOKEN_SETTING, token), (CAFILE_SETTING, cafile)):
        settings.setValue(key, (value or "").strip())


class ConnectionTest:
    """One "Test connection", asked of the session's worker; ``poll()`` until ``done``, then ``ok``, ``message``.

    It claims the worker like a sampling run (WorkerBusy while a run is going), so no message goes astray.
    """

    cancelling = False  # WorkerProcess.claim asks a current user this

    def __init__(self, worker, server: dict):
        self.worker, self.server = worker, server
        self.done, self.ok, self.message = False, False, "testing the connection..."
        self._id, self._deadline = None, None

    def start(self) -> "ConnectionTest":
        self.worker.claim(self)
        try:
            self.worker.ensure_started()
        except Exception:
            self.worker.release(self)
            raise
        self._id = self.worker.next_id()
        self._deadline = time.monotonic() + TEST_TIMEOUT_S
        self.worker.send(type="test_connection", id=self._id, server=self.server)
        return self

    def poll(self, timeout: float = 0.0) -> bool:
        """Handle what the worker said (waiting up to ``timeout`` s); True when the answer is in."""
        while not self.done:
            message = self.worker.next_message(timeout)
            if message is None:
                if time.monotonic() > self._deadline:
                    self._finish(False, f"no answer from the sampling process within {TEST_TIMEOUT_S:g} s")
                break
            timeout = 0.0
            kind = message.get("type")
            if kind == "exit":
                tail = self.worker.stderr_tail(3)
                self._finish(False, "the sampling process ended" + (f": {tail}" if tail else ""))
            elif kind in ("connection", "error") and message.get("id") == self._id:
                self._finish(kind == "connection", message.get("message", ""))
        return self.done

    def _finish(self, ok: bool, message: str) -> None:
        self.done, self.ok, self.message = True, ok, " ".join(str(message).split())
        self.worker.release(self)
