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

import math
import time
from typing import Any, Mapping

import torch

from fed_dfkd.config import ExperimentConfig
from fed_dfkd.coordinator import build_pseudo_generator, build_student, float_state
from fed_dfkd.data import DatasetInfo
from fed_dfkd.data.teachers import TeacherManifest
from fed_dfkd.errors import UserError
from fed_dfkd.models import to_memory_format
from fed_dfkd.models.normalized import NormalizedClassifier, freeze
from fed_dfkd.privacy.client_level import (
    ClientLevelPlan,
    OwnerLedger,
    clip_contribution,
    noise_contribution,
    plan_client_level,
)
from fed_dfkd.privacy.mechanisms import l2_norm
from fed_dfkd.protocol import (
    PROTOCOL_VERSION,
    ClientReportData,
    ClientUpdate,
    PrivacySpecData,
    RefusalData,
    RoundInstruction,
)
from fed_dfkd.runtime import resume_key
from fed_dfkd.samples import dequantize_images, draw_pseudo_batches, round_latents
from fed_dfkd.seeding import make_rng
from fed_dfkd.synthesis import Progress, build_generator_optimizer, build_synthesizer, teacher_class_prior


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
        self.teacher = freeze(to_memory_format(teacher.to(self.device), cfg.runtime.memory_format))
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
        if cfg.method.bn_statistics_per_class and not getattr(self.teacher, "class_feature_targets", None):
            raise UserError(f"teacher {manifest.name}: method.bn_statistics_per_class needs a teacher "
                            "with BatchNorm whose file holds per-class feature statistics; run `fed-dfkd "
                            "pretrain` with this config, which adds them")
        # The owner's own class mix, used here only (it never leaves in this form).
        self.class_prior = teacher_class_prior([manifest.class_histogram], cfg.method,
                                               device=self.device)
        self.class_counts = torch.tensor([float(c) for c in manifest.class_histogram],
                                         device=self.device)
        # Client-level DP: this owner's own plan (from its own config, never the server's word),
        # its ledger, and a secret seed for local noise (a seed the server knew would let it
        # subtract the noise).
        self.privacy_plan: ClientLevelPlan | None = None
        self.ledger: OwnerLedger | None = None
        if cfg.privacy.level == "client":
            self.privacy_plan = plan_client_level(cfg)
            self.ledger = OwnerLedger(accountant=cfg.privacy.accountant, delta=cfg.privacy.delta,
                                      epsilon_max=self.privacy_plan.epsilon_max)

    def expected_privacy(self) -> PrivacySpecData | None:
        """The round spec's privacy part this host accepts (None: no client-level mechanism)."""
        return None if self.privacy_plan is None else self.privacy_plan.round_spec()

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
        if (instruction.mode == "generator_and_logits" and not instruction.generator_state
                and not self.cfg.method.generator_reset):
            return refuse("bad_request", "the round sent no generator weights, and this owner "
                          "does not build a fresh G each round (method.generator_reset: false)")
        if instruction.mode == "generator_and_logits" and instruction.method != self.cfg.method.name:
            return refuse("bad_request", f"client runs method {self.cfg.method.name!r}, "
                          f"server asked for {instruction.method!r}")
        expected = self.expected_privacy()
        asked = instruction.privacy if instruction.privacy is not None and instruction.privacy.level != "none" else None
        if asked != expected:
            return refuse("bad_request", f"the round's privacy mechanism {asked} is not the one this "
                          f"owner agreed to ({expected})")
        return None

    def _budget_refusal(self, instruction: RoundInstruction) -> RefusalData | None:
        """A ``budget_exhausted`` refusal when serving would take ε past ε_max."""
        plan, ledger = self.privacy_plan, self.ledger
        if plan is None or ledger is None or math.isinf(plan.epsilon_max):
            return None
        after = ledger.epsilon_if(instruction.run_key, instruction.round,
                                  noise_multiplier=plan.accounted_noise,
                                  sample_rate=plan.sample_rate,
                                  every_round=plan.mechanism == "central")
        if after <= plan.epsilon_max:
            return None
        return RefusalData(
            round=instruction.round, reason="budget_exhausted",
            message=f"serving round {instruction.round + 1} would bring ε to {after:.4g} > ε_max "
                    f"{plan.epsilon_max:g} at δ = {plan.delta:g}",
            epsilon_spent=float(ledger.epsilon), epsilon_budget=float(plan.epsilon_max))

    def _release(self, instruction: RoundInstruction, delta: dict[str, torch.Tensor] | None,
                 logits: torch.Tensor) -> tuple[dict[str, torch.Tensor] | None, torch.Tensor, float | None]:
        """Apply this owner's mechanism to its round contribution; (ΔG, logits, cumulative ε)."""
        plan, ledger = self.privacy_plan, self.ledger
        if plan is None or ledger is None:
            record = (self.manifest.privacy or {}) if self.cfg.privacy.level == "record" else {}
            epsilon = record.get("epsilon")
            return delta, logits, None if epsilon is None else float(epsilon)
        if plan.mechanism == "local":
            delta, logits = clip_contribution(delta, logits, generator_clip=plan.generator_clip,
                                              logit_clip=plan.logit_clip)
            _, noise_seed = ledger.run(instruction.run_key)
            rng = make_rng(noise_seed, "local-dp-noise", instruction.round)
            delta, logits = noise_contribution(
                delta, logits, noise_multiplier=plan.noise_multiplier,
                generator_clip=plan.generator_clip, logit_clip=plan.logit_clip, rng=rng)
        # Central mode: the trusted server clips and noises; the owner keeps the same ledger.
        epsilon = ledger.spend_round(instruction.run_key, instruction.round,
                                     noise_multiplier=plan.accounted_noise,
                                     sample_rate=plan.sample_rate,
                                     every_round=plan.mechanism == "central")
        return delta, logits, epsilon

    @torch.no_grad()
    def logits(self, samples: torch.Tensor) -> torch.Tensor:
        images = dequantize_images(samples).to(self.device)
        chunks = [self.teacher(images[i : i + 1024]) for i in range(0, len(images), 1024)]
        return torch.cat(chunks).float().cpu()

    def _step_latents(self, instruction: RoundInstruction) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What this round's generator steps fit (the next round's batch), or None (fresh latents).

        With ``federation.generators: per_owner`` the batch is this owner's own, and with
        ``owner_labels: own`` its classes follow the owner's class histogram.
        """
        if self.cfg.method.generator_latents != "round":
            return None
        fe = self.cfg.federation
        per_owner = fe.generators == "per_owner"
        return round_latents(
            self.generator, seed=instruction.seed, round_index=instruction.round + 1,
            batch_size=instruction.batch_size, num_classes=self.info.num_classes, device=self.device,
            owner=self.partition_id if per_owner else None,
            class_counts=self.manifest.class_histogram if per_owner and fe.owner_labels == "own" else None,
        )

    def serve(self, instruction: RoundInstruction) -> ClientUpdate | RefusalData:
        # The budget is checked here, after the ClientApp loaded this owner's ledger.
        refusal = self.check(instruction) or self._budget_refusal(instruction)
        if refusal is not None:
            return refusal
        started = time.perf_counter()
        if instruction.sample_transport == "seed":
            # No pixels came: regenerate the round's samples from the G just received, with the
            # server's seeded stream (FederatedServer.plan_round draws the same ones).
            self.generator.load_state_dict(instruction.generator_state, strict=False)
            samples = draw_pseudo_batches(
                self.generator, num_batches=instruction.sample_batches,
                batch_size=instruction.batch_size,
                rng=make_rng(instruction.seed, "pseudo-batches", instruction.round, device=self.device),
                batch_statistics=self.cfg.distill.sample_statistics == "batch",
            ).flatten(0, 1)
        else:
            samples = instruction.samples
        logits = self.logits(samples)
        delta = None
        metrics: dict[str, float] = {}
        norm = 0.0
        if instruction.mode == "generator_and_logits":
            if self.cfg.method.generator_reset:
                # The round's fresh G is its seeded initialisation (the server sends none), and
                # Adam's moments of the last one go.
                fresh = build_pseudo_generator(self.cfg, self.info, reset_round=instruction.round)
                self.generator.load_state_dict(fresh.state_dict())
                self.generator_optimizer.state.clear()
            else:
                self.generator.load_state_dict(instruction.generator_state, strict=False)
            self.student.load_state_dict(instruction.student_state)
            before = float_state(self.generator)
            report = self.synthesizer.step(
                teacher=self.teacher, student=self.student, generator=self.generator,
                optimizer=self.generator_optimizer,
                progress=Progress(fraction=instruction.progress, round=instruction.round),
                rng=make_rng(instruction.seed, "generator-steps", instruction.round, device=self.device),
                latents=self._step_latents(instruction),
                class_prior=self.class_prior, class_counts=self.class_counts,
            )
            after = float_state(self.generator)
            delta = {k: (after[k] - before[k]).cpu() for k in before}
            metrics = {"generator_loss": report.loss, **{f"generator_{k}": v for k, v in report.terms.items()}}
        delta, logits, epsilon = self._release(instruction, delta, logits)
        norm = l2_norm(delta) if delta is not None else 0.0
        # Under client-level DP the histogram and the size are the owner's private data.
        private = self.privacy_plan is not None
        return ClientUpdate(
            generator_delta=delta,
            logits=logits,
            report=ClientReportData(
                round=instruction.round, partition_id=self.partition_id,
                train_size=0 if private else int(self.manifest.train_size),
                class_histogram=() if private else tuple(int(c) for c in self.manifest.class_histogram),
                metrics=metrics, update_norm=norm, seconds=time.perf_counter() - started,
                teacher_hash=self.manifest.config_hash,
                epsilon=epsilon, delta=None if epsilon is None else float(self.cfg.privacy.delta),
            ),
        )

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "generator_optimizer": self.generator_optimizer.state_dict(),
            "synthesizer": self.synthesizer.state_dict(),
        }
        # The privacy ledger is not part of it: the ClientApp keeps it in the owner's own file,
        # the one source of truth across rounds, runs and restarts (client/app.py).
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.synthesizer.load_state_dict(state["synthesizer"])
