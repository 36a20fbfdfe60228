"""VGG-11 with BatchNorm (algorithms.md §8, ``vgg.py`` in the reference, where ``vgg11`` is BN).

Blocks [[64], [128], [256, 256], [512, 512], [512, 512]] of conv3×3 (with bias)-BN-ReLU.
Max-pool after blocks 0–2, and after block 3 for inputs of 64² and up, as in the reference;
a pool is skipped once the feature map is below 2×2, so 8×8 inputs also work. Adaptive average
pooling gives the 512-d feature, and ``classifier`` is Linear(512 → C).
"""

from __future__ import annotations

from torch import Tensor, nn

from fed_dfkd.models.base import Classifier, init_conv_kaiming
from fed_dfkd.models.registries import CLASSIFIERS

VGG11_BLOCKS = ((64,), (128,), (256, 256), (512, 512), (512, 512))
VGG_POOLED_BLOCKS = 3
VGG_LARGE_INPUT = 64


class VGG(Classifier):
    """VGG with BN over ``blocks`` (each a tuple of conv widths)."""

    def __init__(
        self,
        *,
        blocks: tuple[tuple[int, ...], ...],
        num_classes: int,
        in_channels: int,
        image_size: int,
    ) -> None:
        feature_dim = blocks[-1][-1]
        super().__init__(
            num_classes=num_classes, feature_dim=feature_dim, in_channels=in_channels, image_size=image_size
        )
        pooled_blocks = VGG_POOLED_BLOCKS + (1 if image_size >= VGG_LARGE_INPUT else 0)
        layers: list[nn.Module] = []
        channels, spatial_size = in_channels, image_size
        for block_index, widths in enumerate(blocks):
            for width in widths:
                layers += [
                    nn.Conv2d(channels, width, kernel_size=3, padding=1),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
            if block_index < pooled_blocks and spatial_size >= 2:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                spatial_size //= 2
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_conv_kaiming(self)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.pool(self.features(x)).flatten(1)
        return self.classifier(features), features


@CLASSIFIERS.register("vgg11_bn")
def vgg11_bn(*, num_classes: int, in_channels: int, image_size: int) -> VGG:
    return VGG(blocks=VGG11_BLOCKS, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
