"""Splitting one labelled dataset between data owners (clients).

Every partitioner returns one sorted index array per client; the arrays are disjoint and together
cover every index exactly once. The same seed gives the same partition.

* ``iid``: a seeded shuffle cut into near-equal parts.
* ``dirichlet``: label skew as in FedMA (Wang et al., 2020) and NIID-Bench (Li et al., 2022):
  for every class c, proportions
  ``p_c ~ Dir(alpha * 1_K)`` over the K clients decide how c's examples are dealt out. Small
  alpha gives each client few classes; large alpha approaches IID.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np
from torch import Tensor

from fed_dfkd.errors import UserError

__all__ = [
    "partition_iid",
    "partition_dirichlet",
    "class_histograms",
    "partition",
    "partition_schemes",
]

logger = logging.getLogger(__name__)


def _labels_array(labels: np.ndarray | Tensor) -> np.ndarray:
    array = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {array.dtype}")
    return array


def _check_num_clients(num_clients: int, num_items: int) -> None:
    is_count = isinstance(num_clients, (int, np.integer)) and not isinstance(num_clients, bool)
    if not is_count or num_clients < 1:
        raise UserError(f"num_clients must be a positive integer, got {num_clients!r}")
    if num_clients > num_items:
        raise UserError(f"cannot split {num_items} examples between {num_clients} clients")


def partition_iid(labels: np.ndarray | Tensor, num_clients: int, *, seed: int) -> list[np.ndarray]:
    """Shuffle all indices with ``seed`` and cut them into ``num_clients`` parts.

    Part sizes differ by at most one; labels are used only for their count.
    """
    array = _labels_array(labels)
    _check_num_clients(num_clients, len(array))
    shuffled = np.random.default_rng(seed).permutation(len(array))
    return [np.sort(part) for part in np.array_split(shuffled, num_clients)]


def partition_dirichlet(
    labels: np.ndarray | Tensor,
    num_clients: int,
    *,
    alpha: float,
    seed: int,
    min_partition_size: int = 10,
    max_attempts: int = 100,
) -> list[np.ndarray]:
    """Label-skewed partition with per-class Dirichlet proportions.

    For each class c, draw ``p_c ~ Dir(alpha, ..., alpha)`` over the clients and deal c's
    shuffled examples out in those proportions (the last client's share absorbs the rounding).
    The whole draw is repeated until every client holds at least ``min_partition_size``
    examples.

    Raises:
        UserError: when the request is impossible (``num_clients * min_partition_size`` exceeds
            the number of examples) or no draw met the minimum within ``max_attempts``; the
            message names ``alpha``, ``num_clients`` and ``min_partition_size``.
    """
    array = _labels_array(labels)
    _check_num_clients(num_clients, len(array))
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise UserError(f"dirichlet alpha must be a finite number > 0, got {alpha!r}")
    if min_partition_size < 0:
        raise UserError(f"min_partition_size must be >= 0, got {min_partition_size}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")

    request = (
        f"alpha={alpha}, num_clients={num_clients}, min_partition_size={min_partition_size}, "
        f"{len(array)} examples"
    )
    if num_clients * min_partition_size > len(array):
        raise UserError(
            f"impossible Dirichlet partition ({request}): {num_clients} clients x "
            f"{min_partition_size} examples exceed the data; "
            "lower num_clients or min_partition_size"
        )

    rng = np.random.default_rng(seed)
    class_indices = [np.flatnonzero(array == cls) for cls in np.unique(array)]
    smallest = 0
    for attempt in range(1, max_attempts + 1):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for indices in class_indices:
            proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(proportions)[:-1] * len(indices)).astype(np.int64)
            for client, share in enumerate(np.split(rng.permutation(indices), cuts)):
                parts[client].append(share)
        partitions = [np.sort(np.concatenate(shares)) for shares in parts]
        smallest = min(len(part) for part in partitions)
        if smallest >= min_partition_size:
            logger.debug("Dirichlet partition (%s) found on attempt %d", request, attempt)
            return partitions
    raise UserError(
        f"no Dirichlet partition ({request}) gave every client >= {min_partition_size} examples "
        f"in {max_attempts} attempts (smallest client in the last draw: {smallest}); raise alpha, "
        "or lower num_clients or min_partition_size"
    )


def class_histograms(
    labels: np.ndarray | Tensor, partitions: list[np.ndarray], num_classes: int
) -> np.ndarray:
    """``int64 [num_clients, num_classes]``: how many examples of each class each client holds."""
    array = _labels_array(labels)
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{array.min()}, {array.max()}]"
        )
    histograms = np.zeros((len(partitions), num_classes), dtype=np.int64)
    for client, indices in enumerate(partitions):
        client_labels = array[np.asarray(indices, dtype=np.int64)]
        histograms[client] = np.bincount(client_labels, minlength=num_classes)
    return histograms


_Partitioner = Callable[..., list[np.ndarray]]


def _dirichlet_scheme(
    labels: np.ndarray, num_clients: int, *, alpha: float | None, seed: int, min_partition_size: int
) -> list[np.ndarray]:
    if alpha is None:
        raise UserError("the dirichlet partition needs alpha (config data.dirichlet_alpha)")
    return partition_dirichlet(
        labels, num_clients, alpha=alpha, seed=seed, min_partition_size=min_partition_size
    )


def _iid_scheme(
    labels: np.ndarray, num_clients: int, *, alpha: float | None, seed: int, min_partition_size: int
) -> list[np.ndarray]:
    del alpha, min_partition_size  # equal sizes; no skew knob
    return partition_iid(labels, num_clients, seed=seed)


_SCHEMES: dict[str, _Partitioner] = {"iid": _iid_scheme, "dirichlet": _dirichlet_scheme}


def partition_schemes() -> list[str]:
    """Names accepted by :func:`partition`'s ``scheme``."""
    return sorted(_SCHEMES)


def partition(
    labels: np.ndarray | Tensor,
    num_clients: int,
    *,
    scheme: str,
    alpha: float | None = None,
    seed: int,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Partition by scheme name (``"iid"`` or ``"dirichlet"``); ``alpha`` is used by dirichlet only.

    Raises:
        ValueError: for an unknown scheme; the message lists the valid ones.
    """
    try:
        partitioner = _SCHEMES[scheme]
    except KeyError:
        raise ValueError(
            f"unknown partition scheme {scheme!r}; valid: {', '.join(partition_schemes())}"
        ) from None
    return partitioner(
        labels, num_clients, alpha=alpha, seed=seed, min_partition_size=min_partition_size
    )
