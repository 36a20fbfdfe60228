"""AdaDFKD (Li et al., Neural Networks 2024; algorithms.md §4).

CuDFKD's generator objective plus the Relationship Refinement Module (R2M): a MoCo-style
InfoNCE whose anchor is the teacher's feature of each pseudo-sample (with gradient to G), whose
positive is the student's (projected, detached) feature of the same sample, and whose negatives
are past student keys in a bank, restricted to a rank window that moves from easy to hard:
h(p) = (1 − k)·ramp(p) (§12.3). The student-side relation term is in ``fed_dfkd.distill``.

Deliberate deviation (§6.1, §12.2): when the student's and teacher's feature sizes differ, the
reference builds a fresh random ``Linear(d_s, d_t)`` on every call, so bank entries from
different steps live in different random spaces. The default here is one fixed projection,
seeded from the config seed and stored in the state (``projection: fixed_seeded``);
``fresh_random_reference`` reproduces the reference for faithfulness checks only.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from fed_dfkd.config import CurriculumConfig, MethodConfig
from fed_dfkd.curriculum import NegativeBank, schedules
from fed_dfkd.losses import r2m_infonce
from fed_dfkd.synthesis.base import SYNTHESIZERS, Progress, Synthesizer
from fed_dfkd.synthesis.cudfkd import CUDFKD_DEFAULTS


def random_projection(in_dim: int, out_dim: int, *, rng: torch.Generator) -> Tensor:
    """[in_dim, out_dim] matrix with PyTorch's Linear init scale U(−1/√in, 1/√in)."""
    bound = 1.0 / in_dim**0.5
    return (torch.rand(in_dim, out_dim, generator=rng) * 2 - 1) * bound


@SYNTHESIZERS.register("adadfkd")
class AdaDFKD(Synthesizer):
    name = "adadfkd"
    defaults = {**CUDFKD_DEFAULTS, "r2m_weight": 0.1, "relation_weight": 0.1}

    def __init__(self, method: MethodConfig, curriculum: CurriculumConfig, **kwargs: Any) -> None:
        super().__init__(method, curriculum, **kwargs)
        self._rng = torch.Generator().manual_seed(self.seed + 0x5EED)
        self.bank = NegativeBank(self.teacher_feature_dim, method.negative_bank_size, rng=self._rng)
        self.projection: Tensor | None = None
        if self.student_feature_dim != self.teacher_feature_dim:
            self.projection = random_projection(
                self.student_feature_dim, self.teacher_feature_dim, rng=self._rng
            )

    def term_weights(self, progress: Progress) -> dict[str, float]:
        weights = super().term_weights(progress)
        weights["r2m"] = float(self.method.r2m_weight)
        return weights

    def needs_student_features(self, weights: Mapping[str, float]) -> bool:
        return bool(weights["r2m"])

    def window_start(self, progress: Progress) -> float:
        c = self.curriculum
        return schedules.negative_window_start(
            progress.fraction, width=c.negative_window, begin=c.negative_begin, end=c.negative_end
        )

    def project(self, student_features: Tensor) -> Tensor:
        """P(f_s) into the teacher's feature space (identity when the sizes agree)."""
        if self.student_feature_dim == self.teacher_feature_dim:
            return student_features
        if self.method.projection == "fresh_random_reference":
            matrix = random_projection(self.student_feature_dim, self.teacher_feature_dim, rng=self._rng)
        else:
            matrix = self.projection
        return student_features @ matrix.to(student_features.device, student_features.dtype)

    def extra_terms(
        self, *, cache: Mapping[str, Tensor], progress: Progress, weights: Mapping[str, float]
    ) -> dict[str, Tensor]:
        if not weights["r2m"]:
            return {}
        keys = self.project(cache["student_features"]).detach()
        # Stash the keys for after_step: they are pushed only once G has stepped.
        cache["r2m_keys"] = keys  # type: ignore[index]
        loss = r2m_infonce(
            cache["teacher_features"],
            keys,
            self.bank.negatives.to(keys.device),
            window_start=self.window_start(progress),
            window_width=self.curriculum.negative_window,
            temperature=self.method.contrastive_temperature,
        )
        return {"r2m": loss}

    def after_step(self, cache: Mapping[str, Tensor]) -> None:
        keys = cache.get("r2m_keys")
        if keys is not None:
            self.bank.push(keys.cpu())

    def report_extra(self, progress: Progress) -> dict[str, float]:
        return {"negative_window_start": self.window_start(progress), "bank_filled": float(self.bank.filled)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "bank": self.bank.state_dict(),
            "projection": None if self.projection is None else self.projection.clone(),
            "rng": self._rng.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.bank.load_state_dict(state["bank"])
        if (state["projection"] is None) != (self.projection is None):
            raise ValueError("projection state does not match the feature sizes")
        if self.projection is not None:
            if state["projection"].shape != self.projection.shape:
                raise ValueError(
                    f"projection shape {tuple(state['projection'].shape)} does not match "
                    f"{tuple(self.projection.shape)}"
                )
            self.projection = state["projection"].clone()
        self._rng.set_state(state["rng"])
