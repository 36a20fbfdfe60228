"""Options and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from fed_dfkd.config import ExperimentConfig, load_config
from fed_dfkd.errors import UserError


def add_config_arguments(parser: argparse.ArgumentParser, *, out: bool = True) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="experiment YAML")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set federation.rounds=10",
    )
    parser.add_argument("--data-root", default=None, metavar="DIR",
                        help="dataset root in torchvision's layout (sets data.root)")
    if out:
        parser.add_argument("--out", required=True, metavar="DIR", help="output folder")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    overrides = list(args.overrides)
    if getattr(args, "data_root", None):
        overrides.append(f"data.root={args.data_root}")
    return load_config(args.config, overrides)


def prepare_out_dir(path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --out folder {out}: {exc.strerror}") from None
    return out


def setup_logging(verbose: bool = False) -> None:
    """The apps configure logging; the library only emits."""
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("matplotlib", "PIL", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
