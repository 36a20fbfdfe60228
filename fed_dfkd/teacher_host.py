"""The client-side core: one data owner's private teacher answering rounds (DESIGN.md §3.4).

Given a :class:`~fed_dfkd.protocol.RoundInstruction` (G's and S's weights, the round's uint8
pseudo-batches and the round's spec) a host

* answers its teacher's logits on the pseudo-batches;
* in mode ``generator_and_logits``, loads G and S into local copies and runs the method's
  generator steps with its full teacher (BN prior, one-hot, balance, adversarial, R2M with its
  own negative bank), returning ΔG = G_after − G_before on G's floating-point entries;
* refuses (a typed :class:`~fed_dfkd.protocol.RefusalData`, never an exception) a request it
  cannot serve: another protocol version, another config, another input shape.

Its state across rounds (G's Adam moments, the method's negative bank and projection) is
explicit: :meth:`state_dict` / :meth:`load_state_dict`, kept by the ClientApp in
``Context.state``. No Flower here.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import torch

from fed_dfkd.config import ExperimentConfig
from fed_dfkd.coordinator import build_pseudo_generator, build_student, float_state
from fed_dfkd.data import DatasetInfo
from fed_dfkd.data.teachers import TeacherManifest
from fed_dfkd.models.normalized import NormalizedClassifier, freeze
from fed_dfkd.privacy.mechanisms import l2_norm
from fed_dfkd.protocol import (
    PROTOCOL_VERSION,
    ClientReportData,
    ClientUpdate,
    RefusalData,
    RoundInstruction,
)
from fed_dfkd.runtime import resume_key
from fed_dfkd.samples import dequantize_images
from fed_dfkd.seeding import make_rng
from fed_dfkd.synthesis import Progress, build_generator_optimizer, build_synthesizer


class TeacherHost:
    def __init__(
        self,
        cfg: ExperimentConfig,
        teacher: NormalizedClassifier,
        manifest: TeacherManifest,
        info: DatasetInfo,
        *,
        device: torch.device | str = "cpu",
    ) -> None:
        self.cfg, self.manifest, self.info = cfg, manifest, info
        self.device = torch.device(device)
        self.teacher = freeze(teacher.to(self.device))
        self.config_key = resume_key(cfg)
        # Local copies of G and S: overwritten by the server's weights every round; only G's
        # optimizer state and the method's state persist here.
        self.generator = build_pseudo_generator(cfg, info).to(self.device)
        self.student = build_student(cfg, info).to(self.device)
        self.generator_optimizer = build_generator_optimizer(self.generator, cfg.method)
        self.synthesizer = build_synthesizer(
            cfg.method, cfg.curriculum, batch_size=cfg.distill.batch_size,
            teacher_feature_dim=self.teacher.feature_dim,
            student_feature_dim=self.student.feature_dim,
            seed=cfg.runtime.seed,
        )

    @property
    def partition_id(self) -> int:
        return -1 if self.manifest.partition_id is None else int(self.manifest.partition_id)

    def check(self, instruction: RoundInstruction) -> RefusalData | None:
        """Why this host cannot serve ``instruction``, or None."""
        def refuse(reason: str, message: str) -> RefusalData:
            return RefusalData(round=instruction.round, reason=reason, message=message)

        if instruction.protocol_version != PROTOCOL_VERSION:
            return refuse("protocol_mismatch", f"client speaks protocol {PROTOCOL_VERSION}, "
                          f"server sent {instruction.protocol_version}")
        if instruction.config_hash and instruction.config_hash != self.config_key:
            return refuse("incompatible_manifest", "the server runs another experiment config "
                          f"({instruction.config_hash} != {self.config_key})")
        samples = instruction.samples
        expected = (self.info.in_channels, self.info.image_size, self.info.image_size)
        if samples.dtype != torch.uint8 or samples.dim() != 4 or tuple(samples.shape[1:]) != expected:
            return refuse("incompatible_manifest", f"samples must be uint8 [N, {expected[0]}, "
                          f"{expected[1]}, {expected[2]}], got {samples.dtype} {tuple(samples.shape)}")
        if instruction.mode == "generator_and_logits" and instruction.method != self.cfg.method.name:
            return refuse("bad_request", f"client runs method {self.cfg.method.name!r}, "
                          f"server asked for {instruction.method!r}")
        return None

    @torch.no_grad()
    def logits(self, samples: torch.Tensor) -> torch.Tensor:
        images = dequantize_images(samples).to(self.device)
        chunks = [self.teacher(images[i : i + 1024]) for i in range(0, len(images), 1024)]
        return torch.cat(chunks).float().cpu()

    def serve(self, instruction: RoundInstruction) -> ClientUpdate | RefusalData:
        refusal = self.check(instruction)
        if refusal is not None:
            return refusal
        started = time.perf_counter()
        logits = self.logits(instruction.samples)
        delta = None
        metrics: dict[str, float] = {}
        norm = 0.0
        if instruction.mode == "generator_and_logits":
            self.generator.load_state_dict(instruction.generator_state, strict=False)
            self.student.load_state_dict(instruction.student_state)
            before = float_state(self.generator)
            report = self.synthesizer.step(
                teacher=self.teacher, student=self.student, generator=self.generator,
                optimizer=self.generator_optimizer,
                progress=Progress(fraction=instruction.progress, round=instruction.round),
                rng=make_rng(instruction.seed, "generator-steps", instruction.round, device=self.device),
            )
            after = float_state(self.generator)
            delta = {k: (after[k] - before[k]).cpu() for k in before}
            norm = l2_norm(delta)
            metrics = {"generator_loss": report.loss, **{f"generator_{k}": v for k, v in report.terms.items()}}
        return ClientUpdate(
            generator_delta=delta,
            logits=logits,
            report=ClientReportData(
                round=instruction.round, partition_id=self.partition_id,
                train_size=int(self.manifest.train_size),
                class_histogram=tuple(int(c) for c in self.manifest.class_histogram),
                metrics=metrics, update_norm=norm, seconds=time.perf_counter() - started,
                teacher_hash=self.manifest.config_hash,
            ),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator_optimizer": self.generator_optimizer.state_dict(),
            "synthesizer": self.synthesizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.synthesizer.load_state_dict(state["synthesizer"])
