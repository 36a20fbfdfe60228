"""A plain data-free distillation loop, outside the framework's round machinery.

The yardstick for `fed-dfkd distill`: the same teacher, student, generator and loss functions,
but the loop written out in one page as the reference scripts have it (algorithms.md §1.3):
each iteration takes ``--g-steps`` Adam steps on G (train mode, fresh latents), then
``--s-steps`` student steps, each on a FRESH batch drawn from the just-updated G. Nothing is
quantised, replayed, checkpointed or labelled ahead of time. The budget is wall time
(``--seconds``), or a number of student steps under a cosine learning rate (``--cosine-steps``),
whichever ends first; evaluations count against the wall time. One seed, ``runtime.seed``.

    python bench/plain_loop.py --config configs/fmnist_tuned.yaml \
        --teacher runs/fmnist_probe/teachers/central.pt --seconds 300

With ``--pool`` the loop is DENSE / CMI's instead: every iteration re-initialises G (seeded by
the iteration), takes ``--g-steps`` steps, adds one batch to a pool that keeps every batch, and
the student's ``--s-steps`` steps draw their batches sample by sample from the whole pool,
labelled once by the teacher when they joined it. ``fresh``: G's steps draw fresh latents and
ask for the argmax (plus ``--w-bal``), and the pool's batch is a fresh draw; ``fixed``: G's
steps all fit one latent batch to balanced assigned classes, and that batch joins the pool;
``optimized``: the same, with the latents optimised next to G (as DENSE does). The framework's
``method.generator_reset`` / ``generator_latents`` / ``distill.replay_sampling`` do ``fixed``.

Prints one line per evaluation (elapsed seconds, iterations, student steps, test accuracy)
and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import torch

from fed_dfkd.augment import random_shift
from fed_dfkd.config import load_config
from fed_dfkd.coordinator import build_pseudo_generator, build_student
from fed_dfkd.samples import round_latents
from fed_dfkd.data.datasets import load_experiment_data
from fed_dfkd.data.teachers import evaluate_accuracy, load_teacher
from fed_dfkd.errors import UserError
from fed_dfkd.losses import (
    ADVERSARIAL_DIVERGENCES,
    BatchNormStatistics,
    adversarial_loss,
    class_balance_loss,
    kd_loss,
    one_hot_loss,
)


def _number(kind: type, low: float, *, strict: bool) -> Any:
    """An argparse type: a ``kind`` above ``low`` (or at least ``low`` when not ``strict``)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}, got {text}")
        return value
    return parse


POSITIVE_INT, COUNT = _number(int, 0, strict=True), _number(int, 0, strict=False)
POSITIVE, NON_NEGATIVE = _number(float, 0, strict=True), _number(float, 0, strict=False)


def _betas(text: str) -> tuple[float, float]:
    """Adam's betas as ``b1,b2``, each in [0, 1)."""
    try:
        betas = tuple(float(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers b1,b2; got {text!r}") from None
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise argparse.ArgumentTypeError(f"expected two numbers in [0, 1) as b1,b2; got {text!r}")
    return betas  # type: ignore[return-value]


def main() -> int:
    try:
        run()
    except UserError as error:  # a bad config, teacher file or dataset: one line, exit 2
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="experiment config (dataset, models, G size)")
    ap.add_argument("--teacher", required=True, help="a teacher .pt saved by fed-dfkd pretrain")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, as on every fed-dfkd command (e.g. models.student=lenet5)")
    ap.add_argument("--seconds", type=POSITIVE, default=300.0, help="wall-time budget")
    ap.add_argument("--eval-seconds", type=POSITIVE, default=30.0, help="evaluate this often")
    ap.add_argument("--batch", type=POSITIVE_INT, default=256)
    ap.add_argument("--g-steps", type=COUNT, default=1)
    ap.add_argument("--s-steps", type=POSITIVE_INT, default=5)
    ap.add_argument("--g-lr", type=POSITIVE, default=1e-3)
    ap.add_argument("--g-betas", type=_betas, default=(0.5, 0.999), help="G's Adam betas, b1,b2")
    ap.add_argument("--s-opt", choices=["adam", "sgd"], default="adam")
    ap.add_argument("--s-lr", type=POSITIVE, default=1e-3)
    ap.add_argument("--cosine-steps", type=COUNT, default=0,
                    help="cosine-anneal the student lr to 0 over this many student steps (0: constant)")
    ap.add_argument("--temperature", type=POSITIVE, default=1.0)
    ap.add_argument("--w-bn", type=NON_NEGATIVE, default=1.0)
    ap.add_argument("--w-oh", type=NON_NEGATIVE, default=1.0)
    ap.add_argument("--w-adv", type=NON_NEGATIVE, default=1.0)
    ap.add_argument("--w-bal", type=NON_NEGATIVE, default=0.0)
    ap.add_argument("--adv", default="kl", choices=sorted(ADVERSARIAL_DIVERGENCES),
                    help="adversarial divergence")
    ap.add_argument("--sample-mode", choices=["train", "eval"], default="train",
                    help="G's BatchNorm mode when drawing the student's batches")
    ap.add_argument("--g-jitter", type=COUNT, default=0,
                    help="in G's steps, shift G's images by up to this many pixels before the "
                         "teacher and student see them (DeepInversion's jitter)")
    ap.add_argument("--mixup", type=NON_NEGATIVE, default=0.0,
                    help="fraction of each student batch replaced by mixup pairs of G's samples, "
                         "labelled by the teacher like the rest")
    ap.add_argument("--pool", choices=["off", "fresh", "fixed", "optimized"], default="off",
                    help="DENSE / CMI synthesis: a fresh G per iteration and a pool of every "
                         "batch (see the module docstring)")
    ap.add_argument("--threads", type=POSITIVE_INT, default=1)
    args = ap.parse_args()
    if args.mixup > 1:
        ap.error(f"--mixup is a fraction of the batch, in [0, 1]; got {args.mixup:g}")
    if args.pool != "off" and (args.mixup or args.g_jitter or args.cosine_steps):
        ap.error("--pool takes none of --mixup, --g-jitter, --cosine-steps")

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    splits = load_experiment_data(cfg)
    teacher, _ = load_teacher(args.teacher)
    student = build_student(cfg, splits.info)
    generator = build_pseudo_generator(cfg, splits.info)
    opt_g = torch.optim.Adam(generator.parameters(), lr=args.g_lr, betas=args.g_betas)
    if args.s_opt == "adam":
        opt_s = torch.optim.Adam(student.parameters(), lr=args.s_lr)
    else:
        opt_s = torch.optim.SGD(student.parameters(), lr=args.s_lr, momentum=0.9, weight_decay=1e-4)
    # One seed, runtime.seed (--set runtime.seed=N): G's and S's initialisation as in the
    # framework, and this stream for the latents and the mixup pairs.
    rng = torch.Generator().manual_seed(cfg.runtime.seed)
    teacher_acc = evaluate_accuracy(teacher, splits.test_images, splits.test_labels, batch_size=1000)

    def draw() -> torch.Tensor:
        z = generator.sample_latent(args.batch, rng=rng)
        return generator(z, generator.sample_labels(args.batch, rng=rng))

    def generator_loss(x: torch.Tensor, assigned: torch.Tensor | None = None) -> torch.Tensor:
        """G's objective on its images x: BN prior, one-hot (to the argmax, or CE to the
        ``assigned`` classes), class balance and the adversarial term, with the --w-* weights."""
        with BatchNormStatistics(teacher, scale=cfg.method.bn_statistics_scale) as bn:
            t = teacher(x)
            loss = args.w_bn * bn.loss()
        if args.w_oh:
            loss = loss + args.w_oh * (one_hot_loss(t) if assigned is None
                                       else torch.nn.functional.cross_entropy(t, assigned))
        if args.w_bal:
            loss = loss + args.w_bal * class_balance_loss(t, temperature=1.0)
        if args.w_adv:
            loss = loss + args.w_adv * adversarial_loss(student(x), t, divergence=args.adv,
                                                        temperature=3.0)
        return loss

    pool_images: list[torch.Tensor] = []
    pool_targets: list[torch.Tensor] = []

    def pool_iteration(index: int) -> None:
        """--pool: a fresh G fitted for --g-steps, one batch into the pool, student steps on it."""
        nonlocal generator, student_steps
        generator = build_pseudo_generator(cfg, splits.info, reset_round=index)
        generator.train()
        student.eval()
        latent, assigned = round_latents(generator, seed=cfg.runtime.seed, round_index=index,
                                         batch_size=args.batch, num_classes=splits.info.num_classes)
        if args.pool == "optimized":
            latent.requires_grad_(True)
        params = list(generator.parameters()) + ([latent] if args.pool == "optimized" else [])
        opt = torch.optim.Adam(params, lr=args.g_lr, betas=args.g_betas)
        fresh = args.pool == "fresh"
        for _ in range(args.g_steps):
            x = draw() if fresh else generator(latent)
            loss = generator_loss(x, None if fresh else assigned)
            opt.zero_grad(set_to_none=True)
            loss.backward(inputs=params)
            opt.step()
        with torch.no_grad():  # train mode: the batch statistics G was fitted with
            x = draw() if fresh else generator(latent.detach())
            pool_images.append(x)
            pool_targets.append(teacher(x))
        images, targets = torch.cat(pool_images), torch.cat(pool_targets)
        student.train()
        for _ in range(args.s_steps):
            index_ = torch.randint(len(images), (args.batch,), generator=rng)
            s_loss = kd_loss(student(images[index_]), targets[index_], divergence="kl",
                             temperature=args.temperature)
            opt_s.zero_grad(set_to_none=True)
            s_loss.backward()
            opt_s.step()
            student_steps += 1

    start = time.perf_counter()
    next_eval = args.eval_seconds
    iterations = student_steps = 0
    history = []

    def stream_iteration() -> None:
        """The reference loop: --g-steps on G, then --s-steps on fresh batches of it."""
        nonlocal student_steps
        # -- generator phase: G.train, S.eval, T frozen --------------------------------------
        generator.train()
        student.eval()
        for _ in range(args.g_steps):
            x = draw()
            if args.g_jitter:
                x = random_shift(x, max_shift=args.g_jitter, generator=rng)
            loss = generator_loss(x)
            opt_g.zero_grad(set_to_none=True)
            loss.backward(inputs=list(generator.parameters()))
            opt_g.step()
        # -- student phase: each step on a fresh batch of the updated G ----------------------
        generator.train(args.sample_mode == "train")
        student.train()
        for _ in range(args.s_steps):
            if args.cosine_steps:
                frac = min(student_steps / args.cosine_steps, 1.0)
                for group in opt_s.param_groups:
                    group["lr"] = args.s_lr * 0.5 * (1 + math.cos(math.pi * frac))
            with torch.no_grad():
                x = draw()
                if args.mixup:
                    k = int(round(args.mixup * len(x)))
                    lam = torch.rand(k, 1, 1, 1, generator=rng)
                    x = torch.cat([x[k:], lam * x[:k] + (1 - lam) * x[torch.randperm(len(x), generator=rng)[:k]]])
                t = teacher(x)
            s_loss = kd_loss(student(x), t, divergence="kl", temperature=args.temperature)
            opt_s.zero_grad(set_to_none=True)
            s_loss.backward()
            opt_s.step()
            student_steps += 1

    while True:
        if args.pool != "off":
            pool_iteration(iterations)
        else:
            stream_iteration()
        iterations += 1
        elapsed = time.perf_counter() - start
        done = elapsed >= args.seconds or (args.cosine_steps and student_steps >= args.cosine_steps)
        if elapsed >= next_eval or done:
            student.eval()
            acc = evaluate_accuracy(student, splits.test_images, splits.test_labels, batch_size=1000)
            history.append({"seconds": round(elapsed, 1), "iterations": iterations,
                            "student_steps": student_steps, "accuracy": acc})
            print(f"{elapsed:7.1f}s it {iterations:5d} S steps {student_steps:6d} acc {acc:.4f} "
                  f"({acc / teacher_acc:.3f}x)", flush=True)
            next_eval += args.eval_seconds
        if done:
            break
    # A fingerprint of the student's weights: equal for two runs exactly when they trained alike.
    checksum = float(sum(p.detach().double().abs().sum() for p in student.parameters()))
    print(json.dumps({"args": vars(args), "teacher_accuracy": teacher_acc, "student_checksum": checksum,
                      "final_accuracy": history[-1]["accuracy"],
                      "best_accuracy": max(h["accuracy"] for h in history), "history": history}))


if __name__ == "__main__":
    sys.exit(main())
