"""What the HTTP server and its client agree on: paths, headers, versions, content types.

Torch-free and FastAPI-free: the client (ProbSAMLib.app.remote, stdlib only) imports it inside Slicer's
worker process, where neither FastAPI nor uvicorn need be installed.
"""

from ProbSAMLib import __version__

# Raised when a request or answer changes meaning; the path prefix carries it too, so a server can one day
# serve two versions side by side.
PROTOCOL_VERSION = 1
PREFIX = f"/v{PROTOCOL_VERSION}"
PROTOCOL_HEADER = "X-ProbSAM-Protocol"
VERSION_HEADER = "X-ProbSAM-Version"
WIRE_TYPE = "application/x-probsam-wire"  # ProbSAMLib.app.wire: a JSON header plus raw numpy buffers
DEFAULT_PORT = 8765
TOKEN_ENV = "PROBSAM_SERVER_TOKEN"
PROBSAM_VERSION = __version__


def client_headers(token=None) -> dict:
    """The headers every client request carries: the version handshake and, if any, the token."""
    headers = {PROTOCOL_HEADER: str(PROTOCOL_VERSION), VERSION_HEADER: PROBSAM_VERSION}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers
