"""Self-paced learning (SPL) weights for the student objective, algorithms.md §3.3, §3.4, §12.1.

The student minimises mean(v ⊙ ℓ) with v computed without gradient from the current losses and
a pace λ that grows with progress, so easy (low-loss) samples count first and harder ones are
admitted later.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from fed_dfkd.curriculum.schedules import check_progress, linear

logger = logging.getLogger(__name__)

__all__ = [
    "SELF_PACED_GRANULARITIES",
    "SELF_PACED_KINDS",
    "SELF_PACED_PACES",
    "SelfPacedResult",
    "SelfPacedWeighting",
    "self_paced_weights",
]

SELF_PACED_KINDS = ("hard", "soft", "log")
SELF_PACED_GRANULARITIES = ("sample", "batch")
SELF_PACED_PACES = ("absolute", "quantile")

# Floor for a quantile pace of 0 (all reference losses 0): keeps l/λ finite-or-inf, never NaN.
_MIN_QUANTILE_PACE = 1e-12
# Weight at or above which a sample counts as admitted in the logged fraction.
_ADMITTED_WEIGHT = 0.5


def _check_choice(argument: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{argument} must be one of {', '.join(valid)}; got {value!r}")


def _weights(losses: Tensor, *, pace: float, kind: str, inclusive: bool) -> Tensor:
    dtype = losses.dtype if losses.is_floating_point() else torch.get_default_dtype()
    losses = losses.detach().to(dtype)
    below_pace = losses <= pace if inclusive else losses < pace
    if kind == "hard":
        return below_pace.to(dtype)
    if kind == "soft":
        if not pace > 0:
            raise ValueError(f"the soft self-paced weight needs pace > 0, got {pace}")
        return below_pace.to(dtype) * (1.0 - losses / pace)
    # (1 + e^{−λ}) / (1 + e^{ℓ−λ}) = sigmoid(λ − ℓ) / sigmoid(λ), in log space so that neither
    # exponential overflows for large |λ| or ℓ.
    pace_tensor = torch.tensor(pace, dtype=dtype, device=losses.device)
    return torch.exp(F.logsigmoid(pace_tensor - losses) - F.logsigmoid(pace_tensor))


@torch.no_grad()
def self_paced_weights(losses: Tensor, *, pace: float, kind: str) -> Tensor:
    """Self-paced weights v(ℓ; λ) (no gradient), algorithms.md §3.3, with λ = ``pace``.

    ``"hard"``: v = 1[ℓ < λ]; ``"soft"``: v = 1[ℓ < λ]·(1 − ℓ/λ) (λ > 0);
    ``"log"`` (CuDFKD ``curr_log``): v = (1 + e^{−λ}) / (1 + e^{ℓ−λ}), so v(0) = 1, v(λ) ≈ ½ and
    v ≈ e^{λ−ℓ} for ℓ ≫ λ. It is the minimiser over v ∈ [0, 1] of v·ℓ + R_λ(v) (§3.5).
    """
    _check_choice("kind", kind, SELF_PACED_KINDS)
    pace = float(pace)
    if not math.isfinite(pace):
        raise ValueError(f"pace must be finite, got {pace}")
    return _weights(losses, pace=pace, kind=kind, inclusive=False)


@dataclass(frozen=True)
class SelfPacedResult:
    """What :class:`SelfPacedWeighting` returns for one batch.

    ``weights`` ([B], no grad): the student loss is ``(weights * losses).mean()``.
    ``pace``: the λ used (for the quantile pace, the loss value at the quantile).
    ``mean_weight``: mean of ``weights``. ``admitted_fraction``: fraction with weight ≥ ½.
    ``quantile_level``: q for the quantile pace, None for the absolute pace.
    """

    weights: Tensor
    pace: float
    mean_weight: float
    admitted_fraction: float
    quantile_level: float | None = None


class SelfPacedWeighting:
    """Self-paced weighting with a pace schedule and a granularity, algorithms.md §3.3–§3.4, §12.1.

    ``pace="absolute"`` (the reference): λ(p) = ``pace_start`` + (``pace_end`` − ``pace_start``)·p
    and v = :func:`self_paced_weights` (ℓ; λ). With λ0 = 1.5 this reproduces the reference.

    ``pace="quantile"`` (default): at small loss scales the absolute pace does nothing (per-sample
    KD losses of 0.05–0.4 all get weights ≈ 1 at λ0 = 1.5), so the pace follows the losses:
    q(p) = ``pace_start`` + (``pace_end`` − ``pace_start``)·p ∈ (0, 1] and λ = the q-quantile of the
    reference losses (``torch.quantile``, linear interpolation). Then
    ``"hard"``: v = 1[ℓ ≤ λ] (≤, so that q = 1 admits everything and about q of the batch is
    admitted); ``"soft"``: v = 1[ℓ ≤ λ]·(1 − ℓ/λ);
    ``"log"``: the loss in units of the quantile, v = (1 + e^{−κ}) / (1 + e^{κ(ℓ/λ − 1)}) with
    κ = ``sharpness``, so v(0) = 1 and v(λ) ≈ ½ whatever the loss scale. Losses are expected to
    be non-negative (a quantile of 0 is floored at 1e-12).

    ``granularity="sample"`` (default, true SPL): the reference losses are this batch's
    per-sample losses and every sample gets its own weight.
    ``granularity="batch"`` (the reference HEAD): the batch mean L̄ is the single loss, every
    entry of ``weights`` is v(L̄), so ``(weights * losses).mean()`` = v(L̄)·L̄. For the quantile
    pace the reference set is the last ``history`` batch means, the current one included.

    **State:** with ``granularity="batch"``, every call pushes the batch mean into the history
    (the one mutation; saved by :meth:`state_dict`). ``granularity="sample"`` is stateless.
    """

    def __init__(
        self,
        *,
        kind: str = "log",
        granularity: str = "sample",
        pace: str = "quantile",
        pace_start: float,
        pace_end: float,
        sharpness: float = 5.0,
        history: int = 64,
    ) -> None:
        _check_choice("kind", kind, SELF_PACED_KINDS)
        _check_choice("granularity", granularity, SELF_PACED_GRANULARITIES)
        _check_choice("pace", pace, SELF_PACED_PACES)
        pace_start, pace_end = float(pace_start), float(pace_end)
        for argument, value in (("pace_start", pace_start), ("pace_end", pace_end)):
            if not math.isfinite(value):
                raise ValueError(f"{argument} must be finite, got {value}")
            if pace == "quantile" and not 0.0 < value <= 1.0:
                raise ValueError(
                    f"{argument} is a quantile level with pace='quantile' and must be in (0, 1], "
                    f"got {value}"
                )
            if pace == "absolute" and kind == "soft" and not value > 0:
                raise ValueError(f"{argument} must be > 0 for the soft weight, got {value}")
        if not (math.isfinite(sharpness) and sharpness > 0):
            raise ValueError(f"sharpness must be a finite number > 0, got {sharpness}")
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be an integer >= 1, got {history!r}")
        self.kind = kind
        self.granularity = granularity
        self.pace = pace
        self.pace_start = pace_start
        self.pace_end = pace_end
        self.sharpness = float(sharpness)
        self.history = history
        self._batch_loss_history: deque[float] = deque(maxlen=history)

    def __call__(self, losses: Tensor, progress: float) -> SelfPacedResult:
        """Weights for the per-sample ``losses`` ([B]) at ``progress`` p ∈ [0, 1]."""
        progress = check_progress(progress)
        if losses.dim() != 1 or losses.numel() == 0:
            raise ValueError(
                f"losses must be a non-empty [batch] tensor, got {tuple(losses.shape)}"
            )
        with torch.no_grad():
            losses = losses.detach()
            if not losses.is_floating_point():
                losses = losses.to(torch.get_default_dtype())
            if not bool(torch.isfinite(losses).all()):
                raise ValueError("losses contain NaN or infinite values")
            if self.granularity == "batch":
                batch_loss = losses.mean()
                self._batch_loss_history.append(float(batch_loss))
                values = batch_loss.reshape(1)
                reference = torch.tensor(
                    list(self._batch_loss_history), dtype=losses.dtype, device=losses.device
                )
            else:
                values = losses
                reference = losses
            quantile_level: float | None = None
            if self.pace == "absolute":
                pace_value = linear(progress, start=self.pace_start, end=self.pace_end)
                weights = _weights(values, pace=pace_value, kind=self.kind, inclusive=False)
            else:
                quantile_level = linear(progress, start=self.pace_start, end=self.pace_end)
                if reference.dtype not in (torch.float32, torch.float64):
                    reference = reference.float()  # torch.quantile takes float32/64 only
                pace_value = float(torch.quantile(reference, quantile_level))
                weights = self._quantile_weights(values, pace_value)
            if self.granularity == "batch":
                weights = weights.expand(losses.shape[0]).clone()
            return SelfPacedResult(
                weights=weights,
                pace=pace_value,
                mean_weight=float(weights.mean()),
                admitted_fraction=float((weights >= _ADMITTED_WEIGHT).to(weights.dtype).mean()),
                quantile_level=quantile_level,
            )

    def _quantile_weights(self, values: Tensor, pace_value: float) -> Tensor:
        scale = max(pace_value, _MIN_QUANTILE_PACE)
        if self.kind == "log":
            return _weights(
                self.sharpness * values / scale, pace=self.sharpness, kind="log", inclusive=False
            )
        if self.kind == "soft":
            below_pace = (values <= pace_value).to(values.dtype)
            return below_pace * (1.0 - values / scale)
        return _weights(values, pace=pace_value, kind="hard", inclusive=True)

    def state_dict(self) -> dict[str, Any]:
        """The batch-mean history (empty for ``granularity="sample"``)."""
        return {"batch_loss_history": list(self._batch_loss_history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a longer history keeps its newest ``history`` entries."""
        if set(state) != {"batch_loss_history"}:
            raise ValueError(
                "self-paced state must have exactly the key 'batch_loss_history', "
                f"got {sorted(state)}"
            )
        values = [float(value) for value in state["batch_loss_history"]]
        if not all(math.isfinite(value) for value in values):
            raise ValueError("batch_loss_history contains non-finite values")
        self._batch_loss_history = deque(values, maxlen=self.history)
