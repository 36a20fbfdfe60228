"""``fed-dfkd superlink``: Flower's SuperLink with the project's settings, in the foreground.

TLS by default (``--certs DIR`` from ``fed-dfkd certs``); ``--insecure`` is an explicit choice.
Runtime installation of app dependencies is off, and the Flower variables of platform.md §2 are
set (telemetry and update checks off). ``--state DIR`` keeps the SuperLink's database
(``DIR/superlink.db``) and Flower home (``DIR/.flwr``) there; otherwise the state is in memory
and ``FLWR_HOME`` is taken from the environment, else ``./.flwr``. SIGINT, SIGTERM and SIGHUP
are forwarded to the SuperLink, which stops its SuperExec; what is still running
``--grace`` seconds later is killed.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--certs", metavar="DIR",
                       help="folder of `fed-dfkd certs` (ca.pem, server.pem, server.key)")
    group.add_argument("--insecure", action="store_true",
                       help="no TLS: traffic is readable by anyone on the network path")


def require_tls_choice(args: argparse.Namespace) -> None:
    from fed_dfkd.errors import UserError

    if not args.insecure and not args.certs:
        raise UserError("TLS is the default: pass --certs DIR (make one with "
                        "`fed-dfkd certs --out DIR`), or --insecure to run without TLS")


def check_port(option: str, port: int) -> None:
    from fed_dfkd.errors import UserError

    if not 1 <= port <= 65535:
        raise UserError(f"{option} must be a port number in 1..65535, got {port}")


def check_grace(grace: float) -> None:
    from fed_dfkd.errors import UserError

    if not (math.isfinite(grace) and grace >= 0):
        raise UserError(f"--grace must be a finite number of seconds >= 0, got {grace}")


def flwr_home(state: str | None) -> Path:
    if state:
        return Path(state).expanduser().resolve() / ".flwr"
    return Path(os.environ.get("FLWR_HOME") or Path.cwd() / ".flwr").expanduser().resolve()


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("superlink", help="run a Flower SuperLink (TLS by default)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000,
                        help="the one HTTP port for SuperNodes, the CLI and ServerApps "
                             "(default 8000, Flower's)")
    add_tls_arguments(parser)
    parser.add_argument("--state", metavar="DIR", default=None,
                        help="keep the SuperLink's database and Flower home here (default: in memory)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds to exit after a signal before SIGKILL (default 10)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fed_dfkd.engine.deploy import (
        CertificatePaths,
        process_environment,
        run_foreground,
        superlink_command,
    )

    require_tls_choice(args)
    check_port("--port", args.port)
    check_grace(args.grace)
    certificates = (None if args.insecure
                    else CertificatePaths.in_folder(Path(args.certs)).require(server=True))
    database = None
    if args.state:
        state = Path(args.state).expanduser().resolve()
        state.mkdir(parents=True, exist_ok=True)
        database = state / "superlink.db"
    command = superlink_command(host=args.host, port=args.port, certificates=certificates,
                                database=database)
    return run_foreground(command, env=process_environment(flwr_home(args.state)), grace=args.grace)
