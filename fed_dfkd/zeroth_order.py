"""Generator training from teacher logits alone: zeroth-order gradient estimates (mode ``logits_only``).

In mode ``logits_only`` the teachers are black boxes that answer logits on the samples of a round
(DESIGN.md §3, last paragraph). The server trains G itself (algorithms.md §11 option C, DFME-style):

1. **Queries.** Draw a query batch x_i = G(z_i), i = 1..n (z from ``derive_seed(seed, "zo-latent",
   round)``; G in train mode, as a synthesis step runs it) and m random unit directions u_ij per
   sample (``"zo-directions"``: orthonormal frames, see :func:`sample_directions`). The wire
   carries x_i and x_i + h_ij with h_ij = μ·√d·u_ij, clamped to [0, 1] and quantised to uint8
   (μ is the RMS change per pixel, ``federation.zo_smoothing``; d = C·H·W).
2. **Estimate.** From the aggregated (ensemble) logits t̄ on those n·(1 + m) samples, the
   teacher-side objective F(x_1..x_n) (the method's one-hot and class-balance terms, optionally
   the adversarial term through the teacher) is evaluated once at x and once per (i, j) with
   only x_i moved (:func:`replace_one_values`; no extra query). The forward differences give

       ĝ_i = (d / r_i)·D_i⁺·[F(x + δ_ij e_i) − F(x)]_j ≈ ∂F/∂x_i

   (:func:`forward_difference_gradient`), where the rows of D_i are the **actual**
   displacements the teachers saw, δ_ij = dequantised(x_i + h_ij) − dequantised(x_i), not the
   nominal h_ij: clamping and the uint8 grid change them, and a finite difference is a slope
   only along the step actually taken. For orthogonal steps of one length this is DFME's
   (d/m)·Σ_j [(F_ij − F)/μ]·u_ij; for the skewed actual steps it is its least-squares form.
3. **Steps.** ``method.generator_steps`` server Adam steps on G (its own optimizer) with the
   surrogate Σ_i ⟨ĝ_i, G(z_i)⟩ (its gradient in x is ĝ), plus the exact server-side terms: the
   adversarial term through the student with the teacher logits detached (algorithms.md §12.4)
   and the total-variation prior.

Teacher internals are unavailable: the BN-statistics prior, DAFL's activation term and R2M's
feature anchor are dropped (a warning names them). Pure torch; randomness is passed in.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from fed_dfkd.config import CurriculumConfig, MethodConfig
from fed_dfkd.curriculum import schedules
from fed_dfkd.losses import adversarial_loss, class_balance_loss, one_hot_loss, total_variation
from fed_dfkd.models import Classifier, Generator
from fed_dfkd.samples import as_float_images, quantize_images
from fed_dfkd.seeding import make_rng
from fed_dfkd.synthesis import build_generator_optimizer
from fed_dfkd.synthesis.base import ADVERSARIAL_TEMPERATURE

logger = logging.getLogger(__name__)

__all__ = [
    "TEACHER_INTERNAL_TERMS",
    "ZerothOrderGeneratorTrainer",
    "ZerothOrderQuery",
    "forward_difference_gradient",
    "perturb",
    "replace_one_values",
    "sample_directions",
]

#: Generator terms that need more than a teacher's logits; a black-box round drops them.
TEACHER_INTERNAL_TERMS = ("bn_statistics_weight", "activation_weight", "r2m_weight")

# Variants (i, j) evaluated per vectorised call of the objective, bounded in elements so a
# large batch (B·m variants of a [B, C] logit matrix each) never holds B²·m·C floats at once.
_VARIANT_ELEMENTS = 1 << 22


def sample_directions(
    batch_size: int,
    num_directions: int,
    shape: tuple[int, ...],
    *,
    rng: torch.Generator,
    orthogonal: bool = True,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random unit directions ``[batch_size, num_directions, *shape]`` (unit L2 over ``shape``).

    ``orthogonal``: each sample's directions are the columns of Haar-random orthonormal frames
    (QR of a Gaussian matrix with the signs of R's diagonal; a new frame per d directions when
    m > d). Each direction is still uniform on the sphere (E[d·u uᵀ] = I, what makes DFME's
    estimate unbiased) and their span is a uniformly random subspace, as with independent
    directions; but a frame's steps are orthogonal and of one length, so the least-squares
    estimate of :func:`forward_difference_gradient` is well conditioned and equals DFME's sum.
    Otherwise independent Gaussian directions normalised to the sphere (DFME's draw). Draws on
    ``rng``'s device, then moves to ``device``.
    """
    if batch_size < 1 or num_directions < 1:
        raise ValueError(f"need batch_size >= 1 and num_directions >= 1, got {batch_size}, {num_directions}")
    dimension = math.prod(shape)
    if dimension < 1:
        raise ValueError(f"shape must have positive size, got {shape}")
    if not orthogonal:
        gaussian = torch.randn(batch_size, num_directions, dimension, generator=rng, device=rng.device)
        directions = gaussian / gaussian.norm(dim=-1, keepdim=True)
    else:
        frames = []
        remaining = num_directions
        while remaining > 0:
            width = min(remaining, dimension)
            gaussian = torch.randn(batch_size, dimension, width, generator=rng, device=rng.device)
            q, r = torch.linalg.qr(gaussian)
            signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
            signs = torch.where(signs == 0, torch.ones_like(signs), signs)
            frames.append((q * signs.unsqueeze(-2)).transpose(1, 2))
            remaining -= width
        directions = torch.cat(frames, dim=1)
    directions = directions.reshape(batch_size, num_directions, *shape)
    return directions if device is None else directions.to(device)


def perturb(images: Tensor, directions: Tensor, *, smoothing: float) -> tuple[Tensor, Tensor]:
    """The perturbed queries and the displacements the teachers will actually see.

    ``images`` ``[B, C, H, W]`` (uint8, or floats in [0, 1]); ``directions`` ``[B, m, C, H, W]``
    of unit L2 norm. Returns ``(perturbed, steps)``: ``perturbed`` = clamp(x + μ·√d·u, 0, 1)
    ``[B, m, C, H, W]`` in ``images``' dtype (quantised to uint8 when ``images`` is), and
    ``steps`` = float(perturbed) − float(x), the actual displacement δ (float32). ``smoothing``
    μ is the RMS change per pixel, so the nominal L2 radius is μ·√d.
    """
    if directions.dim() != images.dim() + 1 or directions.shape[0] != images.shape[0] or \
            directions.shape[2:] != images.shape[1:]:
        raise ValueError(f"directions {tuple(directions.shape)} do not fit images {tuple(images.shape)}")
    if not smoothing > 0:
        raise ValueError(f"smoothing must be > 0, got {smoothing}")
    base = as_float_images(images).float().unsqueeze(1)
    radius = smoothing * math.sqrt(images[0].numel())
    target = (base + radius * directions.to(base.dtype)).clamp(0.0, 1.0)
    if images.dtype == torch.uint8:
        perturbed = quantize_images(target)
        return perturbed, as_float_images(perturbed) - base
    return target, target - base


def forward_difference_gradient(base_values: Tensor, perturbed_values: Tensor, steps: Tensor) -> Tensor:
    """Forward-difference gradient estimate per sample, ``[B, *shape]``.

    With ``steps`` δ_ij ``[B, m, *shape]`` (D_i the m×d matrix of sample i's steps, d the size of
    ``shape``), ``perturbed_values`` f_ij ``[B, m]`` and ``base_values`` f_i (``[B]`` or a scalar):

        ĝ_i = (d / r_i)·D_i⁺·(f_i· − f_i),    r_i = rank(D_i),

    the least-squares gradient of a linear model fitted to the m forward differences, i.e. the
    gradient projected onto the span of the steps, scaled so that E[ĝ] = ∇f for a random span.
    When the steps are orthogonal with one length μ (DFME's unit directions, before clamping and
    quantisation) this is DFME's (d/m)·Σ_j [(f_ij − f_i)/μ]·u_ij. With the actual (clamped,
    quantised) steps it stays exact on a linear f, where the unit-sphere formula would mix the
    directions: for m = d independent steps it returns ∇f itself. Steps that clamping or
    rounding erased add nothing (they lower r_i). Singular values below the float tolerance of
    ``steps`` count as zero.
    """
    if steps.dim() < 3 or perturbed_values.shape != steps.shape[:2]:
        raise ValueError(f"perturbed_values {tuple(perturbed_values.shape)} must be the first two "
                         f"dimensions of steps {tuple(steps.shape)}")
    batch, count = steps.shape[:2]
    flat = steps.reshape(batch, count, -1)
    dimension = flat.shape[-1]
    # a scalar base value broadcasts too; float64 keeps the pseudo-inverse well within tolerance
    differences = (perturbed_values - base_values.reshape(-1, 1)).double()
    left, singular, right = torch.linalg.svd(flat.double(), full_matrices=False)
    tolerance = singular.amax(dim=1, keepdim=True) * max(count, dimension) * torch.finfo(steps.dtype).eps
    kept = singular > tolerance
    inverse = torch.where(kept, 1.0 / torch.where(kept, singular, torch.ones_like(singular)),
                          torch.zeros_like(singular))
    coefficients = inverse * torch.einsum("bmk,bm->bk", left, differences)
    projection = torch.einsum("bk,bkd->bd", coefficients, right)
    rank = kept.sum(dim=1).clamp_min(1).to(projection.dtype)
    estimate = projection * (dimension / rank).unsqueeze(1)
    return estimate.to(steps.dtype).reshape(batch, *steps.shape[2:])


def replace_one_values(
    objective: Callable[[Tensor], Tensor], base_logits: Tensor, perturbed_logits: Tensor
) -> tuple[Tensor, Tensor]:
    """A batch objective at the base logits, and with one row replaced at a time.

    ``objective`` maps ``[B, C]`` logits to a scalar (it must be ``torch.vmap``-able: the loss
    functions of :mod:`fed_dfkd.losses` are). Returns ``(F(t), values)`` where ``values[i, j]`` =
    F(t with row i replaced by ``perturbed_logits[i, j]``), ``[B, m]``: the objective after moving
    sample i alone, which a batch-level term such as class balance needs (its gradient in x_i
    depends on the other samples) and which costs no extra query.
    """
    if base_logits.dim() != 2 or perturbed_logits.dim() != 3 or perturbed_logits.shape[::2] != base_logits.shape:
        raise ValueError(f"need base [B, C] and perturbed [B, m, C] logits, got "
                         f"{tuple(base_logits.shape)} and {tuple(perturbed_logits.shape)}")
    batch, count, classes = perturbed_logits.shape
    flat = perturbed_logits.reshape(batch * count, classes)
    rows = torch.arange(batch, device=base_logits.device).repeat_interleave(count)
    chunk = max(1, _VARIANT_ELEMENTS // max(1, batch * classes))
    batched = torch.vmap(objective)
    values = []
    for start in range(0, batch * count, chunk):
        stop = min(start + chunk, batch * count)
        variants = base_logits.unsqueeze(0).repeat(stop - start, 1, 1)
        variants[torch.arange(stop - start, device=base_logits.device), rows[start:stop]] = flat[start:stop]
        values.append(batched(variants))
    return objective(base_logits), torch.cat(values).reshape(batch, count)


@contextlib.contextmanager
def _batch_statistics_kept(module: nn.Module) -> Iterator[None]:
    """Run ``module`` in train mode without changing its BN running statistics."""
    saved = {name: buffer.clone() for name, buffer in module.named_buffers()}
    was_training = module.training
    module.train()
    try:
        yield
    finally:
        module.train(was_training)
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                buffer.copy_(saved[name])


@dataclass(frozen=True, eq=False)
class ZerothOrderQuery:
    """One round's black-box query: what is sent and what the estimate needs back.

    ``samples`` ``[n·(1 + m), C, H, W]`` is what the teachers label: the n base samples x_i first,
    then sample i's m perturbations at rows n + i·m + j. ``steps`` ``[n, m, C, H, W]`` are the
    actual displacements δ_ij; ``latent`` (and ``labels`` for a conditional G) regenerate x.
    """

    round: int
    latent: Tensor
    labels: Tensor | None
    samples: Tensor
    steps: Tensor

    @property
    def batch_size(self) -> int:
        return int(self.steps.shape[0])

    @property
    def num_directions(self) -> int:
        return int(self.steps.shape[1])

    @property
    def num_samples(self) -> int:
        return int(self.samples.shape[0])


class ZerothOrderGeneratorTrainer:
    """The server's generator training in mode ``logits_only`` (module docstring).

    Owns G's server optimizer (Adam with the method's settings); :meth:`plan` makes a round's
    queries, :meth:`step` turns the teachers' aggregated answers into generator steps.
    """

    def __init__(
        self,
        generator: Generator,
        method: MethodConfig,
        curriculum: CurriculumConfig,
        *,
        batch_size: int,
        num_directions: int,
        smoothing: float,
        seed: int,
        adversarial_through_teacher: bool = False,
        quantize: bool = True,
    ) -> None:
        if batch_size < 1 or num_directions < 1 or not smoothing > 0:
            raise ValueError(f"need batch_size >= 1, num_directions >= 1 and smoothing > 0, got "
                             f"{batch_size}, {num_directions}, {smoothing}")
        self.generator, self.method, self.curriculum = generator, method, curriculum
        self.batch_size, self.num_directions, self.smoothing = batch_size, num_directions, smoothing
        self.seed, self.quantize = seed, quantize
        self.adversarial_through_teacher = adversarial_through_teacher
        self.optimizer = build_generator_optimizer(generator, method)
        dropped = [name for name in TEACHER_INTERNAL_TERMS if getattr(method, name, None)]
        if dropped:
            logger.warning("mode logits_only: the teachers are black boxes, so %s (teacher "
                           "internals) cannot be computed and are dropped", ", ".join(dropped))

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    def term_weights(self, progress: Any) -> dict[str, float]:
        """The weights of the terms a black-box round can compute, at progress p."""
        m, c = self.method, self.curriculum
        return {
            "one_hot": float(m.one_hot_weight or 0.0),
            "class_balance": float(m.class_balance_weight or 0.0),
            "adversarial": schedules.adversarial_weight(
                progress.fraction, initial=float(m.adversarial_weight or 0.0),
                growth=c.adversarial_growth, begin=c.adversarial_begin, end=c.adversarial_end),
            "total_variation": float(m.total_variation_weight or 0.0),
        }

    # -- queries --------------------------------------------------------------------------------

    @torch.no_grad()
    def plan(self, round_index: int) -> ZerothOrderQuery:
        """This round's query batch and its perturbations (no change to G, not even BN stats)."""
        g, device = self.generator, self.device
        rng = make_rng(self.seed, "zo-latent", round_index, device=device)
        latent = g.sample_latent(self.batch_size, rng=rng, device=device)
        labels = g.sample_labels(self.batch_size, rng=rng, device=device)
        with _batch_statistics_kept(g):
            images = g(latent, labels)
        base = quantize_images(images) if self.quantize else images.float()
        directions = sample_directions(
            self.batch_size, self.num_directions, tuple(base.shape[1:]),
            rng=make_rng(self.seed, "zo-directions", round_index, device=device), device=device)
        perturbed, steps = perturb(base, directions, smoothing=self.smoothing)
        samples = torch.cat([base, perturbed.flatten(0, 1)])
        return ZerothOrderQuery(round=round_index, latent=latent, labels=labels, samples=samples,
                                steps=steps)

    # -- the estimate and the steps -------------------------------------------------------------

    def teacher_objective(
        self, weights: Mapping[str, float], *, labels: Tensor | None, student_logits: Tensor | None
    ) -> Callable[[Tensor], Tensor]:
        """F(t): the weighted teacher-side terms of a batch of ensemble logits t ``[n, C]``."""
        temperature = float(self.method.class_balance_temperature or 1.0)
        divergence = str(self.method.adversarial_divergence or "kl")

        def objective(logits: Tensor) -> Tensor:
            value = logits.new_zeros(())
            if weights["one_hot"]:
                one_hot = (one_hot_loss(logits) if labels is None
                           else torch.nn.functional.cross_entropy(logits, labels))
                value = value + weights["one_hot"] * one_hot
            if weights["class_balance"]:
                value = value + weights["class_balance"] * class_balance_loss(logits, temperature=temperature)
            if student_logits is not None and weights["adversarial"]:
                value = value + weights["adversarial"] * adversarial_loss(
                    student_logits, logits, divergence=divergence, temperature=ADVERSARIAL_TEMPERATURE)
            return value

        return objective

    def step(
        self, query: ZerothOrderQuery, teacher_logits: Tensor, *, student: Classifier, progress: Any
    ) -> dict[str, float]:
        """Estimate ∂F/∂x from the aggregated logits on ``query.samples`` and step G.

        ``teacher_logits`` ``[n·(1 + m), C]`` are the aggregated answers, row for row. Returns the
        round's ``generator_*`` / ``weight_*`` / ``zo_*`` metrics (term values unweighted,
        ``generator_loss`` the weighted objective; the exact terms averaged over the steps).
        """
        n, m = query.batch_size, query.num_directions
        if teacher_logits.dim() != 2 or teacher_logits.shape[0] != query.num_samples:
            raise ValueError(f"expected [{query.num_samples}, classes] logits for the query, got "
                             f"{tuple(teacher_logits.shape)}")
        device = self.device
        logits = teacher_logits.detach().float().to(device)
        base_logits = logits[:n]
        perturbed_logits = logits[n:].reshape(n, m, -1)
        weights = self.term_weights(progress)
        divergence = str(self.method.adversarial_divergence or "kl")
        labels = None if query.labels is None else query.labels.to(device)
        modes = [(module, module.training) for module in (student, self.generator)]
        student.eval()
        metrics: dict[str, float] = {}
        try:
            student_logits = None
            if self.adversarial_through_teacher and weights["adversarial"]:
                with torch.no_grad():
                    # S is on the server: the teacher path of the adversarial term holds S(x_i)
                    # fixed and differentiates t(x_i) by finite differences.
                    student_logits = student(as_float_images(query.samples[:n]).to(device))
            objective = self.teacher_objective(weights, labels=labels, student_logits=student_logits)
            with torch.no_grad():
                base_value, values = replace_one_values(objective, base_logits, perturbed_logits)
                gradient = forward_difference_gradient(base_value, values, query.steps.to(device))
                metrics.update(self._teacher_terms(base_logits, weights, labels=labels,
                                                   student_logits=student_logits, divergence=divergence))
            exact = self._generator_steps(query, gradient, base_logits, weights, student=student,
                                          divergence=divergence, labels=labels)
        finally:
            for module, was_training in modes:
                module.train(was_training)
        metrics.update(exact)
        metrics["generator_loss"] = float(base_value) + sum(
            weights[name] * exact.get(f"generator_{name}", 0.0)
            for name in ("adversarial", "total_variation"))
        metrics.update({f"weight_{name}": value for name, value in weights.items()})
        metrics.update({
            "zo_query_samples": float(query.num_samples),
            "zo_gradient_norm": float(gradient.flatten(1).norm(dim=1).mean()),
            "zo_step_norm": float(query.steps.flatten(2).norm(dim=2).mean()),
        })
        return metrics

    def _teacher_terms(
        self, base_logits: Tensor, weights: Mapping[str, float], *, labels: Tensor | None,
        student_logits: Tensor | None, divergence: str,
    ) -> dict[str, float]:
        terms: dict[str, float] = {}
        if weights["one_hot"]:
            terms["generator_zo_one_hot"] = float(
                one_hot_loss(base_logits) if labels is None
                else torch.nn.functional.cross_entropy(base_logits, labels))
        if weights["class_balance"]:
            terms["generator_zo_class_balance"] = float(class_balance_loss(
                base_logits, temperature=float(self.method.class_balance_temperature or 1.0)))
        if student_logits is not None:
            terms["generator_zo_adversarial"] = float(adversarial_loss(
                student_logits, base_logits, divergence=divergence, temperature=ADVERSARIAL_TEMPERATURE))
        return terms

    def _generator_steps(
        self, query: ZerothOrderQuery, gradient: Tensor, base_logits: Tensor,
        weights: Mapping[str, float], *, student: Classifier, divergence: str, labels: Tensor | None,
    ) -> dict[str, float]:
        """``method.generator_steps`` Adam steps on Σ_i ⟨ĝ_i, G(z_i)⟩ + the exact server terms.

        One query set per round: the estimate ĝ is taken at the round's x and reused by every
        step, while the exact terms are recomputed on the current G(z).
        """
        g = self.generator
        g.train()
        parameters = [p for p in g.parameters() if p.requires_grad]
        latent = query.latent.to(self.device)
        target = base_logits.detach()
        steps = self.method.generator_steps
        totals = {"adversarial": 0.0, "total_variation": 0.0}
        for _ in range(steps):
            images = g(latent, labels)
            loss = (gradient.detach() * images).flatten(1).sum()
            if weights["adversarial"]:
                adversarial = adversarial_loss(student(images), target, divergence=divergence,
                                               temperature=ADVERSARIAL_TEMPERATURE)
                loss = loss + weights["adversarial"] * adversarial
                totals["adversarial"] += float(adversarial.detach())
            if weights["total_variation"]:
                variation = total_variation(images)
                loss = loss + weights["total_variation"] * variation
                totals["total_variation"] += float(variation.detach())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward(inputs=parameters)
            self.optimizer.step()
        return {f"generator_{name}": total / max(steps, 1) for name, total in totals.items() if weights[name]}

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"generator_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["generator_optimizer"])
