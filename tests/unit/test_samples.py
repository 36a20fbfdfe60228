"""Pseudo-batches and their uint8 wire form (fed_dfkd.samples), and derived seeds (fed_dfkd.seeding)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from fed_dfkd.models import build_generator
from fed_dfkd.samples import as_float_images, dequantize_images, draw_pseudo_batches, quantize_images
from fed_dfkd.seeding import derive_seed, make_rng


def small_generator(seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_generator("dcgan", latent_dim=16, width=8, depth=2, image_size=8, channels=1)


def cloned_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------------------------
# quantize / dequantize
# --------------------------------------------------------------------------------------------


def test_quantize_round_trip_error_is_at_most_half_a_level():
    images = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images = torch.cat([images.flatten(), torch.tensor([0.0, 1.0, 0.5 / 255, 1.5 / 255, 254.5 / 255])])
    restored = dequantize_images(quantize_images(images))
    assert (restored - images).abs().max() <= 1 / 510 + 1e-7


def test_quantize_dtypes_and_range():
    images = torch.tensor([-0.5, 0.0, 0.2, 1.0, 3.0], dtype=torch.float64)
    quantized = quantize_images(images)
    assert quantized.dtype == torch.uint8
    assert quantized.tolist() == [0, 0, 51, 255, 255]  # clamped to [0, 1] first; 0.2·255 = 51
    restored = dequantize_images(quantized)
    assert restored.dtype == torch.float32
    assert restored.min() >= 0 and restored.max() <= 1


def test_every_uint8_level_survives_a_round_trip():
    levels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(quantize_images(dequantize_images(levels)), levels)


def test_quantize_detaches():
    images = torch.rand(4, requires_grad=True)
    assert not quantize_images(images).requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.int8])
def test_dequantize_takes_uint8_only(dtype):
    with pytest.raises(TypeError, match="uint8"):
        dequantize_images(torch.zeros(3, dtype=dtype))


def test_as_float_images_passes_floats_through_and_dequantizes_uint8():
    floats = torch.rand(2, 1, 4, 4)
    assert as_float_images(floats) is floats
    as_uint8 = torch.tensor([0, 255], dtype=torch.uint8)
    assert torch.equal(as_float_images(as_uint8), torch.tensor([0.0, 1.0]))


# --------------------------------------------------------------------------------------------
# draw_pseudo_batches
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantize, dtype", [(True, torch.uint8), (False, torch.float32)])
def test_draw_shape_and_dtype(quantize, dtype):
    samples = draw_pseudo_batches(small_generator(), num_batches=3, batch_size=5,
                                  rng=torch.Generator().manual_seed(0), quantize=quantize)
    assert samples.shape == (3, 5, 1, 8, 8)
    assert samples.dtype == dtype
    assert not samples.requires_grad
    if not quantize:
        assert samples.min() >= 0 and samples.max() <= 1


def test_quantized_draws_are_the_float_draws_quantized():
    generator = small_generator()
    as_float = draw_pseudo_batches(generator, num_batches=2, batch_size=4,
                                   rng=torch.Generator().manual_seed(3), quantize=False)
    as_uint8 = draw_pseudo_batches(generator, num_batches=2, batch_size=4,
                                   rng=torch.Generator().manual_seed(3), quantize=True)
    assert torch.equal(as_uint8, quantize_images(as_float))


def test_draws_are_determined_by_the_rng():
    generator = small_generator()

    def draw(seed: int) -> torch.Tensor:
        return draw_pseudo_batches(generator, num_batches=2, batch_size=4,
                                   rng=torch.Generator().manual_seed(seed), quantize=False)

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    # The global RNG plays no part.
    torch.manual_seed(123)
    first = draw(5)
    torch.manual_seed(456)
    assert torch.equal(first, draw(5))


def test_batches_within_a_draw_differ():
    samples = draw_pseudo_batches(small_generator(), num_batches=2, batch_size=4,
                                  rng=torch.Generator().manual_seed(0), quantize=False)
    assert not torch.equal(samples[0], samples[1])


def test_draws_use_running_statistics_so_a_sample_does_not_depend_on_its_batch():
    generator = small_generator()
    batch_of_eight = draw_pseudo_batches(generator, num_batches=1, batch_size=8,
                                         rng=torch.Generator().manual_seed(7), quantize=False)[0]
    # The first four latents of the same stream, drawn as a batch of four.
    latents = torch.randn(8, 16, generator=torch.Generator().manual_seed(7))
    generator.eval()
    with torch.no_grad():
        expected = generator(latents[:4])
    assert torch.allclose(batch_of_eight[:4], expected, atol=1e-6)


def test_batch_statistics_draws_normalise_each_batch_by_itself():
    generator = small_generator()
    drawn = draw_pseudo_batches(generator, num_batches=1, batch_size=8, quantize=False,
                                rng=torch.Generator().manual_seed(7), batch_statistics=True)[0]
    latents = torch.randn(8, 16, generator=torch.Generator().manual_seed(7))
    reference = small_generator()
    reference.train()
    with torch.no_grad():
        expected = reference(latents)
    assert torch.allclose(drawn, expected, atol=1e-6)
    running = draw_pseudo_batches(generator, num_batches=1, batch_size=8, quantize=False,
                                  rng=torch.Generator().manual_seed(7))[0]
    assert not torch.allclose(drawn, running, atol=1e-3)


@pytest.mark.parametrize("batch_statistics", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_draw_restores_the_generators_mode_and_leaves_its_state(training, batch_statistics):
    generator = small_generator()
    generator.train(training)
    before = cloned_state(generator)
    momenta = [m.momentum for m in generator.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert momenta
    draw_pseudo_batches(generator, num_batches=2, batch_size=4, rng=torch.Generator().manual_seed(0),
                        batch_statistics=batch_statistics)
    assert [m.momentum for m in generator.modules() if isinstance(m, torch.nn.BatchNorm2d)] == momenta
    assert generator.training is training
    after = cloned_state(generator)
    assert all(torch.equal(before[k], after[k]) for k in before), "BN running stats must not move"


def test_draw_restores_the_mode_when_the_generator_raises(monkeypatch):
    generator = small_generator()
    generator.train()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(generator, "sample_latent", broken)
    with pytest.raises(RuntimeError, match="boom"):
        draw_pseudo_batches(generator, num_batches=1, batch_size=2, rng=torch.Generator())
    assert generator.training


# --------------------------------------------------------------------------------------------
# derive_seed / make_rng
# --------------------------------------------------------------------------------------------


def test_derive_seed_is_stable_across_versions_and_processes():
    # sha256("0/pseudo-batches/3"), first 8 bytes big-endian, shifted right by one: pinned so that
    # a change of the derivation (which would change every run's random streams) is noticed.
    expected = int.from_bytes(hashlib.sha256(b"0/pseudo-batches/3").digest()[:8], "big") >> 1
    assert derive_seed(0, "pseudo-batches", 3) == expected == 5302487855470811775
    assert derive_seed(0, "pseudo-batches", 3) == derive_seed(0, "pseudo-batches", 3)


def test_derive_seed_is_a_63_bit_integer():
    for keys in [(), ("a",), ("generator-steps", 0), ("x", 10**6)]:
        value = derive_seed(2**40, *keys)
        assert isinstance(value, int) and 0 <= value < 2**63


def test_derive_seed_differs_per_seed_purpose_round_and_order():
    seeds = {
        derive_seed(seed, purpose, r)
        for seed in (0, 1)
        for purpose in ("pseudo-batches", "generator-steps", "student-init", "generator-init")
        for r in range(20)
    }
    assert len(seeds) == 2 * 4 * 20
    assert derive_seed(0, "a", "b") != derive_seed(0, "b", "a")
    assert derive_seed(0, "a") != derive_seed(0, "a", 0)
    assert derive_seed(0) != derive_seed(1)


def test_make_rng_is_seeded_with_the_derived_seed():
    rng = make_rng(3, "pseudo-batches", 2)
    assert rng.initial_seed() == derive_seed(3, "pseudo-batches", 2)
    assert torch.equal(torch.rand(4, generator=rng),
                       torch.rand(4, generator=torch.Generator().manual_seed(derive_seed(3, "pseudo-batches", 2))))
    assert rng.device == torch.device("cpu")
