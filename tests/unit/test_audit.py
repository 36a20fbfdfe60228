"""Membership-inference audit (fed_dfkd/audit.py): metrics against hand computations and
scikit-learn, score equations on tiny logits, sampling rules, and a model that memorised a
random-label set against one that learned nothing."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve
from torch import nn

from fed_dfkd.audit import (
    ATTACK_ORDER,
    ATTACKS,
    ClassStatistics,
    _check_partition,
    attack_model,
    balanced_subsample,
    calibrated_scores,
    class_matched_subsample,
    format_table,
    logit_confidence,
    loss_scores,
    modified_entropy_scores,
    roc_auc,
    roc_curve,
    split_reference,
    tpr_at_fpr,
)
from fed_dfkd.errors import UserError
from fed_dfkd.registry import UnknownNameError

LN2, LN3 = math.log(2.0), math.log(3.0)


# --------------------------------------------------------------------------------------------
# AUC, ROC curve, TPR at low FPR
# --------------------------------------------------------------------------------------------


def test_auc_by_hand_with_a_tie():
    # Members 0.9, 0.8; non-members 0.8, 0.3. Pairs: 0.9>0.8, 0.9>0.3, 0.8=0.8 (½), 0.8>0.3.
    assert roc_auc([0.9, 0.8, 0.8, 0.3], [1, 0, 1, 0]) == pytest.approx(3.5 / 4, abs=1e-15)


def test_auc_extremes():
    assert roc_auc([3, 2, 1, 0], [True, True, False, False]) == 1.0
    assert roc_auc([3, 2, 1, 0], [False, False, True, True]) == 0.0
    assert roc_auc([7.0] * 6, [1, 0, 1, 0, 0, 1]) == 0.5  # one big tie: chance


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_sklearn_on_random_data_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 300
    y = rng.random(n) < 0.4
    scores = np.round(rng.normal(size=n) + 0.7 * y, 1)  # rounding makes many ties
    assert len(np.unique(scores)) < n
    assert roc_auc(scores, y) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_roc_curve_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(200) < 0.5
    scores = np.round(rng.normal(size=200) + y, 1)
    curve = roc_curve(scores, y)
    fpr, tpr, _ = sk_roc_curve(y, scores, drop_intermediate=False)
    np.testing.assert_allclose(curve.fpr, fpr, atol=1e-15)
    np.testing.assert_allclose(curve.tpr, tpr, atol=1e-15)
    assert curve.thresholds[0] == np.inf
    assert np.all(np.diff(curve.thresholds[1:]) < 0)
    # The trapezoid area under the curve is the AUC (ties are diagonal segments).
    area = float(np.sum(np.diff(curve.fpr) * (curve.tpr[1:] + curve.tpr[:-1]) / 2))
    assert area == pytest.approx(roc_auc(scores, y), abs=1e-12)


def test_tpr_at_fpr_by_hand():
    # 100 non-members scored 0..99; members above the 1st, 2nd and 3rd highest non-member, and
    # one low. One false positive (FPR 0.01) is allowed at 1 %: threshold 98.5 catches 2 of 4.
    non_members = np.arange(100.0)
    members = np.array([99.5, 98.5, 97.5, 10.5])
    scores = np.r_[members, non_members]
    y = np.r_[np.ones(4, bool), np.zeros(100, bool)]
    curve = roc_curve(scores, y)
    assert tpr_at_fpr(curve, max_fpr=0.01) == 0.5
    assert tpr_at_fpr(curve, max_fpr=0.0) == 0.25
    assert tpr_at_fpr(curve, max_fpr=0.02) == 0.75
    assert tpr_at_fpr(curve, max_fpr=0.009) == 0.25
    assert tpr_at_fpr(curve, max_fpr=1.0) == 1.0


def test_tpr_at_fpr_cannot_split_a_tie():
    # The top member ties with a non-member: catching it costs one false positive (FPR 0.01).
    scores = np.r_[[5.0, -1.0], [5.0], np.zeros(99)]
    y = np.r_[[True, True], np.zeros(100, bool)]
    curve = roc_curve(scores, y)
    assert tpr_at_fpr(curve, max_fpr=0.01) == 0.5
    assert tpr_at_fpr(curve, max_fpr=0.005) == 0.0


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="one member and one non-member"):
        roc_auc([1.0, 2.0], [1, 1])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([1.0, float("nan")], [1, 0])
    with pytest.raises(ValueError, match="1-d"):
        roc_curve([1.0, 2.0, 3.0], [1, 0])


# --------------------------------------------------------------------------------------------
# Score equations
# --------------------------------------------------------------------------------------------


def logits_of(*probabilities: list[float]) -> torch.Tensor:
    return torch.tensor(probabilities, dtype=torch.float64).log()


def test_loss_score_is_log_p_y():
    logits = torch.tensor([[0.0, LN3], [0.0, LN3]])  # p = (1/4, 3/4)
    scores = loss_scores(logits, torch.tensor([1, 0]))
    torch.testing.assert_close(scores, torch.tensor([math.log(0.75), math.log(0.25)], dtype=torch.float64))


def test_modified_entropy_by_hand():
    logits = logits_of([0.5, 0.25, 0.25], [0.5, 0.25, 0.25])
    scores = modified_entropy_scores(logits, torch.tensor([0, 1]))
    # Mentr = −(1 − p_y) log p_y − Σ_{i≠y} p_i log(1 − p_i)
    label_0 = -(0.5 * math.log(0.5)) - 2 * 0.25 * math.log(0.75)
    label_1 = -(0.75 * math.log(0.25)) - 0.5 * math.log(0.5) - 0.25 * math.log(0.75)
    torch.testing.assert_close(scores, -torch.tensor([label_0, label_1], dtype=torch.float64))


def test_modified_entropy_stays_finite_on_confident_logits():
    # p_0 = 1/(1 + 2e^-100) rounds to 1: log(1 − p_0) must come from the other classes.
    logits = torch.tensor([[100.0, 0.0, 0.0], [100.0, 0.0, 0.0]])
    scores = modified_entropy_scores(logits, torch.tensor([0, 1]))
    assert torch.isfinite(scores).all()
    assert scores[0] == pytest.approx(0.0, abs=1e-40)  # confident and right: Mentr = 0
    # Confident and wrong: −(1 − p_1)·log p_1 − p_0·log(1 − p_0) ≈ 100 + (100 − ln 2).
    assert scores[1] == pytest.approx(-(200.0 - LN2), rel=1e-12)


def test_logit_confidence_by_hand():
    logits = torch.tensor([[0.0, LN3], [0.0, LN3]])  # p = (1/4, 3/4)
    phi = logit_confidence(logits, torch.tensor([1, 0]))
    torch.testing.assert_close(phi, torch.tensor([LN3, -LN3], dtype=torch.float64))
    # p_y/(1 − p_y) = e^50 / 2: finite where float32 p_y is exactly 1.
    extreme = logit_confidence(torch.tensor([[50.0, 0.0, 0.0]]), torch.tensor([0]))
    assert extreme.item() == pytest.approx(50.0 - LN2, rel=1e-14)


def binary_logits(phi_values: list[float], labels: list[int]) -> torch.Tensor:
    """Two-class logits whose φ for the given label is exactly the given value."""
    rows = [[0.0, v] if y == 1 else [v, 0.0] for v, y in zip(phi_values, labels)]
    return torch.tensor(rows, dtype=torch.float64)


def test_calibrated_score_standardises_per_class():
    ref_phi = [1.0, 2.0, 3.0, 4.0, 5.0] + [-2.0, -1.0, 0.0, 1.0, 2.0]
    ref_labels = [1] * 5 + [0] * 5
    reference = binary_logits(ref_phi, ref_labels)
    scored = binary_logits([6.0, 6.0], [1, 0])
    scores = calibrated_scores(scored, torch.tensor([1, 0]), reference_logits=reference,
                               reference_labels=torch.tensor(ref_labels))
    # Class 1: μ = 3, σ = √2.5; class 0: μ = 0, σ = √2.5 (sample std, Bessel).
    expected = torch.tensor([(6 - 3) / math.sqrt(2.5), 6 / math.sqrt(2.5)], dtype=torch.float64)
    torch.testing.assert_close(scores, expected)


def test_calibration_falls_back_to_all_classes_for_a_rare_class():
    phi = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 10.0], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 0, 0, 1])
    stats = ClassStatistics.fit(phi, labels, num_classes=3, min_class_count=5)
    assert stats.mean[0] == 3.0 and stats.std[0] == pytest.approx(math.sqrt(2.5))
    for c in (1, 2):  # one example, none: the global Gaussian
        assert stats.mean[c] == pytest.approx(phi.mean().item())
        assert stats.std[c] == pytest.approx(phi.std().item())
    assert stats.counts.tolist() == [5, 1, 0]
    constant = ClassStatistics.fit(torch.ones(6, dtype=torch.float64), torch.zeros(6, dtype=torch.long),
                                   num_classes=1)
    assert constant.std[0] > 0  # floored: no division by zero


def test_score_inputs_are_checked():
    with pytest.raises(ValueError, match="labels must be in"):
        loss_scores(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="C >= 2"):
        logit_confidence(torch.zeros(2, 1), torch.tensor([0, 0]))


def test_attack_registry():
    assert set(ATTACK_ORDER) == set(ATTACKS.names())
    with pytest.raises(UnknownNameError, match="valid: calibrated, loss, mentr"):
        ATTACKS.get("shadow")


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def test_split_reference_is_a_disjoint_cover():
    reference, evaluation = split_reference(11, generator=torch.Generator().manual_seed(0))
    assert len(reference) == 5 and len(evaluation) == 6
    assert sorted(torch.cat([reference, evaluation]).tolist()) == list(range(11))
    again = split_reference(11, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], reference)


def test_balanced_subsample_sizes_and_seed():
    members, non_members = torch.arange(100, 150), torch.arange(30)
    m, n = balanced_subsample(members, non_members, max_examples=1000,
                              generator=torch.Generator().manual_seed(1))
    assert len(m) == len(n) == 30 and set(m.tolist()) <= set(members.tolist())
    assert torch.equal(n, non_members)
    m2, n2 = balanced_subsample(members, non_members, max_examples=10,
                                generator=torch.Generator().manual_seed(1))
    assert len(m2) == len(n2) == 10 and len(set(m2.tolist())) == 10


def test_class_matched_subsample_gives_equal_histograms():
    member_labels = torch.tensor([0] * 40 + [1] * 5 + [2] * 10)
    members = torch.arange(len(member_labels)) + 1000
    non_member_labels = torch.tensor([0] * 8 + [1] * 8 + [3] * 8)
    non_members = torch.arange(len(non_member_labels))
    m, n = class_matched_subsample(members, member_labels, non_members, non_member_labels,
                                   max_examples=100, generator=torch.Generator().manual_seed(0))
    # min per class: class 0 → 8, class 1 → 5, classes 2 and 3 → 0.
    assert len(m) == len(n) == 13
    assert torch.bincount(member_labels[m - 1000], minlength=4).tolist() == [8, 5, 0, 0]
    assert torch.bincount(non_member_labels[n], minlength=4).tolist() == [8, 5, 0, 0]
    # Capped at 6: 8·6/13 = 3.69 and 5·6/13 = 2.31 → floors 3 + 2, the remainder to class 0.
    m, n = class_matched_subsample(members, member_labels, non_members, non_member_labels,
                                   max_examples=6, generator=torch.Generator().manual_seed(0))
    assert torch.bincount(member_labels[m - 1000], minlength=4).tolist() == [4, 2, 0, 0]
    assert torch.bincount(non_member_labels[n], minlength=4).tolist() == [4, 2, 0, 0]
    assert len(set(m.tolist())) == 6 and len(set(n.tolist())) == 6


def manifest(histogram: list[int], *, config_hash: str = "other", privacy=None) -> SimpleNamespace:
    return SimpleNamespace(name="client_0", train_size=sum(histogram), class_histogram=histogram,
                           config_hash=config_hash, privacy=privacy)


def test_partition_check_names_the_teacher(caplog):
    labels, members = torch.tensor([0, 1, 1, 2]), torch.tensor([1, 2])
    _check_partition(manifest([0, 2, 0]), members, labels, 3, ".", expected_hash="h")
    with pytest.raises(UserError, match="client_0.*another data/partition/seed config"):
        _check_partition(manifest([1, 1, 0]), members, labels, 3, ".", expected_hash="h")
    # The same config hash proves the partition; a DP teacher's counts are noisy: only a warning.
    _check_partition(manifest([1, 1, 0], config_hash="h"), members, labels, 3, ".", expected_hash="h")
    _check_partition(manifest([1, 1, 0], privacy={"epsilon": 1.0}), members, labels, 3, ".",
                     expected_hash="h")
    assert "cannot be checked" in caplog.text


# --------------------------------------------------------------------------------------------
# A memorising model against a constant one
# --------------------------------------------------------------------------------------------


def memorised_model(images: torch.Tensor, labels: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(images.shape[1], 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model.eval()


def test_memorisation_is_detected_and_a_constant_model_is_chance():
    g = torch.Generator().manual_seed(0)
    # Random labels: nothing to generalise, the model can only memorise its members.
    x = torch.randn(96, 16, generator=g)
    y = torch.randint(0, 4, (96,), generator=g)
    members, non_members, reference = slice(0, 32), slice(32, 64), slice(64, 96)
    # Class-matched, as the audit samples them: the class alone then tells nothing.
    y[non_members] = y[members][torch.randperm(32, generator=g)]
    model = memorised_model(x[members], y[members])
    with torch.no_grad():
        logits = model(x)
        train_accuracy = (logits[members].argmax(1) == y[members]).float().mean().item()
    assert train_accuracy == 1.0
    results = attack_model(logits[members], y[members], logits[non_members], y[non_members],
                           reference_logits=logits[reference], reference_labels=y[reference])
    assert results["loss"].auc > 0.9
    assert results["mentr"].auc > 0.9
    assert results["calibrated"].auc > 0.8
    assert results["loss"].members == results["loss"].non_members == 32

    constant = torch.zeros(96, 4)  # a model that outputs the same logits for everything
    chance = attack_model(constant[members], y[members], constant[non_members], y[non_members],
                          reference_logits=constant[reference], reference_labels=y[reference])
    for name in ("loss", "mentr", "calibrated"):
        assert chance[name].auc == pytest.approx(0.5, abs=1e-12)
        assert chance[name].tpr_at_low_fpr == 0.0
    assert chance["loss"].auc == 0.5  # every score is log(1/4): one tie
    table = format_table({"model": results}).splitlines()
    assert table[0].split() == ["target", "attack", "AUC", "TPR@1%FPR", "members", "non-members"]
    assert len(table) == 1 + len(ATTACK_ORDER)
