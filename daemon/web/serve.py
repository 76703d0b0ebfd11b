"""The ``forensic-gender serve`` command: its arguments, the loopback rule (``--allow-remote``),
the listening socket (``--port 0``: a free port, printed), and uvicorn; also
:func:`serve_in_thread` for tests.

uvicorn (the ``web`` extra) is imported where a server starts, so that :func:`register_cli` works
without it and ``serve`` can say which extra to install.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading

from daemon import __version__
from daemon.paths import show
from daemon.web.security import is_loopback


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: a free port the system picks). Raises
    OSError from bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from daemon.cliargs import load_config
    from daemon.web import create_app

    if not is_loopback(args.host) and not args.allow_remote:
        print(f"forensic-gender serve: --host {show(args.host)} is not a loopback address; the page shows evidence and takes reviews. "
              "Bind to 127.0.0.1 (and use an SSH tunnel), or pass --allow-remote if you really mean it", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print(f"forensic-gender serve: --port must be from 0 to 65535 (0: any free port), got {args.port}", file=sys.stderr)
        return 2
    cfg = load_config(args, check_paths=False)
    hosts = ("127.0.0.1", "localhost") if is_loopback(args.host) and args.host in ("127.0.0.1", "localhost") else (args.host,)
    if args.host in ("::1", "[::1]"):
        hosts = ("[::1]", "localhost")
    bind = args.host.strip("[]")
    try:
        sock = listen(bind, args.port)
    except (OSError, OverflowError) as err:
        why = getattr(err, "strerror", None) or str(err)
        print(f"forensic-gender serve: cannot listen on {show(args.host)} port {args.port} ({why}); choose another --port "
              "(0 picks a free one) or stop what uses it", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    try:
        app = create_app(cfg, review=not args.no_review, hosts=hosts, port=port)
    except BaseException:
        sock.close()
        raise
    shown = f"[{bind}]" if ":" in bind else bind
    print(f"forensic-gender {__version__}: review page on http://{shown}:{port}/ (database {show(cfg.database)}); Ctrl-C stops it", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=True, server_header=False, lifespan="off"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        app.close()
    return 0


def register_cli(sub) -> None:  # noqa: ANN001
    from daemon.cliargs import add_config_args

    p = sub.add_parser("serve", help="serve the local review page (loopback only unless --allow-remote)")
    add_config_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: a free port, printed at start)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host (the page has no login)")
    p.add_argument("--no-review", action="store_true", help="read-only page: no review form, no write path")
    p.set_defaults(func=cmd_serve)


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0):  # noqa: ANN001, ANN201
    """Start uvicorn in a daemon thread (tests); returns (server, thread, port). Stop with
    ``server.should_exit = True`` and join the thread."""
    import uvicorn

    sock = listen(host, port)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fg-web", daemon=True)
    t.start()
    return server, t, port
