"""``fed-dfkd audit --run DIR``: membership-inference audit of a finished run (docs/audit.md).

Attacks the student and every teacher the run used (loss, modified entropy, class-calibrated
confidence) with their training images as members and the held-out test split as non-members.
Writes ``DIR/audit.json``, ``DIR/audit.md`` and ``DIR/plots/audit_roc.png`` and prints a table.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fed_dfkd.errors import UserError

logger = logging.getLogger("fed_dfkd.cli.audit")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("audit", help="membership-inference audit of a run's student and teachers",
                            description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, metavar="DIR",
                        help="folder of a `fed-dfkd distill` or `fed-dfkd simulate` run")
    parser.add_argument("--teachers", metavar="DIR", default=None,
                        help="folder the teachers were pretrained into, if the run used --teachers "
                             "(default: DIR/teachers)")
    parser.add_argument("--max-examples", type=int, default=2000, metavar="N",
                        help="at most N members and N non-members per target (default: 2000)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seed of the reference split and the subsamples (default: 0)")
    parser.add_argument("--no-class-match", dest="match_classes", action="store_false",
                        help="sample non-members from the whole test split instead of with the "
                             "members' class histogram (non-IID teachers then look leakier)")
    parser.add_argument("--device", default="cpu", metavar="cpu|cuda|auto",
                        help="where the models run (default: cpu)")
    parser.set_defaults(handler=run)


def _device(name: str):
    from fed_dfkd.runtime import checked_device

    return checked_device(name, "--device")


def run(args: argparse.Namespace) -> int:
    if args.max_examples < 1:
        raise UserError(f"--max-examples must be >= 1, got {args.max_examples}")
    if args.teachers is not None and not Path(args.teachers).is_dir():
        raise UserError(f"--teachers {args.teachers}: no such folder")
    device = _device(args.device)

    from fed_dfkd.audit import format_table, load_run, run_audit, write_audit

    loaded = load_run(Path(args.run), teachers_dir=args.teachers, device=device)
    results = run_audit(loaded, max_examples=args.max_examples, seed=args.seed,
                        match_classes=args.match_classes)
    document = write_audit(loaded, results, max_examples=args.max_examples, seed=args.seed,
                           match_classes=args.match_classes)
    privacy = document["privacy"]
    epsilon = privacy.get("epsilon")
    print(format_table(results))
    print(f"privacy: level {privacy.get('level')}"
          + (f", epsilon {epsilon:.4g}" if isinstance(epsilon, (int, float)) else "")
          + f"; outputs in {loaded.root / 'audit.json'}, audit.md, plots/audit_roc.png")
    return 0
