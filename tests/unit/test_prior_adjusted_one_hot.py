"""The one-hot term judged under a uniform class prior (``method.one_hot_prior_adjustment``);
its use by owners and the central loop is tested in test_class_prior.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fed_dfkd.losses import prior_adjusted_cross_entropy

SKEWED = [900, 90, 10, 0, 0, 0, 0, 0, 0, 0]


def test_closed_form_on_two_samples() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, 5.0], [0.0, 3.0, 1.0, -1.0]])
    counts = torch.tensor([100.0, 10.0, 1.0, 0.0])
    labels = torch.tensor([0, 2])
    # Sample 0: class 3 is unseen and not asked -> out; s = (2 - ln 100, 1 - ln 10, 0 - 0).
    s0 = [2 - math.log(100), 1 - math.log(10), 0.0]
    l0 = -s0[0] + math.log(sum(math.exp(v) for v in s0))
    s1 = [0 - math.log(100), 3 - math.log(10), 1.0]
    l1 = -s1[2] + math.log(sum(math.exp(v) for v in s1))
    loss = prior_adjusted_cross_entropy(logits, labels, class_counts=counts, strength=1.0)
    assert float(loss) == pytest.approx((l0 + l1) / 2, abs=1e-6)
    # At half strength the corrections halve.
    h0 = [2 - 0.5 * math.log(100), 1 - 0.5 * math.log(10), 0.0]
    h1 = [0 - 0.5 * math.log(100), 3 - 0.5 * math.log(10), 1.0]
    expected = (-h0[0] + math.log(sum(map(math.exp, h0))) - h1[2] + math.log(sum(map(math.exp, h1)))) / 2
    assert float(prior_adjusted_cross_entropy(logits, labels, class_counts=counts, strength=0.5)) == (
        pytest.approx(expected, abs=1e-6))


def test_a_majority_class_is_harder_to_satisfy_than_under_the_plain_term() -> None:
    # The skewed teacher's answer: class 0 on top mostly because of its prior.
    logits = torch.tensor([[4.0, 2.5, 0.5, 0.0, 0, 0, 0, 0, 0, 0]])
    counts = torch.tensor(SKEWED, dtype=torch.float32)
    asked = torch.tensor([0])
    plain = prior_adjusted_cross_entropy(logits, asked, class_counts=counts, strength=0.0)
    adjusted = prior_adjusted_cross_entropy(logits, asked, class_counts=counts, strength=1.0)
    assert float(adjusted) > float(plain) + 1.0


def test_uniform_counts_and_strength_zero_give_the_plain_cross_entropy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 5)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    plain = F.cross_entropy(logits, labels)
    for strength in (0.0, 0.7, 1.0, 3.0):
        got = prior_adjusted_cross_entropy(logits, labels, class_counts=torch.full((5,), 37.0), strength=strength)
        torch.testing.assert_close(got, plain)
    skewed = torch.tensor([5.0, 50.0, 500.0, 1.0, 2.0])
    torch.testing.assert_close(
        prior_adjusted_cross_entropy(logits, labels, class_counts=skewed, strength=0.0), plain)


def test_an_unseen_class_has_no_say_unless_it_is_asked_for() -> None:
    logits = torch.tensor([[1.0, 0.5, -2.0]])
    counts = torch.tensor([10.0, 20.0, 0.0])
    labels = torch.tensor([0])
    base = prior_adjusted_cross_entropy(logits, labels, class_counts=counts)
    louder = logits.clone()
    louder[0, 2] = 50.0
    torch.testing.assert_close(prior_adjusted_cross_entropy(louder, labels, class_counts=counts), base)
    # Asked for the unseen class: its raw logit competes with the seen ones (count taken as 1).
    asked = prior_adjusted_cross_entropy(logits, torch.tensor([2]), class_counts=counts)
    s = [1.0 - math.log(10), 0.5 - math.log(20), -2.0]
    assert float(asked) == pytest.approx(-s[2] + math.log(sum(map(math.exp, s))), abs=1e-6)
    assert math.isfinite(float(asked))


def test_without_labels_the_adjusted_argmax_is_the_target() -> None:
    logits = torch.tensor([[3.0, 2.0, 9.0], [1.0, 1.2, 0.0]])
    counts = torch.tensor([1000.0, 1.0, 0.0])  # class 2 unseen: never the target
    got = prior_adjusted_cross_entropy(logits, None, class_counts=counts)
    # Adjusted: sample 0 (3 - 6.91, 2) -> class 1; sample 1 (1 - 6.91, 1.2) -> class 1.
    expected = prior_adjusted_cross_entropy(logits, torch.tensor([1, 1]), class_counts=counts)
    torch.testing.assert_close(got, expected)


def test_gradients_reach_the_logits() -> None:
    logits = torch.zeros(2, 3, requires_grad=True)
    prior_adjusted_cross_entropy(logits, torch.tensor([0, 1]), class_counts=torch.tensor([9.0, 1.0, 1.0])).backward()
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())
    assert float(logits.grad[0, 0]) < 0 and float(logits.grad[1, 1]) < 0


@pytest.mark.parametrize("kwargs, message", [
    ({"class_counts": torch.ones(4)}, "class_counts"),
    ({"class_counts": torch.tensor([1.0, -1.0, 1.0])}, "class_counts"),
    ({"class_counts": torch.tensor([1.0, float("nan"), 1.0])}, "class_counts"),
    ({"class_counts": torch.ones(3), "strength": -0.5}, "strength"),
    ({"class_counts": torch.zeros(3), "labels": None}, "no class"),
])
def test_bad_inputs_name_what_is_wrong(kwargs, message) -> None:
    labels = kwargs.pop("labels", torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=message):
        prior_adjusted_cross_entropy(torch.zeros(2, 3), labels, **kwargs)
    with pytest.raises(ValueError, match="labels"):
        prior_adjusted_cross_entropy(torch.zeros(2, 3), torch.tensor([0]), class_counts=torch.ones(3))
