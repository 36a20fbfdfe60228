"""MixUp queries (``distill.mixup_queries``): blends of pooled pairs (:func:`fed_dfkd.augment.blend_pairs`)
that travel with the round's samples for the teachers to label."""

from __future__ import annotations

import pytest
import torch

from fed_dfkd.augment import blend_pairs
from fed_dfkd.config import ConfigError, config_from_dict
from fed_dfkd.coordinator import Coordinator
from fed_dfkd.data import DatasetInfo
from fed_dfkd.seeding import make_rng

INFO = DatasetInfo("digits", 10, 1, 8, (0.5,), (0.25,), tuple(str(i) for i in range(10)))


def one_hot_images(n: int, scale: float = 1.0) -> torch.Tensor:
    """Image k lights pixel k alone: a blend's two lit pixels name its pair and its λ."""
    return (torch.eye(n) * scale).view(n, 1, 1, n)


def test_every_blend_mixes_two_distinct_images_with_weights_summing_to_one() -> None:
    images = one_hot_images(16)
    blends = blend_pairs(images, 4000, alpha=1.0, generator=torch.Generator().manual_seed(0))
    assert blends.shape == (4000, 1, 1, 16) and blends.dtype == torch.float32
    flat = blends.flatten(1)
    lit = (flat > 0).sum(1)
    # Two distinct images per blend (one lit pixel only where λ is exactly 0 or 1: never here).
    assert lit.eq(2).all()
    torch.testing.assert_close(flat.sum(1), torch.ones(4000))
    # Every image takes part, about equally often (each 2/16 of the draws, 500 of 4000).
    uses = (flat > 0).sum(0).float()
    assert uses.min() > 380 and uses.max() < 620


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_blend_weights_follow_beta_alpha_alpha(alpha: float) -> None:
    """E[λ(1 − λ)] = α / (2(2α + 1)) for λ ~ Beta(α, α): 0.0714, 0.1667, 0.2222."""
    blends = blend_pairs(one_hot_images(8), 20000, alpha=alpha, generator=torch.Generator().manual_seed(1))
    flat = blends.flatten(1).double()
    pairs = flat.topk(2, dim=1).values
    product = (pairs[:, 0] * pairs[:, 1]).mean()
    assert abs(float(product) - alpha / (2 * (2 * alpha + 1))) < 0.004


def test_uint8_blends_are_rounded_like_the_wire_and_seeded() -> None:
    images = one_hot_images(10, 255.0).to(torch.uint8)
    first = blend_pairs(images, 64, alpha=1.0, generator=torch.Generator().manual_seed(3))
    assert first.dtype == torch.uint8
    lit = first.flatten(1).int()
    assert (lit.sum(1) - 255).abs().le(1).all()  # λ·255 and (1 − λ)·255, each rounded
    assert torch.equal(first, blend_pairs(images, 64, alpha=1.0, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(first, blend_pairs(images, 64, alpha=1.0, generator=torch.Generator().manual_seed(4)))
    # A pool of one image can only blend it with itself.
    single = blend_pairs(images[:1], 5, alpha=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(single, images[:1].expand(5, -1, -1, -1))
    with pytest.raises(ValueError, match="alpha > 0"):
        blend_pairs(images, 4, alpha=0.0, generator=torch.Generator())


def test_coordinator_appends_whole_batches_of_pool_blends_after_the_hard_ones(pool_config) -> None:
    cfg = pool_config(mixup_queries=16, mixup_query_alpha=0.5, hard_samples=8)
    c = Coordinator(cfg, INFO)
    assert c.mixup_query_batches() is None  # nothing pooled yet: the first round has none
    samples = c.draw_samples()
    assert torch.equal(c.with_query_batches(samples), samples)
    c.train_student(samples, torch.randn(2, 8, 10))
    c.end_round()
    queries = c.mixup_query_batches()
    assert queries.shape == (2, 8, 1, 8, 8) and queries.dtype == torch.uint8
    pool = c.replay.samples()[0]
    expected = blend_pairs(pool, 16, alpha=0.5, generator=make_rng(cfg.runtime.seed, "mixup-queries", c.round))
    assert torch.equal(queries.flatten(0, 1), expected)
    assert torch.equal(queries, c.mixup_query_batches())  # the round's seeded stream
    sent = c.with_query_batches(samples)
    # The round's two batches, one hard batch, then the two batches of blends.
    assert sent.shape[:2] == (5, 8)
    assert torch.equal(sent[:2], samples) and torch.equal(sent[2], c.hard_batches()[0])
    assert torch.equal(sent[3:], queries)
    c.end_round()
    assert not torch.equal(queries, c.mixup_query_batches())
    assert Coordinator(pool_config(), INFO).mixup_query_batches() is None


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"distill": {"batch_size": 8, "mixup_queries": 12}}, "distill.mixup_queries"),
     ({"distill": {"batch_size": 8, "mixup_queries": -8}}, "distill.mixup_queries"),
     ({"distill": {"mixup_query_alpha": 0}}, "distill.mixup_query_alpha"),
     ({"distill": {"batch_size": 8, "mixup_queries": 8, "quantize_samples": True},
       "federation": {"sample_transport": "seed"}}, "distill.mixup_queries")],
)
def test_bad_mixup_query_settings_name_the_field(overrides, field) -> None:
    raw = {"data": {"dataset": "digits"}, "models": {"teacher": "cnn_digits", "student": "cnn_digits"},
           **overrides}
    with pytest.raises(ConfigError, match=field):
        config_from_dict(raw)
