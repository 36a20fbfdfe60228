"""The server side of a federated round, without Flower (DESIGN.md §3).

:class:`FederatedServer` turns the :class:`~fed_dfkd.coordinator.Coordinator`'s state into one
:class:`~fed_dfkd.protocol.RoundInstruction` per round and completes the round from the valid
client updates: ΔG aggregated into G, logits aggregated into targets, student steps. In mode
``logits_only`` the clients only answer logits, and the server trains G itself from extra logit
queries sent with the round (:mod:`fed_dfkd.zeroth_order`). The ServerApp (``server/``) moves
the instruction and the replies over Flower; the in-process and Ray engines and real deployment
all run this same code.
"""

from __future__ import annotations

import math
import secrets
import time
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from fed_dfkd.aggregation import aggregate_logits
from fed_dfkd.config import ExperimentConfig
from fed_dfkd.coordinator import (
    Coordinator,
    build_pseudo_generator,
    float_state,
    mean_metrics,
    round_metrics,
)
from fed_dfkd.curriculum import schedules
from fed_dfkd.data import DatasetInfo
from fed_dfkd.privacy.client_level import (
    ClientLedger,
    ClientLevelPlan,
    clip_contribution,
    noise_contribution,
    plan_client_level,
    sampled_per_round,
)
from fed_dfkd.protocol import ClientUpdate, PrivacySpecData, RoundInstruction
from fed_dfkd.runtime import resume_key
from fed_dfkd.samples import draw_pseudo_batches, round_latents
from fed_dfkd.seeding import make_rng
from fed_dfkd.zeroth_order import ZerothOrderGeneratorTrainer, ZerothOrderQuery


def aggregate_updates(
    deltas: Sequence[Mapping[str, Tensor]], *, rule: str, weights: Sequence[float]
) -> dict[str, Tensor]:
    """Combine client generator updates entry by entry (``rule`` as in federation.update_aggregation)."""
    logits_rule = {"weighted_mean": "weighted", "mean": "mean", "median": "median",
                   "trimmed_mean": "trimmed_mean"}[rule]
    out = {}
    for name in deltas[0]:
        stacked = torch.stack([d[name].float() for d in deltas])
        flat = stacked.reshape(len(deltas), 1, -1)
        out[name] = aggregate_logits(flat, rule=logits_rule, weights=weights).reshape(stacked.shape[1:])
    return out


def _copy_state(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def teacher_weights(updates: Sequence[ClientUpdate]) -> list[list[float]] | list[float]:
    """Per-class counts [K, C] from the replies' class histograms, else train sizes [K]."""
    histograms = [list(u.report.class_histogram) for u in updates]
    if histograms and all(histograms) and len({len(h) for h in histograms}) == 1:
        return [[float(c) for c in h] for h in histograms]
    return [float(max(u.report.train_size, 1)) for u in updates]


def check_federation_settings(cfg: ExperimentConfig) -> None:
    """Refuse, with a :class:`~fed_dfkd.errors.UserError`, settings that only `fed-dfkd distill`
    can run. Called by :class:`FederatedServer` and, before any teacher is pretrained, by the
    commands that start a federation."""
    from fed_dfkd.errors import UserError

    if not cfg.distill.quantize_samples:
        raise UserError("distill.quantize_samples must be true for a federation: pseudo-samples "
                        "travel as uint8 so every party sees the same tensor")
    if cfg.distill.relabel_augmented:
        raise UserError("distill.relabel_augmented needs the teachers in the server's process: "
                        "only `fed-dfkd distill` has them (a federation's teachers answer once "
                        "per round, on the round's samples)")
    if cfg.distill.feature_weight:
        raise UserError("distill.feature_weight needs the teachers' penultimate features, which "
                        "stay with their owners (only logits cross the wire): only `fed-dfkd "
                        "distill` has them")
    if cfg.method.generator_reset and cfg.method.generator_reset_scope != "all":
        raise UserError("method.generator_reset_scope: input keeps G's body from round to round, "
                        "which the owners' fresh generators do not: only `fed-dfkd distill` has it")


class FederatedServer:
    def __init__(self, cfg: ExperimentConfig, info: DatasetInfo, *, device: torch.device | str = "cpu") -> None:
        check_federation_settings(cfg)
        self.cfg, self.info = cfg, info
        self.coordinator = Coordinator(cfg, info, device=device)
        self.config_key = resume_key(cfg)
        fe = cfg.federation
        # Mode logits_only: the server trains G itself from extra logit queries (zeroth order).
        self.zeroth_order: ZerothOrderGeneratorTrainer | None = None
        if fe.mode == "logits_only" and fe.zo_batch_size > 0 and cfg.method.generator_steps > 0:
            self.zeroth_order = ZerothOrderGeneratorTrainer(
                self.coordinator.generator, cfg.method, cfg.curriculum,
                batch_size=fe.zo_batch_size, num_directions=fe.zo_directions,
                smoothing=fe.zo_smoothing, seed=cfg.runtime.seed,
                adversarial_through_teacher=fe.zo_adversarial_through_teacher,
                quantize=cfg.distill.quantize_samples,
            )
        self._query: ZerothOrderQuery | None = None
        self.privacy = FederationPrivacy(cfg)
        self._wire: torch.nn.Module | None = None
        # federation.generators: per_owner: the fitted G of each owner that replied last round
        # (partition id -> full state), and a scratch G to draw from them.
        self.per_owner = fe.generators == "per_owner"
        self.owner_generators: dict[int, dict[str, Tensor]] = {}
        self._scratch: torch.nn.Module | None = None
        # Names this run for the owners' ledgers; kept in the checkpoint, so a resumed server is
        # the same run to them (its rounds are not charged twice).
        self.run_key = secrets.token_hex(8)

    @property
    def finished(self) -> bool:
        return self.coordinator.finished

    @property
    def round(self) -> int:
        return self.coordinator.round

    def plan_round(self) -> tuple[RoundInstruction, Tensor]:
        """The round's instruction and its pseudo-batches ``[b, B, C, H, W]``.

        In mode ``logits_only`` with generator training, the instruction's samples are the
        pseudo-batches (first, row for row) followed by the round's zeroth-order queries
        (:meth:`ZerothOrderGeneratorTrainer.plan`); :meth:`complete_round` splits the answers.
        """
        c, cfg = self.coordinator, self.cfg
        fe = cfg.federation
        if fe.sample_transport == "seed":
            # The clients regenerate the samples from G as they receive it (cast to the wire
            # dtype): draw from exactly that, so every party holds the same uint8 tensor.
            samples = c.draw_samples(self._wire_generator())
            wire_samples = samples.new_zeros((0, *samples.shape[2:]))
        else:
            samples = c.with_query_batches(
                self._draw_owner_samples() if self.owner_generators else c.draw_samples())
            wire_samples = samples.flatten(0, 1)
        if cfg.method.generator_reset:
            # After the draw (pixels transport: the samples travel as drawn), before G is sent:
            # the clients take this round's steps from the fresh G (and clear their optimizer).
            c.reset_generator()
        self._query = None
        if self.zeroth_order is not None:
            self._query = self.zeroth_order.plan(c.round)
            wire_samples = torch.cat([wire_samples, self._query.samples.to(wire_samples.device)])
        progress = c.progress
        cu = cfg.curriculum
        mode = fe.mode
        instruction = RoundInstruction(
            round=c.round, total_rounds=c.total_rounds, progress=progress.fraction, mode=mode,
            method=cfg.method.name, config_hash=self.config_key,
            generator_steps=cfg.method.generator_steps, batch_size=cfg.distill.batch_size,
            seed=cfg.runtime.seed,
            adversarial_weight=schedules.adversarial_weight(
                progress.fraction, initial=float(cfg.method.adversarial_weight),
                growth=cu.adversarial_growth, begin=cu.adversarial_begin, end=cu.adversarial_end),
            negative_window_start=schedules.negative_window_start(
                progress.fraction, width=cu.negative_window, begin=cu.negative_begin, end=cu.negative_end),
            update_dtype=fe.update_dtype, logit_dtype=fe.logit_dtype,
            privacy=self.privacy.spec,
            sample_transport=fe.sample_transport, run_key=self.run_key,
            sample_batches=int(samples.shape[0]) if fe.sample_transport == "seed" else 0,
            # Copies: complete_round changes the live weights in place. A reset G is not sent:
            # it is the round's seeded initialisation, which every owner builds itself.
            generator_state=(_copy_state(c.generator)
                             if mode == "generator_and_logits" and not cfg.method.generator_reset else {}),
            student_state=_copy_state(c.student) if mode == "generator_and_logits" else {},
            samples=wire_samples,
        )
        return instruction, samples

    def _draw_owner_samples(self) -> Tensor:
        """``[owners, B, C, H, W]``: each kept owner's G on the latents it was fitted to."""
        c, cfg = self.coordinator, self.cfg
        if self._scratch is None:
            self._scratch = build_pseudo_generator(cfg, self.info).to(c.device)
        batches = []
        for owner, state in sorted(self.owner_generators.items()):
            self._scratch.load_state_dict(state)
            latents = round_latents(self._scratch, seed=cfg.runtime.seed, round_index=c.round,
                                    batch_size=cfg.distill.batch_size,
                                    num_classes=self.info.num_classes, device=c.device, owner=owner)
            batches.append(draw_pseudo_batches(
                self._scratch, num_batches=1, batch_size=cfg.distill.batch_size,
                rng=make_rng(cfg.runtime.seed, "pseudo-batches", c.round, device=c.device),
                quantize=cfg.distill.quantize_samples, batch_statistics=True, latents=latents))
        return torch.cat(batches)

    @torch.no_grad()
    def _keep_owner_generators(self, updates: Sequence[ClientUpdate]) -> None:
        """Each replying owner's fitted G: the fresh G it was sent plus its ΔG."""
        base = self.coordinator.generator.state_dict()
        kept: dict[int, dict[str, Tensor]] = {}
        for update in updates:
            if update.generator_delta is None:
                continue
            state = {k: v.detach().clone() for k, v in base.items()}
            for name, value in update.generator_delta.items():
                state[name] += value.to(state[name].device, state[name].dtype)
            kept[update.report.partition_id] = state
        self.owner_generators = kept

    def _wire_generator(self) -> torch.nn.Module:
        """G as the clients load it: G itself in float32, else a copy cast to ``state_dtype``."""
        if self.cfg.federation.state_dtype == "float32":
            return self.coordinator.generator
        if self._wire is None:
            self._wire = build_pseudo_generator(self.cfg, self.info).to(self.coordinator.device)
        dtype = {"float32": torch.float32, "float16": torch.float16}[self.cfg.federation.state_dtype]
        state = {k: v.to(dtype) if v.is_floating_point() else v
                 for k, v in self.coordinator.generator.state_dict().items()}
        self._wire.load_state_dict(state)
        return self._wire

    def generator_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in float_state(self.coordinator.generator).items()}

    def complete_round(
        self, samples: Tensor, updates: Sequence[ClientUpdate], *, started: float | None = None
    ) -> dict[str, Any]:
        """Aggregate the valid ``updates`` and train the student; returns the round's metrics."""
        if not updates:
            raise ValueError("a round needs at least one update")
        c, cfg = self.coordinator, self.cfg
        r, progress = c.round, c.progress
        weights = [float(max(u.report.train_size, 1)) for u in updates]
        central = self.privacy.central_aggregate(updates, round_index=r)
        if cfg.federation.mode == "generator_and_logits":
            deltas = [u.generator_delta for u in updates if u.generator_delta is not None]
            if self.per_owner:
                self._keep_owner_generators(updates)
            elif central is not None and central[0] is not None:
                c.apply_generator_update(central[0])
            elif central is None and len(deltas) == len(updates):
                c.apply_generator_update(
                    aggregate_updates(deltas, rule=cfg.federation.update_aggregation, weights=weights))
        if central is not None:
            answers = central[1]
        else:
            logits = torch.stack([u.logits.float() for u in updates])
            # Every rule aggregates row by row, so the query rows can be split off afterwards.
            answers = aggregate_logits(logits, rule=cfg.distill.ensemble,
                                       weights=teacher_weights(updates))
        labelled = samples.shape[0] * samples.shape[1]
        targets = answers[:labelled]
        synthesis = mean_metrics([u.report.metrics for u in updates])
        if self.zeroth_order is not None:
            query = self._query
            if query is None or query.round != r:
                raise RuntimeError(f"round {r + 1}: complete_round needs this round's plan_round "
                                   "(its zeroth-order queries)")
            if answers.shape[0] != labelled + query.num_samples:
                raise ValueError(f"expected logits for {labelled} + {query.num_samples} samples, "
                                 f"got {answers.shape[0]}")
            # G moves before S, as in the other mode: the adversarial term sees the round's S.
            synthesis.update(self.zeroth_order.step(query, answers[labelled:], student=c.student,
                                                    progress=progress))
            self._query = None
        student = c.train_student(samples, targets)
        c.end_round()
        metrics = round_metrics(r, progress, synthesis=synthesis, student=student,
                                seconds=time.perf_counter() - started if started else 0.0)
        metrics.update(self.privacy.end_round(updates, round_index=r))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"coordinator": self.coordinator.state_dict(),
                                 "privacy": self.privacy.state_dict(), "run_key": self.run_key}
        if self.per_owner:
            state["owner_generators"] = {k: dict(v) for k, v in self.owner_generators.items()}
        if self.zeroth_order is not None:
            state["zeroth_order"] = self.zeroth_order.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.coordinator.load_state_dict(state["coordinator"])
        if "run_key" in state:
            self.run_key = str(state["run_key"])
        if "privacy" in state:
            self.privacy.load_state_dict(state["privacy"])
        elif self.privacy.level != "none" and self.coordinator.round:
            raise ValueError("the checkpoint has no privacy ledger; resuming would forget the "
                             "privacy already spent")
        if self.per_owner:
            if "owner_generators" not in state and self.coordinator.round:
                raise ValueError("the checkpoint has no per-owner generators, which "
                                 "federation.generators: per_owner needs to resume")
            self.owner_generators = {int(k): {n: t.to(self.coordinator.device) for n, t in v.items()}
                                     for k, v in dict(state.get("owner_generators", {})).items()}
        if self.zeroth_order is not None:
            if "zeroth_order" not in state:
                raise ValueError("the checkpoint has no zeroth-order generator state (G's server "
                                 "optimizer), which mode logits_only needs to resume")
            self.zeroth_order.load_state_dict(state["zeroth_order"])
        self._query = None


class FederationPrivacy:
    """The server's side of the privacy model (DESIGN.md §4) for one run.

    * ``record``: every teacher is DP-SGD-trained; the clients report their teachers' ε, the
      federation's is the worst client's.
    * ``client``/``central``: the server clips each reply (ΔG to C_g, logit rows to C_l), sums,
      adds Gaussian noise from a secret seed and divides by the m clients it samples; its
      accountant records (σ/√r, q = m/K) every completed round.
    * ``client``/``local``: the clients noise their own releases; the server keeps the ε each
      one reports, the federation's is the worst client's.

    ``per_client`` maps partition id to the last cumulative ε that owner reported (central: the
    federation's ε for every owner that took part).
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        pr = cfg.privacy
        self.level = pr.level
        self.delta = pr.delta
        self.accountant_name = pr.accountant
        self.plan: ClientLevelPlan | None = plan_client_level(cfg) if pr.level == "client" else None
        self.sampled = sampled_per_round(num_clients=cfg.federation.num_clients,
                                         sample_rate=cfg.federation.sample_rate)
        self.ledger: ClientLedger | None = None
        if self.plan is not None and self.plan.mechanism == "central":
            self.ledger = ClientLedger(accountant=pr.accountant, delta=pr.delta,
                                       epsilon_max=math.inf)
        # The central noise must be unpredictable to the clients, who see every new G and S.
        self.noise_seed = secrets.randbits(62) if self.ledger is not None else 0
        self.per_client: dict[int, float] = {}
        self.epsilon: float | None = None

    @property
    def mechanism(self) -> str | None:
        if self.level == "record":
            return "dp-sgd"
        return None if self.plan is None else self.plan.mechanism

    @property
    def spec(self) -> PrivacySpecData | None:
        return None if self.plan is None else self.plan.round_spec()

    def central_aggregate(
        self, updates: Sequence[ClientUpdate], *, round_index: int
    ) -> tuple[dict[str, Tensor] | None, Tensor] | None:
        """(ΔG, logits) = (Σ clipped + noise) / m in central mode; None otherwise."""
        plan = self.plan
        if plan is None or plan.mechanism != "central":
            return None
        delta_sum: dict[str, Tensor] | None = None
        logit_sum: Tensor | None = None
        with_delta = all(u.generator_delta is not None for u in updates)
        for update in updates:
            delta, logits = clip_contribution(
                update.generator_delta if with_delta else None, update.logits,
                generator_clip=plan.generator_clip, logit_clip=plan.logit_clip)
            logit_sum = logits if logit_sum is None else logit_sum + logits
            if delta is not None:
                delta_sum = delta if delta_sum is None else {k: delta_sum[k] + v for k, v in delta.items()}
        assert logit_sum is not None
        rng = make_rng(self.noise_seed, "central-dp-noise", round_index)
        delta_sum, logit_sum = noise_contribution(
            delta_sum, logit_sum, noise_multiplier=plan.noise_multiplier,
            generator_clip=plan.generator_clip, logit_clip=plan.logit_clip, rng=rng)
        # Divided by the planned m, not the number of replies: the count of who answered is
        # not released (dropped replies shrink the aggregate instead).
        scale = 1.0 / self.sampled
        mean_delta = None if delta_sum is None else {k: v * scale for k, v in delta_sum.items()}
        return mean_delta, logit_sum * scale

    def end_round(self, updates: Sequence[ClientUpdate], *, round_index: int) -> dict[str, Any]:
        """Account the completed round; the metrics it adds (``epsilon`` and ``delta``)."""
        if self.level == "none":
            return {}
        if self.ledger is not None and self.plan is not None:
            self.epsilon = self.ledger.spend_round(
                round_index, noise_multiplier=self.plan.accounted_noise,
                sample_rate=self.plan.sample_rate, every_round=True)
            # Every owner that ever took part is covered by the same (federation) ledger.
            owners = set(self.per_client) | {u.report.partition_id for u in updates}
            self.per_client = {owner: self.epsilon for owner in sorted(owners)}
        else:
            for update in updates:
                if update.report.epsilon is not None:
                    self.per_client[update.report.partition_id] = float(update.report.epsilon)
            self.epsilon = max(self.per_client.values()) if self.per_client else None
        return {"epsilon": self.epsilon, "delta": self.delta}

    def report(self) -> dict[str, Any]:
        """The report's privacy keys (issue 4): level, ε, δ, accountant, per-client ε."""
        if self.level == "none":
            return {"privacy_level": "none", "epsilon": None, "delta": None, "accountant": None,
                    "per_client_epsilon": {}}
        plan = self.plan
        return {
            "privacy_level": self.level, "privacy_mechanism": self.mechanism,
            "epsilon": self.epsilon, "delta": self.delta, "accountant": self.accountant_name,
            # JSON has no infinity: report.json writes ε = ∞ (σ = 0) as null, and says so here.
            "epsilon_infinite": self.epsilon is not None and math.isinf(self.epsilon),
            "per_client_epsilon": {str(k): v for k, v in sorted(self.per_client.items())},
            "noise_multiplier": None if plan is None else plan.noise_multiplier,
            "epsilon_max": None if plan is None or math.isinf(plan.epsilon_max) else plan.epsilon_max,
            "secure_rng": False,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "ledger": None if self.ledger is None else self.ledger.state_dict(),
            "noise_seed": self.noise_seed,
            "per_client": {int(k): float(v) for k, v in self.per_client.items()},
            "epsilon": self.epsilon,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.ledger is not None:
            if state.get("ledger") is None:
                raise ValueError("the checkpoint has no central privacy ledger")
            self.ledger.load_state_dict(state["ledger"])
        self.noise_seed = int(state["noise_seed"])
        self.per_client = {int(k): float(v) for k, v in dict(state["per_client"]).items()}
        self.epsilon = None if state.get("epsilon") is None else float(state["epsilon"])
