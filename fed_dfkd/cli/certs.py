"""``fed-dfkd certs --out DIR``: a CA and a server certificate for a loopback deployment.

Writes ``DIR/ca.pem`` (give it to SuperNodes and the ``flwr`` CLI), ``DIR/server.pem`` and
``DIR/server.key`` (mode 0600; for ``fed-dfkd superlink --certs DIR``). The server certificate
is valid for ``127.0.0.1`` and ``localhost`` unless ``--ip`` / ``--dns`` name others. The CA's
private key is not kept: to add a name, make a new set.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("certs", help="make a CA and a server certificate (TLS on loopback)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the three files")
    parser.add_argument("--ip", action="append", default=None, metavar="ADDRESS",
                        help="IP address the server certificate names (repeatable; "
                             "default 127.0.0.1)")
    parser.add_argument("--dns", action="append", default=None, metavar="NAME",
                        help="host name the server certificate names (repeatable; default localhost)")
    parser.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    parser.add_argument("--force", action="store_true", help="replace existing files")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fed_dfkd.engine.deploy import LOOPBACK, make_certificates

    paths = make_certificates(
        Path(args.out), ip_addresses=args.ip or [LOOPBACK], dns_names=args.dns or ["localhost"],
        valid_days=args.days, overwrite=args.force,
    )
    print(f"CA {paths.ca}\nserver certificate {paths.certificate}\nserver key {paths.key} (mode 0600)")
    return 0
