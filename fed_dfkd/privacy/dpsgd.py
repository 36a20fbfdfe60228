"""Record-level DP teachers: DP-SGD with Opacus (DESIGN.md §4, docs/privacy.md "Record level").

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy", Alg. 1): each step draws
a Poisson sample B of the owner's records (every record independently with probability q),
clips every per-sample gradient to L2 norm C, sums, adds N(0, σ²C² I) and takes an optimiser
step with the noisy sum divided by the expected batch size qN. Each step is one subsampled
Gaussian release (σ, q); T steps compose in the accountant as ``(σ, q, T)``.

* BatchNorm mixes the records of a batch, so its per-sample gradients do not exist: the model
  goes through Opacus's ``ModuleValidator.fix`` first, which replaces each BatchNorm with
  ``GroupNorm(gcd(32, C), C)`` (:func:`make_dp_compatible`; ``GroupNorm(C, C)`` for C ≤ 32).
* :func:`calibrate_noise_multiplier` finds σ for a target ε of the *whole* ledger of an owner,
  the DP-SGD steps plus whatever else it releases (its private feature statistics, one more
  Gaussian release), by bisection on the composed history.
* :func:`train_dp_sgd` trains with Opacus's ``PrivacyEngine`` (hooks mode, flat clipping,
  Poisson sampling, empty batches skipped but still accounted).

Opacus is imported inside the functions that need it, so importing this module stays cheap.
Noise comes from a seeded ``torch.Generator`` (torch's PRNG): Opacus's secure RNG needs
torchcsprng, which has no build here (see :mod:`fed_dfkd.privacy.mechanisms`).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fed_dfkd.privacy.accountants import (
    _HARMLESS_OPACUS_WARNINGS,
    HistoryEntry,
    accountant_epsilon,
    make_accountant,
)
from fed_dfkd.seeding import make_rng

logger = logging.getLogger(__name__)

__all__ = [
    "DPSGDResult",
    "calibrate_noise_multiplier",
    "dp_sgd_sample_rate",
    "is_dp_compatible",
    "make_dp_compatible",
    "train_dp_sgd",
]

# Warnings of private training that say nothing is wrong (platform.md §6), silenced by message
# around our own calls into Opacus only.
_HARMLESS_TRAINING_WARNINGS = (
    *_HARMLESS_OPACUS_WARNINGS,
    # torch, on every backward through Opacus's hooks: the first layer's input needs no grad.
    r"Full backward hook is firing when gradients are computed with respect to module outputs",
    # Opacus, once per PrivacyEngine: we know (docs/privacy.md, "Randomness").
    r"Secure RNG turned off",
)


@contextmanager
def _quiet_training() -> Iterator[None]:
    with warnings.catch_warnings():
        for pattern in _HARMLESS_TRAINING_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        yield


@contextmanager
def _quiet_validators() -> Iterator[None]:
    # ModuleValidator.fix logs two INFO lines per BatchNorm it replaces, on every teacher load;
    # the replacement is documented (make_dp_compatible), so they are held back to WARNING.
    validators = logging.getLogger("opacus.validators")
    level = validators.level
    validators.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        validators.setLevel(level)


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that Opacus can train: ``ModuleValidator.fix``, then validated.

    ``fix`` replaces every BatchNorm with ``GroupNorm(gcd(32, C), C)`` (fresh affine parameters,
    weight 1 and bias 0) under the same module name, so the state dict keys of the other layers
    are unchanged. In-place activations are made out-of-place: Opacus's backward hooks wrap each
    layer's output, and an in-place ReLU on it is an autograd error. Neither changes a
    parameter, so building an architecture and calling this again rebuilds a saved DP model.
    Only layers with trainable parameters are fixed: call it on a fresh (unfrozen) model.
    Raises ValueError when something still cannot be trained privately.
    """
    from opacus.validators import ModuleValidator

    with _quiet_validators():
        fixed = ModuleValidator.fix(model)
    for module in fixed.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    problems = ModuleValidator.validate(fixed, strict=False)
    if problems:
        raise ValueError("the model cannot be trained with DP-SGD even after ModuleValidator.fix: "
                         + "; ".join(str(problem).splitlines()[0] for problem in problems))
    return fixed


def is_dp_compatible(model: nn.Module) -> bool:
    """Whether Opacus's ``ModuleValidator`` accepts ``model`` as it is (no BatchNorm, ...)."""
    from opacus.validators import ModuleValidator

    return not ModuleValidator.validate(model, strict=False)


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def dp_sgd_sample_rate(num_samples: int, batch_size: int) -> float:
    """q = 1 / ⌈N / B⌉, as Opacus derives it from a data loader of batch size B.

    An epoch is ⌈N / B⌉ Poisson draws, each of expected size qN ≈ B.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
    return 1.0 / math.ceil(num_samples / batch_size)


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    extra_history: Sequence[HistoryEntry] = (),
    epsilon_tolerance: float = 0.01,
    max_noise_multiplier: float = 1e6,
) -> float:
    """The σ whose ``steps`` releases at rate q, composed with ``extra_history``, reach the target.

    ε(σ) is the cumulative ε at δ of the history ``[(σ, q, steps), *extra_history]`` (one ledger,
    :func:`~fed_dfkd.privacy.accountants.accountant_epsilon`); it falls as σ grows, towards the
    ε of ``extra_history`` alone. Bisection on σ (as Opacus's ``get_noise_multiplier``, which
    cannot take the extra releases) returns σ with target − tolerance ≤ ε(σ) ≤ target.

    Raises ValueError when the target is out of reach: ``extra_history`` alone already costs it,
    or σ would exceed ``max_noise_multiplier``.
    """
    target = float(target_epsilon)
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target_epsilon must be finite and > 0, got {target}")
    if not epsilon_tolerance > 0:
        raise ValueError(f"epsilon_tolerance must be > 0, got {epsilon_tolerance}")
    # Validates every entry (and the accountant's name) before any ε is computed.
    extra = make_accountant(accountant)
    for sigma, q, n in extra_history:
        extra.step(noise_multiplier=sigma, sample_rate=q, steps=n)
    make_accountant(accountant).step(noise_multiplier=1.0, sample_rate=sample_rate, steps=steps)
    extra_entries = tuple(extra.history)
    floor = accountant_epsilon(accountant, extra_entries, delta)
    if floor >= target:
        raise ValueError(f"cannot reach ε = {target} at δ = {delta}: the other releases alone "
                         f"cost ε = {floor:.4f} ({accountant})")

    def epsilon(sigma: float) -> float:
        history = ((float(sigma), float(sample_rate), int(steps)), *extra_entries)
        return accountant_epsilon(accountant, history, delta)

    low, high = 0.0, 10.0
    eps_high = epsilon(high)
    while eps_high > target:
        low, high = high, 2.0 * high
        if high > max_noise_multiplier:
            raise ValueError(f"cannot reach ε = {target} at δ = {delta} with q = {sample_rate} over "
                             f"{steps} steps ({accountant}): σ would exceed {max_noise_multiplier}")
        eps_high = epsilon(high)
    for _ in range(200):  # halves the bracket each time; 200 is far beyond float precision
        if target - eps_high <= epsilon_tolerance:
            break
        middle = 0.5 * (low + high)
        eps_middle = epsilon(middle)
        if eps_middle <= target:
            high, eps_high = middle, eps_middle
        else:
            low = middle
    logger.debug("calibrated σ = %s: ε = %.4f for target %s at δ = %s (q = %s, %d steps, "
                 "extra %s, %s)", high, eps_high, target, delta, sample_rate, steps,
                 extra_entries, accountant)
    return float(high)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DPSGDResult:
    """What one DP-SGD training did.

    ``steps`` counts every Poisson draw, including the (skipped) empty ones: they are the
    releases the accountant must charge, ``(noise_multiplier, sample_rate, steps)``.
    ``opacus_history`` is what Opacus's own accountant recorded (optimiser steps only) and
    ``opacus_epsilon`` its ε at ``delta``. ``epochs`` holds per-epoch ``epoch``, ``lr``,
    ``loss`` and ``accuracy`` on the sampled batches: computed from the private records without
    noise, they are for the owner's own log, never for release.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    empty_batches: int
    delta: float
    opacus_epsilon: float
    opacus_history: list[HistoryEntry] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)


def train_dp_sgd(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    batch_size: int,
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    noise_multiplier: float,
    max_grad_norm: float,
    delta: float,
    accountant: str,
    seed: int,
    device: torch.device | str,
    learning_rate: Callable[[int], float] | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    progress_desc: str | None = None,
) -> tuple[nn.Module, DPSGDResult]:
    """Train ``model`` with DP-SGD (Abadi et al. 2016) on cross-entropy; return it and a report.

    ``model`` must already be DP-compatible (:func:`make_dp_compatible`). Each epoch is
    ⌈N / B⌉ Poisson draws at q = :func:`dp_sgd_sample_rate`; per-sample gradients are clipped
    to ``max_grad_norm`` and noised with σ = ``noise_multiplier`` by Opacus's ``DPOptimizer``
    around the optimiser ``make_optimizer(parameters)``. ``learning_rate(t)``, if given, sets
    the learning rate before draw t (0-based); ``transform`` maps each sampled batch (e.g. an
    augmentation; per record, so privacy is unaffected). Sampling and noise come from
    generators seeded by ``seed``. Returns the trained model (the same module, Opacus's hooks
    and per-sample attributes removed) and a :class:`DPSGDResult`.
    """
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    if not is_dp_compatible(model):
        raise ValueError("the model is not DP-compatible; pass it through make_dp_compatible first")
    images = torch.as_tensor(images, dtype=torch.float32).cpu()
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    device = torch.device(device)
    # Contiguous (NCHW) whatever runtime.memory_format says: Opacus's convolution grad sampler
    # computes wrong per-sample gradients for channels_last weights, so it would clip the wrong
    # norms (tests/unit/test_dpsgd.py). Where the teacher is used later it is laid out again.
    model.to(device, memory_format=torch.contiguous_format)
    model.train()

    loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size,
                        generator=make_rng(seed, "dpsgd-sampling"))
    optimizer = make_optimizer(model.parameters())
    with _quiet_training():
        engine = PrivacyEngine(accountant=accountant, secure_mode=False)
        private_model, private_optimizer, private_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=float(noise_multiplier), max_grad_norm=float(max_grad_norm),
            poisson_sampling=True, noise_generator=make_rng(seed, "dpsgd-noise", device=device),
        )
    sample_rate = float(private_loader.sample_rate)
    expected_rate = dp_sgd_sample_rate(len(images), batch_size)
    if not math.isclose(sample_rate, expected_rate, rel_tol=1e-12):
        raise RuntimeError(f"Opacus samples at q = {sample_rate}, expected {expected_rate}")
    draws_per_epoch = len(private_loader)

    epoch_range: Any = range(epochs)
    if progress_desc is not None:
        from tqdm.auto import tqdm

        epoch_range = tqdm(epoch_range, desc=progress_desc, unit="epoch", leave=False, disable=None)
    step, empty = 0, 0
    records: list[dict[str, float]] = []
    try:
        with _quiet_training():
            for epoch in epoch_range:
                loss_sum, correct, seen = 0.0, 0, 0
                for batch, targets in private_loader:
                    if learning_rate is not None:
                        for group in private_optimizer.param_groups:
                            group["lr"] = float(learning_rate(step))
                    step += 1
                    if len(batch) == 0:
                        # A Poisson draw can be empty; the step is still charged (``steps``).
                        empty += 1
                        continue
                    batch, targets = batch.to(device), targets.to(device)
                    if transform is not None:
                        batch = transform(batch)
                    logits = private_model(batch)
                    loss = F.cross_entropy(logits, targets)
                    private_optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    private_optimizer.step()
                    loss_sum += float(loss.detach()) * len(batch)
                    correct += int((logits.detach().argmax(dim=1) == targets).sum())
                    seen += len(batch)
                record = {
                    "epoch": epoch + 1,
                    "loss": loss_sum / max(seen, 1),
                    "accuracy": correct / max(seen, 1),
                    "lr": float(private_optimizer.param_groups[0]["lr"]),
                }
                records.append(record)
                logger.debug("%s epoch %d/%d (DP-SGD): loss %.4f, train accuracy %.4f, lr %.3g",
                             progress_desc or "training", epoch + 1, epochs, record["loss"],
                             record["accuracy"], record["lr"])
            opacus_history = [(float(s), float(q), int(n)) for s, q, n in engine.accountant.history]
            if opacus_history and noise_multiplier > 0:
                # Opacus's own number for what it saw, next to ours (same history: same value).
                opacus_epsilon = float(engine.get_epsilon(delta))
            else:  # nothing recorded (0) or no noise (∞): Opacus's PRV cannot say
                opacus_epsilon = accountant_epsilon(accountant, tuple(opacus_history), delta)
    finally:
        trained = private_model.to_standard_module()
        trained.zero_grad(set_to_none=True)
    if step != epochs * draws_per_epoch:
        raise RuntimeError(f"DP-SGD made {step} draws, expected {epochs} x {draws_per_epoch}")
    if empty:
        logger.info("%s: %d of %d Poisson batches were empty (skipped, still accounted)",
                    progress_desc or "DP-SGD", empty, step)
    result = DPSGDResult(
        noise_multiplier=float(noise_multiplier), max_grad_norm=float(max_grad_norm),
        sample_rate=sample_rate, steps=step, empty_batches=empty, delta=float(delta),
        opacus_epsilon=opacus_epsilon, opacus_history=opacus_history, epochs=records,
    )
    return trained, result
