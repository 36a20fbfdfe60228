"""A small CNN for 8×8 sklearn digits (algorithms.md §12.5: "for 8×8 digits, use a small CNN").

conv3×3(32) → conv3×3(64) → max-pool 2 → conv3×3(128) → global average pool → fc, with ReLU
after every convolution; ``half`` halves the widths and ``batch_norm`` puts BN after every
convolution. Global pooling makes it size-agnostic, so it also takes 28×28 and 32×32 images.
"""

from __future__ import annotations

from torch import Tensor, nn

from fed_dfkd.models.base import Classifier, init_conv_kaiming
from fed_dfkd.models.registries import CLASSIFIERS

DIGITS_CNN_WIDTHS = (32, 64, 128)


class DigitsCNN(Classifier):
    """Three 3×3 convolutions with one max-pool, then global average pooling and a linear head."""

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        image_size: int,
        half: bool = False,
        batch_norm: bool = False,
    ) -> None:
        widths = tuple(width // 2 for width in DIGITS_CNN_WIDTHS) if half else DIGITS_CNN_WIDTHS
        super().__init__(
            num_classes=num_classes, feature_dim=widths[-1], in_channels=in_channels, image_size=image_size
        )
        if image_size < 2:
            raise ValueError(f"DigitsCNN needs images of at least 2x2 for its max-pool, got {image_size}")

        def conv_block(channels_in: int, channels_out: int) -> list[nn.Module]:
            # BN follows the conv directly, so the conv's bias would be redundant.
            layers: list[nn.Module] = [
                nn.Conv2d(channels_in, channels_out, kernel_size=3, padding=1, bias=not batch_norm)
            ]
            if batch_norm:
                layers.append(nn.BatchNorm2d(channels_out))
            layers.append(nn.ReLU(inplace=True))
            return layers

        self.features = nn.Sequential(
            *conv_block(in_channels, widths[0]),
            *conv_block(widths[0], widths[1]),
            nn.MaxPool2d(kernel_size=2),
            *conv_block(widths[1], widths[2]),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(widths[-1], num_classes)
        init_conv_kaiming(self)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.features(x)
        return self.fc(features), features


@CLASSIFIERS.register("cnn_digits")
def cnn_digits(*, num_classes: int, in_channels: int, image_size: int) -> DigitsCNN:
    return DigitsCNN(num_classes=num_classes, in_channels=in_channels, image_size=image_size)


@CLASSIFIERS.register("cnn_digits_bn")
def cnn_digits_bn(*, num_classes: int, in_channels: int, image_size: int) -> DigitsCNN:
    return DigitsCNN(num_classes=num_classes, in_channels=in_channels, image_size=image_size, batch_norm=True)


@CLASSIFIERS.register("cnn_digits_half")
def cnn_digits_half(*, num_classes: int, in_channels: int, image_size: int) -> DigitsCNN:
    return DigitsCNN(num_classes=num_classes, in_channels=in_channels, image_size=image_size, half=True)


@CLASSIFIERS.register("cnn_digits_half_bn")
def cnn_digits_half_bn(*, num_classes: int, in_channels: int, image_size: int) -> DigitsCNN:
    return DigitsCNN(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, half=True, batch_norm=True
    )
