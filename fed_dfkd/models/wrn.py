"""Pre-activation wide ResNets WRN-d-w (algorithms.md §8, ``wresnet.py`` in the reference).

Depth d = 6n + 4; a bias-free 3×3 stem to 16 channels, three groups of n pre-activation blocks
(BN-ReLU-conv-BN-ReLU-conv) with 16w/32w/64w channels and strides 1/2/2, a final BN-ReLU,
average pooling and ``fc``. The 64w-d pooled output is the feature. Dropout is 0, so omitted.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fed_dfkd.models.base import Classifier, init_conv_kaiming
from fed_dfkd.models.registries import CLASSIFIERS

WRN_STEM_WIDTH = 16
WRN_GROUP_WIDTHS = (16, 32, 64)
WRN_GROUP_STRIDES = (1, 2, 2)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3×3-BN-ReLU-conv3×3 plus shortcut.

    When the shape changes, the first BN-ReLU output feeds both the branch and the 1×1 conv
    shortcut; otherwise the shortcut is the raw input.
    """

    def __init__(self, channels_in: int, channels_out: int, *, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels_in)
        self.conv1 = nn.Conv2d(channels_in, channels_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Conv2d(channels_in, channels_out, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(F.relu(self.bn2(out)))
        residual = x if self.shortcut is None else self.shortcut(activated)
        return out + residual


class WideResNet(Classifier):
    """WRN-``depth``-``widen_factor``; ``depth`` must be 6n + 4."""

    def __init__(
        self, *, depth: int, widen_factor: int, num_classes: int, in_channels: int, image_size: int
    ) -> None:
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {depth}")
        blocks_per_group = (depth - 4) // 6
        widths = [width * widen_factor for width in WRN_GROUP_WIDTHS]
        super().__init__(
            num_classes=num_classes, feature_dim=widths[-1], in_channels=in_channels, image_size=image_size
        )
        self.conv1 = nn.Conv2d(in_channels, WRN_STEM_WIDTH, kernel_size=3, stride=1, padding=1, bias=False)
        groups: list[nn.Module] = []
        channels = WRN_STEM_WIDTH
        for width, stride in zip(widths, WRN_GROUP_STRIDES, strict=True):
            blocks = []
            for block_index in range(blocks_per_group):
                blocks.append(PreActBlock(channels, width, stride=stride if block_index == 0 else 1))
                channels = width
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.bn_final = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_conv_kaiming(self)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.groups(self.conv1(x))
        features = self.pool(F.relu(self.bn_final(out))).flatten(1)
        return self.fc(features), features


def _register_wrn(depth: int, widen_factor: int) -> None:
    def build(*, num_classes: int, in_channels: int, image_size: int) -> WideResNet:
        return WideResNet(
            depth=depth,
            widen_factor=widen_factor,
            num_classes=num_classes,
            in_channels=in_channels,
            image_size=image_size,
        )

    build.__name__ = build.__qualname__ = f"wrn{depth}_{widen_factor}"
    CLASSIFIERS.register(build.__name__)(build)


for _depth, _widen_factor in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register_wrn(_depth, _widen_factor)
