"""BatchNorm-statistics prior on a (frozen) teacher: DeepInversion / DFQ / CuDFKD's L_bn.

A context manager hooks every BatchNorm layer, records the statistics of the layer **input** of
the last forward pass, and turns them into the loss. Hooks never outlive the ``with`` block.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Mapping

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

logger = logging.getLogger(__name__)

__all__ = ["BatchNormStatistics"]

# BatchNorm1d/2d are the layers the method is defined for; 3d reduces the same way and costs
# nothing to support.
_BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class BatchNormStatistics:
    """Collects per-layer batch statistics of BN inputs and computes the BN prior.

    algorithms.md §1.2 BN statistics: on the input of every BN layer l, μ_l is the per-channel
    mean and σ²_l the **biased** variance over (N, H, W) (all dimensions but the channel), and

        L_bn = Σ_l ( ‖μ_l − μ̂_l‖₂ + ‖σ²_l − σ̂²_l‖₂ )

    with **unsquared** norms, against the layer's running statistics (μ̂, σ̂²), or against
    ``targets[name] = (mean, var)`` for the layers named there (module names as in
    ``model.named_modules()``; e.g. private feature statistics).

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
    ) -> None:
        self.model = model
        targets = dict(targets or {})
        batch_norm_layers = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, _BATCH_NORM_TYPES)
        }
        unknown = sorted(set(targets) - set(batch_norm_layers))
        if unknown:
            raise ValueError(
                f"targets name modules that are not BatchNorm layers of the model: {unknown}; "
                f"BatchNorm layers: {sorted(batch_norm_layers)}"
            )
        self._layers: list[tuple[str, nn.Module]] = []
        self._targets: dict[str, tuple[Tensor, Tensor]] = {}
        for name, module in batch_norm_layers.items():
            if name in targets:
                mean, var = targets[name]
                if mean.shape != (module.num_features,) or var.shape != (module.num_features,):
                    raise ValueError(
                        f"targets[{name!r}] must be two tensors of shape ({module.num_features},), "
                        f"got {tuple(mean.shape)} and {tuple(var.shape)}"
                    )
                self._targets[name] = (mean.detach(), var.detach())
            elif module.running_mean is None or module.running_var is None:
                logger.debug("BatchNorm layer %r has no running statistics; skipped", name)
                continue
            self._layers.append((name, module))
        self._statistics: dict[str, tuple[Tensor, Tensor]] = {}
        self._handles: list[RemovableHandle] = []

    @property
    def num_layers(self) -> int:
        """Number of BN layers that contribute to the loss."""
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

    def _make_record_hook(self, name: str):
        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            features = inputs[0]
            reduce_dims = [0, *range(2, features.dim())]
            var, mean = torch.var_mean(features, dim=reduce_dims, correction=0)
            self._statistics[name] = (mean, var)

        return record

    def layer_losses(self) -> list[Tensor]:
        """Per-layer terms ‖μ_l − μ̂_l‖₂ + ‖σ²_l − σ̂²_l‖₂, in the order of :attr:`layer_names`."""
        if not self._layers:
            return []
        missing = [name for name, _ in self._layers if name not in self._statistics]
        if len(missing) == len(self._layers):
            raise RuntimeError(
                "no BatchNorm statistics recorded: run the model inside the `with` block first"
            )
        if missing:
            raise RuntimeError(f"the last forward pass did not reach BatchNorm layers {missing}")
        losses = []
        for name, module in self._layers:
            mean, var = self._statistics[name]
            if name in self._targets:
                target_mean, target_var = self._targets[name]
            else:
                target_mean, target_var = module.running_mean, module.running_var
            target_mean = target_mean.to(device=mean.device, dtype=mean.dtype)
            target_var = target_var.to(device=var.device, dtype=var.dtype)
            losses.append(
                torch.linalg.vector_norm(mean - target_mean)
                + torch.linalg.vector_norm(var - target_var)
            )
        return losses

    def loss(self) -> Tensor:
        """L_bn (algorithms.md §1.2): the sum of :meth:`layer_losses`; 0 for a model without BN."""
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
