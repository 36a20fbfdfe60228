"""Student steps on (pseudo-batch, aggregated teacher targets).

Per sample i (algorithms.md §3.3, §4.3, §12.1):

    ℓ_i = ℓ_KD(s_i, t_i) + λ_rel·ℓ_rel,i + β·ℓ_hint,i
          (λ_rel = method.relation_weight, 0 except AdaDFKD; β = distill.feature_weight, 0 by default)
    L_S = (1/B)·Σ_i v_i·ℓ_i                      v_i self-paced, held constant (no gradient)

ℓ_KD is the KL at temperature τ (×τ²) or the logit L1. ℓ_rel is the per-row in-batch InfoNCE
between teacher and student embeddings. Deliberate deviation: the embeddings are the teacher's
aggregated *logits* and the student's logits rather than penultimate features, because logits
are what crosses the wire in the federation (algorithms.md §11 allows it; features leak more
and need one projection per teacher architecture). The learning rate follows a cosine of the
progress p (§12.3), not of epochs. ℓ_hint (``distill.feature_weight``, `fed-dfkd distill` only)
regresses the teacher's penultimate features from the student's through a linear map P trained
with the student (:func:`~fed_dfkd.losses.feature_hint_per_sample`).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from fed_dfkd.config import CurriculumConfig, DistillConfig, MethodConfig
from fed_dfkd.curriculum import SelfPacedWeighting, schedules
from fed_dfkd.losses import feature_hint_per_sample, kd_per_sample, relation_infonce_per_sample
from fed_dfkd.models import Classifier
from fed_dfkd.samples import as_float_images
from fed_dfkd.synthesis import Progress


@dataclass(frozen=True)
class StudentStepReport:
    loss: float
    kd_loss: float
    relation_loss: float
    mean_weight: float
    admitted_fraction: float
    pace: float
    lr: float
    feature_loss: float = 0.0


class ReplayBuffer:
    """Labelled pseudo-batches of the last ``rounds + 1`` rounds, kept by whoever trains S.

    Student steps are cheap next to generator steps and the teachers' labels are already paid
    for, so replaying recent rounds gives the student more steps per round at no cost in queries
    or bytes (the idea of CuDFKD's memory bank, algorithms.md §3.6, bounded). Batches stay
    uint8 when they arrived so.
    """

    def __init__(self, rounds: int, *, sampling: str = "batches") -> None:
        if sampling not in ("batches", "samples"):
            raise ValueError(f"sampling must be 'batches' or 'samples', got {sampling!r}")
        self.rounds = rounds
        self.sampling = sampling
        self._entries: list[tuple[Tensor, Tensor]] = []

    def add(self, images: Tensor, targets: Tensor) -> None:
        """Append one round's ``[b, B, C, H, W]`` images and ``[b, B, classes]`` targets."""
        self._entries.append((images, targets))
        del self._entries[: max(0, len(self._entries) - (self.rounds + 1))]

    def __len__(self) -> int:
        """The number of stored samples."""
        return sum(e[0].shape[0] * e[0].shape[1] for e in self._entries)

    def batches(self) -> tuple[Tensor, Tensor]:
        images = torch.cat([e[0] for e in self._entries])
        targets = torch.cat([e[1] for e in self._entries])
        return images, targets

    def samples(self) -> tuple[Tensor, Tensor]:
        """Every stored sample: images ``[N, C, H, W]`` and targets ``[N, classes]``."""
        images, targets = self.batches()
        return images.flatten(0, 1), targets.flatten(0, 1)

    def schedule(self, steps: int, *, rng: torch.Generator) -> tuple[Tensor, Tensor]:
        """The ``steps`` (images, targets) batches to train on this round.

        Without replay and with one batch per step this is the round's batches in order (the
        reference's fresh batch per step); otherwise stored batches are drawn uniformly with
        ``rng``, or, with ``sampling="samples"``, each batch's samples are drawn uniformly from
        every stored sample (so one batch mixes the rounds).
        """
        images, targets = self.batches()
        if self.rounds == 0 and len(images) == steps:
            return images, targets
        if self.sampling == "samples":
            flat_images, flat_targets = self.samples()
            index = torch.randint(len(flat_images), (steps, images.shape[1]), generator=rng)
            return flat_images[index], flat_targets[index]
        index = torch.randint(len(images), (steps,), generator=rng)
        return images[index], targets[index]

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "entries": [(i.clone(), t.clone()) for i, t in self._entries]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["rounds"]) != self.rounds:
            raise ValueError(f"replay buffer holds {state['rounds']} rounds, expected {self.rounds}")
        self._entries = [(i.clone(), t.clone()) for i, t in state["entries"]]


def fit_student(
    trainer: "StudentTrainer",
    images: Tensor,
    targets: Tensor,
    *,
    steps: int,
    chunk: int,
    batch_size: int,
    rng: torch.Generator,
    weights: Tensor | None = None,
    transform: Callable[[Tensor, int], Tensor] | None = None,
    mix: Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]] | None = None,
    after_chunk: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Train ``trainer``'s student for ``steps`` steps on a fixed labelled pool.

    ``images`` ``[N, C, H, W]`` (uint8 or float in [0, 1]) and ``targets`` ``[N, classes]``;
    each batch is ``batch_size`` samples drawn uniformly with replacement (or in proportion to
    ``weights``) with ``rng``. The steps go in chunks of ``chunk``, and chunk i of n runs at
    progress i/n, so the cosine learning rate and the self-paced pace span the fit as they span
    a run's rounds. ``transform(batches, i)`` (augmentation) sees each chunk's batches
    ``[chunk, B, C, H, W]`` before training, ``mix(images, targets, i)`` (MixUp, relabelling)
    then sees them as float images on the student's device with their targets and returns the
    pair to train on; ``after_chunk(i, n)`` runs after chunk i.
    Returns the last chunk's mean report.
    """
    if steps < 1 or chunk < 1:
        raise ValueError(f"steps and chunk must be >= 1, got {steps} and {chunk}")
    chunks = -(-steps // chunk)
    device = next(trainer.student.parameters()).device
    report: dict[str, float] = {}
    for i in range(chunks):
        size = min(chunk, steps - i * chunk)
        if weights is None:
            index = torch.randint(len(images), (size, batch_size), generator=rng)
        else:
            index = torch.multinomial(weights, size * batch_size, replacement=True, generator=rng)
            index = index.view(size, batch_size)
        batches = images[index]
        if transform is not None:
            batches = transform(batches, i)
        batch_images, batch_targets = as_float_images(batches).to(device), targets[index].to(device)
        if mix is not None:
            batch_images, batch_targets = mix(batch_images, batch_targets, i)
        report = trainer.train_round(batch_images, batch_targets, Progress.of_round(i, chunks))
        if after_chunk is not None:
            after_chunk(i, chunks)
    return report


def build_student_optimizer(student: Classifier, distill: DistillConfig) -> torch.optim.Optimizer:
    if distill.optimizer == "sgd":
        return torch.optim.SGD(
            student.parameters(), lr=distill.lr, momentum=distill.momentum,
            weight_decay=distill.weight_decay,
        )
    return torch.optim.Adam(student.parameters(), lr=distill.lr, weight_decay=distill.weight_decay)


class StudentTrainer:
    """Owns the student's optimizer and self-paced state; one call of :meth:`step` per batch."""

    def __init__(
        self,
        student: Classifier,
        distill: DistillConfig,
        curriculum: CurriculumConfig,
        method: MethodConfig,
        *,
        teacher_features: Callable[[Tensor], Tensor] | None = None,
        teacher_feature_dim: int | None = None,
        projection_seed: int = 0,
    ) -> None:
        """``teacher_features`` (with ``distill.feature_weight`` > 0): the teachers' penultimate
        features ``[B, teacher_feature_dim]`` of float images ``[B, C, H, W]``; the trainer then
        owns the map P (``nn.Linear``, initialised from ``projection_seed`` or at zero, as
        ``distill.feature_projection_init`` says), trained by the same
        optimizer (a second parameter group) and saved with :meth:`state_dict`."""
        self.student = student
        self.distill = distill
        self.relation_weight = float(method.relation_weight)
        self.relation_temperature = float(method.contrastive_temperature)
        self.optimizer = build_student_optimizer(student, distill)
        self.feature_weight = float(distill.feature_weight)
        self.teacher_features = teacher_features
        self.projection: torch.nn.Linear | None = None
        if self.feature_weight:
            if teacher_features is None or teacher_feature_dim is None:
                raise ValueError("distill.feature_weight needs the teachers' features: pass "
                                 "teacher_features and teacher_feature_dim")
            device = next(student.parameters()).device
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(projection_seed)
                self.projection = torch.nn.Linear(student.feature_dim, teacher_feature_dim)
            if distill.feature_projection_init == "zero":
                torch.nn.init.zeros_(self.projection.weight)
                torch.nn.init.zeros_(self.projection.bias)
            self.projection.to(device)
            self.optimizer.add_param_group({"params": list(self.projection.parameters())})
        # The averaged student (distill.student_ema > 0): updated after every step, never trained.
        self.ema: Classifier | None = None
        if distill.student_ema > 0:
            self.ema = copy.deepcopy(student).eval()
            self.ema.requires_grad_(False)
        self.weighting: SelfPacedWeighting | None = None
        if curriculum.enabled:
            self.weighting = SelfPacedWeighting(
                kind=curriculum.weighting,
                granularity=curriculum.granularity,
                pace=curriculum.pace,
                pace_start=curriculum.pace_start,
                pace_end=curriculum.pace_end,
                sharpness=curriculum.sharpness,
                history=curriculum.history,
            )

    def learning_rate(self, progress: Progress) -> float:
        if self.distill.lr_schedule == "cosine":
            return schedules.cosine(progress.fraction, base=self.distill.lr)
        return self.distill.lr

    def per_sample_loss(self, student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(ℓ_i, ℓ_KD,i, ℓ_rel,i), each ``[B]``; ℓ_rel is zero without a relation weight. Both terms
        see the targets' logits divided by ``distill.target_temperature``."""
        if self.distill.target_temperature != 1.0:
            teacher_logits = teacher_logits / self.distill.target_temperature
        kd = kd_per_sample(
            student_logits, teacher_logits,
            divergence=self.distill.divergence, temperature=self.distill.temperature,
        )
        if self.relation_weight:
            relation = relation_infonce_per_sample(
                teacher_logits, student_logits, temperature=self.relation_temperature
            )
        else:
            relation = torch.zeros_like(kd)
        return kd + self.relation_weight * relation, kd, relation

    def step(self, images: Tensor, teacher_logits: Tensor, progress: Progress) -> StudentStepReport:
        """One optimizer step of the student on ``images`` (in [0, 1]) against ``teacher_logits``."""
        lr = self.learning_rate(progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.student.train()
        if self.projection is not None:
            student_logits, student_features = self.student(images, return_features=True)
            with torch.no_grad():
                target_features = self.teacher_features(images)  # type: ignore[misc]
            hint = feature_hint_per_sample(self.projection(student_features), target_features)
        else:
            student_logits, hint = self.student(images), None
        losses, kd, relation = self.per_sample_loss(student_logits, teacher_logits.to(student_logits.dtype))
        if hint is not None:
            losses = losses + self.feature_weight * hint
        if self.weighting is not None:
            paced = self.weighting(losses.detach(), progress.fraction)
            loss = (paced.weights * losses).mean()
            mean_weight, admitted, pace = paced.mean_weight, paced.admitted_fraction, paced.pace
        else:
            loss = losses.mean()
            mean_weight, admitted, pace = 1.0, 1.0, float("nan")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.update_ema()
        return StudentStepReport(
            loss=float(loss.detach()),
            kd_loss=float(kd.detach().mean()),
            relation_loss=float(relation.detach().mean()),
            mean_weight=mean_weight,
            admitted_fraction=admitted,
            pace=pace,
            lr=lr,
            feature_loss=0.0 if hint is None else float(hint.detach().mean()),
        )

    @property
    def evaluated(self) -> Classifier:
        """The student that is evaluated and reported: the average when ``student_ema`` > 0."""
        return self.ema if self.ema is not None else self.student

    @torch.no_grad()
    def update_ema(self) -> None:
        """θ_ema ← d·θ_ema + (1 − d)·θ for the floating-point parameters and buffers (BatchNorm
        running statistics included); integer buffers (BN's step counter) are copied."""
        if self.ema is None:
            return
        decay = float(self.distill.student_ema)
        live = self.student.state_dict()
        for name, value in self.ema.state_dict().items():
            if value.is_floating_point():
                value.mul_(decay).add_(live[name].detach(), alpha=1.0 - decay)
            else:
                value.copy_(live[name])

    def train_round(self, images: Tensor, teacher_logits: Tensor, progress: Progress) -> dict[str, float]:
        """One step per batch of ``images`` ``[steps, B, C, H, W]`` (float in [0, 1]) with targets
        ``[steps, B, classes]``; returns the mean of every reported quantity."""
        reports = [self.step(x, t, progress) for x, t in zip(images, teacher_logits)]
        keys = asdict(reports[0]).keys()
        return {key: sum(getattr(r, key) for r in reports) / len(reports) for key in keys}

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "weighting": None if self.weighting is None else self.weighting.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "projection": None if self.projection is None else self.projection.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        projection = state.get("projection")  # absent before distill.feature_weight existed
        if (projection is None) != (self.projection is None):
            # Before the optimizer: its parameter groups would differ too, with a vaguer message.
            raise ValueError("the checkpoint's feature map (distill.feature_weight) does not match "
                             "this run's setting")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.weighting is not None and state["weighting"] is not None:
            self.weighting.load_state_dict(state["weighting"])
        ema = state.get("ema")  # absent in checkpoints written before the option existed
        if (ema is None) != (self.ema is None):
            raise ValueError("the checkpoint's averaged student (distill.student_ema) does not match "
                             "this run's setting")
        if self.ema is not None:
            self.ema.load_state_dict(ema)
        if self.projection is not None:
            self.projection.load_state_dict(projection)
