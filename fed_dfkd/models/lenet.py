"""LeNet-5 and LeNet-5-half (algorithms.md §8, ``lenet.py`` in the reference).

The reference resizes MNIST to 32×32; here inputs smaller than 32×32 are zero-padded
centrally inside the model instead, so 28×28 Fashion-MNIST (and 8×8 digits) go in unchanged.
The ``_bn`` variants add BatchNorm after the first two convolutions so that a BN-statistics
prior (L_bn) has something to match; the reference LeNets have no BN. ``lenet5_bn_full`` adds it
after every hidden layer (the 120-d third convolution and the 84-d fully connected layer too):
the same network with 226 normalised channels for the prior instead of 22.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fed_dfkd.models.base import Classifier
from fed_dfkd.models.registries import CLASSIFIERS

LENET_INPUT_SIZE = 32


class LeNet5(Classifier):
    """conv5(6)-pool-conv5(16)-pool-conv5(120)-fc(84)-fc(C); widths halved when ``half``.

    The features are the 120-d (60-d when half) output of the third convolution, after ReLU.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        image_size: int,
        half: bool = False,
        batch_norm: bool = False,
        batch_norm_full: bool = False,
    ) -> None:
        divisor = 2 if half else 1
        conv1_channels, conv2_channels = 6 // divisor, 16 // divisor
        feature_dim, hidden_dim = 120 // divisor, 84 // divisor
        super().__init__(
            num_classes=num_classes, feature_dim=feature_dim, in_channels=in_channels, image_size=image_size
        )
        if image_size > LENET_INPUT_SIZE:
            raise ValueError(
                f"LeNet-5 takes images of at most {LENET_INPUT_SIZE}x{LENET_INPUT_SIZE}, got {image_size}"
            )

        def conv_block(channels_in: int, channels_out: int) -> nn.Sequential:
            layers: list[nn.Module] = [nn.Conv2d(channels_in, channels_out, kernel_size=5)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(channels_out))
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(kernel_size=2)]
            return nn.Sequential(*layers)

        batch_norm = batch_norm or batch_norm_full
        self.features = nn.Sequential(
            conv_block(in_channels, conv1_channels),  # 32 -> 28 -> 14
            conv_block(conv1_channels, conv2_channels),  # 14 -> 10 -> 5
            nn.Conv2d(conv2_channels, feature_dim, kernel_size=5),  # 5 -> 1
            *([nn.BatchNorm2d(feature_dim)] if batch_norm_full else []),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Linear(feature_dim, hidden_dim),
            *([nn.BatchNorm1d(hidden_dim)] if batch_norm_full else []),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, num_classes),
        )

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        height, width = x.shape[-2:]
        if height > LENET_INPUT_SIZE or width > LENET_INPUT_SIZE:
            raise ValueError(f"LeNet-5 takes images of at most 32x32, got {height}x{width}")
        pad_height, pad_width = LENET_INPUT_SIZE - height, LENET_INPUT_SIZE - width
        if pad_height or pad_width:
            # Central padding keeps the digit where the 32×32 reference saw it.
            x = F.pad(
                x, (pad_width // 2, pad_width - pad_width // 2, pad_height // 2, pad_height - pad_height // 2)
            )
        features = self.features(x).flatten(1)
        return self.classifier(features), features


@CLASSIFIERS.register("lenet5")
def lenet5(*, num_classes: int, in_channels: int, image_size: int) -> LeNet5:
    return LeNet5(num_classes=num_classes, in_channels=in_channels, image_size=image_size)


@CLASSIFIERS.register("lenet5_bn")
def lenet5_bn(*, num_classes: int, in_channels: int, image_size: int) -> LeNet5:
    return LeNet5(num_classes=num_classes, in_channels=in_channels, image_size=image_size, batch_norm=True)


@CLASSIFIERS.register("lenet5_bn_full")
def lenet5_bn_full(*, num_classes: int, in_channels: int, image_size: int) -> LeNet5:
    return LeNet5(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, batch_norm_full=True
    )


@CLASSIFIERS.register("lenet5_half")
def lenet5_half(*, num_classes: int, in_channels: int, image_size: int) -> LeNet5:
    return LeNet5(num_classes=num_classes, in_channels=in_channels, image_size=image_size, half=True)


@CLASSIFIERS.register("lenet5_half_bn")
def lenet5_half_bn(*, num_classes: int, in_channels: int, image_size: int) -> LeNet5:
    return LeNet5(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, half=True, batch_norm=True
    )
