"""The R2M negative bank: a ring buffer of past student keys, algorithms.md §4.2 "State".

Rows (not the reference's columns) are the keys: the bank is ``[size, dim]``, which is what
:func:`fed_dfkd.losses.contrastive.r2m_infonce` takes as ``negatives``.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from torch import Tensor

from fed_dfkd.losses.contrastive import unit

logger = logging.getLogger(__name__)

__all__ = ["NegativeBank"]


class NegativeBank:
    """Queue Q of K = ``size`` unit keys of dimension ``dim`` with a ring pointer (§4.2).

    Initialised with Gaussian rows (drawn from ``rng``) normalised to unit length. :meth:`push`
    overwrites the oldest rows; unlike the reference, the batch size need not divide ``size``
    (writes wrap around), and a batch larger than the bank leaves its last ``size`` keys.

    :meth:`push` replaces the bank tensor instead of writing into it, so a tensor obtained from
    :attr:`negatives` earlier (e.g. saved by autograd for a loss not yet back-propagated) is
    never modified: computing the R2M loss, pushing, then calling ``backward`` is safe.
    """

    def __init__(
        self,
        dim: int,
        size: int,
        *,
        rng: torch.Generator,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an integer >= 1, got {size!r}")
        self.dim = dim
        self.size = size
        gaussian = torch.randn(size, dim, generator=rng, device=rng.device, dtype=dtype)
        self._negatives = unit(gaussian).to(device=device if device is not None else rng.device)
        self._pointer = 0
        self._filled = 0

    @property
    def negatives(self) -> Tensor:
        """The current bank, ``[size, dim]``, unit rows, no gradient. Do not modify it."""
        return self._negatives

    @property
    def pointer(self) -> int:
        """Row the next pushed key is written to."""
        return self._pointer

    @property
    def filled(self) -> int:
        """Number of keys pushed so far, saturating at ``size``."""
        return self._filled

    @property
    def device(self) -> torch.device:
        return self._negatives.device

    @torch.no_grad()
    def push(self, keys: Tensor) -> None:
        """Enqueue ``keys`` ([B, dim]): detached, normalised, written at the pointer with
        wrap-around; the pointer advances by B (mod ``size``)."""
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be [batch, {self.dim}], got {tuple(keys.shape)}")
        count = keys.shape[0]
        if count == 0:
            return
        keys = unit(keys.detach()).to(device=self._negatives.device, dtype=self._negatives.dtype)
        # Only the last `size` keys survive a batch larger than the bank.
        skipped = max(count - self.size, 0)
        keys = keys[skipped:]
        start = (self._pointer + skipped) % self.size
        rows = (start + torch.arange(keys.shape[0], device=keys.device)) % self.size
        negatives = self._negatives.clone()
        negatives[rows] = keys
        self._negatives = negatives
        self._pointer = (self._pointer + count) % self.size
        self._filled = min(self._filled + count, self.size)

    def state_dict(self) -> dict[str, Any]:
        """Bank tensor (a copy), pointer and fill count."""
        return {
            "negatives": self._negatives.detach().clone(),
            "pointer": self._pointer,
            "filled": self._filled,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the bank stays on this bank's device and dtype."""
        expected = {"negatives", "pointer", "filled"}
        if set(state) != expected:
            raise ValueError(
                f"negative bank state must have keys {sorted(expected)}, got {sorted(state)}"
            )
        negatives = state["negatives"]
        if not isinstance(negatives, Tensor) or tuple(negatives.shape) != (self.size, self.dim):
            found = (
                tuple(negatives.shape)
                if isinstance(negatives, Tensor)
                else type(negatives).__name__
            )
            raise ValueError(
                f"negatives must be a tensor of shape ({self.size}, {self.dim}), got {found}"
            )
        pointer, filled = int(state["pointer"]), int(state["filled"])
        if not 0 <= pointer < self.size:
            raise ValueError(f"pointer must be in [0, {self.size}), got {pointer}")
        if not 0 <= filled <= self.size:
            raise ValueError(f"filled must be in [0, {self.size}], got {filled}")
        self._negatives = negatives.detach().to(
            device=self._negatives.device, dtype=self._negatives.dtype
        ).clone()
        self._pointer = pointer
        self._filled = filled
