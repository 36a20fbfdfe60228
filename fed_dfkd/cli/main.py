"""Entry point of the ``fed-dfkd`` command.

Each subcommand lives in its own module exposing ``add_parser(subparsers)`` and
``run(args) -> int``. A :class:`~fed_dfkd.errors.UserError` (bad config, argument, file or
checkpoint) becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from fed_dfkd.errors import UserError

# Module names under fed_dfkd.cli, in the order ``--help`` lists them.
SUBCOMMANDS = ("validate_config", "pretrain", "distill", "simulate", "certs", "superlink",
               "supernode", "deploy_local", "privacy", "audit")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep the one-line form
        self.print_usage(sys.stderr)
        raise SystemExit(f"{self.prog}: error: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fed-dfkd",
        description="Federated, privacy-preserving, data-free knowledge distillation.",
        epilog="Run `fed-dfkd COMMAND --help` for a command's options.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"fed_dfkd.cli.{name}")
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        return int(exc.code or 0)
    from fed_dfkd.cli.common import setup_logging

    setup_logging(args.verbose)
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"fed-dfkd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fed-dfkd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
