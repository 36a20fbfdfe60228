"""Partitioning a labelled dataset between clients: coverage, balance, skew, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fed_dfkd.data.partition import (
    class_histograms,
    partition,
    partition_dirichlet,
    partition_iid,
    partition_schemes,
)
from fed_dfkd.errors import UserError


def balanced_labels(num_classes: int = 10, per_class: int = 200) -> np.ndarray:
    # Interleaved, so that index order says nothing about the class.
    return np.tile(np.arange(num_classes), per_class)


def assert_disjoint_cover(partitions: list[np.ndarray], total: int) -> None:
    joined = np.concatenate(partitions)
    assert len(joined) == total, "some index is missing or repeated"
    assert np.array_equal(np.sort(joined), np.arange(total))
    for part in partitions:
        assert part.dtype.kind == "i"
        assert np.array_equal(part, np.sort(part))


def mean_max_class_share(labels: np.ndarray, partitions: list[np.ndarray]) -> float:
    histograms = class_histograms(labels, partitions, int(labels.max()) + 1)
    return float(np.mean(histograms.max(axis=1) / histograms.sum(axis=1)))


# --------------------------------------------------------------------------------------------
# IID
# --------------------------------------------------------------------------------------------


def test_iid_is_disjoint_covering_and_balanced() -> None:
    labels = np.arange(103) % 4
    partitions = partition_iid(labels, 7, seed=3)
    assert len(partitions) == 7
    assert_disjoint_cover(partitions, 103)
    sizes = sorted(len(part) for part in partitions)
    assert sizes == [14, 14, 15, 15, 15, 15, 15]  # 103 = 7 * 14 + 5


def test_iid_is_deterministic_per_seed_and_accepts_tensors() -> None:
    labels = balanced_labels(5, 40)
    first = partition_iid(labels, 4, seed=11)
    again = partition_iid(torch.as_tensor(labels), 4, seed=11)
    other = partition_iid(labels, 4, seed=12)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_iid_rejects_more_clients_than_examples() -> None:
    with pytest.raises(UserError, match="5 examples between 6 clients"):
        partition_iid(np.zeros(5, dtype=np.int64), 6, seed=0)
    with pytest.raises(UserError, match="num_clients"):
        partition_iid(np.zeros(5, dtype=np.int64), 0, seed=0)


# --------------------------------------------------------------------------------------------
# Dirichlet
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.05, 0.5, 5.0, 1000.0])
def test_dirichlet_is_disjoint_covering_and_respects_min_size(alpha: float) -> None:
    labels = balanced_labels()
    partitions = partition_dirichlet(labels, 10, alpha=alpha, seed=1, min_partition_size=25)
    assert len(partitions) == 10
    assert_disjoint_cover(partitions, len(labels))
    assert min(len(part) for part in partitions) >= 25


def test_dirichlet_small_alpha_is_skewed_and_large_alpha_is_not() -> None:
    labels = balanced_labels()
    skewed = mean_max_class_share(labels, partition_dirichlet(labels, 10, alpha=0.1, seed=0))
    near_iid = mean_max_class_share(labels, partition_dirichlet(labels, 10, alpha=100.0, seed=0))
    # One class out of ten: 0.1 is perfectly balanced, 1.0 is a single class per client.
    assert skewed > 0.45
    assert near_iid < 0.2
    assert skewed > near_iid + 0.25


def test_dirichlet_with_huge_alpha_deals_each_class_out_evenly() -> None:
    # Dir(alpha) concentrates on the uniform vector as alpha grows, so every client gets about
    # 200 / 10 = 20 examples of every class (floor of the cumulative cuts: within 1 or 2).
    labels = balanced_labels()
    partitions = partition_dirichlet(labels, 10, alpha=1e8, seed=4, min_partition_size=0)
    histograms = class_histograms(labels, partitions, 10)
    assert np.abs(histograms - 20).max() <= 2


def test_dirichlet_is_deterministic_per_seed() -> None:
    labels = balanced_labels()
    first = partition_dirichlet(labels, 8, alpha=0.3, seed=5)
    again = partition_dirichlet(torch.as_tensor(labels), 8, alpha=0.3, seed=5)
    other = partition_dirichlet(labels, 8, alpha=0.3, seed=6)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_dirichlet_one_client_gets_everything() -> None:
    labels = balanced_labels(3, 7)
    (only,) = partition_dirichlet(labels, 1, alpha=0.1, seed=0, min_partition_size=21)
    assert np.array_equal(only, np.arange(21))


def test_dirichlet_impossible_request_raises_user_error_naming_the_knobs() -> None:
    labels = balanced_labels(10, 10)  # 100 examples
    with pytest.raises(UserError, match=r"alpha=0\.5.*num_clients=11.*min_partition_size=10"):
        partition_dirichlet(labels, 11, alpha=0.5, seed=0, min_partition_size=10)


def test_dirichlet_gives_up_after_max_attempts() -> None:
    # Feasible only if every client gets exactly 10 of 100: a tiny alpha never draws that.
    labels = balanced_labels(10, 10)
    with pytest.raises(UserError, match=r"alpha=0\.001.*num_clients=10.*in 5 attempts"):
        partition_dirichlet(labels, 10, alpha=0.001, seed=0, min_partition_size=10, max_attempts=5)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("inf"), float("nan")])
def test_dirichlet_rejects_bad_alpha(alpha: float) -> None:
    with pytest.raises(UserError, match="alpha"):
        partition_dirichlet(balanced_labels(), 4, alpha=alpha, seed=0)


# --------------------------------------------------------------------------------------------
# Histograms and dispatch
# --------------------------------------------------------------------------------------------


def test_class_histograms_by_hand() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    histograms = class_histograms(labels, [np.array([0, 1]), np.array([2, 3, 4, 5])], 4)
    assert histograms.dtype == np.int64
    assert histograms.tolist() == [[1, 1, 0, 0], [0, 1, 3, 0]]


def test_class_histograms_rejects_labels_outside_the_classes() -> None:
    with pytest.raises(ValueError, match="labels must lie in"):
        class_histograms(np.array([0, 3]), [np.array([0, 1])], 3)


def test_partition_dispatches_by_scheme() -> None:
    labels = balanced_labels()
    by_name = partition(labels, 5, scheme="dirichlet", alpha=0.2, seed=9, min_partition_size=20)
    direct = partition_dirichlet(labels, 5, alpha=0.2, seed=9, min_partition_size=20)
    assert all(np.array_equal(a, b) for a, b in zip(by_name, direct))
    iid = partition(labels, 5, scheme="iid", alpha=0.2, seed=9, min_partition_size=20)
    assert all(np.array_equal(a, b) for a, b in zip(iid, partition_iid(labels, 5, seed=9)))


def test_partition_unknown_scheme_lists_the_valid_ones() -> None:
    assert partition_schemes() == ["dirichlet", "iid"]
    with pytest.raises(ValueError, match="'shards'.*valid: dirichlet, iid"):
        partition(balanced_labels(), 4, scheme="shards", alpha=1.0, seed=0)


def test_partition_dirichlet_needs_alpha() -> None:
    with pytest.raises(UserError, match="alpha"):
        partition(balanced_labels(), 4, scheme="dirichlet", seed=0)
