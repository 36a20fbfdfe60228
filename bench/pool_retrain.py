"""Retrain a fresh student on the labelled pool a finished run left in its checkpoint.

The pool (``distill.replay_rounds`` with ``replay_sampling: samples``) holds every round's uint8
pseudo-samples and their ensemble targets. Training a new student on it, with the run's own
student settings unless changed here, separates what the student side does (temperature, steps,
sampling, filtering) from the synthesis, in minutes instead of a whole federation:

    python bench/pool_retrain.py --run runs/fed_po/a03_own --teachers runs/fmnist_probe/fed_a03/teachers \
        --temperature 1 --steps 2400

``--select agree`` keeps only the samples whose ensemble label is the class the owner's G was
asked for (a ``federation.generators: per_owner`` run in which every owner replied every round;
the classes are recomputed from each owner's manifest). ``--select balanced`` draws the
student's batches with weights inversely proportional to the count of their ensemble label. One line per 10 rounds: the test accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from fed_dfkd.config import load_config
from fed_dfkd.coordinator import build_pseudo_generator, build_student
from fed_dfkd.data import dataset_info
from fed_dfkd.data.datasets import load_experiment_data
from fed_dfkd.data.teachers import load_teacher
from fed_dfkd.distill import StudentTrainer
from fed_dfkd.samples import as_float_images, round_latents
from fed_dfkd.synthesis import Progress


def pool(run: Path, teachers: Path | None, select: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, targets) of the run's pool, filtered with ``select == "agree"``."""
    cfg = load_config(run / "config.resolved.yaml")
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    coordinator = state["server"]["coordinator"] if "server" in state else state["engine"]["coordinator"]
    images, targets = [], []
    owners = sorted(state["server"].get("owner_generators", {})) if "server" in state else []
    generator = build_pseudo_generator(cfg, dataset_info(cfg.data.dataset))
    manifests = {}
    for round_index, (batch_images, batch_targets) in enumerate(coordinator["replay"]["entries"]):
        for row in range(batch_images.shape[0]):
            keep = torch.ones(batch_images.shape[1], dtype=torch.bool)
            if select == "agree":
                if round_index == 0 or teachers is None:
                    continue  # round 0 is the untrained G's batch; nobody was asked for a class
                if len(owners) != batch_images.shape[0]:
                    raise SystemExit(f"--select agree: round {round_index + 1}'s pool entry has "
                                     f"{batch_images.shape[0]} batches, not one per kept owner "
                                     f"({len(owners)}); it needs a per-owner run in which every "
                                     "owner replied every round")
                owner = owners[row]
                if owner not in manifests:
                    manifests[owner] = load_teacher(teachers / f"client_{owner}.pt")[1]
                manifest = manifests[owner]
                _, asked = round_latents(
                    generator, seed=cfg.runtime.seed, round_index=round_index,
                    batch_size=cfg.distill.batch_size, num_classes=manifest.num_classes, owner=owner,
                    class_counts=manifest.class_histogram if cfg.federation.owner_labels == "own" else None)
                keep = batch_targets[row].argmax(1) == asked
            images.append(batch_images[row][keep])
            targets.append(batch_targets[row][keep])
    return torch.cat(images), torch.cat(targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--teachers", type=Path, help="the owners' teachers (for --select agree)")
    parser.add_argument("--select", choices=("all", "agree", "balanced"), default="all")
    parser.add_argument("--steps", type=int, default=2400, help="student steps in all")
    parser.add_argument("--temperature", type=float, help="KD temperature (default: the run's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    cfg = load_config(args.run / "config.resolved.yaml")
    if args.temperature is not None:
        cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, temperature=args.temperature))
    splits = load_experiment_data(cfg)
    images, targets = pool(args.run, args.teachers, args.select)
    labels = targets.argmax(1)
    print(f"pool {len(images)} samples, ensemble labels per class "
          f"{torch.bincount(labels, minlength=splits.info.num_classes).tolist()}", flush=True)
    weights = (1.0 / torch.bincount(labels, minlength=splits.info.num_classes).clamp(min=1).float())[labels]

    torch.manual_seed(args.seed)
    student = build_student(cfg, splits.info)
    trainer = StudentTrainer(student, cfg.distill, cfg.curriculum, cfg.method)
    batch, per_round = cfg.distill.batch_size, cfg.distill.student_steps
    rounds = max(1, args.steps // per_round)
    rng = torch.Generator().manual_seed(args.seed + 1)
    test = splits.test_images
    test = as_float_images(test) if test.dtype == torch.uint8 else test
    for r in range(rounds):
        if args.select == "balanced":
            index = torch.multinomial(weights, per_round * batch, replacement=True, generator=rng)
            index = index.view(per_round, batch)
        else:
            index = torch.randint(len(images), (per_round, batch), generator=rng)
        student.train()
        trainer.train_round(as_float_images(images[index]), targets[index], Progress.of_round(r, rounds))
        if (r + 1) % 10 == 0 or r + 1 == rounds:
            student.eval()
            with torch.no_grad():
                accuracy = float((student(test).argmax(1) == splits.test_labels).float().mean())
            print(f"round {r + 1}/{rounds} ({(r + 1) * per_round} steps): test accuracy {accuracy:.4f}",
                  flush=True)


if __name__ == "__main__":
    main()
