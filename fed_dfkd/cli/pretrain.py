"""``fed-dfkd pretrain``: train the owners' teachers (and optionally a central one) under OUT/teachers."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from fed_dfkd.cli.common import add_config_arguments, config_from_args, prepare_out_dir
from fed_dfkd.config import dump_config
from fed_dfkd.data.teachers import TEACHERS_DIR, TeacherManifest, pretrain_teachers
from fed_dfkd.errors import UserError
from fed_dfkd.runs import atomic_write_text
from fed_dfkd.runtime import resolve_device


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "pretrain",
        help="train one teacher per client (and optionally a central one)",
        description=(
            "Partition the train split into federation.num_clients parts and train one teacher "
            "per part, writing OUT/teachers/client_K.pt; teachers already trained under the same "
            "config are reused."
        ),
    )
    add_config_arguments(parser)
    parser.add_argument("--central", action="store_true",
                        help="also train a central teacher on all train data (OUT/teachers/central.pt)")
    parser.add_argument("--no-clients", action="store_true",
                        help="do not train the per-client teachers (use with --central)")
    parser.add_argument("--force", action="store_true",
                        help="train again even when a teacher for this config exists")
    parser.set_defaults(handler=run)


def format_table(manifests: Sequence[TeacherManifest]) -> str:
    """One row per teacher: name, train size, test accuracy, and ε for DP teachers.

    A DP teacher's train size is its owner's noisy released count (0: none released); its ε is
    the total over everything the owner released, at the δ given in the header.
    """
    private = [m.privacy for m in manifests if m.privacy is not None]
    header = ["teacher", "train size", "test accuracy"]
    if private:
        deltas = sorted({p["delta"] for p in private})
        header.append("epsilon (delta " + ", ".join(f"{d:g}" for d in deltas) + ")")
    rows = []
    for m in manifests:
        row = [m.name, str(m.train_size), f"{m.test_accuracy:.4f}"]
        if private:
            row.append("-" if m.privacy is None else f"{m.privacy['epsilon']:.3f}")
        rows.append(row)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [f"{row[0]:<{widths[0]}}"] + [f"{cell:>{width}}" for cell, width in zip(row[1:], widths[1:])]
        return "  ".join(cells)

    return "\n".join([line(header), *(line(row) for row in rows)])


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.no_clients and not args.central:
        raise UserError("--no-clients without --central leaves no teacher to train")
    out = prepare_out_dir(args.out)
    manifests = pretrain_teachers(
        cfg, out, central=args.central, clients=not args.no_clients, force=args.force,
        device=resolve_device(cfg.runtime),
    )
    # Next to the teachers, not in OUT/: a later `distill --out OUT` writes its own resolved config.
    atomic_write_text(out / TEACHERS_DIR / "config.resolved.yaml", dump_config(cfg))
    print(format_table(manifests))
    sys.stdout.flush()
    return 0
