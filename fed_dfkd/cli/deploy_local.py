"""``fed-dfkd deploy-local --clients N --config C --out DIR``: a real deployment on 127.0.0.1.

Pretrains the owners' missing teachers into ``DIR/teachers``, makes certificates in
``DIR/certs``, starts one SuperLink and N SuperNodes on free loopback ports with TLS (unless
``--insecure``), runs the federation with ``flwr run`` and waits for it (at most ``--timeout``
seconds; default rounds x ``federation.round_timeout`` plus a margin). The ServerApp writes the
run's outputs into DIR (``report.json`` with ``engine: "deployment"``). Every process started is
then stopped by its recorded process group, SuperNodes first, also on failure, Ctrl-C or
SIGTERM. Each process logs into ``DIR/logs/``. Exit code 0 when the run completed, 1 when it did
not (the reason and the log to read are printed), 2 on bad input, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from pathlib import Path
from typing import Any

from fed_dfkd.cli.common import add_config_arguments, prepare_out_dir
from fed_dfkd.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("deploy-local",
                            help="federation on a real SuperLink and N SuperNodes on 127.0.0.1 (TLS)")
    add_config_arguments(parser)
    parser.add_argument("--clients", type=int, default=None, metavar="N",
                        help="SuperNodes to start (sets federation.num_clients; default: the config's)")
    parser.add_argument("--insecure", action="store_true", help="no TLS between the processes")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--app", metavar="DIR", default=None,
                        help="the Flower app folder `flwr run` builds (default: this source checkout)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="give up on the run after this long (default: rounds x "
                             "federation.round_timeout + a margin)")
    parser.set_defaults(handler=run)


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _log_tail(path: Path, lines: int = 15) -> str:
    """The end of a log without the HTTP client's per-request lines."""
    if not path.is_file():
        return ""
    kept = [line for line in path.read_text(errors="replace").splitlines()
            if line.strip() and " httpx: " not in line]
    return "\n".join(kept[-lines:])


def _interrupt(signum: int, _frame: Any) -> None:
    # SIGTERM takes the Ctrl-C path: the deployment's cleanup runs in its `finally`.
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UserError(f"--timeout must be a finite number of seconds > 0, got {args.timeout}")
    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    out = prepare_out_dir(args.out)

    from fed_dfkd.engine.deploy import deploy_local

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = deploy_local(
            config=Path(args.config), out=out, overrides=overrides, num_clients=args.clients,
            tls=not args.insecure, resume=args.resume,
            app_dir=Path(args.app) if args.app else None, run_timeout=args.timeout,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    report, outcome = result.report, result.outcome
    run_log = result.logs_dir / "flwr-run.log"
    finished = ("completed", "budget_exhausted")
    if report is None or not outcome.completed or report.get("status") not in finished:
        if outcome.run_id is None:
            why = "the run was not started"
        elif outcome.timed_out:
            why = f"run {outcome.run_id} did not finish in time and was stopped"
        else:
            why = f"run {outcome.run_id} ended as {outcome.status or 'unknown'}"
        if report is not None and report.get("status") not in finished:
            why += f"; the server stopped: {report.get('stop_reason')}"
        print(f"fed-dfkd deploy-local: {why}; see {run_log} and the other logs in "
              f"{result.logs_dir}", file=sys.stderr)
        tail = _log_tail(run_log)
        if tail:
            print(f"last lines of {run_log.name}:\n{tail}", file=sys.stderr)
        return 1
    print(
        f"student accuracy {_fraction(report['student_accuracy'])} after "
        f"{report['rounds_completed']} rounds on a loopback deployment "
        f"({'insecure' if args.insecure else 'TLS'}), {report['bytes_up'] + report['bytes_down']} "
        f"bytes, {report['rejected_replies']} rejected and {report.get('missing_replies', 0)} "
        f"missing replies, {report['wall_seconds']:.1f} s; outputs in {out}, logs in {result.logs_dir}"
    )
    return 0
