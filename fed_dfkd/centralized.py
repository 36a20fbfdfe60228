"""Centralised data-free distillation: the reference the federated run is checked against.

One round here is one federated round (DESIGN.md §3) with every teacher in one process, in the
same order and with the same random streams (:class:`~fed_dfkd.coordinator.Coordinator`):

1. draw the round's pseudo-batches X from G (eval mode, uint8 when ``distill.quantize_samples``),
   with ``distill.hard_samples`` pooled samples pushed towards the student's mistakes and
   ``distill.mixup_queries`` blends of pooled pairs appended
   (:meth:`~fed_dfkd.coordinator.Coordinator.with_query_batches`);
2. the teachers' logits on X, aggregated into targets (``distill.ensemble``);
3. (``method.generator_reset``: G re-initialised, its optimizer state cleared;)
   ``method.generator_steps`` generator steps against the teacher(s) and the student as it was
   at the start of the round (what a client receives), directly on G;
4. ``distill.student_steps`` student steps on the labelled batches.

``teacher_weights`` are the teachers' sizes or class histograms (``distill.ensemble`` decides
which matters; see ``fed_dfkd.aggregation``). Several teachers are combined by :class:`~fed_dfkd.models.normalized.TeacherEnsemble` for the
generator terms (a joint objective; a federation instead averages per-client updates). No disk
I/O here: the command saves :meth:`state_dict` and writes the outputs.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch

from fed_dfkd.aggregation import aggregate_logits
from fed_dfkd.config import ExperimentConfig
from fed_dfkd.coordinator import Coordinator, round_metrics, synthesis_metrics
from fed_dfkd.data import DatasetInfo
from fed_dfkd.errors import UserError
from fed_dfkd.models import Classifier, to_memory_format
from fed_dfkd.models.normalized import TeacherEnsemble, freeze
from fed_dfkd.samples import as_float_images
from fed_dfkd.seeding import make_rng
from fed_dfkd.synthesis import build_generator_optimizer, build_synthesizer, teacher_class_prior


class CentralDistillation:
    def __init__(
        self,
        cfg: ExperimentConfig,
        teachers: Sequence[Classifier],
        info: DatasetInfo,
        *,
        teacher_weights: Sequence[float] | Sequence[Sequence[float]] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.cfg, self.info = cfg, info
        device = torch.device(device)
        self.teachers = [freeze(to_memory_format(t.to(device), cfg.runtime.memory_format)) for t in teachers]
        self.teacher: Classifier = (
            self.teachers[0] if len(self.teachers) == 1 else TeacherEnsemble(self.teachers)
        )
        self.coordinator = Coordinator(
            cfg, info, device=device,
            teacher_features=self.teacher_features if cfg.distill.feature_weight else None,
            teacher_feature_dim=self.teacher.feature_dim if cfg.distill.feature_weight else None)
        self.device = self.coordinator.device
        self.teacher_weights = list(teacher_weights) if teacher_weights is not None else None
        self.generator_optimizer = build_generator_optimizer(self.generator, cfg.method)
        self.synthesizer = build_synthesizer(
            cfg.method, cfg.curriculum, batch_size=cfg.distill.batch_size,
            teacher_feature_dim=self.teacher.feature_dim,
            student_feature_dim=self.student.feature_dim, seed=cfg.runtime.seed,
        )
        # What the teachers' class histograms steer in G's objective (their sum: the data of
        # several teachers together).
        m = cfg.method
        self.class_prior = None
        self.class_counts = None
        if m.class_balance_prior != "uniform" or m.one_hot_prior_adjustment:
            histograms = self.teacher_weights
            if histograms is None or not all(isinstance(row, Sequence) for row in histograms):
                raise ValueError("method.class_balance_prior: teacher and method.one_hot_prior_adjustment "
                                 "need the teachers' class histograms as teacher_weights")
            if m.class_balance_prior != "uniform":
                self.class_prior = teacher_class_prior(
                    histograms, m, device=self.device  # type: ignore[arg-type]
                )
            if m.one_hot_prior_adjustment:
                self.class_counts = torch.tensor(
                    [[float(c) for c in row] for row in histograms], device=self.device  # type: ignore[union-attr]
                ).sum(dim=0)
        if m.bn_statistics_per_class and not getattr(self.teacher, "class_feature_targets", None):
            raise UserError("method.bn_statistics_per_class needs one teacher with BatchNorm whose file "
                            "holds per-class feature statistics (`fed-dfkd pretrain` with this config "
                            "writes them; an ensemble of client teachers has none: use "
                            "distill.teacher_source: central)")
        self.last_samples: torch.Tensor | None = None

    @property
    def student(self) -> Classifier:
        return self.coordinator.student

    @property
    def generator(self) -> torch.nn.Module:
        return self.coordinator.generator

    @property
    def round(self) -> int:
        return self.coordinator.round

    @property
    def finished(self) -> bool:
        return self.coordinator.finished

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        """The teachers' penultimate features ``[N, D]`` of float images (concatenated over several
        teachers): what ``distill.feature_weight``'s hint regresses."""
        return self.teacher(images, return_features=True)[1]

    @torch.no_grad()
    def teacher_targets(self, images: torch.Tensor) -> torch.Tensor:
        """Aggregated teacher logits ``[N, C]`` for float images ``[N, C, H, W]``."""
        member_logits = torch.stack([t(images) for t in self.teachers])
        return aggregate_logits(member_logits, rule=self.cfg.distill.ensemble, weights=self.teacher_weights)

    def run_round(self) -> dict[str, Any]:
        """One round; returns its metrics (no evaluation: the caller decides when)."""
        if self.finished:
            raise RuntimeError("all rounds are done")
        c, r = self.coordinator, self.coordinator.round
        progress = c.progress
        started = time.perf_counter()
        samples = c.with_query_batches(c.draw_samples())
        targets = self.teacher_targets(as_float_images(samples).flatten(0, 1))
        if self.cfg.method.generator_reset:  # after the draw: this round's samples are labelled
            c.reset_generator(self.generator_optimizer)
        synthesis = self.synthesizer.step(
            teacher=self.teacher, student=self.student, generator=self.generator,
            optimizer=self.generator_optimizer, progress=progress,
            rng=make_rng(self.cfg.runtime.seed, "generator-steps", r, device=self.device),
            latents=c.step_latents(), class_prior=self.class_prior, class_counts=self.class_counts,
        )
        student = c.train_student(samples, targets, relabel=self.teacher_targets)
        c.end_round()
        self.last_samples = samples[0]
        return round_metrics(r, progress, synthesis=synthesis_metrics(synthesis), student=student,
                             seconds=time.perf_counter() - started)

    def state_dict(self) -> dict[str, Any]:
        return {
            "coordinator": self.coordinator.state_dict(),
            "generator_optimizer": self.generator_optimizer.state_dict(),
            "synthesizer": self.synthesizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.coordinator.load_state_dict(state["coordinator"])
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.synthesizer.load_state_dict(state["synthesizer"])
