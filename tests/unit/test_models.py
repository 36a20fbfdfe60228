"""Unit tests for fed_dfkd.models: shapes, features, parameter/BN counts, generator, Normalize."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fed_dfkd.models import (
    CLASSIFIERS,
    GENERATORS,
    Classifier,
    Generator,
    Normalize,
    build_classifier,
    build_generator,
)
from fed_dfkd.registry import UnknownNameError

SMALL_CLASSIFIERS = [
    "lenet5",
    "lenet5_bn",
    "lenet5_bn_full",
    "lenet5_half",
    "lenet5_half_bn",
    "cnn_digits",
    "cnn_digits_bn",
    "cnn_digits_half",
    "cnn_digits_half_bn",
]
DIGITS_CLASSIFIERS = [name for name in SMALL_CLASSIFIERS if name.startswith("cnn_digits")]
LARGE_CLASSIFIERS = ["resnet18", "resnet34", "wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2", "vgg11_bn"]

# algorithms.md §8 at C = 10, 3×32×32: (parameters, BN layers, feature dim).
PAPER_TABLE = {
    "resnet18": (11.17e6, 20, 512),
    "resnet34": (21.28e6, 36, 512),
    "wrn40_2": (2.24e6, 37, 128),
    "wrn40_1": (0.56e6, 37, 64),
    "wrn16_2": (0.69e6, 13, 128),
    "wrn16_1": (0.175e6, 13, 64),
    "vgg11_bn": (9.23e6, 8, 512),
}
# The layer the logits come from, applied to the returned features.
HEAD_ATTRIBUTE = {
    "lenet5": "classifier",
    "cnn_digits": "fc",
    "resnet": "linear",
    "wrn": "fc",
    "vgg11_bn": "classifier",
}


def head_of(name: str, model: nn.Module) -> nn.Module:
    for prefix, attribute in HEAD_ATTRIBUTE.items():
        if name.startswith(prefix):
            return getattr(model, attribute)
    raise AssertionError(f"no head known for {name}")


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def count_batch_norms(model: nn.Module) -> int:
    return sum(isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) for module in model.modules())


def build_on_meta(name: str, **sizes: int) -> Classifier:
    # Counting needs no storage or init: build on the meta device.
    with torch.device("meta"):
        return build_classifier(name, **sizes)


def check_forward(name: str, model: Classifier, x: torch.Tensor, num_classes: int) -> None:
    model.eval()
    with torch.no_grad():
        logits = model(x)
        logits_again, features = model(x, return_features=True)
    assert logits.shape == (x.shape[0], num_classes)
    assert features.shape == (x.shape[0], model.feature_dim)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits_again, logits)
    with torch.no_grad():
        torch.testing.assert_close(head_of(name, model)(features), logits)


def test_registry_holds_exactly_the_documented_names() -> None:
    assert set(CLASSIFIERS) == set(SMALL_CLASSIFIERS) | set(LARGE_CLASSIFIERS)
    assert list(GENERATORS) == ["dcgan"]


SMALL_CASES = [(name, 1, 28) for name in SMALL_CLASSIFIERS] + [(name, 3, 32) for name in SMALL_CLASSIFIERS]
SMALL_CASES += [(name, 1, 8) for name in DIGITS_CLASSIFIERS]  # 8×8 sklearn digits


@pytest.mark.parametrize("name,channels,size", SMALL_CASES)
def test_small_classifier_shapes_and_features(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_classifier(name, num_classes=7, in_channels=channels, image_size=size)
    assert (model.num_classes, model.in_channels, model.image_size) == (7, channels, size)
    check_forward(name, model, torch.randn(2, channels, size, size), num_classes=7)


@pytest.mark.parametrize("name", LARGE_CLASSIFIERS)
def test_large_classifier_forward_on_cifar_shape(name: str) -> None:
    torch.manual_seed(0)
    model = build_classifier(name, num_classes=10, in_channels=3, image_size=32)
    check_forward(name, model, torch.randn(1, 3, 32, 32), num_classes=10)


def test_wrn_takes_grayscale_28() -> None:
    torch.manual_seed(0)
    model = build_classifier("wrn16_1", num_classes=10, in_channels=1, image_size=28)
    check_forward("wrn16_1", model, torch.randn(2, 1, 28, 28), num_classes=10)


@pytest.mark.parametrize("name", sorted(PAPER_TABLE))
def test_parameter_and_batch_norm_counts_match_the_paper_table(name: str) -> None:
    expected_parameters, expected_batch_norms, expected_feature_dim = PAPER_TABLE[name]
    model = build_on_meta(name, num_classes=10, in_channels=3, image_size=32)
    assert count_parameters(model) == pytest.approx(expected_parameters, rel=0.01)
    assert count_batch_norms(model) == expected_batch_norms
    assert model.feature_dim == expected_feature_dim


@pytest.mark.parametrize("name,expected", [("resnet18", 11.22e6), ("resnet34", 21.33e6), ("wrn40_2", 2.26e6)])
def test_parameter_counts_at_100_classes(name: str, expected: float) -> None:
    model = build_on_meta(name, num_classes=100, in_channels=3, image_size=32)
    assert count_parameters(model) == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize(
    "name,expected_parameters,expected_batch_norms,expected_feature_dim",
    [
        # conv 1→6 (156) + 6→16 (2416) + 16→120 (48120) + fc 120→84 (10164) + 84→10 (850)
        ("lenet5", 61706, 0, 120),
        # + BN(6) and BN(16): 2·22 affine parameters
        ("lenet5_bn", 61750, 2, 120),
        # + BN(120) and BN(84) as well: 2·(22 + 204) affine parameters
        ("lenet5_bn_full", 62158, 4, 120),
        # conv 1→3 (78) + 3→8 (608) + 8→60 (12060) + fc 60→42 (2562) + 42→10 (430)
        ("lenet5_half", 15738, 0, 60),
        ("lenet5_half_bn", 15760, 2, 60),
        # conv 1→32 (320) + 32→64 (18496) + 64→128 (73856) + fc 128→10 (1290)
        ("cnn_digits", 93962, 0, 128),
        # bias-free convs (−224) + BN affine 2·224
        ("cnn_digits_bn", 94186, 3, 128),
        # conv 1→16 (160) + 16→32 (4640) + 32→64 (18496) + fc 64→10 (650)
        ("cnn_digits_half", 23946, 0, 64),
    ],
)
def test_small_classifier_counts_by_hand(
    name: str, expected_parameters: int, expected_batch_norms: int, expected_feature_dim: int
) -> None:
    model = build_on_meta(name, num_classes=10, in_channels=1, image_size=32)
    assert count_parameters(model) == expected_parameters
    assert count_batch_norms(model) == expected_batch_norms
    assert model.feature_dim == expected_feature_dim


def test_lenet_pads_small_inputs_centrally_to_32() -> None:
    torch.manual_seed(0)
    model = build_classifier("lenet5", num_classes=10, in_channels=1, image_size=28).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(F.pad(x, (2, 2, 2, 2))))
        # Off-centre padding of the same image is a different input.
        assert not torch.allclose(model(x), model(F.pad(x, (0, 4, 0, 4))))


def test_lenet_features_are_post_relu() -> None:
    torch.manual_seed(0)
    model = build_classifier("lenet5_half", num_classes=10, in_channels=1, image_size=28)
    _, features = model(torch.randn(2, 1, 28, 28), return_features=True)
    assert (features >= 0).all()


def test_lenet_rejects_inputs_above_32() -> None:
    with pytest.raises(ValueError, match="36"):
        build_classifier("lenet5", num_classes=10, in_channels=1, image_size=36)


@pytest.mark.parametrize("image_size,expected_pools", [(2, 1), (8, 3), (32, 3), (64, 4)])
def test_vgg_pools_only_while_the_map_is_at_least_2(image_size: int, expected_pools: int) -> None:
    model = build_on_meta("vgg11_bn", num_classes=10, in_channels=3, image_size=image_size)
    assert sum(isinstance(module, nn.MaxPool2d) for module in model.modules()) == expected_pools


def test_vgg_takes_8x8() -> None:
    torch.manual_seed(0)
    model = build_classifier("vgg11_bn", num_classes=10, in_channels=1, image_size=8)
    check_forward("vgg11_bn", model, torch.randn(2, 1, 8, 8), num_classes=10)


def test_same_global_seed_builds_the_same_weights() -> None:
    torch.manual_seed(3)
    first = build_classifier("cnn_digits_bn", num_classes=10, in_channels=1, image_size=8)
    torch.manual_seed(3)
    second = build_classifier("cnn_digits_bn", num_classes=10, in_channels=1, image_size=8)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_classifier_is_abstract_and_checks_sizes() -> None:
    with pytest.raises(TypeError):
        Classifier(num_classes=10, feature_dim=4, in_channels=1, image_size=8)  # type: ignore[abstract]
    with pytest.raises(ValueError, match="num_classes"):
        build_classifier("cnn_digits", num_classes=0, in_channels=1, image_size=8)


@pytest.mark.parametrize("registry_builder", ["classifier", "generator"])
def test_unknown_name_lists_the_valid_names(registry_builder: str) -> None:
    with pytest.raises(UnknownNameError) as raised:
        if registry_builder == "classifier":
            build_classifier("resnet1000", num_classes=10, in_channels=3, image_size=32)
        else:
            build_generator("stylegan", latent_dim=8, width=4, depth=2, image_size=8, channels=1)
    message = str(raised.value)
    valid = CLASSIFIERS.names() if registry_builder == "classifier" else GENERATORS.names()
    assert all(name in message for name in valid)


# --- generator ---------------------------------------------------------------------------------

GENERATOR_SIZES = [
    # (latent, width, depth, size, channels, parameters): digits and Fashion-MNIST from §12.5
    (32, 16, 2, 8, 1, 31857),
    (64, 32, 2, 28, 1, 500577),
    (16, 8, 2, 32, 3, None),
]


@pytest.mark.parametrize("latent_dim,width,depth,image_size,channels,_parameters", GENERATOR_SIZES)
@pytest.mark.parametrize("init", ["dcgan", "default"])
def test_generator_output_shape_and_range(
    latent_dim: int,
    width: int,
    depth: int,
    image_size: int,
    channels: int,
    _parameters: int | None,
    init: str,
) -> None:
    torch.manual_seed(0)
    generator = build_generator(
        "dcgan",
        latent_dim=latent_dim,
        width=width,
        depth=depth,
        image_size=image_size,
        channels=channels,
        init=init,
    )
    assert isinstance(generator, Generator)
    attributes = (generator.latent_dim, generator.image_size, generator.channels)
    assert attributes == (latent_dim, image_size, channels)
    # Large latents push the Sigmoid towards its ends; the output must still stay in [0, 1].
    z = 50.0 * generator.sample_latent(2, rng=torch.Generator().manual_seed(1))
    images = generator(z)
    assert images.shape == (2, channels, image_size, image_size)
    assert images.min() >= 0.0 and images.max() <= 1.0


@pytest.mark.parametrize(
    "latent_dim,width,depth,image_size,channels,expected",
    [size for size in GENERATOR_SIZES if size[-1] is not None] + [(512, 64, 2, 32, 3, 8_776_259)],
)
def test_generator_parameter_counts(
    latent_dim: int, width: int, depth: int, image_size: int, channels: int, expected: int
) -> None:
    # CIFAR row of §1.4: Linear 512→256·8·8 (8,404,992) + BN 512 + conv 256→128 (294,912) + BN 256
    # + conv 128→64 (73,728) + BN 128 + conv 64→3 (1,731) = 8,776,259.
    with torch.device("meta"):
        generator = build_generator(
            "dcgan", latent_dim=latent_dim, width=width, depth=depth, image_size=image_size, channels=channels
        )
    assert count_parameters(generator) == expected
    assert count_batch_norms(generator) == depth + 1


def test_generator_rejects_sizes_not_divisible_by_two_to_the_depth() -> None:
    with pytest.raises(ValueError, match=r"28.*2\*\*depth = 8"):
        build_generator("dcgan", latent_dim=8, width=4, depth=3, image_size=28, channels=1)
    with pytest.raises(ValueError, match="init"):
        build_generator("dcgan", latent_dim=8, width=4, depth=2, image_size=8, channels=1, init="xavier")


def test_generator_dcgan_init_statistics() -> None:
    fashion_sizes = dict(latent_dim=64, width=32, depth=2, image_size=28, channels=1)
    torch.manual_seed(0)
    dcgan = build_generator("dcgan", **fashion_sizes, init="dcgan")
    torch.manual_seed(0)
    default = build_generator("dcgan", **fashion_sizes, init="default")
    # Linear 64→6272: 401,408 weights, so the sample std is within ~0.1% of 0.02.
    assert dcgan.project.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert dcgan.project.weight.mean().abs().item() < 1e-3
    assert (dcgan.project.bias == 0).all()
    # PyTorch's default Linear init is U(±1/sqrt(64)), std 1/sqrt(3·64) ≈ 0.072.
    assert default.project.weight.std().item() == pytest.approx(64**-0.5 / 3**0.5, rel=0.02)
    dcgan_bn = [module for module in dcgan.modules() if isinstance(module, nn.BatchNorm2d)]
    default_bn = [module for module in default.modules() if isinstance(module, nn.BatchNorm2d)]
    first_bn_weight = dcgan_bn[0].weight  # 128 values ~ N(1, 0.02)
    assert first_bn_weight.mean().item() == pytest.approx(1.0, abs=0.01)
    assert 0.01 < first_bn_weight.std().item() < 0.03
    assert all((module.bias == 0).all() for module in dcgan_bn)
    assert all((module.weight == 1).all() for module in default_bn)
    output_conv = [module for module in dcgan.modules() if isinstance(module, nn.Conv2d)][-1]
    assert output_conv.bias is not None and (output_conv.bias == 0).all()


def test_generator_sample_latent_uses_only_the_given_rng() -> None:
    generator = build_generator("dcgan", latent_dim=16, width=8, depth=2, image_size=8, channels=1)
    global_state = torch.get_rng_state()
    first = generator.sample_latent(5, rng=torch.Generator().manual_seed(7))
    second = generator.sample_latent(5, rng=torch.Generator().manual_seed(7), device="cpu")
    assert torch.equal(torch.get_rng_state(), global_state)
    assert first.shape == (5, 16)
    torch.testing.assert_close(first, second)
    expected = torch.randn(5, 16, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(first, expected)


# --- normalisation -----------------------------------------------------------------------------


def test_normalize_by_hand_and_round_trip() -> None:
    normalize = Normalize(mean=(0.5, 0.25, 0.0), std=(0.25, 0.5, 2.0))
    x = torch.ones(1, 3, 2, 2)
    expected = torch.tensor([2.0, 1.5, 0.5]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    torch.testing.assert_close(normalize(x), expected)
    images = torch.rand(4, 3, 5, 5)
    torch.testing.assert_close(normalize.inverse(normalize(images)), images)
    torch.testing.assert_close(normalize(normalize.inverse(images)), images)
    assert set(normalize.state_dict()) == {"mean", "std"}


def test_normalize_rejects_bad_constants() -> None:
    with pytest.raises(ValueError, match="length"):
        Normalize(mean=(0.5, 0.5), std=(0.5,))
    with pytest.raises(ValueError, match="positive"):
        Normalize(mean=(0.5,), std=(0.0,))
