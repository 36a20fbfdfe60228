"""``fed-dfkd validate-config FILE``: load, check and print the resolved config."""

from __future__ import annotations

import argparse

from fed_dfkd.config import dump_config, load_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("validate-config", help="check a config and print it resolved")
    parser.add_argument("config", metavar="FILE")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one value (repeatable)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print(dump_config(cfg), end="")
    return 0
