"""Progress of long work: a bar on a terminal, one log line per round otherwise (DESIGN.md §7).

The ``lines`` mode logs through ``logging.getLogger("fed_dfkd.progress")`` at INFO; the apps
decide where that goes (the library configures no handler).
"""

from __future__ import annotations

import logging
import math
import sys
from types import TracebackType
from typing import Any, Mapping, TextIO

logger = logging.getLogger("fed_dfkd.progress")

PROGRESS_MODES = ("auto", "bar", "lines", "none")


def format_metric(value: Any) -> str:
    """A compact text for one metric: 4 significant digits for floats (0.9123, 0.41, 1.2e-05)."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return "nan"
    return format(number, ".4g")


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """``key=value`` pairs, space separated, in the mapping's order."""
    return " ".join(f"{key}={format_metric(value)}" for key, value in metrics.items())


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class RoundProgress:
    """Shows how far a loop of ``total`` rounds (or epochs) has come; a context manager.

    ``mode``: ``"auto"`` (a bar when ``stream`` is a terminal, else ``"lines"``), ``"bar"`` (a tqdm
    bar on ``stream``), ``"lines"`` (one INFO log line per :meth:`update`, e.g.
    ``round 3/40 student_accuracy=0.9123 loss=0.41 seconds=1.2``) or ``"none"``. ``initial`` is
    the step a resumed run starts from. ``unit`` names a step in the log lines and the bar.
    ``stream`` defaults to ``sys.stderr`` as it is when the object is made.
    """

    def __init__(
        self,
        total: int,
        *,
        mode: str = "auto",
        desc: str = "",
        initial: int = 0,
        stream: TextIO | None = None,
        unit: str = "round",
    ) -> None:
        if mode not in PROGRESS_MODES:
            raise ValueError(f"unknown progress mode {mode!r}; valid: {', '.join(PROGRESS_MODES)}")
        if total < 0 or initial < 0:
            raise ValueError(f"total and initial must be >= 0, got {total=}, {initial=}")
        self.total, self.desc, self.unit = total, desc, unit
        self.step = initial
        self._stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if _is_terminal(self._stream) else "lines"
        self.mode = mode
        self._bar: Any = None
        if mode == "bar":
            from tqdm import tqdm  # not tqdm.auto: a notebook widget would ignore `stream`

            self._bar = tqdm(total=total, initial=initial, desc=desc or None, unit=unit,
                             file=self._stream, dynamic_ncols=True, leave=True)

    def update(self, step: int, metrics: Mapping[str, float] | None = None) -> None:
        """Record that ``step`` steps are done; show ``metrics`` (bar postfix or one log line)."""
        metrics = metrics or {}
        self.step = step
        if self.mode == "bar":
            if self._bar is None:  # closed
                return
            advance = step - self._bar.n
            if advance >= 0:
                self._bar.update(advance)
            else:  # a step went backwards (a resumed count): show it as it is
                self._bar.n = step
            self._bar.set_postfix_str(format_metrics(metrics), refresh=True)
        elif self.mode == "lines":
            prefix = f"{self.desc}: " if self.desc else ""
            text = format_metrics(metrics)
            logger.info("%s%s %d/%d%s", prefix, self.unit, step, self.total,
                        f" {text}" if text else "")

    def close(self) -> None:
        """End the bar (the other modes hold nothing); safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "RoundProgress":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
