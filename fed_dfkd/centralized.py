"""Centralised data-free distillation: the reference the federated run is checked against.

One round here is exactly one federated round with every teacher in one process
(DESIGN.md §3), in the same order, with the same random streams:

1. draw the round's pseudo-batches X from G (eval mode, uint8 when ``distill.quantize_samples``);
2. the teachers' logits on X, aggregated into targets (``distill.ensemble``);
3. ``method.generator_steps`` generator steps against the teacher(s) and the student as it was
   at the start of the round (what a client receives);
4. ``distill.student_steps`` student steps, one per pseudo-batch of X (or, with
   ``distill.replay_rounds``, on batches drawn from this and recent rounds' labelled X).

Progress p = completed rounds / ``federation.rounds`` drives every schedule. Several teachers
are combined by :class:`~fed_dfkd.models.normalized.TeacherEnsemble` for the generator terms.
No disk I/O here: the command saves :meth:`state_dict` and writes the outputs.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch

from fed_dfkd.aggregation import aggregate_logits
from fed_dfkd.config import ExperimentConfig
from fed_dfkd.data import DatasetInfo
from fed_dfkd.distill import ReplayBuffer, StudentTrainer
from fed_dfkd.models import Classifier, Generator, build_classifier, build_generator
from fed_dfkd.models.normalized import NormalizedClassifier, TeacherEnsemble, freeze
from fed_dfkd.samples import as_float_images, draw_pseudo_batches
from fed_dfkd.seeding import derive_seed, make_rng
from fed_dfkd.synthesis import Progress, build_generator_optimizer, build_synthesizer


def build_student(cfg: ExperimentConfig, info: DatasetInfo) -> NormalizedClassifier:
    torch.manual_seed(derive_seed(cfg.runtime.seed, "student-init"))
    net = build_classifier(
        cfg.models.student, num_classes=info.num_classes, in_channels=info.in_channels,
        image_size=info.image_size,
    )
    return NormalizedClassifier(net, info.mean, info.std)


def build_pseudo_generator(cfg: ExperimentConfig, info: DatasetInfo) -> Generator:
    g = cfg.models.generator
    torch.manual_seed(derive_seed(cfg.runtime.seed, "generator-init"))
    return build_generator(
        g.arch, latent_dim=g.latent_dim, width=g.width, depth=g.depth,
        image_size=info.image_size, channels=info.in_channels, init=g.init,
    )


class CentralDistillation:
    def __init__(
        self,
        cfg: ExperimentConfig,
        teachers: Sequence[Classifier],
        info: DatasetInfo,
        *,
        teacher_weights: Sequence[float] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.cfg, self.info, self.device = cfg, info, torch.device(device)
        self.teachers = [freeze(t.to(self.device)) for t in teachers]
        self.teacher: Classifier = (
            self.teachers[0] if len(self.teachers) == 1 else TeacherEnsemble(self.teachers)
        )
        self.teacher_weights = list(teacher_weights) if teacher_weights is not None else None
        self.student = build_student(cfg, info).to(self.device)
        self.generator = build_pseudo_generator(cfg, info).to(self.device)
        self.generator_optimizer = build_generator_optimizer(self.generator, cfg.method)
        self.synthesizer = build_synthesizer(
            cfg.method, cfg.curriculum, batch_size=cfg.distill.batch_size,
            teacher_feature_dim=self.teacher.feature_dim,
            student_feature_dim=self.student.feature_dim, seed=cfg.runtime.seed,
        )
        self.trainer = StudentTrainer(self.student, cfg.distill, cfg.curriculum, cfg.method)
        self.replay = ReplayBuffer(cfg.distill.replay_rounds)
        self.round = 0
        self.total_rounds = cfg.federation.rounds
        self.last_samples: torch.Tensor | None = None

    @property
    def finished(self) -> bool:
        return self.round >= self.total_rounds

    @torch.no_grad()
    def teacher_targets(self, images: torch.Tensor) -> torch.Tensor:
        """Aggregated teacher logits ``[N, C]`` for float images ``[N, C, H, W]``."""
        member_logits = torch.stack([t(images) for t in self.teachers])
        return aggregate_logits(member_logits, rule=self.cfg.distill.ensemble, weights=self.teacher_weights)

    def run_round(self) -> dict[str, Any]:
        """One round; returns its metrics (no evaluation: the caller decides when)."""
        if self.finished:
            raise RuntimeError("all rounds are done")
        cfg, r = self.cfg, self.round
        seed = cfg.runtime.seed
        progress = Progress.of_round(r, self.total_rounds)
        started = time.perf_counter()
        samples = draw_pseudo_batches(
            self.generator, num_batches=cfg.distill.pseudo_batches or cfg.distill.student_steps,
            batch_size=cfg.distill.batch_size,
            rng=make_rng(seed, "pseudo-batches", r, device=self.device),
            quantize=cfg.distill.quantize_samples,
        )
        images = as_float_images(samples)
        steps, batch = images.shape[:2]
        targets = self.teacher_targets(images.flatten(0, 1)).view(steps, batch, -1)
        synthesis = self.synthesizer.step(
            teacher=self.teacher, student=self.student, generator=self.generator,
            optimizer=self.generator_optimizer, progress=progress,
            rng=make_rng(seed, "generator-steps", r, device=self.device),
        )
        self.replay.add(samples, targets)
        replay_images, replay_targets = self.replay.schedule(
            cfg.distill.student_steps, rng=make_rng(seed, "replay", r)
        )
        student = self.trainer.train_round(as_float_images(replay_images), replay_targets, progress)
        self.last_samples = samples[0]
        self.round += 1
        metrics: dict[str, Any] = {
            "round": r + 1,
            "progress": progress.fraction,
            "generator_loss": synthesis.loss,
            **{f"generator_{name}": value for name, value in synthesis.terms.items()},
            **{f"weight_{name}": value for name, value in synthesis.weights.items()},
            **{name: value for name, value in synthesis.extra.items()},
            "student_loss": student["loss"],
            "kd_loss": student["kd_loss"],
            "relation_loss": student["relation_loss"],
            "mean_weight": student["mean_weight"],
            "admitted_fraction": student["admitted_fraction"],
            "pace": student["pace"],
            "lr": student["lr"],
            "seconds": time.perf_counter() - started,
        }
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "generator": self.generator.state_dict(),
            "generator_optimizer": self.generator_optimizer.state_dict(),
            "student": self.student.state_dict(),
            "trainer": self.trainer.state_dict(),
            "synthesizer": self.synthesizer.state_dict(),
            "replay": self.replay.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.student.load_state_dict(state["student"])
        self.trainer.load_state_dict(state["trainer"])
        self.synthesizer.load_state_dict(state["synthesizer"])
        self.replay.load_state_dict(state["replay"])
        self.round = int(state["round"])
