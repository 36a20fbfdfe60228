"""``fed-dfkd privacy ACTION``: privacy planning tools.

``plan``: the noise multiplier σ that reaches a target ε at δ over R releases of the subsampled
Gaussian mechanism at sampling rate q, or, given σ, the ε it reaches.

``sweep``: accuracy against ε. Runs one experiment per (ε, seed) at one privacy level
(:mod:`fed_dfkd.sweep`), in this process, and writes ``DIR/sweep.csv``, ``DIR/sweep.md`` and
``DIR/plots/accuracy_vs_epsilon.png``; rerunning it finishes only the missing runs.
"""

from __future__ import annotations

import argparse
import math
import shlex
from pathlib import Path
from typing import Sequence

from fed_dfkd.cli.common import add_config_arguments
from fed_dfkd.errors import UserError
from fed_dfkd.privacy.accountants import ACCOUNTANTS, epsilon_after, noise_multiplier_for
from fed_dfkd.registry import UnknownNameError
from fed_dfkd.sweep import COMMANDS as SWEEP_COMMANDS
from fed_dfkd.sweep import LEVELS as SWEEP_LEVELS
from fed_dfkd.sweep import MECHANISMS as SWEEP_MECHANISMS


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("privacy", help="privacy planning (plan), accuracy-vs-ε sweeps (sweep)",
                            description=__doc__.splitlines()[0])
    actions = parser.add_subparsers(dest="privacy_action", metavar="ACTION")
    actions.required = True

    plan_parser = actions.add_parser(
        "plan", help="noise multiplier for a target ε, or ε for a noise multiplier",
        description="Print `noise_multiplier: σ` and `epsilon: ε` for a target ε, or "
                    "`epsilon: ε` for a given --noise-multiplier. Exactly one of the two.")
    plan_parser.add_argument("--target-epsilon", type=float, default=None, metavar="E",
                      help="cumulative ε to reach after all rounds (inf: no noise)")
    plan_parser.add_argument("--noise-multiplier", type=float, default=None, metavar="S",
                      help="σ (noise std / clipping bound) of every release")
    plan_parser.add_argument("--delta", type=float, required=True, metavar="D", help="δ, in (0, 1)")
    plan_parser.add_argument("--rounds", type=int, required=True, metavar="R",
                      help="number of releases (rounds, or DP-SGD steps), >= 1")
    plan_parser.add_argument("--sample-rate", type=float, required=True, metavar="Q",
                      help="probability that a party (or record) takes part in a release, "
                           "in (0, 1]")
    plan_parser.add_argument("--accountant", default="rdp", metavar="|".join(ACCOUNTANTS.names()),
                      help="accountant (default: rdp)")
    plan_parser.set_defaults(handler=run)

    sweep_parser = actions.add_parser(
        "sweep", help="accuracy against ε: one run per (ε, seed), a table and a plot",
        description="Run one experiment per target ε and seed at one privacy level, in this "
                    "process, into DIR/runs/<series>_eps<ε>_seed<s>/, then write DIR/sweep.csv, "
                    "DIR/sweep.md and DIR/plots/accuracy_vs_epsilon.png (every run under "
                    "DIR/runs, so a record and a client sweep may share DIR). ε = inf is the "
                    "baseline without DP. Finished runs are reused; interrupted ones resumed. "
                    "See docs/privacy.md.")
    add_config_arguments(sweep_parser)
    sweep_parser.add_argument("--level", required=True, choices=SWEEP_LEVELS,
                              help="record (DP-SGD teachers) or client (Gaussian mechanism on "
                                   "every release)")
    sweep_parser.add_argument("--epsilons", required=True, metavar="E1,E2,...",
                              help="target ε values > 0, comma-separated; inf: no DP "
                                   "(e.g. 0.5,1,2,4,8,inf)")
    sweep_parser.add_argument("--seeds", default="0", metavar="S1,S2,...",
                              help="runtime.seed values, comma-separated (default: 0)")
    sweep_parser.add_argument("--command", dest="sweep_command", choices=SWEEP_COMMANDS,
                              default="simulate",
                              help="simulate (a federation; default) or distill (centralised; "
                                   "record level only)")
    sweep_parser.add_argument("--mechanism", choices=SWEEP_MECHANISMS, default=None,
                              help="client level: central (default) or local")
    sweep_parser.add_argument("--engine", choices=("inprocess", "ray"), default="inprocess",
                              help="simulate's engine (default: inprocess)")
    sweep_parser.add_argument("--teachers", metavar="DIR", default=None,
                              help="folder of a `fed-dfkd pretrain` run to use for every run "
                                   "(client level, one seed; default: pretrain once per teacher "
                                   "config into DIR/teacher_cache/)")
    sweep_parser.add_argument("--audit", action="store_true",
                              help="run `fed-dfkd audit` on each finished run and add the "
                                   "student's membership-inference AUC and TPR@1%%FPR to the "
                                   "table")
    sweep_parser.set_defaults(handler=run)


def _check_plan_arguments(args: argparse.Namespace) -> None:
    if (args.target_epsilon is None) == (args.noise_multiplier is None):
        raise UserError("give exactly one of --target-epsilon and --noise-multiplier")
    if args.target_epsilon is not None and not args.target_epsilon > 0:
        raise UserError(f"--target-epsilon must be > 0, got {args.target_epsilon}")
    if args.noise_multiplier is not None and not (math.isfinite(args.noise_multiplier)
                                                  and args.noise_multiplier >= 0):
        raise UserError("--noise-multiplier must be finite and >= 0, "
                        f"got {args.noise_multiplier}")
    if not 0 < args.delta < 1:
        raise UserError(f"--delta must be in (0, 1), got {args.delta}")
    if not 0 < args.sample_rate <= 1:
        raise UserError(f"--sample-rate must be in (0, 1], got {args.sample_rate}")
    if args.rounds < 1:
        raise UserError(f"--rounds must be >= 1, got {args.rounds}")
    try:
        ACCOUNTANTS.get(args.accountant)
    except UnknownNameError as exc:
        raise UserError(f"--accountant: {exc}") from None


def plan(args: argparse.Namespace) -> int:
    _check_plan_arguments(args)
    common = dict(delta=args.delta, sample_rate=args.sample_rate, steps=args.rounds,
                  accountant=args.accountant)
    if args.target_epsilon is not None:
        try:
            sigma = noise_multiplier_for(target_epsilon=args.target_epsilon, **common)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        print(f"noise_multiplier: {sigma!r}")
    else:
        sigma = args.noise_multiplier
    print(f"epsilon: {epsilon_after(noise_multiplier=sigma, **common)!r}")
    return 0


def _command_line(args: argparse.Namespace) -> str:
    """The sweep's own command line, rebuilt from its arguments (recorded in sweep.md)."""
    argv = ["fed-dfkd", "privacy", "sweep", "--config", args.config, "--level", args.level,
            "--epsilons", args.epsilons, "--seeds", args.seeds, "--command", args.sweep_command]
    if args.mechanism:
        argv += ["--mechanism", args.mechanism]
    if args.engine != "inprocess":
        argv += ["--engine", args.engine]
    if args.data_root:
        argv += ["--data-root", args.data_root]
    for override in args.overrides:
        argv += ["--set", override]
    if args.teachers:
        argv += ["--teachers", args.teachers]
    if args.audit:
        argv.append("--audit")
    return shlex.join([*argv, "--out", args.out])


def _execute(argv: Sequence[str]) -> int:
    """Run one ``fed-dfkd`` command in this process: its handler, with its UserErrors raised."""
    from fed_dfkd.cli.main import build_parser

    try:
        args = build_parser().parse_args(list(argv))
    except SystemExit as exc:  # only a bug in the sweep builds a bad command line
        raise UserError(f"`fed-dfkd {shlex.join(argv)}`: {exc.code}") from None
    return int(args.handler(args) or 0)


def sweep(args: argparse.Namespace) -> int:
    from fed_dfkd.sweep import (PLOT_NAME, SWEEP_CSV, SWEEP_MD, SweepSpec, parse_epsilons,
                                parse_seeds, run_sweep)

    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.teachers is not None and not Path(args.teachers).is_dir():
        raise UserError(f"--teachers {args.teachers}: no such folder")
    spec = SweepSpec(
        config=Path(args.config), level=args.level, epsilons=parse_epsilons(args.epsilons),
        seeds=parse_seeds(args.seeds), command=args.sweep_command, mechanism=args.mechanism,
        overrides=tuple(overrides), teachers=Path(args.teachers) if args.teachers else None,
        engine=args.engine, audit=args.audit, command_line=_command_line(args),
    )
    if Path(args.config).is_dir():
        raise UserError(f"cannot read config file {args.config}: Is a directory")
    if not Path(args.config).is_file():
        raise UserError(f"config file not found: {args.config}")
    out = Path(args.out)
    outcome = run_sweep(spec, out, execute=_execute)
    counts = {name: sum(1 for action in outcome.actions.values() if action == name)
              for name in ("reused", "failed")}
    print(f"{len(outcome.actions)} runs: {len(outcome.actions) - sum(counts.values())} run now, "
          f"{counts['reused']} reused, {counts['failed']} failed; table in {out / SWEEP_MD} and "
          f"{out / SWEEP_CSV}, plot in {out / 'plots' / PLOT_NAME}")
    if outcome.unfinished:
        print(f"not finished: {', '.join(outcome.unfinished)}; run the same command again to "
              "resume them")
        return 1
    return 0


_ACTIONS = {"plan": plan, "sweep": sweep}


def run(args: argparse.Namespace) -> int:
    return _ACTIONS[args.privacy_action](args)
