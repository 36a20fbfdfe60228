"""The server-side state of a distillation run: G, S and the student's training.

Shared by the centralised reference (``fed_dfkd.centralized``) and the federated ServerApp, so
both run the same round (DESIGN.md §3): draw the round's pseudo-batches from G, have the
teachers label them, move G (by local steps or by aggregated client updates), then train S on
the labelled batches. Every random stream is derived from the config seed and the round index.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from fed_dfkd.augment import augment_batches, blend_pairs, mixup_batches
from fed_dfkd.config import DistillConfig, ExperimentConfig
from fed_dfkd.data import DatasetInfo
from fed_dfkd.distill import ReplayBuffer, StudentTrainer, fit_student
from fed_dfkd.hard_samples import perturb_towards_errors
from fed_dfkd.models import Generator, build_classifier, build_generator, to_memory_format
from fed_dfkd.models.normalized import NormalizedClassifier
from fed_dfkd.samples import as_float_images, draw_pseudo_batches, round_latents
from fed_dfkd.seeding import derive_seed, make_rng
from fed_dfkd.synthesis import Progress

logger = logging.getLogger(__name__)


def build_student(cfg: ExperimentConfig, info: DatasetInfo) -> NormalizedClassifier:
    torch.manual_seed(derive_seed(cfg.runtime.seed, "student-init"))
    net = build_classifier(
        cfg.models.student, num_classes=info.num_classes, in_channels=info.in_channels,
        image_size=info.image_size,
    )
    return NormalizedClassifier(to_memory_format(net, cfg.runtime.memory_format), info.mean, info.std)


def build_pseudo_generator(
    cfg: ExperimentConfig, info: DatasetInfo, *, reset_round: int | None = None
) -> Generator:
    """G at its seeded initialisation; with ``reset_round``, the re-initialisation of that
    round (``method.generator_reset``), from its own seed."""
    g = cfg.models.generator
    seed = cfg.runtime.seed
    torch.manual_seed(derive_seed(seed, "generator-init") if reset_round is None
                      else derive_seed(seed, "generator-reset", reset_round))
    return build_generator(
        g.arch, latent_dim=g.latent_dim, width=g.width, depth=g.depth,
        image_size=info.image_size, channels=info.in_channels, init=g.init,
        num_classes=info.num_classes if g.conditional else 0,
    )


def float_state(module: torch.nn.Module) -> dict[str, Tensor]:
    """The floating-point entries of a state dict (what a generator update carries)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def mix_and_relabel(
    images: Tensor,
    targets: Tensor,
    distill: DistillConfig,
    *,
    generator: torch.Generator,
    relabel: Callable[[Tensor], Tensor] | None,
) -> tuple[Tensor, Tensor]:
    """The student's float batches ``[steps, B, C, H, W]`` and targets ``[steps, B, K]`` after
    ``distill.mixup`` (:func:`~fed_dfkd.augment.mixup_batches`, from ``generator``) and, with
    ``distill.relabel_augmented``, with the targets replaced by ``relabel`` of the images (the
    aggregated teacher logits ``[N, K]`` of float images ``[N, C, H, W]``)."""
    if distill.mixup:
        images, targets = mixup_batches(images, targets, alpha=distill.mixup, generator=generator)
    if distill.relabel_augmented:
        if relabel is None:
            raise ValueError("distill.relabel_augmented needs the teachers: pass relabel")
        targets = relabel(images.flatten(0, 1)).view(*targets.shape[:2], -1).to(targets.dtype)
    return images, targets


def fit_fresh_student(
    cfg: ExperimentConfig,
    info: DatasetInfo,
    images: Tensor,
    targets: Tensor,
    *,
    steps: int,
    device: torch.device | str = "cpu",
    weights: Tensor | None = None,
    relabel: Callable[[Tensor], Tensor] | None = None,
    after_chunk: Callable[[StudentTrainer, int, int], None] | None = None,
    teacher_features: Callable[[Tensor], Tensor] | None = None,
    teacher_feature_dim: int | None = None,
) -> tuple[StudentTrainer, dict[str, float]]:
    """A fresh student (the run's seeded initialisation, its own optimizer, a cosine and
    self-paced pace over the fit) trained ``steps`` steps on a fixed pool with
    :func:`~fed_dfkd.distill.fit_student`, in chunks of ``student_steps``, with the run's
    augmentation settings and the seeded ``"final-fit"`` streams: the final fit of a run, and
    what ``bench/pool_retrain.py`` redoes. Returns the trainer (its ``student``) and the last
    chunk's report. ``distill.final_fit_target_temperature``, when set, replaces the targets'
    temperature for the fit. ``distill.mixup`` and ``distill.relabel_augmented`` (with
    ``relabel``, as in :meth:`Coordinator.train_student`) act on the fit's batches as on a
    round's, from the ``"final-fit-mixup"`` stream. ``teacher_features`` and
    ``teacher_feature_dim`` serve ``distill.feature_weight`` as in :class:`Coordinator`; the fit's
    map P starts from the run's seeded initialisation, like its student."""
    d, seed = cfg.distill, cfg.runtime.seed
    if d.final_fit_target_temperature is not None:
        d = dataclasses.replace(d, target_temperature=d.final_fit_target_temperature)
    trainer = StudentTrainer(build_student(cfg, info).to(device), d, cfg.curriculum, cfg.method,
                             teacher_features=teacher_features, teacher_feature_dim=teacher_feature_dim,
                             projection_seed=derive_seed(seed, "feature-projection"))
    augment = make_rng(seed, "final-fit-augment")

    def transform(batches: Tensor, _: int) -> Tensor:
        return augment_batches(batches, shift=d.augment_shift, flip=d.augment_flip, generator=augment)

    mixing = make_rng(seed, "final-fit-mixup")

    def mix(batches: Tensor, batch_targets: Tensor, _: int) -> tuple[Tensor, Tensor]:
        return mix_and_relabel(batches, batch_targets, d, generator=mixing, relabel=relabel)

    report = fit_student(
        trainer, images, targets, steps=steps, chunk=d.student_steps, batch_size=d.batch_size,
        rng=make_rng(seed, "final-fit"), weights=weights,
        transform=transform if d.augment_shift or d.augment_flip else None,
        mix=mix if d.mixup or d.relabel_augmented else None,
        after_chunk=None if after_chunk is None else lambda i, n: after_chunk(trainer, i, n))
    return trainer, report


class Coordinator:
    """G, S, the student's trainer and replay buffer, and the round clock."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        info: DatasetInfo,
        *,
        device: torch.device | str = "cpu",
        teacher_features: Callable[[Tensor], Tensor] | None = None,
        teacher_feature_dim: int | None = None,
    ) -> None:
        """``teacher_features`` and ``teacher_feature_dim`` (``distill.feature_weight``, only where
        the teachers are in this process): the teachers' penultimate features of float images, for
        the student's feature hint (:class:`~fed_dfkd.distill.StudentTrainer`)."""
        self.cfg, self.info, self.device = cfg, info, torch.device(device)
        self.student = build_student(cfg, info).to(self.device)
        self.generator = build_pseudo_generator(cfg, info).to(self.device)
        self.teacher_features, self.teacher_feature_dim = teacher_features, teacher_feature_dim
        self.trainer = StudentTrainer(self.student, cfg.distill, cfg.curriculum, cfg.method,
                                      teacher_features=teacher_features,
                                      teacher_feature_dim=teacher_feature_dim,
                                      projection_seed=derive_seed(cfg.runtime.seed, "feature-projection"))
        self.replay = ReplayBuffer(cfg.distill.replay_rounds, sampling=cfg.distill.replay_sampling)
        self.round = 0
        self.total_rounds = cfg.federation.rounds
        # The student the final fit replaced, until the round's evaluation takes it.
        self.pre_fit_student: NormalizedClassifier | None = None

    @property
    def finished(self) -> bool:
        return self.round >= self.total_rounds

    @property
    def evaluated_student(self) -> NormalizedClassifier:
        """The student to evaluate and report: the weight average with ``distill.student_ema``."""
        return self.trainer.evaluated  # type: ignore[return-value]

    @property
    def progress(self) -> Progress:
        return Progress.of_round(self.round, self.total_rounds)

    def draw_samples(self, generator: torch.nn.Module | None = None) -> Tensor:
        """This round's pseudo-batches ``[b, B, C, H, W]`` (uint8 when quantised), from G or from
        ``generator`` (a copy of G as the clients receive it), with the round's seeded stream."""
        d = self.cfg.distill
        generator = generator if generator is not None else self.generator
        latents = None
        if self.cfg.method.generator_latents == "round":
            # The batch G was fitted to in the last round, with the statistics it was fitted with.
            latents = self.latents(self.round)
        return draw_pseudo_batches(
            generator, num_batches=d.pseudo_batches or d.student_steps, batch_size=d.batch_size,
            rng=make_rng(self.cfg.runtime.seed, "pseudo-batches", self.round, device=self.device),
            quantize=d.quantize_samples,
            batch_statistics=d.sample_statistics == "batch" or latents is not None, latents=latents,
        )

    def latents(self, round_index: int) -> tuple[Tensor, Tensor]:
        """(Z, Y) of :func:`~fed_dfkd.samples.round_latents` for ``round_index``."""
        return round_latents(self.generator, seed=self.cfg.runtime.seed, round_index=round_index,
                             batch_size=self.cfg.distill.batch_size,
                             num_classes=self.info.num_classes, device=self.device)

    def step_latents(self) -> tuple[Tensor, Tensor] | None:
        """What this round's generator steps fit (next round's batch), or None (fresh latents)."""
        if self.cfg.method.generator_latents != "round":
            return None
        return self.latents(self.round + 1)

    @torch.no_grad()
    def reset_generator(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """``method.generator_reset``: G back to a fresh initialisation seeded by the round (its
        weights and BN running statistics), and ``optimizer``'s state (Adam's moments) cleared;
        with ``method.generator_reset_scope: input`` only G's input layer and its moments, except
        in the rounds after the first that ``method.generator_body_reset_every`` divides, which
        re-draw all of G."""
        fresh = build_pseudo_generator(self.cfg, self.info, reset_round=self.round)
        me = self.cfg.method
        whole = me.generator_reset_scope == "all" or (
            me.generator_body_reset_every > 0 and self.round > 0 and self.round % me.generator_body_reset_every == 0)
        target, source = (self.generator, fresh) if whole else (self.generator.project, fresh.project)
        target.load_state_dict(source.state_dict())
        if optimizer is not None:
            for parameter in target.parameters():
                optimizer.state.pop(parameter, None)

    @torch.no_grad()
    def apply_generator_update(self, delta: Mapping[str, Tensor]) -> None:
        """G ← G + ΔG on the floating-point entries (weights and BN running statistics)."""
        state = self.generator.state_dict()
        for name, value in delta.items():
            state[name].add_(value.to(state[name].device, state[name].dtype))

    def with_query_batches(self, samples: Tensor) -> Tensor:
        """The round's pseudo-batches ``samples`` followed by :meth:`hard_batches` and
        :meth:`mixup_query_batches` (unchanged when there are none): what the teachers label and
        the pool receives."""
        extra = [b for b in (self.hard_batches(), self.mixup_query_batches()) if b is not None]
        return torch.cat([samples, *(b.to(samples.device, samples.dtype) for b in extra)]) if extra else samples

    def mixup_query_batches(self) -> Tensor | None:
        """``distill.mixup_queries``: that many blends of random pairs of the replay buffer
        (:func:`~fed_dfkd.augment.blend_pairs`, λ ~ Beta(``mixup_query_alpha``, same), the round's
        ``"mixup-queries"`` stream) as ``[Q / B, B, C, H, W]`` batches in the buffer's dtype for the
        teachers to label with the round's samples. None when off or while the buffer is empty."""
        d = self.cfg.distill
        if not d.mixup_queries or not len(self.replay):
            return None
        images, _ = self.replay.samples()
        blends = blend_pairs(images, d.mixup_queries, alpha=d.mixup_query_alpha,
                             generator=make_rng(self.cfg.runtime.seed, "mixup-queries", self.round))
        return blends.view(d.mixup_queries // d.batch_size, d.batch_size, *blends.shape[1:])

    def hard_batches(self) -> Tensor | None:
        """``distill.hard_samples``: that many samples of the replay buffer, drawn without
        replacement (with, when it holds fewer) by the round's ``"hard-samples"`` stream and
        pushed towards the student's mistakes (:func:`~fed_dfkd.hard_samples.perturb_towards_errors`
        against their stored targets at ``distill.target_temperature``), as ``[H / B, B, C, H, W]``
        batches in the buffer's dtype for the teachers to label with the round's samples. None
        when off or while the buffer is empty (the first round)."""
        d = self.cfg.distill
        if not d.hard_samples or not len(self.replay):
            return None
        images, targets = self.replay.samples()
        rng = make_rng(self.cfg.runtime.seed, "hard-samples", self.round)
        index = (torch.randperm(len(images), generator=rng)[: d.hard_samples]
                 if len(images) >= d.hard_samples
                 else torch.randint(len(images), (d.hard_samples,), generator=rng))
        hard = perturb_towards_errors(
            self.student, images[index].to(self.device), targets[index].to(self.device),
            radius=d.hard_sample_radius, steps=d.hard_sample_steps,
            rng=make_rng(self.cfg.runtime.seed, "hard-sample-start", self.round, device=self.device),
            target_temperature=d.target_temperature)
        return hard.view(d.hard_samples // d.batch_size, d.batch_size, *hard.shape[1:])

    def train_student(
        self, samples: Tensor, targets: Tensor, *, relabel: Callable[[Tensor], Tensor] | None = None
    ) -> dict[str, float]:
        """Student steps on this round's labelled batches (and the replayed ones).

        ``relabel`` (``distill.relabel_augmented``): the aggregated teacher logits ``[N, K]`` of
        float images ``[N, C, H, W]``; the augmented batches get those instead of their stored
        targets. Only the centralised loop, which holds the teachers, can pass it.
        """
        steps, batch = samples.shape[:2]
        self.replay.add(samples, targets.view(steps, batch, -1))
        d, seed = self.cfg.distill, self.cfg.runtime.seed
        images, labels = self.replay.schedule(d.student_steps, rng=make_rng(seed, "replay", self.round))
        if d.augment_shift or d.augment_flip:
            images = augment_batches(
                images, shift=d.augment_shift, flip=d.augment_flip,
                generator=make_rng(seed, "student-augment", self.round),
            )
        images, labels = mix_and_relabel(
            as_float_images(images).to(self.device), labels.to(self.device), d,
            generator=make_rng(seed, "student-mixup", self.round), relabel=relabel)
        report = self.trainer.train_round(images, labels, self.progress)
        if d.final_fit_steps and self.round + 1 == self.total_rounds:
            report.update(self.final_fit(relabel=relabel))
        return report

    def final_fit(self, *, relabel: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """``distill.final_fit_steps``: the student is replaced by :func:`fit_fresh_student` on
        every sample of the replay buffer (the whole pool with a large ``replay_rounds``).

        It runs inside the last round, before that round's checkpoint, so an interrupted fit is
        redone with its round. ``bench/pool_retrain.py`` reproduces it from the checkpoint.
        """
        images, targets = self.replay.samples()
        steps, chunk = self.cfg.distill.final_fit_steps, self.cfg.distill.student_steps
        logger.info("final fit: a fresh student, %d steps on %d pooled samples", steps, len(images))
        started = time.monotonic()

        def log_progress(_: StudentTrainer, i: int, n: int) -> None:
            # About one line per tenth of the fit: it can take minutes after the last round.
            if (i + 1) % max(1, n // 10) == 0 or i + 1 == n:
                logger.info("final fit: %d/%d steps, %.0f s", min(steps, (i + 1) * chunk), steps,
                            time.monotonic() - started)

        trainer, report = fit_fresh_student(self.cfg, self.info, images, targets,
                                            steps=steps, device=self.device,
                                            relabel=relabel, teacher_features=self.teacher_features,
                                            teacher_feature_dim=self.teacher_feature_dim,
                                            after_chunk=log_progress)
        self.pre_fit_student = copy.deepcopy(self.evaluated_student)
        self.student.load_state_dict(trainer.student.state_dict())
        self.trainer.load_state_dict(trainer.state_dict())
        return {"final_fit_samples": float(len(images)), "final_fit_kd_loss": report["kd_loss"]}

    def end_round(self) -> None:
        self.round += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "generator": self.generator.state_dict(),
            "student": self.student.state_dict(),
            "trainer": self.trainer.state_dict(),
            "replay": self.replay.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.student.load_state_dict(state["student"])
        self.trainer.load_state_dict(state["trainer"])
        self.replay.load_state_dict(state["replay"])
        self.round = int(state["round"])


def round_metrics(
    round_index: int,
    progress: Progress,
    *,
    synthesis: Mapping[str, float] | None,
    student: Mapping[str, float],
    seconds: float,
) -> dict[str, Any]:
    """One metrics.jsonl record (before evaluation): every loss term by name."""
    metrics: dict[str, Any] = {"round": round_index + 1, "progress": progress.fraction}
    metrics.update(synthesis or {})
    metrics.update({
        "student_loss": student["loss"], "kd_loss": student["kd_loss"],
        "relation_loss": student["relation_loss"], "mean_weight": student["mean_weight"],
        "admitted_fraction": student["admitted_fraction"], "pace": student["pace"],
        "lr": student["lr"], "seconds": seconds,
    })
    if student.get("feature_loss"):  # distill.feature_weight: the hint ℓ_hint before its weight
        metrics["feature_loss"] = student["feature_loss"]
    metrics.update({k: v for k, v in student.items() if k.startswith("final_fit_")})
    return metrics


def synthesis_metrics(report: Any) -> dict[str, float]:
    """Flatten a SynthesisReport into ``generator_*`` / ``weight_*`` metrics."""
    out = {"generator_loss": report.loss}
    out.update({f"generator_{k}": v for k, v in report.terms.items()})
    out.update({f"weight_{k}": v for k, v in report.weights.items()})
    out.update(dict(report.extra))
    return out


def mean_metrics(reports: Sequence[Mapping[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in reports for k in r})
    return {k: sum(r[k] for r in reports if k in r) / sum(1 for r in reports if k in r) for k in keys}

