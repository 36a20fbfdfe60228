"""Privacy accountants: cumulative (ε, δ) of a sequence of subsampled Gaussian mechanisms.

Every release fed-dfkd accounts for (a DP-SGD step, a client-level Gaussian release of a generator
update or of logits) is a Poisson-subsampled Gaussian mechanism with noise multiplier σ (noise
std / L2 sensitivity) and sampling rate q. An :class:`Accountant` keeps the history of such steps
as ``(σ, q, steps)`` entries and turns it into a cumulative ε at a given δ with Opacus:

* ``rdp``: Rényi DP of the subsampled Gaussian (Mironov et al. 2019), converted to (ε, δ) at the
  best order α (``opacus.accountants.RDPAccountant``);
* ``prv``: numerical composition of privacy-loss random variables (Gopi et al. 2021), the
  tightest of the two (``opacus.accountants.PRVAccountant``); it reports an upper bound.

Opacus's ``gdp`` accountant is deliberately not offered: it overestimates at q = 1 and can
underestimate elsewhere (shared/docs/platform.md §6.2), so its numbers are never reported.

The accounting itself is the pure function :func:`accountant_epsilon` (history in, ε out); the
classes only keep the history. ε is always cumulative over the whole history, never per round.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

from fed_dfkd.registry import Registry

logger = logging.getLogger(__name__)

# One accountant history entry: (noise multiplier σ, sampling rate q, number of steps).
HistoryEntry = tuple[float, float, int]

# Warnings Opacus emits that say nothing about the result being wrong (platform.md §6.2). They are
# silenced by message, only around our own calls into Opacus.
_HARMLESS_OPACUS_WARNINGS = (
    # RDP: the best order is at the edge of the grid, so the bound may be a little loose.
    r"Optimal order is the (largest|smallest) alpha",
    # PRV at q = 1: log(1 - q) = -inf inside a np.where branch that is then discarded.
    r"divide by zero encountered in log",
)


@contextmanager
def _quiet_opacus() -> Iterator[None]:
    with warnings.catch_warnings():
        for pattern in _HARMLESS_OPACUS_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        yield


def _check_release(*, noise_multiplier: float, sample_rate: float, steps: int) -> HistoryEntry:
    """Validate one (σ, q, steps) entry and return it with plain Python types."""
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, numbers.Real):
        raise TypeError(f"noise_multiplier must be a number, got {noise_multiplier!r}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real):
        raise TypeError(f"sample_rate must be a number, got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an integer, got {steps!r}")
    sigma, q, n = float(noise_multiplier), float(sample_rate), int(steps)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {sigma}")
    if not 0 < q <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {q}")
    if n < 1:
        raise ValueError(f"steps must be >= 1, got {n}")
    return sigma, q, n


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return delta


def _collapse(history: list[HistoryEntry], entry: HistoryEntry) -> None:
    """Append ``entry``, merging it into the last entry when (σ, q) repeat, as Opacus does."""
    sigma, q, n = entry
    if history and history[-1][0] == sigma and history[-1][1] == q:
        history[-1] = (sigma, q, history[-1][2] + n)
    else:
        history.append(entry)


@functools.lru_cache(maxsize=256)
def accountant_epsilon(mechanism: str, history: tuple[HistoryEntry, ...], delta: float) -> float:
    """Cumulative ε at ``delta`` of ``history`` under Opacus's ``mechanism`` accountant.

    Pure and cached: a budget check on a copy of an accountant followed by the same release on
    the real one costs one computation (PRV takes 0.04-0.4 s per call). An empty history is
    ε = 0; any entry with σ = 0 is ε = ∞ (no noise, no privacy; Opacus's PRV would fail on it).
    """
    if mechanism not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {mechanism!r}; "
                         f"valid: {', '.join(ACCOUNTANTS.names())}")
    delta = _check_delta(delta)
    if not history:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in history):
        return math.inf
    # Imported here: importing opacus pulls in its optimizers and grad-sample machinery (~1.5 s),
    # which every `fed-dfkd` command would otherwise pay.
    from opacus.accountants import create_accountant

    opacus_accountant = create_accountant(mechanism=mechanism)
    opacus_accountant.history = list(history)
    with _quiet_opacus():
        return float(opacus_accountant.get_epsilon(delta=delta))


class Accountant:
    """Keeps the (σ, q, steps) history of one party's releases; ε is computed from it on demand.

    Subclasses only name their Opacus mechanism. Create them by name with
    :func:`make_accountant`.
    """

    mechanism: ClassVar[str]

    def __init__(self) -> None:
        self._history: list[HistoryEntry] = []

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` releases with noise multiplier σ at sampling rate q, in O(1).

        Consecutive steps with the same (σ, q) collapse into one history entry, so a run's
        history stays as long as the number of times σ or q changed.
        """
        entry = _check_release(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                               steps=steps)
        _collapse(self._history, entry)

    def epsilon(self, *, delta: float) -> float:
        """Cumulative ε at ``delta`` over everything recorded so far (never per round)."""
        return accountant_epsilon(self.mechanism, tuple(self._history), delta)

    @property
    def history(self) -> list[HistoryEntry]:
        """A copy of the history, oldest first, as Opacus keeps it."""
        return list(self._history)

    @property
    def total_steps(self) -> int:
        return sum(n for _, _, n in self._history)

    def copy(self) -> Accountant:
        """An independent accountant with the same history (for what-if questions)."""
        other = type(self)()
        other._history = list(self._history)
        return other

    def state_dict(self) -> dict[str, Any]:
        """The history as parallel lists of plain numbers.

        Storable as is in JSON and in a Flower ``ConfigRecord`` (which holds no tuples).
        """
        return {
            "mechanism": self.mechanism,
            "sigma": [sigma for sigma, _, _ in self._history],
            "q": [q for _, q, _ in self._history],
            "steps": [n for _, _, n in self._history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the history with the one in ``state`` (from :meth:`state_dict`)."""
        missing = [key for key in ("mechanism", "sigma", "q", "steps") if key not in state]
        if missing:
            raise ValueError(f"accountant state lacks {', '.join(missing)}")
        if state["mechanism"] != self.mechanism:
            raise ValueError(f"accountant state is for {state['mechanism']!r}, "
                             f"not {self.mechanism!r}")
        sigmas, rates, counts = list(state["sigma"]), list(state["q"]), list(state["steps"])
        if not len(sigmas) == len(rates) == len(counts):
            raise ValueError("accountant state: sigma, q and steps differ in length "
                             f"({len(sigmas)}, {len(rates)}, {len(counts)})")
        history = [_check_release(noise_multiplier=s, sample_rate=q, steps=n)
                   for s, q, n in zip(sigmas, rates, counts)]
        self._history = history

    def __repr__(self) -> str:
        return f"{type(self).__name__}(history={self._history!r})"


ACCOUNTANTS: Registry[type[Accountant]] = Registry("accountant")


@ACCOUNTANTS.register("rdp")
class RdpAccountant(Accountant):
    """Rényi-DP accounting (``opacus.accountants.RDPAccountant``, its default orders α)."""

    mechanism = "rdp"


@ACCOUNTANTS.register("prv")
class PrvAccountant(Accountant):
    """PRV accounting (``opacus.accountants.PRVAccountant``, default ε error 0.01; upper bound)."""

    mechanism = "prv"


def make_accountant(name: str) -> Accountant:
    """A fresh accountant by name (``rdp`` or ``prv``); an unknown name lists the valid ones."""
    return ACCOUNTANTS.get(name)()


def epsilon_after(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  accountant: str) -> float:
    """ε at δ after ``steps`` releases of the subsampled Gaussian mechanism (σ, q)."""
    entry = _check_release(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                           steps=steps)
    ACCOUNTANTS.get(accountant)
    return accountant_epsilon(accountant, (entry,), delta)


def noise_multiplier_for(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         accountant: str, epsilon_tolerance: float = 0.01) -> float:
    """The noise multiplier σ reaching ``target_epsilon`` at δ after ``steps`` releases.

    Wraps ``opacus.accountants.utils.get_noise_multiplier`` (bisection on σ): the returned σ
    gives ε ≤ target and target − ε ≤ ``epsilon_tolerance``. A target of ∞ needs no noise (σ = 0).
    Raises ValueError when the target is out of reach (σ would exceed Opacus's 1e6).
    """
    _check_release(noise_multiplier=1.0, sample_rate=sample_rate, steps=steps)
    delta = _check_delta(delta)
    ACCOUNTANTS.get(accountant)
    target = float(target_epsilon)
    if not target > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target}")
    if not epsilon_tolerance > 0:
        raise ValueError(f"epsilon_tolerance must be > 0, got {epsilon_tolerance}")
    if math.isinf(target):
        return 0.0
    from opacus.accountants.utils import get_noise_multiplier  # lazy: see accountant_epsilon

    try:
        with _quiet_opacus():
            sigma = get_noise_multiplier(target_epsilon=target, target_delta=delta,
                                         sample_rate=float(sample_rate), steps=int(steps),
                                         accountant=accountant,
                                         epsilon_tolerance=float(epsilon_tolerance))
    except ValueError as exc:
        raise ValueError(f"cannot reach ε = {target} at δ = {delta} with q = {sample_rate} "
                         f"over {steps} steps ({accountant}): {exc}") from None
    logger.debug("calibrated σ = %s for ε = %s, δ = %s, q = %s, %s steps (%s)",
                 sigma, target, delta, sample_rate, steps, accountant)
    return float(sigma)
