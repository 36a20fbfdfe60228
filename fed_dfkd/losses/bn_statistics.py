"""BatchNorm-statistics prior on a (frozen) teacher: DeepInversion / DFQ / CuDFKD's L_bn.

A context manager hooks every BatchNorm layer, records the statistics of the layer **input** of
the last forward pass, and turns them into the loss. Hooks never outlive the ``with`` block.

The same prior works on teachers without BatchNorm (DP-SGD teachers, whose BN became GroupNorm)
when their owner released private per-channel statistics of the normalisation layers' inputs
(:mod:`fed_dfkd.privacy.feature_statistics`): those layers are named in ``targets``.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Literal, Mapping

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

logger = logging.getLogger(__name__)

__all__ = ["BN_STATISTICS_SCALES", "BatchNormStatistics", "NORMALIZATION_TYPES", "num_channels"]

BN_STATISTICS_SCALES = ("absolute", "standardized")

# BatchNorm1d/2d are the layers the method is defined for; 3d reduces the same way and costs
# nothing to support.
_BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Normalisation layers whose input has channels on dim 1, so "per-channel statistics over
# (N, H, W)" means the same thing as for BN. They carry no running statistics of that kind
# (InstanceNorm's are per-instance), so they only take part through ``targets``.
NORMALIZATION_TYPES = (
    *_BATCH_NORM_TYPES,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


def num_channels(module: nn.Module) -> int:
    """The channel count C of a normalisation layer (``num_features`` or ``num_channels``)."""
    if isinstance(module, nn.GroupNorm):
        return int(module.num_channels)
    if isinstance(module, NORMALIZATION_TYPES):
        return int(module.num_features)
    raise TypeError(f"{type(module).__name__} is not a normalisation layer")


class BatchNormStatistics:
    """Collects per-layer batch statistics of BN inputs and computes the BN prior.

    algorithms.md §1.2 BN statistics: on the input of every BN layer l, μ_l is the per-channel
    mean and σ²_l the **biased** variance over (N, H, W) (all dimensions but the channel), and

        L_bn = Σ_l ( ‖μ_l − μ̂_l‖₂ + ‖σ²_l − σ̂²_l‖₂ )

    with **unsquared** norms, against the layer's running statistics (μ̂, σ̂²), or against
    ``targets[name] = (mean, var)`` for the layers named there (module names as in
    ``model.named_modules()``; e.g. private feature statistics). ``targets`` may also name
    GroupNorm and InstanceNorm layers (:data:`NORMALIZATION_TYPES`): their inputs are recorded
    the same way (per channel over all dimensions but the channel, biased variance) and compared
    to the targets. Such layers without a target are not hooked.

    ``scale="standardized"`` (a deviation from the reference, ``method.bn_statistics_scale``)
    measures both gaps in units of the target's own spread, channel by channel:

        L_bn = Σ_l ( ‖(μ_l − μ̂_l) / √(σ̂²_l + ε)‖₂ + ‖(σ²_l − σ̂²_l) / (σ̂²_l + ε)‖₂ )

    with ε the layer's own ``eps`` (1e-5 for a layer without one). The absolute form weighs a
    layer by the size of its activations, so in a deep teacher the last blocks (large
    activations, and a sampling floor that even real batches do not get under) dominate and
    the early layers, which shape the image, hardly count; the standardized form is invariant
    to each channel's scale and weighs the layers alike.

    Per class (``method.bn_statistics_per_class``, a deviation from the reference): with
    ``class_targets[name] = (mean, var)``, each ``[K, C]`` (row k: the layer input's statistics
    over the owner's real images of class k, NaN for a class it has none of) and
    ``row_classes`` (the class each row of the batch was generated for), the layer's term is

        Σ_k (n_k / n) ( ‖μ_{l,k} − μ̂_{l,k}‖₂ + ‖σ²_{l,k} − σ̂²_{l,k}‖₂ )

    over the classes k with a target and n_k ≥ 2 rows (n their rows in all), μ_{l,k} and σ²_{l,k}
    the statistics of those rows alone (standardized by the class's own spread with
    ``scale="standardized"``). Where no class of the batch qualifies, the layer falls back to the
    term above.

    Usage::

        with BatchNormStatistics(teacher) as bn_statistics:
            logits = teacher(x)
            loss = bn_statistics.loss()

    Every BN layer in ``model.modules()`` is hooked, so a module holding several teachers gives
    the sum over all of them. The recorded statistics keep their graph back to the input ``x``.
    Statistics are cleared when ``model`` starts a new forward pass (the last forward wins); a
    layer called several times in one forward keeps its last call. A layer with neither running
    statistics (``track_running_stats=False``) nor a target is skipped. Hooks are removed on
    exit, also when the block raises; the last statistics stay readable after the block.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        targets: Mapping[str, tuple[Tensor, Tensor]] | None = None,
        scale: Literal["absolute", "standardized"] = "absolute",
        class_targets: Mapping[str, tuple[Tensor, Tensor]] | None = None,
        row_classes: Tensor | None = None,
    ) -> None:
        if scale not in BN_STATISTICS_SCALES:
            raise ValueError(f"scale must be one of {BN_STATISTICS_SCALES}, got {scale!r}")
        if (class_targets is None) != (row_classes is None):
            raise ValueError("class_targets and row_classes go together")
        self.model = model
        self.scale = scale
        targets = dict(targets or {})
        # Per-class targets: {name: (mean [K, C], var [K, C])}, NaN rows for classes without.
        self._class_targets: dict[str, tuple[Tensor, Tensor]] = {}
        self._row_classes = None if row_classes is None else row_classes.detach().long()
        normalization_layers = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, NORMALIZATION_TYPES)
        }
        unknown = sorted(set(targets) - set(normalization_layers))
        if unknown:
            raise ValueError(
                f"targets name modules that are not BatchNorm (or other normalisation) layers of "
                f"the model: {unknown}; normalisation layers: {sorted(normalization_layers)}"
            )
        self._layers: list[tuple[str, nn.Module]] = []
        self._targets: dict[str, tuple[Tensor, Tensor]] = {}
        for name, module in normalization_layers.items():
            if name in targets:
                mean, var = targets[name]
                channels = num_channels(module)
                if mean.shape != (channels,) or var.shape != (channels,):
                    raise ValueError(
                        f"targets[{name!r}] must be two tensors of shape ({channels},), "
                        f"got {tuple(mean.shape)} and {tuple(var.shape)}"
                    )
                self._targets[name] = (mean.detach(), var.detach())
            per_class = class_targets is not None and name in class_targets
            if name in targets or per_class:
                pass
            elif not isinstance(module, _BATCH_NORM_TYPES):
                continue  # no target and no running statistics to compare with
            elif module.running_mean is None or module.running_var is None:
                logger.debug("BatchNorm layer %r has no running statistics; skipped", name)
                continue
            if per_class:
                mean, var = class_targets[name]  # type: ignore[index]
                channels = num_channels(module)
                if mean.dim() != 2 or mean.shape[1] != channels or mean.shape != var.shape:
                    raise ValueError(f"class_targets[{name!r}] must be two tensors of shape "
                                     f"(classes, {channels}), got {tuple(mean.shape)} and {tuple(var.shape)}")
                self._class_targets[name] = (mean.detach(), var.detach())
            self._layers.append((name, module))
        unknown = sorted(set(class_targets or {}) - set(normalization_layers))
        if unknown:
            raise ValueError(f"class_targets name modules that are not normalisation layers: {unknown}")
        self._statistics: dict[str, tuple[Tensor, Tensor]] = {}
        self._class_statistics: dict[str, list[tuple[int, int, Tensor, Tensor]]] = {}
        self._handles: list[RemovableHandle] = []

    @property
    def num_layers(self) -> int:
        """Number of layers (BN, or normalisation layers with a target) that contribute to the loss."""
        return len(self._layers)

    @property
    def layer_names(self) -> list[str]:
        """Names (as in ``named_modules``) of the contributing layers, in loss order."""
        return [name for name, _ in self._layers]

    def __enter__(self) -> "BatchNormStatistics":
        if self._handles:
            raise RuntimeError("BatchNormStatistics is already active; it cannot be nested")
        self._statistics.clear()
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._clear_hook))
            for name, module in self._layers:
                self._handles.append(module.register_forward_hook(self._make_record_hook(name)))
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _clear_hook(self, module: nn.Module, inputs: tuple[object, ...]) -> None:
        self._statistics.clear()
        self._class_statistics.clear()

    def _make_record_hook(self, name: str):
        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            features = inputs[0]
            reduce_dims = [0, *range(2, features.dim())]
            var, mean = torch.var_mean(features, dim=reduce_dims, correction=0)
            self._statistics[name] = (mean, var)
            if name in self._class_targets:
                self._class_statistics[name] = self._per_class(name, features)

        return record

    def _per_class(self, name: str, features: Tensor) -> list[tuple[int, int, Tensor, Tensor]]:
        """(class, rows, mean, var) of the rows of every class that has a target and >= 2 rows."""
        rows = self._row_classes
        if rows is None or rows.shape != (features.shape[0],):
            raise ValueError(f"row_classes must have one class per row of the batch "
                             f"({features.shape[0]}), got {None if rows is None else tuple(rows.shape)}")
        rows = rows.to(features.device)
        target_mean, _ = self._class_targets[name]
        reduce_dims = [0, *range(2, features.dim())]
        groups = []
        for label in torch.unique(rows).tolist():
            chosen = rows == label
            count = int(chosen.sum())
            if count < 2 or not 0 <= label < target_mean.shape[0] or not bool(
                torch.isfinite(target_mean[label]).all()
            ):
                continue
            var, mean = torch.var_mean(features[chosen], dim=reduce_dims, correction=0)
            groups.append((int(label), count, mean, var))
        return groups

    def _gap(self, module: nn.Module, mean: Tensor, var: Tensor, target_mean: Tensor, target_var: Tensor) -> Tensor:
        target_mean = target_mean.to(device=mean.device, dtype=mean.dtype)
        target_var = target_var.to(device=var.device, dtype=var.dtype)
        mean_gap, var_gap = mean - target_mean, var - target_var
        if self.scale == "standardized":
            spread = target_var.clamp(min=0) + float(getattr(module, "eps", 1e-5))
            mean_gap, var_gap = mean_gap / spread.sqrt(), var_gap / spread
        return torch.linalg.vector_norm(mean_gap) + torch.linalg.vector_norm(var_gap)

    def layer_losses(self) -> list[Tensor]:
        """Per-layer terms ‖μ_l − μ̂_l‖₂ + ‖σ²_l − σ̂²_l‖₂ (standardized: divided by the target's
        spread, see the class docstring), in the order of :attr:`layer_names`."""
        if not self._layers:
            return []
        missing = [name for name, _ in self._layers if name not in self._statistics]
        if len(missing) == len(self._layers):
            raise RuntimeError(
                "no BatchNorm statistics recorded: run the model inside the `with` block first"
            )
        if missing:
            raise RuntimeError(f"the last forward pass did not reach normalisation layers {missing}")
        losses = []
        for name, module in self._layers:
            groups = self._class_statistics.get(name)
            if groups:
                # Per class: each class's rows against that class's statistics, weighted by rows.
                class_mean, class_var = self._class_targets[name]
                total = sum(count for _, count, _, _ in groups)
                losses.append(sum(
                    (count / total) * self._gap(module, mean, var, class_mean[label], class_var[label])
                    for label, count, mean, var in groups
                ))
                continue
            mean, var = self._statistics[name]
            if name in self._targets:
                target_mean, target_var = self._targets[name]
            elif module.running_mean is not None:
                target_mean, target_var = module.running_mean, module.running_var
            else:
                raise RuntimeError(f"layer {name!r}: no class of the batch has a per-class target "
                                   "and the layer has no running statistics")
            losses.append(self._gap(module, mean, var, target_mean, target_var))
        return losses

    def loss(self) -> Tensor:
        """L_bn (algorithms.md §1.2): the sum of :meth:`layer_losses`; 0 when no layer contributes."""
        losses = self.layer_losses()
        if not losses:
            return torch.zeros((), device=self._model_device())
        return torch.stack(losses).sum()

    def _model_device(self) -> torch.device:
        for tensor in self.model.parameters():
            return tensor.device
        for tensor in self.model.buffers():
            return tensor.device
        return torch.device("cpu")
