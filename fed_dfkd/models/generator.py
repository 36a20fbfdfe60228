"""The DCGAN-style generator G: z → x̃ ∈ [0, 1] (algorithms.md §1.4, §12.5).

The reference ``DCGAN_Generator_CIFAR10`` with its width ``ngf`` (``width``), depth d, output
size S and channel count nc all free:

1. Linear(nz → ngf·2^d·s0²), s0 = S / 2^d, reshaped to (ngf·2^d, s0, s0); BN; ×2 nearest up.
2. d − 1 times: conv3×3 (C → C/2, no bias), BN, LeakyReLU(0.2), ×2 up.
3. conv3×3 (2·ngf → ngf, no bias), BN, LeakyReLU(0.2).
4. conv3×3 (ngf → nc, with bias), Sigmoid.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from fed_dfkd.models.registries import GENERATORS

logger = logging.getLogger(__name__)

GENERATOR_INITS = ("dcgan", "default")
LEAKY_RELU_SLOPE = 0.2
DCGAN_INIT_STD = 0.02


@GENERATORS.register("dcgan")
class Generator(nn.Module):
    """DCGAN generator of ``channels``×``image_size``×``image_size`` images in [0, 1].

    ``init="dcgan"`` is CuDFKD/AdaDFKD's ``reset_model``: conv and linear weights ~ N(0, 0.02),
    BN weights ~ N(1, 0.02), zero biases (drawn from the global torch RNG, which callers seed).
    ``init="default"`` keeps PyTorch's initialisation, as the baselines do.
    """

    def __init__(
        self,
        *,
        latent_dim: int,
        width: int,
        depth: int,
        image_size: int,
        channels: int,
        init: str = "dcgan",
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"generator num_classes must be an integer >= 0, got {num_classes!r}")
        for name, value in (
            ("latent_dim", latent_dim),
            ("width", width),
            ("depth", depth),
            ("image_size", image_size),
            ("channels", channels),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"generator {name} must be a positive integer, got {value!r}")
        if init not in GENERATOR_INITS:
            raise ValueError(f"unknown generator init {init!r}; valid: {', '.join(GENERATOR_INITS)}")
        upsampling = 2**depth
        if image_size % upsampling:
            raise ValueError(
                f"generator image_size {image_size} is not divisible by 2**depth = {upsampling} "
                f"(depth {depth}); choose a depth whose 2**depth divides {image_size}"
            )
        self.latent_dim = latent_dim
        self.width = width
        self.depth = depth
        self.image_size = image_size
        self.channels = channels
        # > 0: class-conditional G (a one-hot label joins z), see ``forward``.
        self.num_classes = num_classes
        self.initial_size = image_size // upsampling
        self.initial_channels = width * upsampling

        self.project = nn.Linear(latent_dim + num_classes, self.initial_channels * self.initial_size**2)
        layers: list[nn.Module] = [
            nn.BatchNorm2d(self.initial_channels),
            nn.Upsample(scale_factor=2, mode="nearest"),
        ]
        block_channels = self.initial_channels
        for _ in range(depth - 1):
            layers += [
                nn.Conv2d(block_channels, block_channels // 2, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(block_channels // 2),
                nn.LeakyReLU(LEAKY_RELU_SLOPE, inplace=True),
                nn.Upsample(scale_factor=2, mode="nearest"),
            ]
            block_channels //= 2
        layers += [
            nn.Conv2d(block_channels, width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(LEAKY_RELU_SLOPE, inplace=True),
            nn.Conv2d(width, channels, kernel_size=3, padding=1),
            nn.Sigmoid(),
        ]
        self.body = nn.Sequential(*layers)
        if init == "dcgan":
            self.reset_parameters_dcgan()

    def reset_parameters_dcgan(self) -> None:
        """Re-draw every weight with the DCGAN init (§1.4, ``reset_model`` in the reference)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.normal_(module.weight, mean=0.0, std=DCGAN_INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, mean=1.0, std=DCGAN_INIT_STD)
                nn.init.zeros_(module.bias)

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """Map latents z [B, latent_dim] to images x̃ [B, channels, image_size, image_size] in [0, 1].

        A conditional generator also takes the target classes ``labels`` [B] (a deliberate
        extension of the reference's unconditional G: the one-hot term can then ask for a
        sampled class, as DeepInversion does with an image tensor, instead of the argmax).
        """
        if self.conditional:
            if labels is None:
                raise ValueError("a conditional generator needs labels")
            z = torch.cat([z, nn.functional.one_hot(labels, self.num_classes).to(z.dtype)], dim=1)
        elif labels is not None:
            raise ValueError("an unconditional generator takes no labels")
        out = self.project(z).view(-1, self.initial_channels, self.initial_size, self.initial_size)
        return self.body(out)

    def sample_latent(
        self, batch_size: int, *, rng: torch.Generator, device: torch.device | str | None = None
    ) -> Tensor:
        """Draw z ~ N(0, I) of shape [batch_size, latent_dim] from ``rng``.

        The draw happens on ``rng``'s device and is then moved to ``device``, so a CPU generator
        gives the same latents whatever device the model runs on.
        """
        latents = torch.randn(batch_size, self.latent_dim, generator=rng, device=rng.device)
        return latents if device is None else latents.to(device)

    def sample_labels(
        self, batch_size: int, *, rng: torch.Generator, device: torch.device | str | None = None
    ) -> Tensor | None:
        """Target classes for a batch (uniform, from ``rng``), or None when unconditional."""
        if not self.conditional:
            return None
        labels = torch.randint(self.num_classes, (batch_size,), generator=rng, device=rng.device)
        return labels if device is None else labels.to(device)

    def extra_repr(self) -> str:
        return (
            f"latent_dim={self.latent_dim}, width={self.width}, depth={self.depth}, "
            f"image_size={self.image_size}, channels={self.channels}, num_classes={self.num_classes}"
        )
