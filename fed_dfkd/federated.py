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

import time
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from fed_dfkd.aggregation import aggregate_logits
from fed_dfkd.config import ExperimentConfig
from fed_dfkd.coordinator import Coordinator, float_state, mean_metrics, round_metrics
from fed_dfkd.curriculum import schedules
from fed_dfkd.data import DatasetInfo
from fed_dfkd.protocol import ClientUpdate, RoundInstruction
from fed_dfkd.runtime import resume_key
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


class FederatedServer:
    def __init__(self, cfg: ExperimentConfig, info: DatasetInfo, *, device: torch.device | str = "cpu") -> None:
        if not cfg.distill.quantize_samples:
            from fed_dfkd.errors import UserError

            raise UserError("distill.quantize_samples must be true for a federation: pseudo-samples "
                            "travel as uint8 so every party sees the same tensor")
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
        samples = c.draw_samples()
        wire_samples = samples.flatten(0, 1)
        self._query = None
        if self.zeroth_order is not None:
            self._query = self.zeroth_order.plan(c.round)
            wire_samples = torch.cat([wire_samples, self._query.samples.to(wire_samples.device)])
        progress = c.progress
        cu, fe = cfg.curriculum, cfg.federation
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
            # Copies: complete_round changes the live weights in place.
            generator_state=_copy_state(c.generator) if mode == "generator_and_logits" else {},
            student_state=_copy_state(c.student) if mode == "generator_and_logits" else {},
            samples=wire_samples,
        )
        return instruction, samples

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
        if cfg.federation.mode == "generator_and_logits":
            deltas = [u.generator_delta for u in updates if u.generator_delta is not None]
            if len(deltas) == len(updates):
                c.apply_generator_update(
                    aggregate_updates(deltas, rule=cfg.federation.update_aggregation, weights=weights))
        logits = torch.stack([u.logits.float() for u in updates])
        # Every rule aggregates row by row, so the query rows can be split off afterwards.
        answers = aggregate_logits(logits, rule=cfg.distill.ensemble, weights=teacher_weights(updates))
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
        return round_metrics(r, progress, synthesis=synthesis, student=student,
                             seconds=time.perf_counter() - started if started else 0.0)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"coordinator": self.coordinator.state_dict()}
        if self.zeroth_order is not None:
            state["zeroth_order"] = self.zeroth_order.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.coordinator.load_state_dict(state["coordinator"])
        if self.zeroth_order is not None:
            if "zeroth_order" not in state:
                raise ValueError("the checkpoint has no zeroth-order generator state (G's server "
                                 "optimizer), which mode logits_only needs to resume")
            self.zeroth_order.load_state_dict(state["zeroth_order"])
        self._query = None
