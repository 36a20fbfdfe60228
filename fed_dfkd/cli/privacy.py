"""``fed-dfkd privacy ACTION``: privacy planning tools.

``plan``: the noise multiplier σ that reaches a target ε at δ over R releases of the subsampled
Gaussian mechanism at sampling rate q, or, given σ, the ε it reaches.
"""

from __future__ import annotations

import argparse
import math

from fed_dfkd.errors import UserError
from fed_dfkd.privacy.accountants import ACCOUNTANTS, epsilon_after, noise_multiplier_for
from fed_dfkd.registry import UnknownNameError


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("privacy", help="privacy planning (plan)",
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


# Each action of the group; `sweep` joins later (issue 4).
_ACTIONS = {"plan": plan}


def run(args: argparse.Namespace) -> int:
    return _ACTIONS[args.privacy_action](args)
