"""Aggregating K teachers' logits into one target (fed_dfkd.aggregation): closed forms, bad input,
robustness to a corrupted teacher."""

from __future__ import annotations

import pytest
import torch

from fed_dfkd.aggregation import LOGIT_RULES, aggregate_logits


def stacked(*rows: list[float]) -> torch.Tensor:
    """K teachers, one sample, len(row) classes: [K, 1, C]."""
    return torch.tensor(rows, dtype=torch.float32)[:, None, :]


def test_the_rules_are_the_ones_the_config_offers():
    from typing import get_args, get_type_hints

    from fed_dfkd.config import DistillConfig

    assert set(get_args(get_type_hints(DistillConfig)["ensemble"])) == set(LOGIT_RULES)


def test_mean():
    logits = stacked([1.0, 2.0], [3.0, 6.0], [5.0, 1.0])
    assert torch.equal(aggregate_logits(logits, rule="mean"), torch.tensor([[3.0, 3.0]]))


def test_weighted_normalises_the_weights():
    logits = stacked([1.0, 0.0], [5.0, 4.0])
    out = aggregate_logits(logits, rule="weighted", weights=[1.0, 3.0])
    assert torch.allclose(out, torch.tensor([[4.0, 3.0]]))
    # Scaling every weight changes nothing; a tensor works like a list.
    assert torch.allclose(aggregate_logits(logits, rule="weighted", weights=torch.tensor([10.0, 30.0])), out)


def test_weighted_with_equal_weights_is_the_mean():
    logits = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(0))
    out = aggregate_logits(logits, rule="weighted", weights=[2, 2, 2, 2])
    assert torch.allclose(out, logits.mean(dim=0), atol=1e-6)


def test_weighted_with_a_zero_weight_ignores_that_teacher():
    logits = stacked([1.0, 2.0], [100.0, -100.0])
    assert torch.allclose(aggregate_logits(logits, rule="weighted", weights=[1.0, 0.0]), torch.tensor([[1.0, 2.0]]))


def test_median_of_an_odd_count_is_the_middle_value():
    logits = stacked([1.0, 9.0], [7.0, 2.0], [3.0, 4.0])
    assert torch.equal(aggregate_logits(logits, rule="median"), torch.tensor([[3.0, 4.0]]))


def test_median_of_an_even_count_is_the_mean_of_the_two_middle_values():
    # torch.median alone would return the lower middle value (2 and 3 here).
    logits = stacked([1.0, 10.0], [4.0, 3.0], [2.0, 5.0], [8.0, 0.0])
    assert torch.equal(aggregate_logits(logits, rule="median"), torch.tensor([[3.0, 4.0]]))
    assert torch.equal(aggregate_logits(stacked([1.0], [2.0]), rule="median"), torch.tensor([[1.5]]))


def test_median_and_trimmed_mean_of_one_teacher_are_that_teacher():
    logits = stacked([1.0, -2.0, 3.5])
    for rule in ("mean", "median", "trimmed_mean"):
        assert torch.equal(aggregate_logits(logits, rule=rule), logits[0])


def test_trimmed_mean_drops_the_extremes_per_entry():
    logits = stacked([0.0, 50.0], [1.0, 2.0], [2.0, 3.0], [3.0, 4.0], [100.0, -60.0])
    # trim 0.2 of 5 = 1 from each end, entry by entry: mean(1, 2, 3) and mean(2, 3, 4).
    assert torch.allclose(aggregate_logits(logits, rule="trimmed_mean", trim_fraction=0.2), torch.tensor([[2.0, 3.0]]))


def test_trimmed_mean_with_zero_trim_is_the_mean():
    logits = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(aggregate_logits(logits, rule="trimmed_mean", trim_fraction=0.0), logits.mean(0), atol=1e-6)


def test_trim_count_rounds_down():
    logits = stacked([0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [6.0], [7.0], [8.0], [100.0])
    # 0.25 of 10 = 2.5 -> 2 from each end: mean(2..7) = 4.5.
    assert torch.allclose(aggregate_logits(logits, rule="trimmed_mean", trim_fraction=0.25), torch.tensor([[4.5]]))


def test_the_output_shape_is_samples_by_classes():
    logits = torch.randn(3, 7, 10, generator=torch.Generator().manual_seed(2))
    histograms = torch.arange(30, dtype=torch.float32).reshape(3, 10)
    for rule in LOGIT_RULES:
        out = aggregate_logits(logits, rule=rule, weights=histograms)
        assert out.shape == (7, 10) and out.dtype == logits.dtype


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights, message",
    [
        (None, "needs weights"),
        ([1.0, 2.0], "need 3 weights"),
        ([1.0, 2.0, 3.0, 4.0], "need 3 weights"),
        ([1.0, -1.0, 1.0], "non-negative"),
        ([0.0, 0.0, 0.0], "not all zero"),
        ([1.0, float("nan"), 1.0], "finite"),
        ([1.0, float("inf"), 1.0], "finite"),
    ],
)
def test_bad_weights_raise(weights, message):
    with pytest.raises(ValueError, match=message):
        aggregate_logits(torch.zeros(3, 2, 4), rule="weighted", weights=weights)


@pytest.mark.parametrize("shape", [(2, 4), (3, 2, 4, 1), (5,)])
def test_logits_must_be_teachers_by_samples_by_classes(shape):
    with pytest.raises(ValueError, match="teachers, samples, classes"):
        aggregate_logits(torch.zeros(shape), rule="mean")


def test_an_unknown_rule_lists_the_valid_ones():
    with pytest.raises(ValueError) as raised:
        aggregate_logits(torch.zeros(2, 1, 3), rule="max")
    for rule in LOGIT_RULES:
        assert rule in str(raised.value)


@pytest.mark.parametrize("trim_fraction", [-0.1, 0.5, 0.9])
def test_a_bad_trim_fraction_raises(trim_fraction):
    with pytest.raises(ValueError, match="trim_fraction"):
        aggregate_logits(torch.zeros(4, 1, 3), rule="trimmed_mean", trim_fraction=trim_fraction)


# --------------------------------------------------------------------------------------------
# Robustness
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_robust_rules_ignore_one_corrupted_teacher(rule, sign):
    rng = torch.Generator().manual_seed(3)
    honest = torch.randn(4, 16, 10, generator=rng)
    corrupted = torch.cat([honest, torch.full((1, 16, 10), sign * 1e6)])
    robust = aggregate_logits(corrupted, rule=rule)
    # Every entry stays within the honest teachers' range, and so do the predicted classes'
    # logits: the huge teacher moves nothing far.
    low, high = honest.min(dim=0).values, honest.max(dim=0).values
    assert bool(((robust >= low - 1e-6) & (robust <= high + 1e-6)).all())
    assert robust.abs().max() < 10
    # The plain mean is dragged away: the contrast that makes the test meaningful.
    assert aggregate_logits(corrupted, rule="mean").abs().min() > 1e5


def test_class_weighted_takes_each_class_from_the_teachers_that_saw_it():
    # Teacher 0 saw only class 0, teacher 1 only class 1: p = (0.9, 0.8) renormalised.
    logits = torch.log(torch.tensor([[[0.9, 0.1]], [[0.2, 0.8]]]))
    out = aggregate_logits(logits, rule="class_weighted", weights=[[10, 0], [0, 10]])
    assert torch.allclose(out.exp(), torch.tensor([[0.9 / 1.7, 0.8 / 1.7]]), atol=1e-6)


def test_class_weighted_with_equal_histograms_is_the_mean_of_probabilities():
    logits = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    out = aggregate_logits(logits, rule="class_weighted", weights=[[2, 2, 2, 2]] * 3)
    assert torch.allclose(out.exp(), logits.softmax(-1).mean(0), atol=1e-6)


def test_class_weighted_lets_everyone_vote_on_a_class_nobody_saw():
    logits = torch.log(torch.tensor([[[0.5, 0.5]], [[0.1, 0.9]]]))
    out = aggregate_logits(logits, rule="class_weighted", weights=[[4, 0], [0, 0]])
    # class 0 from teacher 0 only (0.5); class 1 nobody saw: mean (0.5 + 0.9) / 2 = 0.7
    assert torch.allclose(out.exp(), torch.tensor([[0.5 / 1.2, 0.7 / 1.2]]), atol=1e-6)


def test_weighted_accepts_histograms_as_their_row_sums():
    logits = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    by_counts = aggregate_logits(logits, rule="weighted", weights=[[1, 2, 0, 0], [3, 3, 3, 3]])
    by_sizes = aggregate_logits(logits, rule="weighted", weights=[3, 12])
    assert torch.allclose(by_counts, by_sizes)


def test_class_weighted_rejects_a_wrong_shape():
    with pytest.raises(ValueError, match="class counts"):
        aggregate_logits(torch.zeros(2, 1, 3), rule="class_weighted", weights=[1, 2])


def test_consensus_chains_the_teachers_class_by_class():
    # Teacher 0 saw classes 0 and 1 (equally often), teacher 1 classes 1 and 2. Teacher 0 says
    # z0 - z1 = 2 and gives the class it never saw a confident 9, which must not count; teacher
    # 1 says z1 - z2 = 1. A chain, so the fit is exact whatever the weights: z = (3, 1, 0).
    logits = stacked([2.0, 0.0, 9.0], [7.0, 1.0, 0.0])
    out = aggregate_logits(logits, rule="consensus", weights=[[100, 100, 0], [0, 100, 100]])
    assert torch.allclose(out, torch.tensor([[3.0, 1.0, 0.0]]).log_softmax(-1), atol=1e-5)
    # The class-weighted ensemble mixes probabilities, where teacher 0's confident 9 on the
    # class it never saw leaves its own classes almost nothing: it ranks class 1 first.
    mixed = aggregate_logits(logits, rule="class_weighted", weights=[[100, 100, 0], [0, 100, 100]])
    assert mixed.argmax() == 1 and mixed.exp().max() < 0.5


def test_consensus_corrects_for_each_owners_class_mix():
    # One teacher trained on 3x as many class-0 examples: its logits carry log(3) of prior,
    # which the rule removes (class posteriors under a uniform prior).
    logits = stacked([torch.log(torch.tensor(3.0)).item(), 0.0])
    out = aggregate_logits(logits, rule="consensus", weights=[[300, 100]])
    assert torch.allclose(out.exp(), torch.tensor([[0.5, 0.5]]), atol=1e-5)


def test_consensus_recovers_scores_that_every_teacher_agrees_on():
    # t_kc = z_c + log n_kc + b_k (any offset per teacher and sample) on the classes teacher k
    # saw, anything on the others: the rule returns log softmax(z) for any positive counts.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, generator=g)
    counts = torch.tensor([[10.0, 50, 0, 3], [0, 20, 30, 40], [5, 0, 0, 100]])
    offsets = torch.randn(3, 6, 1, generator=g) * 5
    unseen = torch.randn(3, 6, 4, generator=g) * 10 * (counts[:, None, :] == 0)
    logits = z[None] + counts.clamp_min(1).log()[:, None, :] + offsets + unseen
    out = aggregate_logits(logits, rule="consensus", weights=counts)
    assert torch.allclose(out, z.log_softmax(-1), atol=1e-4)


def test_consensus_ignores_a_constant_added_to_one_teacher():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 4, generator=g)
    counts = [[10, 20, 0, 5], [0, 30, 30, 1], [7, 0, 9, 40]]
    shifted = logits.clone()
    shifted[1] += 12.5
    assert torch.allclose(aggregate_logits(logits, rule="consensus", weights=counts),
                          aggregate_logits(shifted, rule="consensus", weights=counts), atol=1e-5)


def test_consensus_of_teachers_that_saw_everything_equally_is_the_mean_of_logits():
    # Equal weights on a complete design: z_c = mean_k t_kc up to a common shift.
    logits = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(3))
    out = aggregate_logits(logits, rule="consensus", weights=[[50, 50, 50, 50]] * 3)
    assert torch.allclose(out, logits.mean(0).log_softmax(-1), atol=1e-5)


def test_consensus_lets_everyone_speak_on_a_class_nobody_saw():
    # Class 2 unseen: its score is the teachers' own logit, corrected as if it were a class of
    # average frequency for each of them; both say z2 - z0 = -1, and that is what comes out.
    logits = stacked([1.0, 0.0, 0.0], [1.0, 0.0, 0.0])
    out = aggregate_logits(logits, rule="consensus", weights=[[100, 100, 0], [100, 100, 0]])
    assert torch.allclose(out, torch.tensor([[1.0, 0.0, 0.0]]).log_softmax(-1), atol=1e-4)


def test_consensus_needs_class_counts_of_the_right_shape():
    with pytest.raises(ValueError, match="consensus"):
        aggregate_logits(torch.zeros(2, 1, 3), rule="consensus")
    with pytest.raises(ValueError, match="class counts"):
        aggregate_logits(torch.zeros(2, 1, 3), rule="consensus", weights=[1, 2])
