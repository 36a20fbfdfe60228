"""``fed-dfkd simulate --config C --out DIR [--engine inprocess|ray]``: a simulated federation.

Pretrains the owners' teachers that are missing (into ``DIR/teachers``, cached by config hash),
then runs the ServerApp with ``federation.num_clients`` ClientApps on the chosen engine
(:mod:`fed_dfkd.engine`). Writes what ``fed-dfkd distill`` writes, plus the federation's keys in
``report.json``. ``--resume`` continues from the last completed round; a folder that already
holds a run is never overwritten.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fed_dfkd.cli.common import add_config_arguments, prepare_out_dir

ENGINES = ("inprocess", "ray")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("simulate", help="simulated federation (clients host the teachers)")
    add_config_arguments(parser)
    parser.add_argument("--engine", choices=ENGINES, default="inprocess",
                        help="inprocess: ClientApps called in this process (no Ray); "
                             "ray: Flower's Ray simulation, one CPU per client (default: inprocess)")
    parser.add_argument("--teachers", metavar="DIR", default=None,
                        help="folder of a `fed-dfkd pretrain` run (default: pretrain into --out)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.set_defaults(handler=run)


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if getattr(args, "data_root", None):
        overrides.append(f"data.root={args.data_root}")
    out = prepare_out_dir(args.out)

    from fed_dfkd.engine import simulate

    report = simulate(config=Path(args.config), out=out, overrides=overrides, engine=args.engine,
                      teachers=Path(args.teachers) if args.teachers else None, resume=args.resume)
    summary = (
        f"student accuracy {_fraction(report['student_accuracy'])} "
        f"(best teacher {_fraction(report['best_teacher_accuracy'])}, "
        f"ensemble {_fraction(report['ensemble_accuracy'])}) after {report['rounds_completed']} "
        f"rounds, {report['bytes_up'] + report['bytes_down']} bytes, "
        f"{report['rejected_replies']} rejected replies, {report['wall_seconds']:.1f} s; "
        f"outputs in {out}"
    )
    if report.get("status") == "budget_exhausted":
        print(f"federation ended: {report.get('stop_reason')}; {summary}")
        return 0
    if report.get("status") != "completed":
        print(f"federation stopped: {report.get('stop_reason')}; {summary}")
        return 1
    print(summary)
    return 0
