"""Classifiers that take images in [0, 1], and an ensemble of such classifiers.

Everything that moves between components (generator output, real images, the uint8 pseudo-
batches on the wire) is an image in [0, 1]. The dataset's normalisation is part of each model,
so a teacher, a student and the generator can never disagree about it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from fed_dfkd.models.base import Classifier, Normalize


FeatureTargets = dict[str, tuple[Tensor, Tensor]]


class NormalizedClassifier(Classifier):
    """``net(normalize(x))`` for images ``x`` in [0, 1].

    ``feature_targets`` maps module names (as in this wrapper's ``named_modules()``, e.g.
    ``net.features.1``) to the per-channel ``(mean, var)`` the BN-statistics prior should aim
    at for that layer's input. It is empty for ordinary teachers (their BatchNorm running
    statistics are the targets); a DP teacher's loader fills it with its owner's private feature
    statistics (:mod:`fed_dfkd.privacy.feature_statistics`). Not part of the state dict.
    """

    def __init__(self, net: Classifier, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(
            num_classes=net.num_classes,
            feature_dim=net.feature_dim,
            in_channels=net.in_channels,
            image_size=net.image_size,
        )
        self.normalize = Normalize(mean, std)
        self.net = net
        self.feature_targets: FeatureTargets = {}
        # Per-class (mean [K, C], var [K, C]) of named layers' inputs on the owner's own data
        # (``method.bn_statistics_per_class``); empty unless its teacher file holds them.
        self.class_feature_targets: FeatureTargets = {}

    def set_class_feature_targets(self, targets: Mapping[str, tuple[Tensor, Tensor]]) -> None:
        """Replace :attr:`class_feature_targets`; each name must be a module of this model and
        each target two ``[classes, channels]`` tensors of one shape."""
        self.class_feature_targets = self._checked_targets(targets, dims=2, what="class feature target")

    def set_feature_targets(self, targets: Mapping[str, tuple[Tensor, Tensor]]) -> None:
        """Replace :attr:`feature_targets`; each name must be a module of this model and each
        target two 1-D tensors of one length (the layer's channels, checked by the prior)."""
        self.feature_targets = self._checked_targets(targets, dims=1, what="feature target")

    def _checked_targets(self, targets: Mapping[str, tuple[Tensor, Tensor]], *, dims: int,
                         what: str) -> FeatureTargets:
        modules = dict(self.named_modules())
        checked: FeatureTargets = {}
        for name, (mean, var) in targets.items():
            if name not in modules:
                raise ValueError(f"{what} {name!r} is not a module of this model")
            if mean.dim() != dims or mean.shape != var.shape:
                raise ValueError(f"{what} {name!r}: mean and var must be {dims}-D tensors of one "
                                 f"shape, got {tuple(mean.shape)} and {tuple(var.shape)}")
            checked[name] = (mean.detach(), var.detach())
        return checked

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.net.forward_features(self.normalize(x))


class TeacherEnsemble(Classifier):
    """The centralised stand-in for several owners' teachers.

    Logits are the mean of the members' logits (differentiable, so generator objectives can be
    computed through it); features are the members' features concatenated, so the R2M anchor
    keeps every teacher's embedding. The BN-statistics prior finds every member's BatchNorm
    layers through ``modules()`` and sums over them, which is what a federation of these
    teachers sums over its clients; :attr:`feature_targets` gathers the members' targets under
    their names in the ensemble, so members without BatchNorm (DP teachers) take part too.
    """

    def __init__(self, members: Sequence[Classifier]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one teacher")
        first = members[0]
        for member in members[1:]:
            if member.num_classes != first.num_classes:
                raise ValueError("ensemble members disagree on the number of classes")
        super().__init__(
            num_classes=first.num_classes,
            feature_dim=sum(m.feature_dim for m in members),
            in_channels=first.in_channels,
            image_size=first.image_size,
        )
        self.members = nn.ModuleList(members)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        outputs = [member.forward_features(x) for member in self.members]
        logits = torch.stack([o[0] for o in outputs]).mean(dim=0)
        features = torch.cat([o[1] for o in outputs], dim=1)
        return logits, features

    @property
    def feature_targets(self) -> FeatureTargets:
        """Every member's ``feature_targets``, named as in the ensemble (``members.{k}.…``)."""
        return {
            f"members.{k}.{name}": target
            for k, member in enumerate(self.members)
            for name, target in getattr(member, "feature_targets", {}).items()
        }

    def member_logits(self, x: Tensor) -> Tensor:
        """[K, B, C] logits of every member."""
        return torch.stack([member(x) for member in self.members])


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: a teacher never trains during distillation."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model
