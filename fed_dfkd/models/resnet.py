"""CIFAR ResNet-18/34 (algorithms.md §8, ``resnet.py`` in the reference).

3×3 stride-1 stem with no max-pool, four BasicBlock stages (64/128/256/512, strides 1/2/2/2),
global average pooling and a linear head; the 512-d pooled output is the feature.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from fed_dfkd.models.base import Classifier, init_conv_kaiming
from fed_dfkd.models.registries import CLASSIFIERS

RESNET_STAGE_WIDTHS = (64, 128, 256, 512)
RESNET_STAGE_STRIDES = (1, 2, 2, 2)


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN plus shortcut, then ReLU; 1×1 conv + BN shortcut on a shape change."""

    def __init__(self, channels_in: int, channels_out: int, *, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(channels_out),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(Classifier):
    """ResNet with BasicBlocks for small images; ``blocks_per_stage`` picks the depth."""

    def __init__(
        self, *, blocks_per_stage: Sequence[int], num_classes: int, in_channels: int, image_size: int
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            feature_dim=RESNET_STAGE_WIDTHS[-1],
            in_channels=in_channels,
            image_size=image_size,
        )
        self.conv1 = nn.Conv2d(
            in_channels, RESNET_STAGE_WIDTHS[0], kernel_size=3, stride=1, padding=1, bias=False
        )
        self.bn1 = nn.BatchNorm2d(RESNET_STAGE_WIDTHS[0])
        stages: list[nn.Module] = []
        channels = RESNET_STAGE_WIDTHS[0]
        stage_specs = zip(RESNET_STAGE_WIDTHS, RESNET_STAGE_STRIDES, blocks_per_stage, strict=True)
        for width, stride, num_blocks in stage_specs:
            blocks = []
            for block_index in range(num_blocks):
                blocks.append(BasicBlock(channels, width, stride=stride if block_index == 0 else 1))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels, num_classes)
        init_conv_kaiming(self)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        features = self.pool(self.stages(out)).flatten(1)
        return self.linear(features), features


@CLASSIFIERS.register("resnet18")
def resnet18(*, num_classes: int, in_channels: int, image_size: int) -> CifarResNet:
    return CifarResNet(
        blocks_per_stage=(2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, image_size=image_size
    )


@CLASSIFIERS.register("resnet34")
def resnet34(*, num_classes: int, in_channels: int, image_size: int) -> CifarResNet:
    return CifarResNet(
        blocks_per_stage=(3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, image_size=image_size
    )
