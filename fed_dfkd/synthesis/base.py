"""The one interface every synthesis method honours, and the generative objective they share.

All generator-based methods minimise one weighted sum of named terms (algorithms.md §2):

    L_G = w_bn·L_bn + w_oh·L_oh + w_bal·Σ_c p̄_c log p̄_c + w_act·L_act
          + w_adv(p)·L_adv(s, t) + w_tv·TV(x̃) [+ w_r2m·L_R2M for AdaDFKD]

A method is therefore a set of default weights (its module) plus, where needed, extra terms
and state (AdaDFKD's negative bank and projection). Callers give every method the same inputs
(teacher, student, generator, its optimizer, a frozen :class:`Progress`, a seeded RNG) and get
the same :class:`SynthesisReport` back, so adding a method never changes a call site.
"""

from __future__ import annotations

import abc
import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import Tensor, nn

from fed_dfkd.augment import random_shift
from fed_dfkd.config import CurriculumConfig, MethodConfig
from fed_dfkd.curriculum import schedules
from fed_dfkd.losses import (
    BatchNormStatistics,
    activation_loss,
    adversarial_loss,
    class_balance_loss,
    one_hot_loss,
    prior_adjusted_cross_entropy,
    total_variation,
)
from fed_dfkd.models import Classifier, Generator
from fed_dfkd.registry import Registry
from fed_dfkd.samples import boundary_targets

SYNTHESIZERS: Registry[type["Synthesizer"]] = Registry("method")

# Temperature of the adversarial KL / JS term: fixed at 3 with factor 9 in every reference
# script (algorithms.md §1.2), independent of the KD temperature.
ADVERSARIAL_TEMPERATURE = 3.0


@dataclass(frozen=True)
class Progress:
    """Where a run stands: ``fraction`` p = completed rounds / total rounds, in [0, 1].

    Every schedule is a pure function of p (algorithms.md §12.3), so a resumed or federated
    run computes exactly the values an uninterrupted central run would.
    """

    fraction: float
    round: int = 0

    def __post_init__(self) -> None:
        if not (0.0 <= self.fraction <= 1.0) or math.isnan(self.fraction):
            raise ValueError(f"progress must be in [0, 1], got {self.fraction}")

    @classmethod
    def of_round(cls, round_index: int, total_rounds: int) -> "Progress":
        return cls(fraction=round_index / total_rounds, round=round_index)


@dataclass(frozen=True)
class SynthesisReport:
    """What one call of :meth:`Synthesizer.step` did: mean over its generator steps."""

    loss: float
    terms: Mapping[str, float]
    weights: Mapping[str, float]
    steps: int
    extra: Mapping[str, float] = field(default_factory=dict)


def build_generator_optimizer(generator: nn.Module, method: MethodConfig) -> torch.optim.Adam:
    """Adam on G as in the reference (lr 1e-3, betas (0.9, 0.99) for CuDFKD/AdaDFKD)."""
    return torch.optim.Adam(
        generator.parameters(), lr=method.generator_lr, betas=tuple(method.generator_betas)
    )


class Synthesizer(abc.ABC):
    """Local generator steps given a teacher and a student.

    Subclasses set ``name`` and ``defaults`` (the loss weights a config may leave ``null``) and
    may add terms through :meth:`extra_terms` and state through :meth:`state_dict`.
    """

    name: ClassVar[str]
    defaults: ClassVar[Mapping[str, Any]]

    def __init__(
        self,
        method: MethodConfig,
        curriculum: CurriculumConfig,
        *,
        batch_size: int,
        teacher_feature_dim: int,
        student_feature_dim: int,
        seed: int,
    ) -> None:
        self.method = method
        self.curriculum = curriculum
        self.batch_size = batch_size
        self.teacher_feature_dim = teacher_feature_dim
        self.student_feature_dim = student_feature_dim
        self.seed = seed

    # -- schedule ----------------------------------------------------------------------------

    def term_weights(self, progress: Progress) -> dict[str, float]:
        """Weight of every named term at progress p (zero-weight terms are not computed)."""
        m, c = self.method, self.curriculum
        return {
            "bn_statistics": float(m.bn_statistics_weight),
            "one_hot": float(m.one_hot_weight),
            "class_balance": float(m.class_balance_weight),
            "activation": float(m.activation_weight),
            "adversarial": schedules.adversarial_weight(
                progress.fraction,
                initial=float(m.adversarial_weight),
                growth=c.adversarial_growth,
                begin=c.adversarial_begin,
                end=c.adversarial_end,
            ),
            "total_variation": float(m.total_variation_weight),
        }

    # -- objective ---------------------------------------------------------------------------

    def objective(
        self,
        *,
        teacher: Classifier,
        student: Classifier,
        images: Tensor,
        progress: Progress,
        weights: Mapping[str, float],
        labels: Tensor | None = None,
        class_prior: Tensor | None = None,
        class_counts: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Weighted generator loss on ``images`` (in [0, 1], carrying G's graph).

        Returns ``(loss, terms, cache)`` where ``terms`` holds the unweighted value of every
        computed term and ``cache`` the tensors extra terms need (``teacher_features``,
        ``student_features``, ...). With ``labels`` (a conditional G's target classes) the
        one-hot term is CE(t, labels) instead of CE(t, argmax t); ``labels`` may also be soft
        targets ``[B, C]`` (``method.boundary_fraction``). With ``class_prior`` the
        class-balance term is KL(p̄ ‖ prior) instead of −H(p̄). With
        ``method.one_hot_prior_adjustment`` τ > 0 the one-hot term judges the teacher's logits
        less τ·log ``class_counts`` (the per-class counts of its training data), over the classes
        it saw (:func:`fed_dfkd.losses.prior_adjusted_cross_entropy`). With
        ``method.bn_statistics_per_class`` the BN prior matches each class's rows (the argmax of
        soft ``labels``) to the teacher's ``class_feature_targets``.
        """
        # The BN hooks cost a mean and a variance per layer: only register them when used. A DP
        # teacher has no BatchNorm; its owner's private feature statistics are the targets.
        class_targets = row_classes = None
        if weights["bn_statistics"] and self.method.bn_statistics_per_class:
            class_targets = getattr(teacher, "class_feature_targets", None)
            if not class_targets:
                raise ValueError("method.bn_statistics_per_class needs a teacher with per-class "
                                 "feature statistics (a teacher file from `fed-dfkd pretrain`)")
            if labels is None:
                raise ValueError("method.bn_statistics_per_class needs each row's class "
                                 "(method.generator_latents: round)")
            row_classes = labels.argmax(dim=1) if labels.dim() == 2 else labels
        recorder = (
            BatchNormStatistics(teacher, targets=getattr(teacher, "feature_targets", None),
                                scale=self.method.bn_statistics_scale,
                                class_targets=class_targets, row_classes=row_classes)
            if weights["bn_statistics"] else contextlib.nullcontext()
        )
        with recorder as bn:
            teacher_logits, teacher_features = teacher(images, return_features=True)
            bn_loss = bn.loss() if bn is not None else None
        terms: dict[str, Tensor] = {}
        if bn_loss is not None:
            terms["bn_statistics"] = bn_loss
        adjustment = float(self.method.one_hot_prior_adjustment)
        if weights["one_hot"] and adjustment:
            if class_counts is None:
                raise ValueError("method.one_hot_prior_adjustment needs the teacher's class counts")
            terms["one_hot"] = prior_adjusted_cross_entropy(
                teacher_logits, labels, class_counts=class_counts, strength=adjustment
            )
        elif weights["one_hot"]:
            terms["one_hot"] = (
                one_hot_loss(teacher_logits) if labels is None
                else torch.nn.functional.cross_entropy(teacher_logits, labels)
            )
        if weights["class_balance"]:
            terms["class_balance"] = class_balance_loss(
                teacher_logits, temperature=float(self.method.class_balance_temperature), prior=class_prior
            )
        if weights["activation"]:
            terms["activation"] = activation_loss(teacher_features)
        if weights["total_variation"]:
            terms["total_variation"] = total_variation(images)
        cache: dict[str, Tensor] = {
            "teacher_logits": teacher_logits,
            "teacher_features": teacher_features,
        }
        if weights["adversarial"] or self.needs_student_features(weights):
            student_logits, student_features = student(images, return_features=True)
            cache["student_logits"] = student_logits
            cache["student_features"] = student_features
            if weights["adversarial"]:
                terms["adversarial"] = adversarial_loss(
                    student_logits,
                    teacher_logits if self.method.adversarial_through_teacher else teacher_logits.detach(),
                    divergence=str(self.method.adversarial_divergence),
                    temperature=ADVERSARIAL_TEMPERATURE,
                )
        terms.update(self.extra_terms(cache=cache, progress=progress, weights=weights))
        loss = sum((weights[name] * value for name, value in terms.items()), images.new_zeros(()))
        return loss, terms, cache

    def needs_student_features(self, weights: Mapping[str, float]) -> bool:
        return False

    def extra_terms(
        self, *, cache: Mapping[str, Tensor], progress: Progress, weights: Mapping[str, float]
    ) -> dict[str, Tensor]:
        """Method-specific terms; their weights must be in :meth:`term_weights`."""
        return {}

    def after_step(self, cache: Mapping[str, Tensor]) -> None:
        """Explicit state update after an optimizer step (e.g. pushing keys to a bank)."""

    # -- the step every caller uses ------------------------------------------------------------

    def step(
        self,
        *,
        teacher: Classifier,
        student: Classifier,
        generator: Generator,
        optimizer: torch.optim.Optimizer,
        progress: Progress,
        rng: torch.Generator,
        latents: tuple[Tensor, Tensor] | None = None,
        class_prior: Tensor | None = None,
        class_counts: Tensor | None = None,
    ) -> SynthesisReport:
        """``method.generator_steps`` optimizer steps on G; teacher and student stay unchanged.

        G runs in train mode (batch statistics, as the reference); the student in eval mode so
        its BatchNorm running statistics are not touched; gradients reach only G's parameters.
        With ``latents`` = ``(Z, Y)`` (``method.generator_latents: round``) every step uses that
        one batch, and the one-hot term asks for the assigned classes Y instead of the argmax
        (with ``method.boundary_fraction``, blends of Y and a partner class drawn once per call
        from ``rng``: :func:`~fed_dfkd.samples.boundary_targets`).
        ``class_prior`` (``method.class_balance_prior: teacher``, see :func:`teacher_class_prior`)
        is the class mix the class-balance term asks of this teacher, ``class_counts`` the
        per-class counts of its training data (``method.one_hot_prior_adjustment``). With
        ``method.synthesis_jitter`` = j every step shifts each image by up to j pixels (offsets
        from ``rng``) before the objective, which then sees the shifted batch.
        """
        weights = self.term_weights(progress)
        steps = self.method.generator_steps
        totals: dict[str, float] = {}
        loss_total = 0.0
        modes = [(m, m.training) for m in (teacher, student, generator)]
        student.eval()
        teacher.eval()
        generator.train()
        parameters = [p for p in generator.parameters() if p.requires_grad]
        device = next(generator.parameters()).device
        asked = None
        if latents is not None:
            latents = (latents[0].to(device), latents[1].to(device))
            if self.method.boundary_fraction:
                asked = boundary_targets(latents[1], teacher.num_classes, fraction=self.method.boundary_fraction,
                                         mix=self.method.boundary_mix, rng=rng)
        try:
            for _ in range(steps):
                if latents is not None:
                    latent, labels = latents
                    images = generator(latent, labels if generator.conditional else None)
                else:
                    latent = generator.sample_latent(self.batch_size, rng=rng, device=device)
                    labels = generator.sample_labels(self.batch_size, rng=rng, device=device)
                    images = generator(latent, labels)
                if self.method.synthesis_jitter:
                    images = random_shift(images, max_shift=self.method.synthesis_jitter, generator=rng)
                loss, terms, cache = self.objective(
                    teacher=teacher, student=student, images=images, progress=progress,
                    weights=weights, labels=labels if asked is None else asked, class_prior=class_prior,
                    class_counts=class_counts,
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward(inputs=parameters)
                optimizer.step()
                self.after_step(cache)
                loss_total += float(loss.detach())
                for name, value in terms.items():
                    totals[name] = totals.get(name, 0.0) + float(value.detach())
        finally:
            for module, was_training in modes:
                module.train(was_training)
        denominator = max(steps, 1)
        return SynthesisReport(
            loss=loss_total / denominator,
            terms={name: value / denominator for name, value in totals.items()},
            weights=weights,
            steps=steps,
            extra=self.report_extra(progress),
        )

    def report_extra(self, progress: Progress) -> dict[str, float]:
        return {}

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"method {self.name!r} has no state, got keys {sorted(state)}")


def teacher_class_prior(
    histograms: Sequence[Sequence[float]], method: MethodConfig, *, device: torch.device | str = "cpu"
) -> Tensor | None:
    """The class-balance prior of ``method.class_balance_prior`` for a teacher trained on data with
    these per-class counts (several rows: an ensemble, whose data is their sum).

    ``None`` for ``uniform``. For ``teacher``: the summed counts plus one per class (add-one
    smoothing: a class the teacher never saw gets a small share, not zero, whose log is finite).
    """
    if method.class_balance_prior == "uniform":
        return None
    counts = torch.tensor([[float(c) for c in row] for row in histograms], dtype=torch.float64)
    if counts.dim() != 2 or counts.shape[0] == 0 or counts.shape[1] == 0 or bool((counts < 0).any()):
        raise ValueError(
            "class_balance_prior: teacher needs each teacher's class histogram (non-negative counts)"
        )
    return (counts.sum(dim=0) + 1.0).to(device=device, dtype=torch.float32)


def method_defaults(name: str) -> Mapping[str, Any]:
    """Default loss weights of a registered method (raises UnknownNameError)."""
    return SYNTHESIZERS.get(name).defaults


def build_synthesizer(
    method: MethodConfig,
    curriculum: CurriculumConfig,
    *,
    batch_size: int,
    teacher_feature_dim: int,
    student_feature_dim: int,
    seed: int,
) -> Synthesizer:
    cls = SYNTHESIZERS.get(method.name)
    return cls(
        method,
        curriculum,
        batch_size=batch_size,
        teacher_feature_dim=teacher_feature_dim,
        student_feature_dim=student_feature_dim,
        seed=seed,
    )
