"""``probsam serve``: the options, the start-up checks, the model loaded once, uvicorn.

Everything that can be wrong with the options (a token too short, off loopback without TLS or token, a
certificate missing) is refused before the model loads, with one line and exit status 2.
"""

from __future__ import annotations

import socket
from pathlib import Path

from ProbSAMLib.app.server.protocol import DEFAULT_PORT, PREFIX, TOKEN_ENV
from ProbSAMLib.errors import SettingsError, shown
from ProbSAMLib.weights.registry import DEFAULT_MODEL, MODEL_NAMES


def add_parser(commands) -> None:
    """The ``serve`` subcommand of ``probsam`` (see ProbSAMLib.app.cli._EXTRA_COMMANDS)."""
    serve = commands.add_parser(
        "serve", help="serve one model over HTTP to Slicer and scripts on other machines (needs the [server] extra)",
        description="Serve sampling jobs over HTTP: box-sized CT blocks in, samples and maps out. Loads the "
        "model once; listens on 127.0.0.1 unless told otherwise. See docs/SERVER.md.")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1; anything else needs a token and TLS)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free)")
    serve.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME", help=f"{', '.join(MODEL_NAMES)} (default "
                       f"{DEFAULT_MODEL}); the only model this server serves")
    serve.add_argument("--checkpoint", type=Path, metavar="PATH", help="ProbSAM weights file (as probsam sample)")
    serve.add_argument("--sam-checkpoint", type=Path, metavar="PATH", help="the backbone's weights (as probsam sample)")
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default auto)")
    serve.add_argument("--token-file", type=Path, metavar="FILE",
                       help=f"the token clients must send (first line of FILE; else ${TOKEN_ENV})")
    serve.add_argument("--certfile", type=Path, metavar="PEM", help="TLS certificate chain (with --keyfile)")
    serve.add_argument("--keyfile", type=Path, metavar="PEM", help="TLS private key (with --certfile)")
    serve.add_argument("--insecure-http", action="store_true",
                       help="allow plain HTTP off loopback (behind a TLS proxy); the token is still required")
    serve.add_argument("--max-backlog", type=int, default=4, metavar="N",
                       help="jobs in hand at most (waiting, queued, running); more are told 'busy' (default 4)")
    serve.add_argument("--max-request-mb", type=float, default=256.0, metavar="MB",
                       help="largest request body, i.e. CT block, in MiB (default 256)")
    serve.add_argument("--rate-limit", type=float, default=50.0, metavar="PER_S",
                       help="requests a second per client address (default 50; 0: no limit)")
    serve.set_defaults(run=cmd_serve)


def check_options(args):
    """(token, tls) for the options, or SettingsError, before anything heavy is loaded."""
    from ProbSAMLib.app.server.security import check_exposure, read_token

    if not 0 <= args.port <= 65535:
        raise SettingsError(f"--port must be 0..65535, got {shown(args.port)}")
    if args.max_backlog < 1:
        raise SettingsError(f"--max-backlog must be at least 1, got {shown(args.max_backlog)}")
    if not args.max_request_mb > 0 or not args.rate_limit >= 0:
        raise SettingsError("--max-request-mb must be > 0 and --rate-limit >= 0")
    if (args.certfile is None) != (args.keyfile is None):
        raise SettingsError("give --certfile and --keyfile together (TLS needs both)")
    for option, path in (("--certfile", args.certfile), ("--keyfile", args.keyfile)):
        if path is not None and not path.is_file():
            raise SettingsError(f"{option} {path} is not a file")
    token = read_token(args.token_file)
    tls = args.certfile is not None
    check_exposure(args.host, token, tls, args.insecure_http)
    return token, tls


def cmd_serve(args) -> None:
    token, tls = check_options(args)
    try:
        from ProbSAMLib.app.server.app import Limits, create_app
    except ImportError as error:
        raise SettingsError(f"probsam serve needs the server extra: pip install \"probsamslicer[server]\" "
                            f"({error})") from None
    from ProbSAMLib.app.server.jobqueue import JobQueue
    from ProbSAMLib.app.server.model import ServedModel

    sock = bind(args.host, args.port)  # before the model loads: a port in use fails at once
    models = ServedModel(args.model, args.checkpoint, args.sam_checkpoint, args.device)
    jobs = JobQueue(models, max_backlog=args.max_backlog).start()
    limits = Limits(token=token, max_request_bytes=int(args.max_request_mb * 2 ** 20), rate_per_s=args.rate_limit)
    server = make_server(create_app(models, jobs, limits), args.certfile, args.keyfile)
    host, port = sock.getsockname()[:2]
    url = f"{'https' if tls else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"
    print(f"probsam serve: {models.describe()} at {url}{PREFIX} "
          f"({'token required' if token else 'no token'}; Ctrl-C stops)", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        jobs.stop()
        sock.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (SettingsError, one line, if the address cannot be had)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as error:
        raise SettingsError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def make_server(app, certfile=None, keyfile=None):
    """A uvicorn server for ``app``; run it with ``.run(sockets=[bind(...)])``, stop it with ``should_exit``."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=5,
                            ssl_certfile=str(certfile) if certfile else None,
                            ssl_keyfile=str(keyfile) if keyfile else None)
    return uvicorn.Server(config)

